"""Fidelity: featurelt's STORED vector of an image file equals what the model authors' documented pipeline gives.

For each family the reference is the library's own entry point (open_clip ``create_model_and_transforms(name,
pretrained=TAG)``; transformers ``AutoImageProcessor`` (PIL backend) + ``Dinov2Model``; segment-anything
``SamPredictor.set_image``), fed ``PIL.Image.open(file)``; featurelt ingests the same files (``featurelt
ingest DIR``), runs ``featurelt extract`` (``--resize-on host``: PIL's resize, the reference's) and the
vector is read back from the store. Weights are random (seeded), saved to a file / folder and loaded by
both sides; no network. Tolerance 1e-5.

CLIP tags are open_clip's real pretrained configs (``get_pretrained_cfg``: ViT-B-32 ``openai`` --
QuickGELU; ViT-L-14 ``laion2b_s32b_b82k`` -- mean/std 0.5; ViT-L-14-CLIPA ``datacomp1b`` -- squash resize)
attached to a tiny registered architecture: a real ViT-B/L takes ~20 s per test on 2 CPU cores
(measured: create 5 s, 600 MB state dict, first forward 3.7 s, twice).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featurelt.cli import main
from featurelt.store import Store

TOL = 1e-5
SIZES = [(45, 37), (29, 52), (40, 40)]  # (w, h): odd, portrait, square -> resize and crop both exercised


def _image_folder(root: Path) -> dict[str, Path]:
    """root/a/0.png, root/a/1.jpg, root/b/2.png: random RGB images of SIZES."""
    rng = np.random.default_rng(0)
    files = {}
    for i, ((w, h), cls, ext) in enumerate(zip(SIZES, ["a", "a", "b"], ["png", "jpg", "png"])):
        (root / cls).mkdir(parents=True, exist_ok=True)
        f = root / cls / f"{i}.{ext}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(f, quality=95)
        files[f.name] = f
    return files


def _stored(store_root: Path, set_name: str, files: dict[str, Path]) -> dict[str, np.ndarray]:
    """file name -> stored view-0 vector of that file (matched on the sample id's file name)."""
    store = Store(store_root)
    t = store.read(f"emb_{set_name}", columns=["sample_id", "view", "vector"]).to_pylist()
    out = {}
    for r in t:
        if r["view"] == 0:
            name = Path(str(r["sample_id"]).split(":", 1)[-1]).name
            out[name] = np.asarray(r["vector"], dtype=np.float32)
    assert sorted(out) == sorted(files), (sorted(out), sorted(files))
    return out


def _ingest_extract(tmp_path: Path, files_root: Path, *extract_args: str) -> Path:
    store = tmp_path / "store"
    assert main(["--store", str(store), "ingest", str(files_root), "--no-progress"]) == 0
    assert main(["--store", str(store), "extract", *extract_args, "--resize-on", "host", "--num-workers", "0",
                 "--device", "cpu", "--no-progress"]) == 0
    return store


# -- CLIP ----------------------------------------------------------------------------------------------
TINY_ARCH = "featurelt-fidelity-ViT"
TINY_CFG = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
# tag of the tiny architecture -> (real model, real tag) whose open_clip pretrained config it carries
TAGS = {"openai": ("ViT-B-32", "openai"), "laion2b_s32b_b82k": ("ViT-L-14", "laion2b_s32b_b82k"),
        "datacomp1b": ("ViT-L-14-CLIPA", "datacomp1b")}


@pytest.fixture
def tiny_clip_tags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, dict]:
    """Register TINY_ARCH with open_clip (model config) carrying the real tags' pretrained configs."""
    import open_clip
    from open_clip import factory, pretrained

    cfg_dir = tmp_path / "oc_cfg"
    cfg_dir.mkdir()
    (cfg_dir / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CFG))
    monkeypatch.setattr(factory, "_MODEL_CONFIGS", dict(factory._MODEL_CONFIGS))
    open_clip.add_model_config(str(cfg_dir / f"{TINY_ARCH}.json"))
    tags = {t: copy.deepcopy(pretrained.get_pretrained_cfg(m, rt)) for t, (m, rt) in TAGS.items()}
    monkeypatch.setitem(pretrained._PRETRAINED, TINY_ARCH, tags)
    return tags


