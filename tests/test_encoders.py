"""Tests of featurelt.encoders: every offline-buildable registry entry, weights loading, SAM PCA, text."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featurelt.encoders import (
    CLIP_FAMILY,
    ENCODERS,
    MissingWeightsError,
    build_encoder,
    build_text_encoder,
    list_encoders,
)
from featurelt.encoders.base import checkpoint_sha256, load_templates
from featurelt.images.transforms import split_transform
from featurelt.images.packing import stack_images

REQUIRED = {"clip:tiny", "sam:vit_b", "sam:vit_l", "sam:vit_h", "sam:tiny", "dinov2:small", "dinov2:base",
            "dinov2:large", "dinov2:giant", "dinov2:tiny", "pixels", "text:minilm", CLIP_FAMILY}
OFFLINE = [n for n in ENCODERS.names() if n != CLIP_FAMILY and not ENCODERS.get(n).needs_checkpoint]
OFFLINE_IMAGE = [n for n in OFFLINE if ENCODERS.get(n).kind == "image"]
OFFLINE_TEXT = [n for n in OFFLINE if ENCODERS.get(n).has_text]
SET_NAMES = {("clip:tiny", "embedding"): "clip_tiny", ("sam:tiny", "latent"): "sam_tiny_latent",
             ("sam:tiny", "pca_map"): "sam_tiny_pca_map", ("dinov2:tiny", "cls"): "dinov2_tiny_cls",
             ("dinov2:tiny", "mean_patch"): "dinov2_tiny_mean_patch", ("pixels", "pixels"): "pixels",
             ("pixels:rgb", "pixels"): "pixels_rgb"}
MAP_SIZE = 8


def _images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)),        # non-square RGB
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L"),  # grey
            Image.fromarray(rng.integers(0, 256, (64, 50, 4), dtype=np.uint8), mode="RGBA")]
    return imgs[:n]


def _build(name: str, **kw):
    enc = build_encoder(name, map_size=MAP_SIZE, **kw)
    return enc


def _batch(enc) -> torch.Tensor:
    return torch.stack([enc.preprocess(im) for im in _images()])


def _encode_all(enc, x: torch.Tensor) -> dict[str, torch.Tensor]:
    if any(enc.requires_fit(p) for p in enc.products):
        enc.fit([x])
    return enc.encode(x)


def test_registry_has_every_required_name() -> None:
    assert REQUIRED <= set(ENCODERS.names())
    assert {"clip:tiny", "sam:tiny", "dinov2:tiny", "pixels", "text:minilm"} <= set(OFFLINE)


def test_unknown_names_fail_with_the_choices() -> None:
    with pytest.raises(KeyError, match="available: .*clip:ViT-B-32"):
        ENCODERS.get("clip:ViT-NOPE-99")
    with pytest.raises(KeyError, match="available: .*sam:tiny"):
        ENCODERS.get("sam:vit_xxl")
    assert ENCODERS.get("clip:ViT-B-32").products() == {"embedding": 512}  # resolved from open_clip's config
    assert ENCODERS.get("clip:RN50").products() == {"embedding": 1024}
    assert "clip:ViT-B-32" in ENCODERS and "clip:ViT-NOPE-99" not in ENCODERS and "sam:tiny" in ENCODERS
    assert "open_clip RN50" in ENCODERS.help("clip:RN50")


def test_list_encoders_rows() -> None:
    rows = {r["name"]: r for r in list_encoders(map_size=4)}
    assert rows["sam:vit_b"] == {**rows["sam:vit_b"], "kind": "image", "needs_checkpoint": True,
                                 "products": {"latent": 256, "pca_map": 16}}
    assert rows["text:minilm"]["kind"] == "text" and rows["text:minilm"]["products"] == {"embedding": 384}
    assert rows["dinov2:giant"]["products"] == {"cls": 1536, "mean_patch": 1536}
    assert rows["clip:tiny"]["text"] is True and rows["pixels"]["text"] is False
    expanded = {r["name"]: r for r in list_encoders(expand_clip=True)}
    assert expanded["clip:ViT-L-14"]["products"] == {"embedding": 768} and CLIP_FAMILY not in expanded


def test_cli_encoders_json(capsys: pytest.CaptureFixture[str]) -> None:
    from featurelt.cli import main

    assert main(["encoders", "--json", "--map-size", "64"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["sam:tiny"]["products"] == {"latent": 256, "pca_map": 4096}
    assert main(["encoders"]) == 0
    out = capsys.readouterr().out
    assert "dinov2:tiny" in out and "cls (64)" in out


# -- every offline image encoder ---------------------------------------------------------------------
@pytest.mark.parametrize("name", OFFLINE_IMAGE)
def test_image_encoder_contract(name: str) -> None:
    enc = _build(name)
    spec = ENCODERS.get(name)
    assert enc.name == name and enc.products == spec.products(map_size=MAP_SIZE)
    x = _batch(enc)
    assert x.shape == (3, 3, enc.image_size, enc.image_size) and x.dtype == torch.float32
    # the transform is picklable (DataLoader workers) and gives the same tensor after a round trip
    t2 = pickle.loads(pickle.dumps(enc.transform))
    torch.testing.assert_close(t2(_images()[0]), x[0])
    out = _encode_all(enc, x)
    assert set(out) == set(enc.products)
    for p, v in out.items():
        assert v.shape == (3, enc.products[p]) and v.dtype == torch.float32, (p, v.shape, v.dtype)
        assert torch.isfinite(v).all()
        if p in enc.unit_norm:
            torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
        assert enc.default_set_name(p) == SET_NAMES[(name, p)]
    # products= selects; a wrong shape is refused with the shape in the message
    first = next(iter(enc.products))
    assert set(enc.encode(x, products=[first])) == {first}
    with pytest.raises(ValueError, match=r"got \(3, 3, 5, 5\)"):
        enc.encode(torch.zeros(3, 3, 5, 5))
    # provenance
    prov = enc.provenance()
    assert prov["encoder"] == name and prov["trained"] is False and prov["checkpoint_sha256"] is None
    assert prov["seed"] == 0 and prov["products"] == enc.products
    pp = prov["preprocessing"]
    assert pp["size"] == enc.image_size and len(pp["mean"]) == 3 and len(pp["std"]) == 3 and pp["interpolation"]
    json.dumps(prov)  # stored as JSON
    assert enc.to("cpu") is enc
    # the whole encoder pickles (Ray ships it to workers) and computes the same vectors after
    clone = pickle.loads(pickle.dumps(enc))
    for p, v in clone.encode(x).items():
        torch.testing.assert_close(v, out[p])
    assert clone.fingerprint(first) == enc.fingerprint(first)


@pytest.mark.parametrize("name", OFFLINE_IMAGE)
def test_image_encoder_deterministic_and_fingerprinted(name: str) -> None:
    a, b = _build(name, seed=0), _build(name, seed=0)
    x = _batch(a)
    oa, ob = _encode_all(a, x), _encode_all(b, x)
    for p in oa:
        torch.testing.assert_close(oa[p], ob[p], rtol=0, atol=0)
        assert a.fingerprint(p) == b.fingerprint(p)
    c = _build(name, seed=1)
    oc = _encode_all(c, x)
    p0 = next(iter(oa))
    if name.startswith("pixels"):  # no weights: the seed changes nothing
        torch.testing.assert_close(oa[p0], oc[p0])
    else:
        assert not torch.allclose(oa[p0], oc[p0])
        assert a.fingerprint(p0) != c.fingerprint(p0)
    # preprocessing is part of the fingerprint
    size = {"pixels": 14, "pixels:rgb": 14, "clip:tiny": 48, "sam:tiny": 32, "dinov2:tiny": 28}[name]
    d = _build(name, image_size=size)
    assert d.image_size == size and d.provenance()["preprocessing"]["size"] == size
    od = _encode_all(d, _batch(d))
    assert all(od[p].shape[0] == 3 for p in od)
    p_nofit = next(p for p in d.products if p != "pca_map")
    assert d.fingerprint(p_nofit) != a.fingerprint(p_nofit)


@pytest.mark.parametrize("name", OFFLINE_IMAGE)
def test_split_transform_is_bit_identical(name: str) -> None:
    """Workers hand over uint8 and the device finishes the transform: same floats as the whole transform."""
    from featurelt.images.transforms import DeviceStage, split_transform

    from featurelt.images.packing import PackedImages

    enc = _build(name)
    stages = split_transform(enc.transform)
    assert stages is not None
    host, device_stage = stages
    pickle.loads(pickle.dumps(host)), pickle.loads(pickle.dumps(device_stage))  # DataLoader workers
    parts = [host(im) for im in _images()]
    assert all(p.dtype == torch.uint8 for p in parts)
    if enc.family == "sam":  # longest_pad: the sizes differ until the device stage pads after normalising
        assert len({p.shape for p in parts}) > 1 and device_stage.pad_to == enc.image_size
        assert torch.equal(device_stage(parts), _batch(enc))
        assert torch.equal(device_stage(PackedImages.pack(parts)), _batch(enc))
        parts = [host(im.resize((30, 20))) for im in _images()]  # one size: a batch
        assert torch.equal(device_stage(stack_images(parts)), torch.stack([enc.preprocess(im.resize((30, 20)))
                                                                           for im in _images()]))
        return
    assert torch.equal(device_stage(torch.stack(parts)), _batch(enc))
    out = device_stage(stack_images(parts))  # the channels-last batch workers hand over: same floats
    assert out.is_contiguous() and torch.equal(out, _batch(enc))
    with pytest.raises(TypeError, match="uint8"):
        device_stage(torch.stack(parts).float())
    # by hand: one grey pixel through a 3-channel DeviceStage
    x = torch.full((1, 1, 1, 1), 51, dtype=torch.uint8)
    out = DeviceStage((0.1, 0.2, 0.3), (0.5, 0.5, 0.25), grey=True)(x)
    np.testing.assert_allclose(out.flatten().numpy(), [(0.2 - 0.1) / 0.5, (0.2 - 0.2) / 0.5, (0.2 - 0.3) / 0.25], atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_stack_images_is_a_channels_last_stack(channels: int) -> None:
    """Host stages hand over [C, H, W] views of interleaved pixels; stack_images batches them
    channels-last (the same values as torch.stack), and both resamplings give the same result on
    either layout."""
    from featurelt.images.transforms import ConvertMode, DeviceResize, HostStage

    rng = np.random.default_rng(3)
    mode = "L" if channels == 1 else "RGB"
    images = [Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).convert(mode) for _ in range(4)]
    parts = [HostStage(ConvertMode(mode))(im) for im in images]
    assert parts[0].shape == (channels, 20, 30) and parts[0].permute(1, 2, 0).is_contiguous()  # a view of [H, W, C]
    np.testing.assert_array_equal(parts[1].permute(1, 2, 0).numpy(), np.asarray(images[1]).reshape(20, 30, channels))
    batch = stack_images(parts)
    assert batch.shape == (4, channels, 20, 30) and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack(parts))
    floats = [torch.rand(channels, 20, 30) for _ in range(3)]  # a whole transform's output: stays contiguous
    assert stack_images(floats).is_contiguous() and torch.equal(stack_images(floats), torch.stack(floats))
    resize = DeviceResize(16, 18, "shortest_crop", "bicubic")
    assert torch.equal(resize(batch), resize(torch.stack(parts).contiguous()))
    flat = torch.stack(parts).contiguous()
    assert torch.equal(resize.resample_float(batch, 18, 27), resize.resample_float(flat, 18, 27))
    assert resize.resample_float(batch, 18, 27).is_contiguous()


class _PackedBatches(torch.utils.data.IterableDataset):
    def __init__(self, images: list[torch.Tensor]) -> None:
        self.images = images

    def __iter__(self):
        from featurelt.images.packing import PackedImages

        yield PackedImages.pack(self.images)


def test_packed_images_cross_to_the_main_process_as_one_buffer() -> None:
    """Images of different sizes travel as one uint8 buffer: unpacked they equal the images, a slice
    is the images in it, DeviceStage takes the packed batch as it takes the list, and a DataLoader
    worker hands the batch over as one shared-memory buffer (not one per image)."""
    from featurelt.images.packing import PackedImages
    from featurelt.images.transforms import DeviceResize, DeviceStage

    rng = np.random.default_rng(4)
    arrays = [rng.integers(0, 256, (h, w, c), dtype=np.uint8) for h, w, c in [(20, 30, 3), (9, 14, 3), (25, 11, 1), (16, 16, 3)]]
    images = [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]  # [C, H, W] views, as workers make them
    packed = PackedImages.pack(images)
    assert len(packed) == 4 and packed.data.numel() == sum(a.size for a in arrays)
    for t, u in zip(images, packed.unpack()):
        assert torch.equal(t, u) and u.permute(1, 2, 0).is_contiguous()
    half = packed[2:]
    assert half.shapes == packed.shapes[2:] and all(torch.equal(a, b) for a, b in zip(half.unpack(), images[2:]))
    assert half.data.untyped_storage().data_ptr() == packed.data.untyped_storage().data_ptr()  # a view
    with pytest.raises(ValueError, match="contiguous"):
        packed[::2]
    stage = DeviceStage((0.5, 0.4, 0.3), (0.2, 0.3, 0.4), resize=DeviceResize(12, 14, "shortest_crop", "bilinear"))
    rgb = [t if t.shape[0] == 3 else t.expand(3, -1, -1) for t in images]
    assert torch.equal(stage(PackedImages.pack(rgb)), stage(rgb))
    got = next(iter(torch.utils.data.DataLoader(_PackedBatches(images), batch_size=None, num_workers=1,
                                                multiprocessing_context="spawn")))  # lance is loaded: no fork
    assert isinstance(got, PackedImages) and got.shapes == packed.shapes
    views = got.unpack()
    assert all(torch.equal(a, b) for a, b in zip(views, images))
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1


def _resize_images() -> list[Image.Image]:
    """Smooth and noisy images, up- and downscaled by every tiny transform, one over max_pixels."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:40, 0:56]
    smooth = np.stack([127 + 120 * np.sin(xx / 7 + c) * np.cos(yy / 11) for c in range(3)], -1).astype(np.uint8)
    return [Image.fromarray(smooth), Image.fromarray(rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L"),
            Image.fromarray(rng.integers(0, 256, (64, 50, 4), dtype=np.uint8), mode="RGBA"),
            Image.fromarray(rng.integers(0, 256, (16, 12, 3), dtype=np.uint8)).convert("P")]


def test_resized_size_follows_torchvision() -> None:
    from torchvision.transforms import functional as TF

    from featurelt.images.transforms import resized_size

    for h, w, size in [(37, 45, 32), (45, 37, 32), (28, 28, 224), (375, 500, 224), (500, 333, 256), (7, 1000, 5)]:
        out = TF.resize(Image.new("RGB", (w, h)), size)
        assert resized_size(h, w, size) == (out.height, out.width)


@pytest.mark.parametrize("name", OFFLINE_IMAGE)
def test_device_resize_is_within_two_grey_levels_of_pil(name: str) -> None:
    """resize_on_device: workers hand over the decoded image, DeviceStage resizes, crops and normalises;
    the result is the whole PIL transform's within 2 grey levels, on a few percent of the values.
    Images PIL must resize itself (over max_pixels; palette / alpha images under open_clip, which
    resizes before it converts) give the whole transform's floats exactly."""
    from featurelt.images.transforms import DeviceResize, split_transform

    enc = _build(name)
    stages = split_transform(enc.transform, resize_on_device=True)
    host, dev = stages
    resize = dev.resize
    assert dev.pad_to == (enc.image_size if enc.family == "sam" else None)  # SAM: longest side, padded after
    assert isinstance(resize, DeviceResize)
    pickle.loads(pickle.dumps(host)), pickle.loads(pickle.dumps(dev))
    images = _resize_images()
    parts = [host(im) for im in images]
    ref = torch.stack([enc.preprocess(im) for im in images])
    out = dev(parts)  # a list: the sizes differ
    assert out.shape == ref.shape and out.dtype == torch.float32
    std = torch.tensor(dev.std).view(1, -1, 1, 1)
    levels = ((out - ref) * std * 255).abs()  # back on the 0..255 scale
    by_pil = [(im.mode not in ("RGB", "L") and host.resize_first) or im.width * im.height > resize.max_pixels
              for im in images]
    assert not all(by_pil)
    for i, im in enumerate(images):
        if by_pil[i]:
            assert tuple(parts[i].shape[1:]) == resize.output_size(im.height, im.width)
            assert torch.equal(out[i], ref[i])
        else:
            assert parts[i].shape[1:] == (im.height, im.width)  # went over at its decoded size
            assert levels[i].max() <= 2 + 1e-3
    assert (levels > 0.5).float().mean() < 0.05
    # one size: the batch goes over as one tensor and gives the same as the list
    same = torch.stack([host(images[0]), host(images[0])])
    assert torch.equal(dev(same), dev([same[0], same[1]]))
    # an image over max_pixels is resized by PIL in the worker; the device only crops: exact
    side = int(resize.max_pixels ** 0.5) + 2
    big = Image.fromarray(np.random.default_rng(2).integers(0, 256, (side, side + 9, 3), dtype=np.uint8))
    hb = host(big)
    assert tuple(hb.shape[1:]) == resize.output_size(side, side + 9)
    assert torch.equal(dev([hb]), enc.preprocess(big)[None])


def _encoded(img: Image.Image, **save) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, **save)
    return buf.getvalue()


