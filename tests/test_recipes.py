"""The seed recipes of ``featurelt finetune --recipe`` (featurelt/finetune/recipes): each one's defining property.

sam-fusion (METHODS.md section 2): zero-initialised fusion = plain ResNet exactly; the map follows the
crop and the flip of the image (checked against a map computed from the image itself); the fused stage
is ``Conv1x1(F_norm) * F + F``. auxiliary (section 3): ns-ce with lambda_s = 1 makes the same SGD step as
balanced softmax; the plan keeps the auxiliary caps and never reads split ``filtered``. ltgc-lora (section
4): BalanceMix pairs original x passed generated rows only, one lambda per pair on pixels and labels.
lfm-stage1 (section 6): pixel mixup with the label shift. ecvl-stage1 (section 5): M_i = 0 leaves images
alone, the momentum state follows the formulas.
"""
from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from featurelt.finetune.recipes import RECIPES
from featurelt.finetune.recipes.ecvl_stage1 import MomentumState, momentum_randaugment
from featurelt.finetune.recipes.sam_fusion import MapFusion, attach_map_fusion, crop_maps, map_boxes, normalise_maps
from featurelt.losses import BalancedSoftmax, LossContext, NeighborSilencedCE
from featurelt.samplers import momentum_strength
from featurelt.store import Store

from test_train import build_digits_store


@pytest.mark.parametrize("name", RECIPES.names())
def test_every_recipe_builds_its_hooks(name):
    recipe = RECIPES.get(name)
    hooks = recipe.build_hooks()
    assert recipe.defaults and recipe.stage2 and RECIPES.help(name)
    for attr in ("configure", "wrap_model", "train_plan", "make_batch", "loss", "after_step"):
        assert callable(getattr(hooks, attr))
    with pytest.raises(TypeError, match=f"recipe '{name}'"):
        recipe.build_hooks(no_such_option=1)


# ----------------------------------------------------------------------------------------- sam-fusion

def _resnet():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=5).eval()


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_zero_init_fusion_is_the_plain_network_exactly(stage):
    plain = _resnet()
    fused = _resnet()
    fusion = attach_map_fusion(fused, stage)
    x = torch.randn(3, 3, 32, 32)
    maps = torch.randn(3, 64)  # map_size 8
    fusion.set_batch(maps, torch.tensor([[0, 0, 32, 32]] * 3), torch.tensor([[32, 32]] * 3), torch.tensor([False, True, False]))
    with torch.no_grad():
        assert torch.equal(fused(x), plain(x))
        fusion.conv.weight.fill_(0.5)  # a non-zero conv changes the output: the hook is really on the stage
        fusion.conv.bias.fill_(0.1)  # (stage 4 is 1x1 at 32 px: its normalised map is 0, only the bias acts)
        assert not torch.allclose(fused(x), plain(x))
    seen = []
    fused.get_submodule(f"layer{stage}").register_forward_hook(lambda _m, _i, out: seen.append(out.shape[1]))
    with torch.no_grad():
        fused(x)
    assert fused.sam_fusion is fusion and fusion.conv.out_channels == seen[0]


def test_fused_stage_is_conv_of_normalised_map_times_feature_plus_feature():
    fusion = MapFusion(4)
    with torch.no_grad():
        fusion.conv.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]).view(4, 1, 1, 1))
        fusion.conv.bias.copy_(torch.tensor([0.1, 0.0, -0.3, 0.2]))
    m = torch.arange(16.0).view(1, 16)  # 4x4 map of a 4x4 image, whole frame, 4x4 stage
    fusion.set_batch(m, torch.tensor([[0, 0, 4, 4]]), torch.tensor([[4, 4]]), torch.tensor([False]))
    feat = torch.randn(1, 4, 4, 4)
    out = fusion(feat)
    g = m.view(4, 4)
    norm = (g - g.mean()) / (g.std(unbiased=False) + 1e-6)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    b = torch.tensor([0.1, 0.0, -0.3, 0.2])
    expect = (w[:, None, None] * norm + b[:, None, None]) * feat[0] + feat[0]
    torch.testing.assert_close(out[0], expect)


