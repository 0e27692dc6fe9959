"""featurelt.images.augment: crop box / flip reported match the pixels, determinism per (seed, epoch, index), eval = resize + center crop."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from featurelt.data.images import encode_png, sha256_hex  # noqa: E402
from featurelt.images.augment import EvalTransform, TrainTransform  # noqa: E402
from featurelt.images.decode import DecodedImage  # noqa: E402
from featurelt.images.loader import StoreImageLoader  # noqa: E402
from featurelt.store import Store  # noqa: E402
from featurelt.store.schema import arrow_schema  # noqa: E402


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 [h, w, 3]: smooth gradients plus noise (every column differs, so a flip or shift shows)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([255 * xx / w, 255 * yy / h, 127 + 100 * np.sin(xx / 5 + yy / 7)], axis=-1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _decoded(a: np.ndarray) -> DecodedImage:
    return DecodedImage(encode_png(a), "sample t")


def _pil_resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR)).astype(np.int16)


def _hwc(x: "torch.Tensor") -> np.ndarray:
    return x.permute(1, 2, 0).numpy().astype(np.int16)


def test_flip_crop_box_and_flip_match_the_pixels() -> None:
    a = _photo(48, 72)
    t = TrainTransform(24, "flip-crop", seed=3)
    flips = []
    for index in range(24):
        out, extra = t(_decoded(a), {"sample_id": "t"}, index)
        assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 24, 24) and extra["size"] == (72, 48)
        x0, y0, x1, y1 = (int(v) for v in extra["box"])
        assert extra["box"] == (x0, y0, x1, y1) and 0 <= x0 < x1 <= 72 and 0 <= y0 < y1 <= 48
        area = (x1 - x0) * (y1 - y0) / (72 * 48)
        assert 0.08 - 0.01 <= area <= 1.0  # RandomResizedCrop's scale (rounding of w, h aside)
        ref = _pil_resize(np.ascontiguousarray(a[y0:y1, x0:x1]), 24, 24)  # PIL: cut the box, resize
        ref = ref[:, ::-1] if extra["flip"] else ref
        assert np.abs(_hwc(out) - ref).max() <= 2  # PyTorch's uint8 resampling vs PIL: rounding only
        if (x1 - x0) > 2:  # the other orientation does not match (a wrong flip flag would be caught)
            assert np.abs(_hwc(out) - ref[:, ::-1]).max() > 10
        flips.append(extra["flip"])
    assert 4 <= sum(flips) <= 20  # p = 0.5 over 24 draws


def test_train_transform_is_deterministic_per_seed_epoch_index_and_leaves_the_rng_alone() -> None:
    a = _photo(40, 56, seed=1)
    t = TrainTransform(16, "randaugment", seed=7)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = [t.apply(torch.from_numpy(a).permute(2, 0, 1), i) for i in range(6)]
    assert torch.equal(torch.random.get_rng_state(), before)
    again = pickle.loads(pickle.dumps(t))  # what a loader worker gets
    for i in reversed(range(6)):  # another order, another object: the same images
        out, extra = again(_decoded(a), {}, i)
        assert torch.equal(out, first[i][0]) and extra == first[i][1]
    assert len({e["box"] for _, e in first}) == 6  # positions differ
    t.set_epoch(1)
    epoch1 = [t.apply(torch.from_numpy(a).permute(2, 0, 1), i)[1]["box"] for i in range(6)]
    assert epoch1 != [e["box"] for _, e in first]
    other_seed = TrainTransform(16, "randaugment", seed=8).apply(torch.from_numpy(a).permute(2, 0, 1), 0)[1]
    assert other_seed["box"] != first[0][1]["box"]
    # randaugment = the flip-crop image (same box and flip), then ops on it
    fc, fc_extra = TrainTransform(16, "flip-crop", seed=7).apply(torch.from_numpy(a).permute(2, 0, 1), 0)
    assert fc_extra == first[0][1]
    changed = [not torch.equal(TrainTransform(16, "flip-crop", seed=7).apply(torch.from_numpy(a).permute(2, 0, 1),
                                                                              i)[0], first[i][0]) for i in range(6)]
    assert sum(changed) >= 3  # RandAugment changed most images (an op may be Identity)


@pytest.mark.parametrize(("h", "w", "crop_pct"), [(48, 64, 1.0), (64, 40, 0.875), (32, 32, 1.0)])
def test_eval_transform_is_resize_shorter_side_then_center_crop(h: int, w: int, crop_pct: float) -> None:
    a = _photo(h, w, seed=2)
    s = 32
    out, extra = EvalTransform(s, crop_pct=crop_pct)(_decoded(a), {}, 0)
    short = int(s / crop_pct)  # 32 or 36
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    ref = _pil_resize(a, nw, nh)
    top, left = int(round((nh - s) / 2)), int(round((nw - s) / 2))
    ref = ref[top:top + s, left:left + s]
    assert tuple(out.shape) == (3, s, s) and np.abs(_hwc(out) - ref).max() <= 2
    assert extra["flip"] is False and extra["size"] == (w, h)
    sx, sy = w / nw, h / nh
    assert extra["box"] == pytest.approx((left * sx, top * sy, (left + s) * sx, (top + s) * sy))
    if (h, w, crop_pct) == (48, 64, 1.0):  # by hand: 64x48 -> 42x32, left = round(5) = 5, box x 5*64/42
        assert extra["box"] == pytest.approx((5 * 64 / 42, 0.0, 37 * 64 / 42, 48.0))
    none, none_extra = TrainTransform(s, "none").apply(torch.from_numpy(a).permute(2, 0, 1), 5)
    if crop_pct == 1.0:
        assert torch.equal(none, out) and none_extra == extra


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(ValueError, match="unknown augment 'mixup'"):
        TrainTransform(32, "mixup")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"scale must be .* got \(0.5, 0.2\)"):
        TrainTransform(32, "flip-crop", scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="crop_pct must be in"):
        EvalTransform(32, crop_pct=1.5)


def test_train_transform_through_the_store_loader_workers(tmp_path: Path) -> None:
    arrays = [_photo(30 + 4 * i, 44 - 2 * i, seed=i) for i in range(4)]
    rows = [{"sample_id": f"s{i}", "dataset": "toy", "split": "train", "label": i, "source": "original", "uri": None,
             "image": encode_png(a), "content_sha256": sha256_hex(encode_png(a)), "width": a.shape[1],
             "height": a.shape[0], "description": None} for i, a in enumerate(arrays)]
    store = Store(tmp_path / "store")
    with store.transaction("test: samples") as tx:
        tx.append("samples", pa.Table.from_pylist(rows, schema=arrow_schema("samples")))
    t = TrainTransform(16, "flip-crop", seed=1)
    t.set_epoch(2)
    plan = [np.array([2, 0, 2]), np.array([3, 1])]
    loader = StoreImageLoader(store.root, store.dataset("samples").version, None, plan, t, num_workers=2)
    batches = list(loader)
    assert [b.index.tolist() for b in batches] == [[0, 1, 2], [3, 4]]
    for b in batches:
        assert tuple(b.images.shape) == (len(b), 3, 16, 16)
        for img, pos, extra, sid in zip(b.images, b.index, b.extras, b.columns["sample_id"]):
            a = arrays[int(sid[1:])]
            want, want_extra = t.apply(torch.from_numpy(a).permute(2, 0, 1), int(pos))  # epoch 2 in the workers
            assert torch.equal(img, want) and extra == want_extra
    assert batches[0].extras[0]["box"] != batches[0].extras[2]["box"]  # the same row at two positions


@pytest.mark.parametrize("augment", ["flip-crop", "none"])
def test_encoded_jpeg_decoded_on_the_device_matches_the_worker_transform(augment: str) -> None:
    """EncodedJpeg draws the same boxes and flips in the workers; finish() (decode_jpeg + float resize, the
    GPU path, run here on the CPU) gives TrainTransform's pixels within rounding."""
    import io

    from featurelt.images.augment import EncodedJpeg
    from featurelt.images.packing import collate

    t = TrainTransform(24, augment, seed=5)  # type: ignore[arg-type]
    enc = EncodedJpeg(t)
    photos = [_photo(40 + 6 * i, 60 - 4 * i, seed=i) for i in range(4)]
    jpegs = []
    for a in photos:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=95)
        jpegs.append(buf.getvalue())
    outs = [enc(DecodedImage(d, f"sample j{i}"), {}, 10 + i) for i, d in enumerate(jpegs)]
    assert all(tuple(x.shape[:2]) == (1, 1) and x.dtype == torch.uint8 for x, _ in outs)
    got = enc.finish(collate([x for x, _ in outs]), [e for _, e in outs], device="cpu")
    assert tuple(got.shape) == (4, 3, 24, 24) and got.dtype == torch.uint8
    for i, d in enumerate(jpegs):
        want, want_extra = t(DecodedImage(d, "x"), {}, 10 + i)
        assert outs[i][1] == want_extra  # same box, flip and size
        assert (got[i].to(torch.int16) - want.to(torch.int16)).abs().max() <= 2
    with pytest.raises(Exception, match="sample p: not an 8-bit grey or RGB JPEG"):
        enc(DecodedImage(encode_png(photos[0]), "sample p"), {}, 0)
    with pytest.raises(ValueError, match="RandAugment"):
        EncodedJpeg(TrainTransform(24, "randaugment"))


def test_the_box_is_torchvisions_get_params_under_the_sample_seed() -> None:
    from torchvision.transforms import RandomResizedCrop

    from featurelt.images.augment import sample_seed

    t = TrainTransform(16, "flip-crop", seed=4, scale=(0.2, 0.9))
    t.set_epoch(3)
    x = torch.from_numpy(_photo(50, 70)).permute(2, 0, 1)
    for index in (0, 7, 123):
        torch.manual_seed(sample_seed(4, 3, index))
        i, j, h, w = RandomResizedCrop.get_params(x, [0.2, 0.9], [3 / 4, 4 / 3])
        flip = bool(torch.rand(1).item() < 0.5)
        assert t.apply(x, index)[1] == {"box": (float(j), float(i), float(j + w), float(i + h)), "flip": flip,
                                        "size": (70, 50)}