def _files() -> dict[str, tuple[bytes, bool]]:
    """Encoded images: ``{case: (bytes, whether torchvision may decode it in place of PIL)}``."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:37, 0:53]
    smooth = Image.fromarray(np.stack([127 + 120 * np.sin(xx / 5 + c) * np.cos(yy / 9) for c in range(3)], -1)
                             .astype(np.uint8))
    noisy = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    return {
        "png rgb": (_encoded(noisy, format="PNG"), True),
        "png grey": (_encoded(noisy.convert("L"), format="PNG"), True),
        "png interlaced": (_encoded(noisy, format="PNG", interlace=1), True),
        "jpeg 4:2:0": (_encoded(smooth, format="JPEG", quality=90), True),
        "jpeg 4:4:4": (_encoded(smooth, format="JPEG", quality=95, subsampling=0), True),
        "jpeg progressive": (_encoded(smooth, format="JPEG", progressive=True), True),
        "jpeg grey": (_encoded(smooth.convert("L"), format="JPEG"), True),
        "png palette": (_encoded(noisy.convert("P"), format="PNG"), False),
        "png rgba": (_encoded(noisy.convert("RGBA"), format="PNG"), False),
        "png 16-bit": (_encoded(Image.fromarray(rng.integers(0, 65535, (20, 30)).astype(np.uint16)), format="PNG"),
                       False),
        "jpeg cmyk": (_encoded(smooth.convert("CMYK"), format="JPEG"), False),
        "bmp": (_encoded(noisy, format="BMP"), False),
        "gif": (_encoded(noisy.convert("P"), format="GIF"), False),
    }


def test_plain_image_size_reads_png_and_jpeg_headers() -> None:
    from featurelt.images.decode import decode_bytes, decode_rgb_tensor, plain_image_size

    for case, (data, plain) in _files().items():
        size = plain_image_size(data)
        assert (size is not None) == plain, case
        if plain:
            ref = decode_bytes(data)
            assert size == ref.size, case
            out = decode_rgb_tensor(data)
            assert out.dtype == torch.uint8 and torch.equal(
                out, torch.from_numpy(np.array(ref.convert("RGB"))).permute(2, 0, 1)), case  # PIL's pixels
            assert out.permute(1, 2, 0).is_contiguous(), case  # interleaved, as stack_images wants it
    assert plain_image_size(b"") is None and plain_image_size(b"\xff\xd8\xff") is None
    assert plain_image_size(b"not an image at all") is None


@pytest.mark.parametrize("name", OFFLINE_IMAGE)
def test_host_stage_from_bytes_equals_the_pil_route(name: str) -> None:
    """With the resize on the device, plain PNG / JPEG files skip PIL (torchvision decodes them) and
    give exactly what the PIL route gives, or within 2 grey levels when the image is over
    max_pixels (resized in the worker with uint8 kernels instead of PIL); everything else (and a
    stage that does not convert to RGB) returns None and goes through PIL."""
    from featurelt.images.decode import decode_bytes

    enc = _build(name)
    stages = split_transform(enc.transform, resize_on_device=True)
    host = stages[0] if stages else None
    if host is None:
        return
    assert host.to_rgb == (host(Image.new("L", (9, 9))).shape[0] == 3)  # pixels: grey
    files = _files()
    assert split_transform(enc.transform)[0].from_bytes(files["png rgb"][0]) is None  # resize on the host: PIL
    side = int(host.resize.max_pixels ** 0.5) + 1  # over max_pixels: resized in the worker
    yy, xx = np.mgrid[0:side + 7, 0:side]
    big = np.stack([127 + 120 * np.sin(xx / 9 + c) * np.cos(yy / 13) for c in range(3)], -1).astype(np.uint8)
    files["png over max_pixels"] = (_encoded(Image.fromarray(big), format="PNG"), True)
    files["jpeg over max_pixels"] = (_encoded(Image.fromarray(big), format="JPEG", quality=90), True)
    png = files["png rgb"][0]
    files["png truncated"] = (png[:len(png) // 2], False)  # the header parses, the pixels do not
    for case, (data, plain) in files.items():
        out = host.from_bytes(data)
        assert (out is not None) == (plain and host.to_rgb), case
        if out is None:
            continue
        ref = host(decode_bytes(data).convert("RGB"))
        if "over max_pixels" not in case:
            assert torch.equal(out, ref), case
        else:
            assert out.shape == ref.shape and tuple(out.shape[1:]) == host.resize.output_size(side + 7, side), case
            levels = (out.float() - ref.float()).abs()
            assert levels.max() <= 2 and levels.mean() < 0.2, case
    Image.MAX_IMAGE_PIXELS, limit = side * side - 1, Image.MAX_IMAGE_PIXELS
    try:  # a decompression bomb goes to PIL, which refuses it
        assert host.from_bytes(files["png over max_pixels"][0]) is None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


@pytest.mark.parametrize("channels", [1, 3])
def test_both_resamplings_are_within_two_grey_levels_of_pil(channels: int) -> None:
    """resample_uint8 (the CPU's) and resample_float (CUDA's, run here on the CPU) against PIL's
    resize, up and down, bilinear and bicubic: at most 2 grey levels apart, 0.2 on average."""
    from featurelt.images.transforms import DeviceResize

    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:64, 0:50]
    smooth = (127 + 120 * np.sin(xx / 5) * np.cos(yy / 7)).astype(np.uint8)
    for arr in (smooth, rng.integers(0, 256, (37, 45), dtype=np.uint8)):
        arr = np.stack([arr] * channels, -1) if channels == 3 else arr
        im = Image.fromarray(arr)
        x = torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], channels)).permute(2, 0, 1)[None]
        for nh, nw in [(224, 179), (32, 38), (20, 16), (arr.shape[0], 12)]:
            for interp in ("bilinear", "bicubic"):
                r = DeviceResize(16, None, "squash", interp)
                pil = im.resize((nw, nh), Image.BICUBIC if interp == "bicubic" else Image.BILINEAR)
                ref = torch.from_numpy(np.asarray(pil, dtype=np.float32))
                ref = ref.reshape(nh, nw, channels).permute(2, 0, 1)[None]
                for out in (r.resample_uint8(x, nh, nw), r.resample_float(x, nh, nw)):
                    assert out.shape == ref.shape
                    levels = (out.float() - ref).abs()
                    # most values equal PIL's; a mild downscale of a smooth image has up to 17 % off by one
                    assert levels.max() <= 2 and levels.mean() < 0.2, (nh, nw, interp, out.dtype)
    assert r.resample_uint8(x, 8, 8).dtype == torch.uint8 and r.resample_float(x, 8, 8).dtype == torch.float32


def test_device_resize_by_hand() -> None:
    """A 2x1 image squashed to 1x1 (bilinear, antialiased: the mean) and a constant image upscaled."""
    from featurelt.images.transforms import DeviceResize

    x = torch.tensor([[[[10, 21]]]], dtype=torch.uint8)  # [1, 1, 1, 2]
    out = DeviceResize(1, None, "squash", "bilinear")(x)
    assert out.tolist() == [[[[16.0]]]]  # (10 + 21) / 2 = 15.5, rounded half to even
    const = torch.full((1, 3, 5, 7), 200, dtype=torch.uint8)
    up = DeviceResize(8, 8, "shortest_crop", "bicubic")(const)
    assert up.shape == (1, 3, 8, 8) and torch.all(up == 200)
    with pytest.raises(TypeError, match="uint8"):
        from featurelt.images.transforms import DeviceStage

        DeviceStage((0.0,), (1.0,), resize=DeviceResize(4))([torch.zeros(1, 4, 4)])


def test_pixels_values_by_hand() -> None:
    enc = build_encoder("pixels", image_size=4)
    arr = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    v = enc.encode(enc.preprocess(Image.fromarray(arr, mode="L"))[None])["pixels"]
    torch.testing.assert_close(v[0], torch.tensor(arr.reshape(-1) / 255.0, dtype=torch.float32))
    assert build_encoder("pixels").products == {"pixels": 784}
    rgb = build_encoder("pixels:rgb", image_size=2)
    im = np.zeros((2, 2, 3), dtype=np.uint8)
    im[..., 0], im[..., 2] = 255, 51
    torch.testing.assert_close(rgb.encode(rgb.preprocess(Image.fromarray(im))[None])["pixels"][0],
                               torch.tensor([1.0] * 4 + [0.0] * 4 + [0.2] * 4))


# -- named models need weights ---------------------------------------------------------------------
@pytest.mark.parametrize("name,how", [("clip:ViT-B-32", "--checkpoint FILE"), ("sam:vit_b", "sam_vit_b_01ec64.pth"),
                                      ("dinov2:small", "facebook/dinov2-small")])
def test_named_model_without_weights_is_a_helpful_error(name: str, how: str, tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match="needs pretrained weights but no checkpoint was given") as err:
        build_encoder(name)
    assert how in str(err.value) and "--untrained" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)  # the CLI reports it as one line
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)  # crosses process boundaries
    with pytest.raises(MissingWeightsError, match="checkpoint not found"):
        build_encoder(name, checkpoint=tmp_path / "missing.pth")


def test_clip_text_tower_without_weights_is_an_error() -> None:
    with pytest.raises(MissingWeightsError):
        build_text_encoder("clip:ViT-B-32")


def test_untrained_named_model_is_explicit() -> None:
    enc = build_encoder("clip:ViT-S-32", untrained=True, image_size=64)  # small model and input: fast on CPU
    prov = enc.provenance()
    assert prov["trained"] is False and prov["checkpoint_sha256"] is None and prov["seed"] == 0
    out = enc.encode(torch.zeros(2, 3, 64, 64))["embedding"]
    assert out.shape == (2, 384)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))


# -- loading from checkpoints through the real loaders ------------------------------------------------
def test_clip_tiny_checkpoint_roundtrip(tmp_path: Path) -> None:
    src = build_encoder("clip:tiny", seed=1)
    ckpt = tmp_path / "clip_tiny.pt"
    torch.save(src.model.state_dict(), ckpt)
    loaded = build_encoder("clip:tiny", checkpoint=ckpt, seed=0)  # seed 0 init is overwritten by the file
    x = _batch(src)
    torch.testing.assert_close(loaded.encode(x)["embedding"], src.encode(x)["embedding"])
    assert not torch.allclose(build_encoder("clip:tiny", seed=0).encode(x)["embedding"], src.encode(x)["embedding"])
    prov = loaded.provenance()
    assert prov["trained"] is True and prov["checkpoint_sha256"] == checkpoint_sha256(ckpt) and prov["seed"] is None
    assert loaded.fingerprint("embedding") != src.fingerprint("embedding")
    other = tmp_path / "other.pt"
    torch.save(build_encoder("clip:tiny", seed=2).model.state_dict(), other)
    assert build_encoder("clip:tiny", checkpoint=other).fingerprint("embedding") != loaded.fingerprint("embedding")
    # text tower from the same file
    t_src, t_ld = build_text_encoder("clip:tiny", seed=1), build_text_encoder("clip:tiny", checkpoint=ckpt)
    torch.testing.assert_close(t_ld.encode_classes(["cat", "dog"]), t_src.encode_classes(["cat", "dog"]))
    assert t_ld.fingerprint("embedding") != t_src.fingerprint("embedding")


def test_clip_named_model_path_with_custom_open_clip_config(tmp_path: Path) -> None:
    """The clip:<model> path (open_clip.create_model_and_transforms(model, pretrained=FILE)) on a tiny
    config registered with open_clip, loading clip:tiny's weights: same outputs."""
    import open_clip

    from featurelt.encoders.clip import TINY_CONFIG

    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "featurelt-test-tiny.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(cfg_dir)
    src = build_encoder("clip:tiny", seed=3)
    ckpt = tmp_path / "w.pt"
    torch.save(src.model.state_dict(), ckpt)
    named = build_encoder("clip:featurelt-test-tiny", checkpoint=ckpt)
    x = _batch(src)
    assert named.image_size == 32 and named.provenance()["trained"] is True
    torch.testing.assert_close(named.encode(x)["embedding"], src.encode(x)["embedding"])
    with pytest.raises(MissingWeightsError):
        build_encoder("clip:featurelt-test-tiny")


