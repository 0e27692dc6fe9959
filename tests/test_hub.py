"""featurelt.encoders.hub: offline decided per call (cache -> local_files_only, else network, else one clear
error); importing the encoders sets no environment variable; hub ids dinov2:ORG/NAME / clip:hf-hub:ORG/NAME."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


REV = "0123456789abcdef0123456789abcdef01234567"


def _fake_cache(cache: Path, repo: str, files: dict[str, bytes | Path]) -> Path:
    """The huggingface_hub cache layout of ``repo`` at one revision: refs/main + snapshots/<rev>/<files>."""
    base = cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / REV
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(REV)
    for name, data in files.items():
        (snap / name).write_bytes(data.read_bytes() if isinstance(data, Path) else data)
    return snap


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache; any download attempt fails the test unless a test allows it."""
    import huggingface_hub
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def no_network(*a, **k):
        raise AssertionError(f"network used: {a} {k}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    return cache


def test_import_sets_no_environment_variable():
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = ("import os, json; before = dict(os.environ); import featurelt.encoders, featurelt.encoders.text, "
            "featurelt.encoders.hub; print(json.dumps(dict(os.environ) == before and 'HF_HUB_OFFLINE' not in os.environ))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    assert out.stdout.strip().splitlines()[-1] == "true"


def test_cached_file_is_used_without_network(hub_cache, monkeypatch):
    from featurelt.encoders import hub

    monkeypatch.setattr(hub, "hub_reachable", lambda url=None: pytest.fail("cached: no network check"))
    snap = _fake_cache(hub_cache, "org/model", {"open_clip_config.json": b"{}"})
    assert hub.hub_file("clip:x", "org/model", ["open_clip_config.json"]) == str(snap / "open_clip_config.json")
    assert hub.hub_snapshot("dinov2:x", "org/model", required=["open_clip_config.json"]) == snap
    # a cached snapshot that lacks a required file is not "cached": the network is tried (here: unreachable)
    monkeypatch.setattr(hub, "hub_reachable", lambda url=None: "offline (test)")
    with pytest.raises(hub.NotCachedError, match="offline"):
        hub.hub_snapshot("dinov2:x", "org/model", required=["model.safetensors"])


def test_not_cached_and_offline_is_one_clear_error(hub_cache, monkeypatch):
    from featurelt.encoders import hub

    monkeypatch.setattr(hub, "hub_reachable", lambda url=None: "huggingface.co unreachable: test")
    env = dict(os.environ)
    with pytest.raises(hub.NotCachedError, match=r"'org/absent' is not cached .*run once with network, or pass "
                                                 r"--checkpoint"):
        hub.hub_file("clip:hf-hub:org/absent", "org/absent", ["open_clip_config.json"])
    with pytest.raises(FileNotFoundError, match="not cached"):  # a MissingWeightsError: CLI exit 1
        hub.hub_snapshot("dinov2:org/absent", "org/absent")
    assert dict(os.environ) == env  # offline was decided for these calls only


def test_not_cached_and_online_downloads(hub_cache, monkeypatch, tmp_path):
    import huggingface_hub

    from featurelt.encoders import hub

    got = tmp_path / "downloaded.json"
    got.write_text("{}")
    calls = []
    monkeypatch.setattr(hub, "hub_reachable", lambda url=None: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, fn, revision=None: calls.append((repo, fn)) or str(got))
    assert hub.hub_file("clip:x", "org/new", ["open_clip_config.json"]) == str(got)
    assert calls == [("org/new", "open_clip_config.json")]


def _tiny_dinov2_folder(folder: Path) -> None:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(5)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                             patch_size=14, intermediate_size=64)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, resample=3,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)


