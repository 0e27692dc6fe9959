"""featurelt.finetune.adapt / model / backbones: each --adapt mode trains exactly the parameters it names,
LoRA on timm ViTs, ResNets and open_clip (nn.MultiheadAttention), layer-wise lr decay groups, heads."""
from __future__ import annotations

import pytest
import torch

from featurelt.finetune.adapt import ADAPT_MODES, apply_adapt
from featurelt.finetune.backbones import build_backbone
from featurelt.finetune.model import FinetuneModel

K = 5


def _model(name: str, mode: str, **kw):
    bb = build_backbone(name, pretrained="none", image_size=32, seed=0)
    for m in bb.module.modules():  # timm zero-inits the last BatchNorm of each residual branch, which would
        if isinstance(m, torch.nn.BatchNorm2d):  # cut the gradient of frozen-branch adapters (pretrained gammas are not 0)
            torch.nn.init.ones_(m.weight)
    names = apply_adapt(bb, mode, **kw)
    return bb, FinetuneModel(bb, K), names


def _expected(bb, model: FinetuneModel, mode: str, last_n: int = 1) -> set[str]:
    head = {f"head.{n}" for n, _ in model.head.named_parameters()}
    named = [n for n, _ in model.backbone.named_parameters()]
    if mode == "full":
        back = set(named)
    elif mode == "frozen":
        back = set()
    elif mode == "bias":
        back = {n for n in named if n.endswith(".bias")}
    elif mode == "ln":  # test_resnet: BatchNorm affine; test_vit: LayerNorm affine
        mods = dict(model.backbone.named_modules())
        back = {n for n in named if "." in n and isinstance(mods[n.rsplit(".", 1)[0]], (torch.nn.BatchNorm2d, torch.nn.LayerNorm))}
    elif mode == "last-n":
        back = {n for layer in bb.layers[-last_n:] for n in layer}
    else:  # lora
        back = {n for n in named if ".lora_A." in n or ".lora_B." in n}
    return head | {f"backbone.{n}" for n in back}


def _step(model: FinetuneModel) -> tuple[set[str], set[str]]:
    """One SGD step on random data; returns (parameters with a nonzero gradient, parameters that changed)."""
    torch.manual_seed(0)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 3, 32, 32)
    y = torch.arange(4) % K
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    # LoRA's B starts at zero, so A gets no gradient on the first step: take a second one
    opt.step()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    return grads, changed


@pytest.mark.parametrize("mode", ADAPT_MODES)
@pytest.mark.parametrize("name", ["timm:test_resnet", "timm:test_vit"])
def test_each_mode_trains_exactly_its_parameters(name: str, mode: str) -> None:
    kw = {"last_n": 2} if mode == "last-n" else {}
    bb, model, trainable = _model(name, mode, **kw)
    expected = _expected(bb, model, mode, last_n=2)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert {f"backbone.{n}" for n in trainable} == {n for n in expected if n.startswith("backbone.")}
    grads, changed = _step(model)
    assert grads == expected, sorted(grads ^ expected)[:5]
    assert changed == expected, sorted(changed ^ expected)[:5]
    assert mode == "frozen" or any(n.startswith("backbone.") for n in changed)


def test_lora_targets_of_each_family() -> None:
    bb, model, names = _model("timm:test_vit", "lora", lora_rank=2)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"qkv", "proj", "fc1", "fc2"}
    bb, model, names = _model("clip:tiny", "lora", lora_rank=2)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"c_fc", "c_proj"}
    grads, changed = _step(model)
    assert grads == changed == {n for n, p in model.named_parameters() if p.requires_grad}
    # opt-in: open_clip's nn.MultiheadAttention through peft (packed in-projection on attn, and its out_proj)
    bb, model, names = _model("clip:tiny", "lora", lora_rank=2, lora_targets=("attn", "c_fc", "c_proj"))
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"attn", "out_proj", "c_fc", "c_proj"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads, changed = _step(model)
    assert any(".attn.lora_" in n for n in grads) and any(".out_proj.lora_" in n for n in grads)
    drift = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()
             if not p.requires_grad and n in changed}
    assert drift and all("attn.base_layer" in n for n in drift)  # peft merges / unmerges MHA weights per forward
    assert max(drift.values()) < 1e-6
    with pytest.raises(ValueError, match="module of timm:test_vit is called so"):
        _model("timm:test_vit", "lora", lora_targets=("nope",))