@pytest.mark.parametrize("prefixed", [True, False])
def test_sam_tiny_checkpoint_roundtrip(tmp_path: Path, prefixed: bool) -> None:
    src = build_encoder("sam:tiny", seed=1, map_size=MAP_SIZE)
    state = src.model.state_dict()
    if prefixed:  # the official SAM checkpoints hold the whole Sam; the image encoder is under image_encoder.
        state = {**{f"image_encoder.{k}": v for k, v in state.items()}, "mask_decoder.dummy": torch.zeros(1)}
    ckpt = tmp_path / "sam_tiny.pth"
    torch.save(state, ckpt)
    loaded = build_encoder("sam:tiny", checkpoint=ckpt, map_size=MAP_SIZE)
    x = _batch(src)
    torch.testing.assert_close(loaded.encode(x, products=["latent"])["latent"],
                               src.encode(x, products=["latent"])["latent"])
    assert loaded.provenance()["checkpoint_sha256"] == checkpoint_sha256(ckpt)
    assert loaded.fingerprint("latent") != src.fingerprint("latent")


def test_dinov2_tiny_checkpoint_roundtrip(tmp_path: Path) -> None:
    src = build_encoder("dinov2:tiny", seed=1)
    src.model.save_pretrained(tmp_path / "dino")
    loaded = build_encoder("dinov2:tiny", checkpoint=tmp_path / "dino")
    x = _batch(src)
    a, b = src.encode(x), loaded.encode(x)
    for p in ("cls", "mean_patch"):
        torch.testing.assert_close(a[p], b[p])
    assert loaded.provenance()["trained"] is True
    assert loaded.provenance()["checkpoint_sha256"] == checkpoint_sha256(tmp_path / "dino")
    assert loaded.fingerprint("cls") != src.fingerprint("cls")
    with pytest.raises(ValueError, match="must be a directory"):
        build_encoder("dinov2:tiny", checkpoint=tmp_path / "dino" / "config.json")