def test_dinov2_hub_id_from_cache_offline(hub_cache, monkeypatch, tmp_path):
    """dinov2:ORG/NAME loads from the cache with no network and gives the vectors of --checkpoint DIR."""
    from featurelt.encoders import ENCODERS, build_encoder, hub

    monkeypatch.setattr(hub, "hub_reachable", lambda url=None: "offline (test)")
    folder = tmp_path / "local"
    _tiny_dinov2_folder(folder)
    _fake_cache(hub_cache, "testorg/dinov2-mini", {f.name: f for f in folder.iterdir() if f.is_file()})
    assert ENCODERS.get("dinov2:testorg/dinov2-mini").products() == {"cls": 32, "mean_patch": 32}
    a = build_encoder("dinov2:testorg/dinov2-mini")
    x = torch.rand(2, 3, 28, 28)
    from transformers import Dinov2Model

    ref = Dinov2Model.from_pretrained(folder).eval()(pixel_values=x).last_hidden_state[:, 0]
    np.testing.assert_allclose(a.encode(x)["cls"].numpy(), ref.detach().numpy(), atol=1e-6)
    assert a.provenance()["architecture"]["hub_id"] == "testorg/dinov2-mini" and a.trained
    with pytest.raises(FileNotFoundError, match="'testorg/other' is not cached"):
        build_encoder("dinov2:testorg/other")


def test_clip_hub_id_from_cache(hub_cache, monkeypatch, tmp_path):
    """clip:hf-hub:ORG/NAME: open_clip_config.json + open_clip_model.safetensors from the cache, offline."""
    import open_clip
    from safetensors.torch import save_file

    from featurelt.encoders import build_encoder, build_text_encoder, hub
    from featurelt.encoders.clip import TINY_CONFIG

    monkeypatch.setattr(hub, "hub_reachable", lambda url=None: "offline (test)")
    cfg = {"model_cfg": TINY_CONFIG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                                         "resize_mode": "squash"}}
    torch.manual_seed(4)
    net = open_clip.model.CLIP(embed_dim=64, vision_cfg=open_clip.model.CLIPVisionCfg(**TINY_CONFIG["vision_cfg"]),
                               text_cfg=open_clip.model.CLIPTextCfg(**TINY_CONFIG["text_cfg"]))
    w = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(w))
    _fake_cache(hub_cache, "testorg/clip-mini", {"open_clip_config.json": json.dumps(cfg).encode(),
                                                 "open_clip_model.safetensors": w})
    enc = build_encoder("clip:hf-hub:testorg/clip-mini")
    assert enc.preprocessing()["resize_mode"] == "squash" and enc.preprocessing()["mean"] == [0.5, 0.5, 0.5]
    x = torch.rand(2, 3, 32, 32)
    ref = torch.nn.functional.normalize(net.eval().encode_image(x), dim=-1)
    np.testing.assert_allclose(enc.encode(x)["embedding"].numpy(), ref.detach().numpy(), atol=1e-6)
    text = build_text_encoder("clip:hf-hub:testorg/clip-mini")
    assert text.checkpoint_sha256 == enc.checkpoint_sha256
    with pytest.raises(ValueError, match="applies to clip:<model> encoders, not to 'clip:hf-hub"):
        build_encoder("clip:hf-hub:testorg/clip-mini", pretrained="openai")


def test_encoders_command_lists_tags_hub_ids_and_checksums(capsys):
    from featurelt.cli import main
    from featurelt.encoders.sam import SAM_SHA256

    assert main(["encoders"]) == 0
    out = capsys.readouterr().out
    for sha in SAM_SHA256.values():  # in full, not truncated
        assert sha in out
    assert "dinov2:facebook/dinov2-base" in out and "--pretrained" in out
    assert main(["encoders", "--all", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    b32 = rows["clip:ViT-B-32"]
    assert b32["tags"][:2] == ["openai", "laion400m_e31"] and "laion2b_s34b_b79k" in b32["tags"]
    assert "needs --pretrained TAG" in b32["notes"]
    assert "needs --pretrained" not in rows["clip:ViT-L-14-CLIPA"]["notes"]  # its tags agree