def test_layer_decay_groups_follow_depth() -> None:
    import timm.optim

    bb, model, _ = _model("timm:test_resnet", "full")
    opt = timm.optim.create_optimizer_v2(model, opt="sgd", lr=1.0, weight_decay=0.1, layer_decay=0.5)
    layers = len(bb.layers) + 1  # + head
    scale = {}
    for g in opt.param_groups:
        for p in g["params"]:
            scale[id(p)] = (g["lr_scale"], g["weight_decay"])
    for i, layer in enumerate(bb.layers):
        for n in layer:
            p = dict(model.backbone.named_parameters())[n]
            assert scale[id(p)][0] == pytest.approx(0.5 ** (layers - 1 - i))
            assert scale[id(p)][1] == (0.0 if p.ndim <= 1 else 0.1)  # no decay on norms / biases
    assert scale[id(model.head.weight)] == (1.0, 0.1)
    assert scale[id(model.head.bias)] == (1.0, 0.0)


def test_heads_cosine_and_text() -> None:
    bb = build_backbone("timm:test_resnet", pretrained="none", image_size=32)
    text = torch.randn(K, bb.feature_dim)
    m = FinetuneModel(bb, K, head="text", scale=10.0, text=text).eval()
    x = torch.randn(2, 3, 32, 32)
    f = m.features(x)
    want = 10.0 * torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(text, dim=1).T
    torch.testing.assert_close(m(x), want)
    assert not any(n.startswith("head.") for n, _ in m.named_parameters())
    with pytest.raises(ValueError, match=r"the backbone needs \[5, 96\]"):
        FinetuneModel(bb, K, head="text", text=torch.randn(K, 7))
    c = FinetuneModel(bb, K, head="cosine", scale=4.0).eval()
    w = c.head.weight
    torch.testing.assert_close(c(x), 4.0 * torch.nn.functional.normalize(c.features(x), dim=1)
                               @ torch.nn.functional.normalize(w, dim=1).T)


def test_unknown_backbone_names() -> None:
    with pytest.raises(KeyError, match="unknown backbone family 'foo'"):
        build_backbone("foo:bar")
    with pytest.raises(KeyError, match="'nope' is not a timm model"):
        build_backbone("timm:nope", pretrained="none")
    with pytest.raises(KeyError, match="use FAMILY:MODEL"):
        build_backbone("resnet50")


@pytest.mark.parametrize("name, product", [("clip:tiny", "embedding"), ("dinov2:tiny", "cls"), ("sam:tiny", "latent")])
def test_project_encoders_as_backbones(name: str, product: str) -> None:
    """A backbone built from an encoder's weights gives that encoder's product (clip: before its unit norm);
    its layer groups follow the blocks and last-n trains the last one."""
    from featurelt.encoders import build_encoder

    bb = build_backbone(name, seed=0)
    enc = build_encoder(name, seed=0)
    x = torch.randn(2, 3, bb.image_size, bb.image_size)
    bb.module.eval()
    with torch.no_grad():
        got = bb.module(x)
    want = enc.encode(x, products=[product])[product]
    if name.startswith("clip"):
        got = torch.nn.functional.normalize(got, dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(bb.layers) >= 3 and bb.feature_dim == want.shape[1]
    names = apply_adapt(bb, "last-n", last_n=1)
    assert set(names) == set(bb.layers[-1])