# -- SAM latent and PCA map (METHODS.md section 2) --------------------------------------------------------
def test_sam_latent_is_avgpool_of_the_neck() -> None:
    enc = build_encoder("sam:tiny", map_size=MAP_SIZE)
    x = _batch(enc)
    maps = enc.feature_maps(x)
    assert maps.shape == (3, 256, 4, 4)
    torch.testing.assert_close(enc.encode(x, products=["latent"])["latent"], maps.mean(dim=(2, 3)))


def test_sam_pca_map_matches_numpy_svd() -> None:
    rng = np.random.default_rng(0)
    direction = rng.normal(size=256)
    direction /= np.linalg.norm(direction)
    coef = rng.normal(scale=5.0, size=(6, 1, 4, 4))
    maps = coef * direction[None, :, None, None] + rng.normal(scale=0.3, size=(6, 256, 4, 4)) + 2.0
    maps_t = torch.tensor(maps, dtype=torch.float32)
    enc = build_encoder("sam:tiny", map_size=4)  # map_size = neck size: no resize
    assert enc.requires_fit("pca_map") and not enc.requires_fit("latent")
    with pytest.raises(RuntimeError, match="must be fitted first"):
        enc.encode(torch.zeros(1, 3, 64, 64))
    enc.fit([maps_t[:4], maps_t[4:]])  # streamed in two batches
    state = enc.fit_state("pca_map")
    # reference: SVD of the centered positions x channels matrix
    X = maps_t.double().numpy().transpose(0, 2, 3, 1).reshape(-1, 256)
    mu = X.mean(0)
    _, _, vt = np.linalg.svd(X - mu, full_matrices=False)
    u_ref = vt[0]
    u = np.array(state["component"])
    np.testing.assert_allclose(np.array(state["mean"]), mu, atol=1e-5)
    assert abs(abs(u @ u_ref) - 1) < 1e-5
    assert abs(u @ direction) > 0.99  # it found the planted direction
    sv = np.linalg.svd(X - mu, compute_uv=False) ** 2
    np.testing.assert_allclose(state["explained_variance_ratio"], sv[0] / sv.sum(), rtol=1e-4)
    # the map product = projection onto the component, per position, row-major
    from featurelt.encoders.sam import channel_pca_project, resize_flat

    proj = resize_flat(channel_pca_project(maps_t, torch.tensor(state["mean"]), torch.tensor(state["component"])), 4)
    ref = ((X - mu) @ u).reshape(6, 16)
    sign = np.sign(ref.ravel() @ proj.numpy().ravel())
    np.testing.assert_allclose(proj.numpy(), sign * ref, atol=1e-3)
    # resize: antialiased bilinear = PIL's BILINEAR (triangle filter) on a float image; constant stays constant
    small = resize_flat(torch.tensor(ref.reshape(6, 4, 4), dtype=torch.float32), 2).numpy()
    pil = np.stack([np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize((2, 2), Image.BILINEAR))
                    for m in ref.reshape(6, 4, 4)]).reshape(6, 4)
    np.testing.assert_allclose(small, pil, atol=1e-4)
    torch.testing.assert_close(resize_flat(torch.full((1, 4, 4), 3.0), 16), torch.full((1, 256), 3.0))