def _save_clip_weights(path: Path, quick_gelu: bool) -> None:
    import open_clip

    torch.manual_seed(1)
    model = open_clip.create_model(TINY_ARCH, pretrained=None, force_quick_gelu=quick_gelu)
    with torch.no_grad():  # random init leaves some params zero (e.g. biases): make every weight matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    torch.save(model.state_dict(), path)


def _clip_reference(tag: str, weights: Path, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                    **kw) -> dict[str, np.ndarray]:
    """open_clip's documented pipeline: create_model_and_transforms(name, pretrained=TAG), the tag's
    download pointed at the local weights file."""
    import open_clip
    from open_clip import factory

    monkeypatch.setattr(factory, "download_pretrained", lambda cfg, **k: str(weights))
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_ARCH, pretrained=tag, **kw)
    model.eval()
    out = {}
    with torch.no_grad():
        for name, f in files.items():
            x = preprocess(Image.open(f)).unsqueeze(0)
            out[name] = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)[0].numpy()
    return out


@pytest.mark.parametrize("tag", list(TAGS))
def test_clip_pretrained_tag_matches_open_clip(tag, tiny_clip_tags, tmp_path, monkeypatch):
    cfg = tiny_clip_tags[tag]
    files = _image_folder(tmp_path / "imgs")
    weights = tmp_path / f"{tag}.pt"
    _save_clip_weights(weights, quick_gelu=bool(cfg.get("quick_gelu")))
    store = _ingest_extract(tmp_path, tmp_path / "imgs", f"clip:{TINY_ARCH}", "--pretrained", tag,
                            "--checkpoint", str(weights), "--name", "c")
    got = _stored(store, "c", files)
    # open_clip 3.x only warns when a tag's QuickGELU differs from the model config; its warning's advice
    # (force_quick_gelu=True, or the '-quickgelu' model name) is the authors' documented way
    ref = _clip_reference(tag, weights, files, monkeypatch, force_quick_gelu=bool(cfg.get("quick_gelu")))
    for name in files:
        np.testing.assert_allclose(got[name], ref[name], atol=TOL, rtol=0)
    prov = json.loads(Store(store).read("embedding_sets").to_pylist()[-1]["provenance"])
    assert prov["pretrained"] == tag
    pp = prov["preprocessing"]
    assert pp["mean"] == pytest.approx(list(cfg["mean"])) and pp["resize_mode"] == cfg.get("resize_mode", "shortest")
    if cfg.get("quick_gelu"):  # the activation matters: open_clip's plain GELU build gives other vectors
        with pytest.warns(UserWarning, match="QuickGELU mismatch"):
            plain = _clip_reference(tag, weights, files, monkeypatch)
        assert max(np.abs(plain[n] - ref[n]).max() for n in files) > 1e-3


def test_clip_pretrained_changes_fingerprint(tiny_clip_tags, tmp_path):
    from featurelt.encoders import build_encoder

    weights = tmp_path / "w.pt"
    _save_clip_weights(weights, quick_gelu=False)
    a = build_encoder(f"clip:{TINY_ARCH}", pretrained="laion2b_s32b_b82k", checkpoint=weights)
    b = build_encoder(f"clip:{TINY_ARCH}", pretrained="datacomp1b", checkpoint=weights)
    assert a.checkpoint_sha256 == b.checkpoint_sha256
    assert a.fingerprint("embedding") != b.fingerprint("embedding")
    assert a.provenance()["pretrained"] == "laion2b_s32b_b82k"


def test_clip_bare_checkpoint_refused_when_tags_disagree(tiny_clip_tags, tmp_path):
    from featurelt.encoders import build_encoder

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not read: refused before loading")
    with pytest.raises(ValueError, match="pass --pretrained TAG") as err:
        build_encoder(f"clip:{TINY_ARCH}", checkpoint=weights)
    for tag in TAGS:  # the message lists every tag with what it means
        assert tag in str(err.value)
    assert "QuickGELU" in str(err.value) and "squash" in str(err.value)
    # the real ViT-B-32: openai (QuickGELU) vs laion2b_s34b_b79k (GELU); the CLI names the tags in one line
    store = tmp_path / "s"
    with pytest.raises(ValueError, match="openai.*laion2b_s34b_b79k"):
        build_encoder("clip:ViT-B-32", checkpoint=weights)
    assert main(["--store", str(store), "extract", "clip:ViT-B-32", "--checkpoint", str(weights)]) == 1


