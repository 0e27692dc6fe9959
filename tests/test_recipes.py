"""The seed recipes of ``featurelt finetune --recipe`` (featurelt/finetune/recipes): each one's defining property.

sam-fusion (METHODS.md section 2): zero-initialised fusion = plain ResNet exactly; the map follows the
crop and the flip of the image (against a map computed from the image itself, and through TrainTransform);
the fused stage is ``Conv1x1(F_norm) * F + F``. auxiliary (section 3): ns-ce with lambda_s = 1 makes the same
step as balanced softmax (loss level and a whole recipe run). ltgc-lora (section 4): only LoRA and head
parameters change, rejected generated images never appear in a batch. ecvl-stage1 (section 5): M_i = 0 leaves
images alone, the momentum state follows the formulas, augmentation starts in epoch 2. Config resolution
order, and every recipe's tiny job end to end (stage 1 -> ft_<run> -> stage 2 -> runs rows).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featurelt.finetune.recipes import RECIPES
from featurelt.finetune.recipes.ecvl_stage1 import MomentumState, momentum_randaugment
from featurelt.finetune.recipes.sam_fusion import MapFusion, attach_map_fusion, crop_maps, map_boxes, normalise_maps
from featurelt.losses import BalancedSoftmax, LossContext, NeighborSilencedCE
from featurelt.samplers import momentum_strength
from featurelt.store import Store


@pytest.mark.parametrize("name", RECIPES.names())
def test_every_recipe_builds_its_hooks(name):
    recipe = RECIPES.get(name)
    hooks = recipe.build_hooks()
    assert recipe.defaults and recipe.stage2 and RECIPES.help(name)
    for attr in ("configure", "wrap_model", "train_plan", "make_batch", "loss", "after_step"):
        assert callable(getattr(hooks, attr))
    with pytest.raises(TypeError, match=f"recipe '{name}'"):
        recipe.build_hooks(no_such_option=1)


def test_resolve_orders_config_recipe_flags_and_keeps_the_recipe_in_the_config():
    from featurelt.finetune.config import FinetuneCfg
    from featurelt.finetune.recipes import hooks_for, resolve

    base = FinetuneCfg(lr=0.5, epochs=3, sampler_opts={"a": 0.7})        # as from --config
    cfg, hooks = resolve("lfm-stage1", base, {"text_set": "t", "epochs": 2, "sampler_opts": {"tau": 0.1}})
    assert (cfg.lr, cfg.min_lr_ratio, cfg.optimizer, cfg.batch_size) == (1e-6, 1e-3, "adam", 32)  # recipe > config
    assert cfg.epochs == 2 and cfg.sampler == "lfm" and cfg.head == "text"                         # flags > recipe
    assert cfg.sampler_opts == {"tau": 0.1, "alpha": 1.0, "a": 0.2, "per_sample": False}          # merged key by key
    assert cfg.recipe == "lfm-stage1" and cfg.recipe_opts == {}
    cfg2, _ = resolve("sam-fusion", FinetuneCfg(), {"backbone": "timm:test_resnet"}, opts={"fuse_stage": 2})
    assert cfg2.recipe_opts == {"fuse_stage": 2} and cfg2.optimizer == "sgd" and cfg2.lr == 0.1
    again = hooks_for(cfg2.replace(), store=None)                    # resume / other ranks: the same hooks back
    assert type(again).__name__ == "SamFusionHooks" and again.fuse_stage == 2
    assert hooks_for(FinetuneCfg(), store=None) is None
    with pytest.raises(ValueError, match="needs class text embeddings"):
        hooks.configure(FinetuneCfg(sampler="lfm"))
    with pytest.raises(KeyError, match="unknown recipe 'nope'; available: auxiliary"):
        resolve("nope", FinetuneCfg(), {})


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


def test_map_follows_the_train_transform_crop_and_flip():
    """With the loader's own augmentation (TrainTransform flip-crop), the map cut by the image's extras matches
    the augmented image itself, pooled to the map's cell size, within 4 grey levels; the unflipped map does not."""
    from featurelt.images.augment import TrainTransform

    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    f = 110 + 70 * torch.sin(xx / 7) + 60 * (yy / 64)                 # smooth, not symmetric
    image = f.round().to(torch.uint8).expand(3, 64, 64).contiguous()
    m = F.avg_pool2d(f[None, None], 4)[0, 0]                           # 16x16 map, 4 px per cell
    t = TrainTransform(32, "flip-crop", seed=0, scale=(0.3, 1.0))
    flips = []
    for index in range(8):
        out, extra = t.apply(image, index)
        ref = F.avg_pool2d(out.float().mean(0)[None, None], 4)[0, 0]   # the augmented image at 8x8
        args = (m.view(1, -1), torch.tensor([extra["box"]]), torch.tensor([extra["size"]], dtype=torch.float32))
        got = crop_maps(*args, torch.tensor([extra["flip"]]), (8, 8))[0, 0]
        wrong = crop_maps(*args, torch.tensor([not extra["flip"]]), (8, 8))[0, 0]
        assert (got - ref).abs().max() < 4.0 < 8.0 < (wrong - ref).abs().max()
        flips.append(extra["flip"])
    assert any(flips) and not all(flips)


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