def test_sam_pca_state_roundtrip_and_encode() -> None:
    enc = build_encoder("sam:tiny", map_size=MAP_SIZE)
    x = _batch(enc)
    enc.fit([x[:2], x[2:]])  # image batches
    out = enc.encode(x)
    # the same basis from the neck maps directly
    by_maps = build_encoder("sam:tiny", map_size=MAP_SIZE)
    by_maps.fit([enc.feature_maps(x)])
    np.testing.assert_allclose(by_maps.fit_state("pca_map")["component"], enc.fit_state("pca_map")["component"],
                               atol=1e-5)
    # manual: project the neck map, bilinear resize to map_size, flatten
    maps = enc.feature_maps(x)
    st = enc.fit_state("pca_map")
    proj = torch.einsum("bchw,c->bhw", maps - torch.tensor(st["mean"]).view(1, -1, 1, 1), torch.tensor(st["component"]))
    ref = torch.nn.functional.interpolate(proj[:, None], size=(MAP_SIZE, MAP_SIZE), mode="bilinear",
                                          align_corners=False, antialias=True).reshape(3, -1)
    torch.testing.assert_close(out["pca_map"], ref)
    # the stored provenance restores the same basis: same fingerprint, same vectors
    prov = json.loads(json.dumps(enc.provenance()))
    later = build_encoder("sam:tiny", map_size=MAP_SIZE)
    later.load_fit_state("pca_map", prov["fit"]["pca_map"])
    assert later.fingerprint("pca_map") == enc.fingerprint("pca_map")
    torch.testing.assert_close(later.encode(x)["pca_map"], out["pca_map"])
    other = build_encoder("sam:tiny", map_size=MAP_SIZE)
    other.fit([x[:1]])
    assert other.fingerprint("pca_map") != enc.fingerprint("pca_map")
    # latent does not depend on the basis or the map size: fitting pca_map leaves its fingerprint alone
    unfitted = build_encoder("sam:tiny", map_size=MAP_SIZE * 2)
    assert unfitted.fingerprint("latent") == enc.fingerprint("latent") == other.fingerprint("latent")
    with pytest.raises(ValueError, match="256-d"):
        later.load_fit_state("pca_map", {**prov["fit"]["pca_map"], "mean": [0.0] * 3})


