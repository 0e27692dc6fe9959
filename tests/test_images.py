"""featurelt.images: StoreImageLoader over a tiny store (plan order, repeated offsets, extras, failed rows, workers)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

torch = pytest.importorskip("torch")

from featurelt.data.images import encode_png, sha256_hex  # noqa: E402
from featurelt.images.loader import StoreImageLoader  # noqa: E402
from featurelt.images.packing import PackedImages  # noqa: E402
from featurelt.store import Store  # noqa: E402

SIZES = [(8, 8), (8, 8), (6, 10), (8, 8), (8, 8)]  # (h, w); row 2 differs in size; row 4 is damaged


def _store(root: Path) -> tuple[Store, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    arrays, rows = [], []
    for i, (h, w) in enumerate(SIZES):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        data = encode_png(a)[:30] if i == 4 else encode_png(a)
        arrays.append(a)
        rows.append({"sample_id": f"s{i}", "dataset": "toy", "split": "train", "label": i % 2, "source": "original",
                     "uri": None, "image": data, "content_sha256": sha256_hex(data), "width": w, "height": h,
                     "description": None})
    store = Store(root)
    with store.transaction("test: samples") as tx:
        tx.append("samples", pa.Table.from_pylist(rows, schema=pa.schema([
            ("sample_id", pa.string()), ("dataset", pa.string()), ("split", pa.string()), ("label", pa.int32()),
            ("source", pa.string()), ("uri", pa.string()), ("image", pa.large_binary()),
            ("content_sha256", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
            ("description", pa.string())])))
    return store, arrays


class FlipEvery2nd:
    """make_image: the decoded pixels, flipped left-right at odd plan positions; the extra is (position, label)."""

    def __call__(self, decoded, row, index):
        x = torch.from_numpy(np.array(decoded.pil())).permute(2, 0, 1)
        return (x.flip(-1) if index % 2 else x), (index, row["label"])


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_gives_plan_order_with_repeats_extras_and_failures(tmp_path: Path, workers: int) -> None:
    store, arrays = _store(tmp_path / "store")
    plan = [np.array([3, 0, 3]), np.array([1, 4]), np.array([2, 0])]  # row 3 twice; row 4 damaged; row 2 10 px wide
    loader = StoreImageLoader(store.root, store.dataset("samples").version, None, plan, FlipEvery2nd(),
                              columns=("sample_id", "label"), num_workers=workers, pin_memory=True)
    batches = list(loader)
    assert len(loader) == 3 and [b.batch for b in batches] == [0, 1, 2]
    b0, b1, b2 = batches
    assert b0.index.tolist() == [0, 1, 2] and b0.columns == {"sample_id": ["s3", "s0", "s3"], "label": [1, 0, 1]}
    assert b0.extras == [(0, 1), (1, 0), (2, 1)] and b0.failed == []
    assert isinstance(b0.images, torch.Tensor) and b0.images.shape == (3, 3, 8, 8)
    want = [arrays[3], arrays[0][:, ::-1], arrays[3]]  # position 1 flipped
    for got, a in zip(b0.images, want):
        assert np.array_equal(got.permute(1, 2, 0).numpy(), a)
    assert b1.index.tolist() == [3] and b1.columns["sample_id"] == ["s1"]
    assert len(b1.failed) == 1 and b1.failed[0][:2] == (4, "s4") and "sample s4: cannot decode" in b1.failed[0][2]
    assert isinstance(b2.images, PackedImages)  # two sizes: one buffer
    assert [tuple(t.shape) for t in b2.images.unpack()] == [(3, 6, 10), (3, 8, 8)]
    assert b2.index.tolist() == [5, 6]
    first, second = (t.permute(1, 2, 0).numpy() for t in b2.images.unpack())
    assert np.array_equal(first, arrays[2][:, ::-1]) and np.array_equal(second, arrays[0])  # 5 odd: flipped


def test_loader_names_a_plan_offset_out_of_range(tmp_path: Path) -> None:
    store, _ = _store(tmp_path / "store")
    loader = StoreImageLoader(store.root, store.dataset("samples").version, None, [np.array([0, 1]), np.array([2, 5])],
                              FlipEvery2nd(), columns=("sample_id", "label"), num_workers=0)
    it = iter(loader)
    assert len(next(it)) == 2
    with pytest.raises(ValueError, match="plan batch 1: row offset 5 is out of range: samples version 1 has 5 rows"):
        next(it)