def test_clip_bare_checkpoint_uses_the_shared_tag_config(tmp_path, monkeypatch):
    """A model whose tags all agree (ViT-L-14-CLIPA: squash) takes their config for a bare file."""
    from featurelt.encoders.clip import _bare_file_variant

    variant, tag = _bare_file_variant("ViT-L-14-CLIPA", None)
    assert tag is None and variant[4] == "squash"
    variant, tag = _bare_file_variant("ViT-B-32", "openai")
    assert tag == "openai" and variant[0] is True


def test_unknown_tag_lists_tags(tiny_clip_tags):
    from featurelt.encoders import build_encoder

    with pytest.raises(ValueError, match="unknown pretrained tag 'nope'.*openai, laion2b_s32b_b82k, datacomp1b"):
        build_encoder(f"clip:{TINY_ARCH}", pretrained="nope", untrained=True)
    with pytest.raises(ValueError, match="applies to clip"):
        build_encoder("sam:tiny", pretrained="openai")


# -- DINOv2 ----------------------------------------------------------------------------------------------
def test_dinov2_matches_transformers(tmp_path):
    from transformers import AutoImageProcessor, BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path / "dinov2-tiny"
    torch.manual_seed(2)
    model = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                                     patch_size=14, intermediate_size=128))
    model.save_pretrained(folder)
    # the released models' processor (shortest edge 256, bicubic, center crop 224, ImageNet mean/std), scaled
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, resample=3,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                      do_convert_rgb=True).save_pretrained(folder)
    files = _image_folder(tmp_path / "imgs")
    store = _ingest_extract(tmp_path, tmp_path / "imgs", "dinov2:tiny", "--checkpoint", str(folder), "--name", "d")
    got = _stored(store, "d_cls", files)
    # transformers' PIL backend: PIL resize + center crop, as DINOv2's own eval transform (torchvision on PIL
    # images). Its default torchvision backend resizes uint8 tensors, up to 1 grey level away from PIL
    # (featurelt's --resize-on device is in that class: within 2 grey levels, see ARCHITECTURE.md).
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    assert type(processor).__name__ == "BitImageProcessorPil"
    ref_model = Dinov2Model.from_pretrained(folder).eval()
    with torch.no_grad():
        for name, f in files.items():
            x = processor(images=Image.open(f), return_tensors="pt")["pixel_values"]
            assert x.shape[-1] == 28
            ref = ref_model(pixel_values=x).last_hidden_state[0, 0].numpy()
            np.testing.assert_allclose(got[name], ref, atol=TOL, rtol=0)


# -- SAM -----------------------------------------------------------------------------------------------
def test_sam_matches_sam_predictor(tmp_path):
    from segment_anything import SamPredictor
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    from featurelt.encoders.sam import SAM_VARIANTS, _tiny_encoder

    cfg = SAM_VARIANTS["tiny"]
    torch.manual_seed(3)
    side = cfg["img_size"] // cfg["patch_size"]
    sam = Sam(image_encoder=_tiny_encoder(cfg),
              prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(side, side),
                                           input_image_size=(cfg["img_size"], cfg["img_size"]), mask_in_chans=4),
              mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=256,
                                       transformer=TwoWayTransformer(depth=1, embedding_dim=256, mlp_dim=64,
                                                                     num_heads=2)))
    with torch.no_grad():
        for p in sam.image_encoder.parameters():
            p.add_(0.02 * torch.randn_like(p))
    sam.eval()
    weights = tmp_path / "sam_tiny.pth"
    torch.save(sam.state_dict(), weights)  # the official layout: image_encoder.* keys among the others
    files = _image_folder(tmp_path / "imgs")
    store = _ingest_extract(tmp_path, tmp_path / "imgs", "sam:tiny", "--checkpoint", str(weights),
                            "--products", "latent", "--name", "s")
    got = _stored(store, "s", files)
    predictor = SamPredictor(sam)
    for name, f in files.items():
        predictor.set_image(np.asarray(Image.open(f).convert("RGB")))
        ref = predictor.get_image_embedding()[0].mean(dim=(1, 2)).numpy()
        np.testing.assert_allclose(got[name], ref, atol=TOL, rtol=0)