# -- text ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("text:minilm")


def test_minilm_similarity_and_norm(minilm) -> None:
    e = minilm.encode_classes(["cat", "kitten", "truck"])
    assert e.shape == (3, 384) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2
    prov = minilm.provenance()
    assert prov["trained"] is True and prov["templates"] == ["a photo of a {}."] and len(prov["checkpoint_sha256"]) == 64
    assert minilm.default_set_name() == "minilm"


def test_template_ensemble_by_hand(minilm, tmp_path: Path) -> None:
    f = tmp_path / "templates.txt"
    f.write_text("# comment\na photo of a {}.\n\nan origami {}.\n")
    assert load_templates(f) == ("a photo of a {}.", "an origami {}.")
    enc = build_text_encoder("text:minilm", templates=f)
    got = enc.encode_classes(["cat", "truck"])
    parts = torch.nn.functional.normalize(minilm.encode_text(["a photo of a cat.", "an origami cat.",
                                                              "a photo of a truck.", "an origami truck."]), dim=-1)
    ref = torch.nn.functional.normalize(parts.view(2, 2, -1).mean(1), dim=-1)
    torch.testing.assert_close(got, ref)
    assert enc.fingerprint("embedding") != minilm.fingerprint("embedding")
    with pytest.raises(ValueError, match="must contain"):
        load_templates(["no placeholder"])