# ----------------------------------------------------------------------------------------- tiny jobs, end to end

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _job(root, name):
    import os

    from featurelt.cli import main

    cwd = os.getcwd()
    os.chdir(REPO)  # the jobs name jobs/tiny-data/... relative to the repository root
    try:
        return main(["--store", str(root), "job", f"jobs/{name}.yaml"])
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """The store of jobs/recipes-tiny-data.yaml: digits LT + 2 auxiliary classes + filtered generated images,
    clip:tiny features and text, sam:tiny 8x8 PCA maps."""
    pytest.importorskip("timm")
    root = tmp_path_factory.mktemp("tiny") / "store"
    assert _job(root, "recipes-tiny-data") == 0
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES.names())
def test_tiny_job_runs_stage1_export_stage2(tiny_root, name):
    """Each recipe's tiny job: finetune --recipe (stage 1) -> emb_ft_<run> -> train-head (stage 2) -> runs rows."""
    before = Store(tiny_root).read("runs", columns=["run_id"]).num_rows if Store(tiny_root).has_table("runs") else 0
    assert _job(tiny_root, f"{name}-tiny") == 0
    store = Store(tiny_root)
    ft = store.read("finetune_runs")
    ft_row = ft.slice(ft.num_rows - 1).to_pylist()[0]
    run_id = ft_row["run_id"]
    assert f"recipe: {name}" in ft_row["config"]
    assert store.has_table(f"emb_ft_{run_id}")
    runs = store.read("runs").to_pylist()[before:]
    assert len(runs) == 2                                           # stage 1's evaluation row + stage 2's head
    assert runs[1]["features"] == f"ft_{run_id}"                    # stage 2 read this run's export
    preds = store.sql(f"SELECT max(prediction) AS top FROM predictions WHERE run_id IN ('{runs[0]['run_id']}', "
                      f"'{runs[1]['run_id']}')").column("top").to_pylist()[0]
    assert preds <= 9                                               # auxiliary classes (labels 10, 11) masked
    if name == "sam-fusion":                                        # the fusion conv left zero and learned
        sd = torch.load(ft_row["checkpoint"], weights_only=True)["model"]
        assert float(sd["sam_fusion.conv.weight"].abs().sum()) > 0


class _Recording:
    """Wraps a recipe's hooks: snapshot of the parameters at wrap_model, the sample ids of every train batch."""

    def __init__(self, inner):
        self.inner, self.start, self.ids, self.changed = inner, None, [], []
        self.extra_columns = inner.extra_columns

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def wrap_model(self, model, ctx):
        model = self.inner.wrap_model(model, ctx)
        self.start = {k: v.detach().clone() for k, v in model.named_parameters()}
        return model

    def make_batch(self, images, targets, batch, ctx):
        ids = list(batch.sample_ids)
        if batch.partner is not None:
            ids += ctx.train.sample_ids[batch.partner.numpy()].tolist()
        self.ids.append(ids)
        x, y = self.inner.make_batch(images, targets, batch, ctx)
        self.changed.append(not torch.equal(x, images))
        return x, y


def _library_run(root, name, flags, opts=None):
    from featurelt.finetune.config import FinetuneCfg
    from featurelt.finetune.recipes import resolve
    from featurelt.finetune.train import finetune

    cfg, hooks = resolve(name, FinetuneCfg(), {"image_size": 32, "batch_size": 64, "loader_workers": 0,
                                              "augment": "none", "eval_every": 0, **flags}, opts=opts, store=root)
    rec = _Recording(hooks)
    res = finetune(root, cfg, hooks=rec, write=False)
    return rec, res