def test_sam_official_checksums_listed_and_other_file_warned(tmp_path):
    from featurelt.encoders import list_encoders
    from featurelt.encoders.sam import SAM_SHA256, checksum_note

    rows = {r["name"]: r for r in list_encoders()}
    assert SAM_SHA256["vit_b"] in rows["sam:vit_b"]["notes"] and "sam_vit_b_01ec64.pth" in rows["sam:vit_b"]["notes"]
    assert checksum_note("vit_b", SAM_SHA256["vit_b"]) is None
    assert "not the official sam_vit_b_01ec64.pth" in checksum_note("vit_b", "0" * 64)
    assert checksum_note("tiny", "0" * 64) is None


def test_pretrained_reaches_text_tower_neighbors_filters_and_jobs(tiny_clip_tags, tmp_path):
    """--pretrained is plumbed: extract's text tower, filter-generated (from the set's provenance), neighbors,
    jobs. Without it each of them would meet the refused bare file (the tiny model's tags disagree)."""
    from featurelt.data.filters import filter_generated
    from featurelt.jobs import step_argv

    weights = tmp_path / "w.pt"
    _save_clip_weights(weights, quick_gelu=False)
    _image_folder(tmp_path / "imgs")
    store = _ingest_extract(tmp_path, tmp_path / "imgs", f"clip:{TINY_ARCH}", "--pretrained", "laion2b_s32b_b82k",
                            "--checkpoint", str(weights), "--name", "c")
    s = Store(store)
    text = s.read("text_embeddings").to_pylist()
    assert len(text) == 2 and {r["class_name"] for r in text} == {"a", "b"}  # the text tower was built
    with pytest.raises(ValueError, match="no generated rows"):  # got past the text tower and the sha256 check
        filter_generated(s, "c", mu=0.0, checkpoint=str(weights))
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("cat\ndog\nbird\n")
    base = ["--store", str(store), "neighbors", "--vocab", str(vocab), "--classes", "a", "--k", "2",
            "--encoder", f"clip:{TINY_ARCH}", "--checkpoint", str(weights)]
    assert main(base) == 1  # bare file: refused, one error line
    assert main(base + ["--pretrained", "laion2b_s32b_b82k", "--json"]) == 0
    assert step_argv("extract", {"encoder": "clip:ViT-B-32", "pretrained": "openai"}) == [
        "extract", "clip:ViT-B-32", "--pretrained", "openai"]


def test_pretrained_tag_weights_from_the_hub_cache_offline(tiny_clip_tags, tmp_path, monkeypatch):
    """--pretrained TAG without --checkpoint: the tag's hub file from the local cache, no network; the
    same vectors as the same file passed with --checkpoint."""
    import huggingface_hub
    from huggingface_hub import constants

    from featurelt.encoders import build_encoder, hub

    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "hub_reachable", lambda url=None: "offline (test)")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("network used"))
    tiny_clip_tags["laion2b_s32b_b82k"]["hf_hub"] = "testorg/tiny-laion/"
    weights = tmp_path / "w.pt"
    _save_clip_weights(weights, quick_gelu=False)
    rev = "0" * 40
    repo = cache / "models--testorg--tiny-laion"
    (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev / "open_clip_pytorch_model.bin").write_bytes(weights.read_bytes())
    a = build_encoder(f"clip:{TINY_ARCH}", pretrained="laion2b_s32b_b82k")
    b = build_encoder(f"clip:{TINY_ARCH}", pretrained="laion2b_s32b_b82k", checkpoint=weights)
    assert a.checkpoint_sha256 == b.checkpoint_sha256 and a.fingerprint("embedding") == b.fingerprint("embedding")
    x = torch.rand(2, 3, 32, 32)
    np.testing.assert_array_equal(a.encode(x)["embedding"].numpy(), b.encode(x)["embedding"].numpy())
    with pytest.raises(FileNotFoundError, match="is not cached .*run once with network, or pass --checkpoint"):
        build_encoder(f"clip:{TINY_ARCH}", pretrained="datacomp1b")  # its hub repo is not in this cache


def test_torchscript_archives_are_told_from_state_dicts(tmp_path):
    """OpenAI's original .pt files are TorchScript: only they get torch.load(weights_only=False)."""
    from featurelt.encoders.clip import is_torchscript

    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "jit.pt"))
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "sd.pt")
    (tmp_path / "x.bin").write_bytes(b"not a zip")
    assert is_torchscript(tmp_path / "jit.pt")
    assert not is_torchscript(tmp_path / "sd.pt") and not is_torchscript(tmp_path / "x.bin")