@pytest.mark.parametrize("name", OFFLINE_TEXT)
def test_text_encoder_contract(name: str) -> None:
    enc = build_text_encoder(name)
    v = enc.encode_text(["a photo of a cat.", "a photo of a dog."])
    assert v.shape == (2, enc.products["embedding"]) and v.dtype == torch.float32
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(build_text_encoder(name).encode_text(["a photo of a cat."]), v[:1])
    json.dumps(enc.provenance())


def test_text_encoder_is_not_an_image_encoder() -> None:
    with pytest.raises(ValueError, match="build_text_encoder"):
        build_encoder("text:minilm")
    with pytest.raises(ValueError, match="no text tower"):
        build_text_encoder("sam:tiny")


# -- device ----------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_device_stage_on_cuda_is_bit_identical() -> None:
    """The uint8 -> normalised float step gives the same bits on the GPU as the CPU transform."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from featurelt.images.transforms import DeviceStage

    stage = DeviceStage((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    x = torch.arange(256, dtype=torch.uint8).repeat(3 * 4, 1).view(4, 3, 16, 16)
    assert torch.equal(stage(x.cuda()).cpu(), stage(x))


@pytest.mark.gpu
def test_device_stages_do_not_make_the_host_wait() -> None:
    """DeviceResize + DeviceStage on CUDA queue work without synchronising (a host-to-device copy of
    a Python list would wait for the batch in flight): torch's sync debug mode turns a sync into an error."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from featurelt.images.transforms import DeviceResize, DeviceStage

    stage = DeviceStage((0.5, 0.4, 0.3), (0.2, 0.3, 0.4), resize=DeviceResize(32, 36, "shortest_crop", "bicubic"))
    batch = torch.randint(0, 256, (4, 3, 40, 50), dtype=torch.uint8).cuda()
    images = [im.cuda() for im in (torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8),
                                   torch.randint(0, 256, (3, 64, 48), dtype=torch.uint8))]
    stage(batch), stage(images)  # first call: the per-device constants are made (one copy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stage(batch), stage(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("name", OFFLINE_IMAGE)