def _sam_like_map(image: torch.Tensor, map_size: int) -> torch.Tensor:
    """A stand-in for SAM's map: the image's mean over channels on SAM's padded square, pooled to map_size."""
    h, w = image.shape[-2:]
    side = max(h, w)
    square = torch.zeros(side, side)
    square[:h, :w] = image.mean(0)
    return F.avg_pool2d(square[None, None], side // map_size)[0, 0]


def test_map_follows_crop_and_flip_of_the_image():
    torch.manual_seed(1)
    image = torch.rand(3, 16, 32)                 # H 16, W 32: SAM pads the bottom half of its square
    m = _sam_like_map(image, 8)                   # 8x8 map, scale 8 / 32 = 1/4 cells per pixel
    assert torch.equal(m[4:], torch.zeros(4, 8))  # padding rows
    size = torch.tensor([[32.0, 16.0]])
    box = torch.tensor([[8.0, 0.0, 24.0, 16.0]])  # a crop of the image: x 8..24, all rows
    torch.testing.assert_close(map_boxes(box, size, 8), torch.tensor([[2.0, 0.0, 6.0, 4.0]]))
    crop = image[:, 0:16, 8:24]
    crop_map = F.avg_pool2d(crop.mean(0)[None, None], 4)[0]  # the map the crop itself would have: [1, 4, 4]
    got = crop_maps(m.view(1, 64), box, size, torch.tensor([False]), (4, 4))[0]
    torch.testing.assert_close(got, crop_map)                # a crop of the image gets the same crop of the map
    got_flip = crop_maps(m.view(1, 64), box, size, torch.tensor([True]), (4, 4))[0]
    flip_map = F.avg_pool2d(crop.flip(-1).mean(0)[None, None], 4)[0]
    torch.testing.assert_close(got_flip, flip_map)           # a flipped image gets the flipped map
    # whole frame at the stage's resolution: the image part of the map only (no padding rows)
    whole = crop_maps(m.view(1, 64), torch.tensor([[0.0, 0.0, 32.0, 16.0]]), size, torch.tensor([False]), (4, 8))[0, 0]
    torch.testing.assert_close(whole, m[:4])


def test_normalise_maps_is_per_image_standardisation():
    x = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]], [[[2.0, 2.0], [2.0, 2.0]]]])
    out = normalise_maps(x)
    torch.testing.assert_close(out[0, 0], (x[0, 0] - 4.0) / (torch.tensor(5.0).sqrt() + 1e-6))
    assert torch.equal(out[1], torch.zeros(1, 2, 2))


def test_fuse_stage_errors_name_the_problem():
    with pytest.raises(ValueError, match="--fuse-stage must be 1..4"):
        RECIPES.get("sam-fusion").build_hooks(fuse_stage=5)
    with pytest.raises(ValueError, match="no 'layer2'"):
        attach_map_fusion(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1)), 2)


# ----------------------------------------------------------------------------------------- auxiliary

def test_ns_ce_with_lambda_one_makes_the_balanced_softmax_step():
    torch.manual_seed(0)
    counts = torch.tensor([50.0, 20.0, 5.0, 30.0])  # class 3 auxiliary, neighbor of class 2
    ctx = LossContext(counts, neighbor_of=torch.tensor([-1, -1, -1, 2]), num_target=3)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    models = []
    for loss in (NeighborSilencedCE(ctx, lambda_s=1.0), BalancedSoftmax(ctx), NeighborSilencedCE(ctx, lambda_s=0.1)):
        torch.manual_seed(1)
        model = torch.nn.Linear(6, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loss(model(x), y).backward()
        opt.step()
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert not torch.allclose(models[2].weight, models[1].weight)  # lambda_s < 1 does differ


# ----------------------------------------------------------------------------------------- ecvl-stage1

def test_momentum_randaugment_strength_zero_is_identity_and_positive_changes():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16)
    out = momentum_randaugment(images, torch.zeros(4), k=2, generator=g)
    assert torch.equal(out, images)
    out = momentum_randaugment(images, torch.tensor([0.0, 1.0, 0.0, 1.0]), k=3, generator=g)
    assert torch.equal(out[0], images[0]) and torch.equal(out[2], images[2])
    assert not torch.equal(out[1], images[1]) or not torch.equal(out[3], images[3])
    assert out.min() >= 0 and out.max() <= 1


def test_momentum_state_follows_the_ecvl_formulas():
    st = MomentumState(beta=0.5)
    st.add(["a", "b", "c"], torch.tensor([1.0, 2.0, 6.0]))
    st.add(["a"], torch.tensor([3.0]))                    # mean loss of a this epoch: 2
    st.fold()
    lm = np.array([2.0, 2.0, 6.0])
    np.testing.assert_allclose(st.lm, lm)
    np.testing.assert_allclose(st.strength(["a", "b", "c"]).numpy(), momentum_strength(lm), rtol=1e-6)
    st.add(["c"], torch.tensor([2.0]))
    st.fold()
    np.testing.assert_allclose(st.lm, [2.0, 2.0, 0.5 * 6 + 0.5 * 2])
    assert float(st.strength(["new"])[0]) == 0.0          # never seen: plain image