@pytest.mark.slow
def test_ltgc_lora_changes_only_lora_and_head_and_never_reads_rejected_images(tiny_root):
    store = Store(tiny_root)
    t = store.read("samples", columns=["sample_id", "split", "source"]).to_pylist()
    rejected = {r["sample_id"] for r in t if r["split"] == "filtered"}
    generated = {r["sample_id"] for r in t if r["source"] == "generated" and r["split"] == "train"}
    assert rejected and generated                                   # the tiny store has both
    rec, res = _library_run(tiny_root, "ltgc-lora", {"backbone": "clip:tiny", "epochs": 1})
    seen = {s for ids in rec.ids for s in ids}
    assert not seen & rejected                                      # rejected generated images never in a batch
    assert seen & generated
    for ids in rec.ids:                                             # second half of each batch: generated partners
        half = len(ids) // 2
        assert set(ids[half:]) <= generated and not set(ids[:half]) & generated
    end = dict(res.model.named_parameters())
    # peft's (experimental) LoRA on nn.MultiheadAttention adds the LoRA delta into the frozen packed in_proj
    # weight for each forward and subtracts it again: float rounding leaves ~1e-8 on those frozen weights,
    # so "changed" means more than that; every other frozen weight stays bit-identical
    changed = {k for k, v in rec.start.items() if not torch.allclose(v, end[k].detach().cpu(), rtol=0, atol=1e-6)}
    assert changed and all("lora_" in k or k.startswith("head.") for k in changed)
    frozen = [k for k in rec.start if "lora_" not in k and not k.startswith("head.")]
    assert frozen and not any(end[k].requires_grad for k in frozen)
    drift = [k for k in frozen if not torch.equal(rec.start[k], end[k].detach().cpu())]
    assert all(".attn.base_layer." in k for k in drift)


@pytest.mark.slow
def test_ecvl_stage1_augments_from_the_second_epoch_by_momentum(tiny_root):
    rec, res = _library_run(tiny_root, "ecvl-stage1", {"backbone": "clip:tiny", "text_set": "clip_tiny", "epochs": 2},
                            opts={"k": 3})
    n1 = len(rec.changed) // 2
    assert not any(rec.changed[:n1])                                # epoch 1: no momentum yet, plain images
    assert any(rec.changed[n1:])                                    # epoch 2: M_i > 0 for the harder samples
    m = rec.inner.state.m
    assert m.size == len(set(s for ids in rec.ids for s in ids)) and 0 <= m.min() and m.max() <= 1


@pytest.mark.slow
def test_auxiliary_recipe_with_lambda_one_trains_as_balanced_softmax(tiny_root):
    """The recipe end to end (target + auxiliary rows, caps, ns-ce): with lambda_s = 1 the fine-tuned weights
    equal those of the same run with balanced softmax, bit for bit (section 3: NS-CE with all lambda = 1)."""
    flags = {"backbone": "timm:test_resnet", "pretrained": "none", "epochs": 1, "batch_size": 128}
    rec_ns, res_ns = _library_run(tiny_root, "auxiliary", {**flags, "loss_opts": {"lambda_s": 1.0}})
    assert res_ns.config.loss == "ns-ce" and res_ns.config.aux_cap == 50
    seen = {s for ids in rec_ns.ids for s in ids}
    assert any(s.startswith("aux-") for s in seen)                 # auxiliary rows were trained on
    rec_bs, res_bs = _library_run(tiny_root, "auxiliary", {**flags, "loss": "balanced-softmax"})
    assert rec_ns.ids == rec_bs.ids                                 # the same plan
    end_ns, end_bs = dict(res_ns.model.named_parameters()), dict(res_bs.model.named_parameters())
    for k, v in end_ns.items():
        assert torch.equal(v, end_bs[k]), k


def test_ft_latest_needs_a_finetune_export(digits_store):
    from featurelt.data.features import resolve_set_names

    store = Store(digits_store)
    assert resolve_set_names(store, ["pixels", "clip_tiny"]) == ["pixels", "clip_tiny"]
    with pytest.raises(ValueError, match="no fine-tuned embedding set"):
        resolve_set_names(store, ["ft_latest"])