def test_launching_a_batch_does_not_make_the_host_wait(name: str) -> None:
    """The whole per-batch launch of the extract loop (pinning, host-to-device copy, device stages,
    the encoder's forward under autocast, the device-to-host copy of the outputs) queues work
    without synchronising: a sync anywhere in it would make the host wait for the batch in flight
    and leave the GPU idle while the host prepares the next one."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from featurelt.extract import launch_batch

    enc = _build(name, device="cuda").to("cuda")
    stages = split_transform(enc.transform, resize_on_device=True)
    images = [im.convert("RGB").resize((40, 30)) for im in _images()]
    host, prepare = stages
    products = [p for p in enc.products if not enc.requires_fit(p)]
    from featurelt.images.packing import PackedImages

    batches = [stack_images([host(im) for im in images]),  # channels-last, as workers hand it over
               # images of different sizes, packed as workers hand them over
               PackedImages.pack([host(im.resize((40 + 3 * i, 30 + i))) for i, im in enumerate(images)])]
    for batch in batches:
        launch_batch(enc, batch, products, device="cuda", prepare=prepare).result()  # first call: kernels, allocators
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            job = launch_batch(enc, batch, products, device="cuda", prepare=prepare)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert all(v.shape[0] == len(images) for v in job.result().values())

@pytest.mark.gpu
def test_device_resize_on_cuda_matches_cpu() -> None:
    """The GPU resize (float passes) gives the same passes' grey levels on the CPU, up to 1 where float
    rounding lands on a half; and the CPU's uint8 resampling within 2."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from featurelt.images.transforms import DeviceResize

    rng = np.random.default_rng(0)
    for h, w in [(37, 45), (28, 28), (375, 500), (90, 120)]:
        x = torch.from_numpy(rng.integers(0, 256, (2, 3, h, w), dtype=np.uint8))
        for interp in ("bilinear", "bicubic"):
            r = DeviceResize(32, 36, "shortest_crop", interp)
            nh, nw = r.output_size(h, w)
            a, b = r.resample_float(x, nh, nw), r.resample_float(x.cuda(), nh, nw).cpu()  # CUDA's path, both devices
            assert (a - b).abs().max() <= 1 and (a != b).float().mean() < 0.01
            assert (r(x.cuda()).cpu() - r(x)).abs().max() <= 2  # against the CPU's uint8 resampling


@pytest.mark.gpu
@pytest.mark.parametrize("name", OFFLINE_IMAGE)
def test_cuda_matches_cpu(name: str) -> None:
    """Same encoder on CUDA: float32 outputs on the device, close to CPU, same fingerprint; under bf16
    autocast still float32 (checked on an H100: max |diff| <= 6e-4 fp32, <= 0.03 bf16 for the tiny models)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cpu, gpu = _build(name), _build(name, device="cuda")
    x = _batch(cpu)
    if "pca_map" in cpu.products:
        cpu.fit([x])
        gpu.load_fit_state("pca_map", cpu.fit_state("pca_map"))
    oc, og = cpu.encode(x), gpu.encode(x.cuda())
    for p in oc:
        assert og[p].device.type == "cuda" and og[p].dtype == torch.float32
        torch.testing.assert_close(og[p].cpu(), oc[p], atol=5e-3, rtol=1e-3)
        assert gpu.fingerprint(p) == cpu.fingerprint(p)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ob = gpu.encode(x.cuda())
    assert all(v.dtype == torch.float32 for v in ob.values())
