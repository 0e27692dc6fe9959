"""featurelt extract end to end on a tiny store (METHODS.md sections 2 and 5; issue 3 items 2-8).

The store here is written directly (``samples`` + ``classes``, 3 classes x 8 PNG images of 12x12,
train/test), so these tests do not depend on the ingest command and stay fast. When the
session's ``digits_store`` (ingest + make-lt) is available, one test also runs on it.
"""
from __future__ import annotations

import json
import os
import re
import time
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from featurelt.cli import main
from featurelt.data.images import encode_png, sample_id_for, sha256_hex
from featurelt.store import Store

torch = pytest.importorskip("torch")
encoders = pytest.importorskip("featurelt.encoders")

K = 3  # classes
PER_CLASS = 8  # images per class: 6 train + 2 test
SIZE = 12


def _sample_rows(seed: int, n_per_class: int, *, split_train: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for label in range(K):
        for i in range(n_per_class):
            arr = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
            arr[..., label] = 255 - 20 * i  # class-dependent colour
            data = encode_png(arr)
            rows.append({"sample_id": sample_id_for(data), "dataset": "toy", "split": "train" if i < split_train else "test",
                         "label": label, "source": "original", "uri": None, "image": data,
                         "content_sha256": sha256_hex(data), "width": SIZE, "height": SIZE, "description": None})
    return rows


def _samples_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("sample_id", pa.string()), ("dataset", pa.string()), ("split", pa.string()), ("label", pa.int32()),
        ("source", pa.string()), ("uri", pa.string()), ("image", pa.large_binary()), ("content_sha256", pa.string()),
        ("width", pa.int32()), ("height", pa.int32()), ("description", pa.string())]))


def _write_toy_store(root: Path) -> Store:
    store = Store(root)
    rows = _sample_rows(0, PER_CLASS, split_train=6)
    classes = pa.table({"label": pa.array(range(K), pa.int32()), "name": ["red thing", "green thing", "blue thing"],
                        "source": ["original"] * K, "neighbor_of": pa.array([None] * K, pa.int32()),
                        "train_count": pa.array([6] * K, pa.int64()), "bucket": ["few"] * K,
                        "bucket_many": pa.array([100] * K, pa.int64()), "bucket_few": pa.array([20] * K, pa.int64())})
    with store.transaction("test: write toy samples") as tx:
        tx.append("samples", _samples_table(rows))
        tx.append("classes", classes)
    return store


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy") / "store"
    _write_toy_store(root)
    return root


@pytest.fixture()
def store_root(toy_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(toy_root, root)
    return root


def run(root: Path, *args: str) -> int:
    return main(["--store", str(root), "extract", *args, "--no-progress"])


def _ids(store: Store, table: str, where: str = "view = 0") -> list[str]:
    return store.read(table, columns=["sample_id"], filter=where).column("sample_id").to_pylist()


def _image_encoders() -> list[str]:
    names = [n for n in encoders.ENCODERS.names() if n.startswith("pixels") or n.endswith(":tiny")]
    return sorted(n for n in names if not n.startswith("text:"))


# --------------------------------------------------------------------------- every tiny encoder + SQL
@pytest.mark.parametrize("name", _image_encoders())
def test_tiny_encoder_end_to_end(store_root: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(store_root, name, "--batch-size", "8") == 0
    out = capsys.readouterr().out
    store = Store(store_root)
    enc = encoders.build_encoder(name)
    n = K * PER_CLASS
    for product, dim in enc.products.items():
        set_name = enc.default_set_name(product)
        table = f"emb_{set_name}"
        assert store.count(table) == n, (table, out)
        vec = store.dataset(table).schema.field("vector").type
        assert vec.list_size == dim and vec.value_type == pa.float32()
        # SQL over the embedding table joined to samples
        res = store.sql(f"SELECT s.split, count(*) AS n, count(DISTINCT e.sample_id) AS d FROM {table} e "
                        "JOIN samples s USING (sample_id) GROUP BY 1 ORDER BY 1").to_pylist()
        assert res == [{"split": "test", "n": 2 * K, "d": 2 * K}, {"split": "train", "n": 6 * K, "d": 6 * K}]
        prov = store.read("embedding_sets", filter=f"name = '{set_name}'").to_pylist()
        assert len(prov) == 1 and prov[0]["rows"] == n and prov[0]["dim"] == dim and prov[0]["product"] == product
        p = json.loads(prov[0]["provenance"])
        assert p["encoder"] == name and p["store_version_read"] == 1 and p["featurelt_version"]
        assert "samples" in p["tables_read"]
    assert f"{n * len(enc.products)} rows added" in out or f"{n} rows added" in out
    assert re.search(r"loop time: images \d+ %, launch \d+ %, device \d+ %, rows \d+ %, commit \d+ %", out), out
    # the vectors are what the encoder gives for the decoded images through its own (PIL) transform:
    # exactly with --resize-on host; by default (resize on the device) within 2 grey levels of it
    product = next(p for p in enc.products if not enc.requires_fit(p))
    first = store.read(f"emb_{enc.default_set_name(product)}").slice(0, 2)
    samples = {r["sample_id"]: r for r in store.read("samples").to_pylist()}
    from featurelt.images.decode import load_sample_image

    sids = first.column("sample_id").to_pylist()
    x = torch.stack([enc.preprocess(load_sample_image(samples[s])) for s in sids])
    with torch.inference_mode():
        want = enc.encode(x, products=[product])[product].float().numpy()
    got = np.asarray(first.column("vector").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.02)
    cos = np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert np.all(cos > 0.999), cos
    assert run(store_root, name, "--name", "ref", "--resize-on", "host", "--limit", "2", "--products", product) == 0
    store.refresh()
    ref = store.read("emb_ref")
    assert ref.column("sample_id").to_pylist() == sids
    np.testing.assert_allclose(np.asarray(ref.column("vector").to_pylist(), dtype=np.float32), want, rtol=1e-4, atol=1e-5)
    # embeddings lists the sets
    capsys.readouterr()
    assert main(["--store", str(store_root), "embeddings", "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for product, dim in enc.products.items():
        assert listed[enc.default_set_name(product)]["rows"] == n
        assert listed[enc.default_set_name(product)]["dim"] == dim


def test_sam_pca_map_basis_is_reused(store_root: Path) -> None:
    assert run(store_root, "sam:tiny", "--products", "pca_map", "--map-size", "4", "--split", "test") == 0
    store = Store(store_root)
    prov = json.loads(store.read("embedding_sets").column("provenance")[0].as_py())
    assert prov["fit"]["pca_map"]["n_components"] == 1  # fitted on train, stored with the set
    assert store.count("emb_sam_tiny_pca_map") == 2 * K
    # the train rows come later and use the stored basis: same fingerprint, no refit, no duplicates
    assert run(store_root, "sam:tiny", "--products", "pca_map", "--map-size", "4") == 0
    store.refresh()
    fps = store.read("emb_sam_tiny_pca_map", columns=["fingerprint"]).column("fingerprint").to_pylist()
    assert len(fps) == K * PER_CLASS and len(set(fps)) == 1
    assert len(set(_ids(store, "emb_sam_tiny_pca_map"))) == K * PER_CLASS


def test_pca_map_fit_shows_progress(store_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The pca_map fit reads the train split with a progress bar of its own (issue 19 point 11);
    --no-progress hides it."""
    assert main(["--store", str(store_root), "extract", "sam:tiny", "--products", "pca_map", "--map-size", "4",
                 "--split", "test"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"fit sam:tiny pca_map: 100%.*\b18/18\b", err), err  # the 6 train images of each of 3 classes
    assert run(store_root, "sam:tiny", "--products", "pca_map", "--map-size", "4", "--name", "quiet") == 0
    assert "fit sam:tiny" not in capsys.readouterr().err


def test_ray_init_uses_the_machine_or_ray_cpus() -> None:
    from featurelt.extract.ray_engine import ray_init_args

    assert ray_init_args(None, None)["num_cpus"] == os.cpu_count()
    assert ray_init_args(None, 3) == {"num_cpus": 3, "include_dashboard": False, "log_to_driver": False}
    assert ray_init_args("ray://head:10001", None) == {"address": "ray://head:10001", "log_to_driver": False}
    with pytest.raises(ValueError, match="--ray-cpus sets the CPUs of a local Ray"):
        ray_init_args("ray://head:10001", 4)
    with pytest.raises(ValueError, match="--ray-cpus must be >= 1"):
        ray_init_args(None, 0)


def test_text_minilm_and_clip_text_tower(store_root: Path) -> None:
    assert run(store_root, "text:minilm") == 0
    store = Store(store_root)
    rows = store.read("text_embeddings").sort_by("label").to_pylist()
    assert [r["label"] for r in rows] == [0, 1, 2]
    assert [r["class_name"] for r in rows] == ["red thing", "green thing", "blue thing"]
    v = np.asarray([r["vector"] for r in rows], dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert rows[0]["dim"] == v.shape[1]
    version = store.version
    assert run(store_root, "text:minilm") == 0  # nothing new: no new store version
    store.refresh()
    assert store.version == version and store.count("text_embeddings") == 3
    # clip tiny: image embeddings and its text tower's class embeddings in one run
    assert run(store_root, "clip:tiny", "--limit", "4") == 0
    store.refresh()
    sets = set(store.read("text_embeddings", columns=["set_name"]).column("set_name").to_pylist())
    assert len(sets) == 2


# --------------------------------------------------------------------------- resume, incremental
def test_resume_after_interrupt_and_new_samples(store_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from featurelt.extract.local import LocalRun

    real_commit = LocalRun._commit
    calls = {"n": 0}

    def commit_then_die(self, *args, **kwargs):
        real_commit(self, *args, **kwargs)
        calls["n"] += 1
        raise KeyboardInterrupt("simulated kill after the first chunk commit")

    monkeypatch.setattr(LocalRun, "_commit", commit_then_die)
    rc = run(store_root, "pixels", "--batch-size", "4", "--chunk-rows", "8")
    assert rc == 130 and calls["n"] == 1
    store = Store(store_root)
    assert store.count("emb_pixels") == 8  # the first chunk survives
    # the provenance row came with the first chunk: the killed run is recorded with the rows it committed
    assert store.read("embedding_sets").column("rows").to_pylist() == [8]
    monkeypatch.setattr(LocalRun, "_commit", real_commit)

    assert run(store_root, "pixels", "--batch-size", "4", "--chunk-rows", "8") == 0
    store.refresh()
    ids = _ids(store, "emb_pixels")
    assert len(ids) == K * PER_CLASS and len(set(ids)) == len(ids)
    # the second run's row (first chunk) was updated by each later chunk to the run's total
    assert sorted(store.read("embedding_sets").column("rows").to_pylist()) == sorted([8, K * PER_CLASS - 8])

    # a third run changes nothing
    version = store.version
    assert run(store_root, "pixels") == 0
    store.refresh()
    assert store.version == version

    # new samples ingested later: only they get embedded
    new_rows = _sample_rows(7, 2, split_train=2)
    with store.transaction("test: more samples") as tx:
        tx.append("samples", _samples_table(new_rows))
    assert run(store_root, "pixels") == 0
    store.refresh()
    ids = _ids(store, "emb_pixels")
    assert len(ids) == K * PER_CLASS + len(new_rows) and len(set(ids)) == len(ids)
    assert sorted(store.read("embedding_sets").column("rows").to_pylist()) == sorted([8, K * PER_CLASS - 8, len(new_rows)])


@pytest.mark.slow
def test_kill_9_midway_leaves_the_store_valid_and_resumes(store_root: Path) -> None:
    """A real ``kill -9`` of ``featurelt extract`` after its first commits, while later batches are
    being written: the store opens at its last commit, holds whole chunks without duplicates, and the
    same command then adds only the missing rows."""
    import signal
    import subprocess
    import sys

    store = Store(store_root)
    # enough batches (one commit each) that the run is still going when it is killed
    total = K * PER_CLASS + _add_random_samples(store, [(SIZE, SIZE)] * 1500, prefix="k", seed=11)
    cmd = [sys.executable, "-m", "featurelt", "--store", str(store_root), "extract", "pixels", "--batch-size", "4",
           "--commit-seconds", "0", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            store.refresh()
            if store.has_table("emb_pixels") and store.count("emb_pixels") >= 40:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"extract ended before it could be killed: {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    store = Store(store_root)  # opens at the last commit
    ids = _ids(store, "emb_pixels")
    assert 40 <= len(ids) < total and len(set(ids)) == len(ids) and len(ids) % 4 == 0  # whole batches only
    assert store.read("embedding_sets").column("rows").to_pylist() == [len(ids)]
    before = {r["sample_id"]: r["vector"] for r in store.read("emb_pixels").to_pylist()}
    assert main(["--store", str(store_root), "extract", "pixels", "--batch-size", "64", "--no-progress"]) == 0
    store.refresh()
    ids = _ids(store, "emb_pixels")
    assert len(ids) == total and len(set(ids)) == total
    after = {r["sample_id"]: r["vector"] for r in store.read("emb_pixels").to_pylist()}
    assert all(np.array_equal(after[sid], vec) for sid, vec in before.items())  # committed rows untouched


def test_two_runs_at_once_write_each_row_once(store_root: Path) -> None:
    """Two ``featurelt extract pixels`` processes started together on one store (issue 13 point 4):
    each chunk re-checks the table inside its transaction, so every (sample, view) ends up with
    exactly one row and the two runs' added rows sum to the samples."""
    import subprocess
    import sys

    store = Store(store_root)
    total = K * PER_CLASS + _add_random_samples(store, [(SIZE, SIZE)] * 300, prefix="c", seed=5)
    cmd = [sys.executable, "-m", "featurelt", "--store", str(store_root), "extract", "pixels", "--json",
           "--batch-size", "4", "--commit-seconds", "0", "--no-progress"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    store.refresh()
    t = store.read("emb_pixels", columns=["sample_id", "view"])
    keys = list(zip(t.column("sample_id").to_pylist(), t.column("view").to_pylist()))
    assert len(keys) == len(set(keys)) == total
    added = [json.loads(out)["rows_added"]["pixels"] for out, _ in outs]
    assert sum(added) == total, added
    assert sorted(store.read("embedding_sets").column("rows").to_pylist()) == sorted(a for a in added if a)


def test_a_rerun_removes_duplicate_rows(store_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rows written twice (two runs at once before the re-check) are cut back to one per (sample,
    view) by the next run of the same extract, in one transaction; other sets and fingerprints keep theirs."""
    assert run(store_root, "pixels", "--limit", "6") == 0
    assert run(store_root, "pixels", "--limit", "6", "--name", "other") == 0
    store = Store(store_root)
    rows = store.read("emb_pixels")
    with store.transaction("test: duplicate rows") as tx:
        tx.append("emb_pixels", rows.slice(0, 4))
        tx.append("emb_pixels", rows.slice(1, 1))
        tx.append("emb_other", store.read("emb_other").slice(0, 2))  # another set: not this run's
    store.refresh()
    assert store.count("emb_pixels") == 11
    capsys.readouterr()
    assert run(store_root, "pixels", "--limit", "6") == 0
    assert "note: removed 5 duplicate rows from emb_pixels" in capsys.readouterr().err
    store.refresh()
    t = store.read("emb_pixels")
    assert t.column("sample_id").to_pylist() and sorted(t.column("sample_id").to_pylist()) == sorted(
        rows.column("sample_id").to_pylist())
    kept = {r["sample_id"]: r["vector"] for r in t.to_pylist()}
    assert all(kept[r["sample_id"]] == r["vector"] for r in rows.to_pylist())
    assert store.count("emb_other") == 8  # not touched
    version = store.version
    assert run(store_root, "pixels", "--limit", "6") == 0  # nothing left to do
    store.refresh()
    assert store.version == version


def test_commit_every_chunk_rows_or_commit_seconds(store_root: Path) -> None:
    from featurelt.extract import extract

    n = K * PER_CLASS
    store = Store(store_root)
    res = extract(store, "pixels", name="big_chunks", batch_size=8, device="cpu", progress=False)
    assert res.chunks == 1 and res.rows_added == {"pixels": n}  # defaults: one commit for a small run
    res = extract(store, "pixels", name="by_rows", batch_size=8, chunk_rows=16, device="cpu", progress=False)
    assert res.chunks == -(-n // 16)
    res = extract(store, "pixels", name="by_time", batch_size=8, commit_seconds=0, device="cpu", progress=False)
    assert res.chunks == -(-n // 8)  # every batch is past the deadline
    store.refresh()
    assert store.read("embedding_sets", filter="name = 'by_time'").column("rows").to_pylist() == [n]
    with pytest.raises(ValueError, match="commit_seconds"):
        extract(store, "pixels", name="bad", commit_seconds=-1, device="cpu", progress=False)


def test_commits_run_beside_the_encoding(store_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk is committed in a background thread while later batches are encoded; chunks land in
    order, and the run's rows and provenance are complete."""
    import threading

    import featurelt.extract.encode as fx
    from featurelt.extract import extract
    from featurelt.extract.local import LocalRun

    events: list[tuple[str, float, str]] = []
    real_commit, real_launch = LocalRun._commit, fx.launch_batch

    def slow_commit(self, pending, *args, **kwargs):
        events.append(("commit start", time.perf_counter(), threading.current_thread().name))
        time.sleep(0.3)
        out = real_commit(self, pending, *args, **kwargs)
        events.append(("commit end", time.perf_counter(), threading.current_thread().name))
        return out

    def launch(*args, **kwargs):
        events.append(("launch", time.perf_counter(), threading.current_thread().name))
        return real_launch(*args, **kwargs)

    monkeypatch.setattr(LocalRun, "_commit", slow_commit)
    monkeypatch.setattr(fx, "launch_batch", launch)
    store = Store(store_root)
    n = K * PER_CLASS
    res = extract(store, "pixels", name="bg", batch_size=4, chunk_rows=8, device="cpu", progress=False)
    assert res.chunks == n // 8 and res.rows_added == {"pixels": n}
    starts = [e for e in events if e[0] == "commit start"]
    ends = [e for e in events if e[0] == "commit end"]
    assert starts[0][2].startswith("featurelt-commit")  # not the main thread
    launches_during_first = [e for e in events if e[0] == "launch" and starts[0][1] < e[1] < ends[0][1]]
    assert launches_during_first  # batches were encoded while the first chunk was being written
    assert all(a[1] >= b[1] for a, b in zip(starts[1:], ends))  # one commit at a time, in order
    store.refresh()
    assert store.read("embedding_sets", filter="name = 'bg'").column("rows").to_pylist() == [n]
    assert sorted(_ids(store, "emb_bg")) == sorted(_ids(store, "samples", where="true"))


def test_split_limit_and_missing_split(store_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(store_root, "pixels", "--split", "test", "--limit", "4") == 0
    store = Store(store_root)
    assert store.count("emb_pixels") == 4
    assert store.sql("SELECT count(*) AS n FROM emb_pixels JOIN samples USING (sample_id) WHERE split='test'"
                     ).column("n").to_pylist() == [4]
    capsys.readouterr()
    assert run(store_root, "pixels", "--split", "val") == 1
    err = capsys.readouterr().err
    assert "no samples with split 'val'" in err and "test, train" in err


# --------------------------------------------------------------------------- bad input
def _add_random_samples(store: Store, shapes: list[tuple[int, int]], *, prefix: str, seed: int) -> int:
    """Append random RGB PNG train samples of these (height, width), ids ``<prefix>00000``...; returns how many."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, (h, w) in enumerate(shapes):
        data = encode_png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        rows.append({"sample_id": f"{prefix}{i:05d}", "dataset": "toy", "split": "train", "label": i % K,
                     "source": "original", "uri": None, "image": data, "content_sha256": sha256_hex(data),
                     "width": w, "height": h, "description": None})
    with store.transaction(f"test: {len(rows)} random samples") as tx:
        tx.append("samples", _samples_table(rows))
    return len(rows)


def _add_corrupt(store: Store) -> str:
    row = _sample_rows(3, 1, split_train=1)[0]
    row["image"] = row["image"][:40]  # truncated PNG
    row["sample_id"] = "corrupt0"
    with store.transaction("test: corrupt sample") as tx:
        tx.append("samples", _samples_table([row]))
    return row["sample_id"]


def test_corrupt_image_goes_to_rejects_and_strict_fails(store_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(store_root)
    sid = _add_corrupt(store)
    capsys.readouterr()
    assert run(store_root, "pixels", "--strict") == 1
    err = capsys.readouterr().err
    assert sid in err and "decode" in err
    store.refresh()
    assert not store.has_table("emb_pixels")
    assert run(store_root, "pixels") == 0
    assert "1 rejected" in capsys.readouterr().out
    store.refresh()
    assert store.count("emb_pixels") == K * PER_CLASS
    rej = store.read("rejects").to_pylist()
    assert len(rej) == 1 and rej[0]["sample_id"] == sid and rej[0]["stage"] == "extract"
    assert "cannot decode" in rej[0]["reason"]


# --------------------------------------------------------------------------- views, dtype
def test_views_store_strengths(store_root: Path) -> None:
    from featurelt.extract import randaugment_magnitude, view_strength

    assert [view_strength(v, 2) for v in range(3)] == [0.0, 0.5, 1.0]
    assert [randaugment_magnitude(s) for s in (0.0, 0.5, 1.0)] == [0, 15, 30]
    assert run(store_root, "pixels", "--views", "2", "--augment", "randaugment", "--limit", "6") == 0
    store = Store(store_root)
    t = store.sql("SELECT view, aug_strength, count(*) AS n, count(DISTINCT sample_id) AS d FROM emb_pixels "
                  "GROUP BY 1, 2 ORDER BY 1").to_pylist()
    assert t == [{"view": 0, "aug_strength": 0.0, "n": 6, "d": 6}, {"view": 1, "aug_strength": 0.5, "n": 6, "d": 6},
                 {"view": 2, "aug_strength": 1.0, "n": 6, "d": 6}]
    vecs = {(r["sample_id"], r["view"]): np.asarray(r["vector"]) for r in store.read("emb_pixels").to_pylist()}
    sid = next(iter(vecs))[0]
    assert not np.allclose(vecs[(sid, 0)], vecs[(sid, 2)])  # the strong view differs from the plain image
    # re-run is a no-op; views are reproducible (seeded per sample and view)
    version = store.version
    assert run(store_root, "pixels", "--views", "2", "--augment", "randaugment", "--limit", "6") == 0
    store.refresh()
    assert store.version == version
    assert run(store_root, "pixels", "--views", "2", "--name", "again", "--augment", "randaugment", "--limit", "6") == 0
    store.refresh()
    again = {(r["sample_id"], r["view"]): np.asarray(r["vector"]) for r in store.read("emb_again").to_pylist()}
    for key, v in vecs.items():
        np.testing.assert_array_equal(again[key], v)
    assert run(store_root, "pixels", "--views", "2") == 1  # needs --augment


def test_float16(store_root: Path) -> None:
    assert run(store_root, "pixels", "--dtype", "float16", "--name", "px16", "--limit", "5") == 0
    assert run(store_root, "pixels", "--limit", "5") == 0
    store = Store(store_root)
    assert store.dataset("emb_px16").schema.field("vector").type.value_type == pa.float16()
    a = store.read("emb_px16").sort_by("sample_id").column("vector").to_pylist()
    b = store.read("emb_pixels").sort_by("sample_id").column("vector").to_pylist()
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-3, atol=1e-3)
    assert store.read("embedding_sets", filter="name = 'px16'").column("dtype").to_pylist() == ["float16"]
    # SQL sees float16 sets as float32 (DuckDB has no float16), with filters and projections as usual
    got = store.sql("SELECT sample_id, vector FROM emb_px16 WHERE view = 0 ORDER BY sample_id").to_pylist()
    assert [r["sample_id"] for r in got] == store.read("emb_px16").sort_by("sample_id").column("sample_id").to_pylist()
    np.testing.assert_array_equal(np.asarray([r["vector"] for r in got], np.float32), np.asarray(a, np.float32))
    assert store.sql("SELECT count(*) AS n FROM emb_px16 JOIN samples USING (sample_id)").to_pylist() == [{"n": 5}]


def test_resize_on_device(store_root: Path) -> None:
    """--resize-on device (the default on CUDA): workers hand over decoded images, the resize runs on
    the encoder's device. Same fingerprint and nearly the same vectors as the PIL resize; the
    provenance says where it ran; with workers, augmented views too."""
    assert run(store_root, "clip:tiny", "--name", "host", "--resize-on", "host", "--views", "1",
               "--augment", "randaugment") == 0
    assert run(store_root, "clip:tiny", "--name", "dev", "--resize-on", "device", "--views", "1",
               "--augment", "randaugment", "--num-workers", "2") == 0
    store = Store(store_root)
    a = store.read("emb_host").sort_by([("sample_id", "ascending"), ("view", "ascending")])
    b = store.read("emb_dev").sort_by([("sample_id", "ascending"), ("view", "ascending")])
    assert a.column("sample_id").to_pylist() == b.column("sample_id").to_pylist()
    assert a.column("fingerprint").to_pylist() == b.column("fingerprint").to_pylist()
    va, vb = (np.asarray(t.column("vector").to_pylist()) for t in (a, b))
    assert not np.array_equal(va, vb)  # 12 px images upscaled to 32: a few grey levels differ
    assert np.min(np.sum(va * vb, axis=1)) > 0.999
    prov = {r["name"]: json.loads(r["provenance"]) for r in store.read("embedding_sets").to_pylist()}
    assert prov["host"]["resize_on"] == "host" and prov["dev"]["resize_on"] == "device"
    # SAM too: the device resizes the longer side, normalises, then pads
    for where in ("host", "device"):
        assert run(store_root, "sam:tiny", "--products", "latent", "--name", f"sam{where}", "--resize-on", where,
                   "--limit", "4") == 0
    store.refresh()
    for where in ("host", "device"):
        assert json.loads(store.read("embedding_sets", filter=f"name = 'sam{where}'")["provenance"][0].as_py())[
            "resize_on"] == where
    va, vb = (np.asarray(store.read(f"emb_sam{w}").sort_by("sample_id").column("vector").to_pylist())
              for w in ("host", "device"))
    assert va.shape == (4, 256) and np.min(np.sum(va * vb, axis=1) / np.linalg.norm(va, axis=1)
                                           / np.linalg.norm(vb, axis=1)) > 0.999


def test_plain_files_skip_pil_with_the_same_rows(store_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the resize on the device, the worker decodes plain PNG / JPEG files with torchvision, not
    PIL: the rows are bit-identical to the PIL route's, and a damaged file is still rejected with
    PIL's reason."""
    from featurelt.images.transforms import HostStage

    store = Store(store_root)
    sid = _add_corrupt(store)
    direct: list[bool] = []
    real = HostStage.from_bytes

    def spy(self: HostStage, data: bytes) -> torch.Tensor | None:
        out = real(self, data)
        direct.append(out is not None)
        return out

    monkeypatch.setattr(HostStage, "from_bytes", spy)
    assert run(store_root, "clip:tiny", "--name", "direct", "--resize-on", "device") == 0
    assert len(direct) == K * PER_CLASS + 1 and sum(direct) == K * PER_CLASS  # all but the damaged file
    monkeypatch.setattr(HostStage, "from_bytes", real)
    assert run(store_root, "clip:tiny", "--name", "workers", "--resize-on", "device", "--num-workers", "2") == 0
    monkeypatch.setattr(HostStage, "from_bytes", lambda self, data: None)
    assert run(store_root, "clip:tiny", "--name", "pil", "--resize-on", "device") == 0
    store.refresh()
    a, w, b = (store.read(f"emb_{n}").sort_by("sample_id") for n in ("direct", "workers", "pil"))
    assert a.column("sample_id").to_pylist() == b.column("sample_id").to_pylist() and a.num_rows == K * PER_CLASS
    assert w.column("sample_id").to_pylist() == a.column("sample_id").to_pylist()
    va, vw, vb = (np.asarray(t.column("vector").to_pylist()) for t in (a, w, b))
    assert np.array_equal(va, vb) and np.array_equal(va, vw)  # worker processes decode the same way
    rej = store.read("rejects").to_pylist()
    assert [r["sample_id"] for r in rej] == [sid] * 3 and all("cannot decode" in r["reason"] for r in rej)


def test_images_of_different_sizes_give_the_same_rows(store_root: Path) -> None:
    """A batch whose images differ in size goes over as one packed buffer (resize on the device):
    worker processes give the main process's rows exactly, and PIL's resize (--resize-on host)
    within a grey level or so."""
    store = Store(store_root)
    _add_random_samples(store, [(10, 14), (20, 9), (12, 12), (7, 30), (33, 25), (16, 16)], prefix="mixed", seed=7)
    for name, args in [("main", ()), ("workers", ("--num-workers", "2")), ("host", ("--resize-on", "host"))]:
        assert run(store_root, "clip:tiny", "--name", name, "--batch-size", "5", "--resize-on", "device", *args) == 0
    store.refresh()
    a, w, h = (store.read(f"emb_{n}").sort_by("sample_id") for n in ("main", "workers", "host"))
    assert a.num_rows == K * PER_CLASS + 6
    assert a.column("sample_id").to_pylist() == w.column("sample_id").to_pylist() == h.column("sample_id").to_pylist()
    va, vw, vh = (np.asarray(t.column("vector").to_pylist()) for t in (a, w, h))
    assert np.array_equal(va, vw)
    assert np.min(np.sum(va * vh, axis=1)) > 0.999  # unit vectors


def test_referenced_files_are_read_from_their_uri(store_root: Path, tmp_path: Path) -> None:
    """Samples ingested by reference (a uri, no bytes) are read from their file, whether the worker
    decodes with PIL or torchvision; a missing file is a reject that names it."""
    rows = _sample_rows(5, 1, split_train=1)[:2]
    (tmp_path / "ref0.png").write_bytes(rows[0]["image"])
    rows[0].update(image=None, uri=str(tmp_path / "ref0.png"), sample_id="ref0")
    rows[1].update(image=None, uri=str(tmp_path / "missing.png"), sample_id="ref1")
    store = Store(store_root)
    with store.transaction("test: referenced samples") as tx:
        tx.append("samples", _samples_table(rows))
    for where in ("host", "device"):
        assert run(store_root, "clip:tiny", "--name", f"ref_{where}", "--resize-on", where) == 0
    store.refresh()
    vecs = {}
    for where in ("host", "device"):
        ids = _ids(store, f"emb_ref_{where}")
        assert "ref0" in ids and "ref1" not in ids and len(ids) == K * PER_CLASS + 1
        vecs[where] = np.asarray(store.read(f"emb_ref_{where}", filter="sample_id = 'ref0'")["vector"][0].as_py())
    assert float(vecs["host"] @ vecs["device"]) > 0.999  # unit vectors; the two resizes differ by a grey level or so
    rej = store.read("rejects").to_pylist()
    assert [r["sample_id"] for r in rej] == ["ref1", "ref1"] and all("missing.png" in r["reason"] for r in rej)


def test_workers_get_the_plan_from_a_file(store_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With workers the loader's shard pickles small whatever the plan's size (the workers start
    together), they read the plan and make_image from a file, and the file is gone once the iteration ends."""
    import pickle

    from featurelt.extract.views import ViewMaker
    from featurelt.images.loader import StoreImageLoader

    store = Store(store_root)
    enc = encoders.build_encoder("pixels")
    make_view = ViewMaker(enc.transform, views=0, augment=None, seed=0)
    version = store.dataset("samples").version
    big = StoreImageLoader(store.root, version, None, np.array_split(np.arange(200_000), 50_000), make_view)
    assert len(pickle.dumps(big.shard)) > 1_000_000
    remove = big._spill(big.shard)
    assert len(pickle.dumps(big.shard)) < 16_384 < 65_536  # the pipe a worker's pickle goes through
    again = pickle.loads(pickle.dumps(big.shard))
    assert again.plan is None and again.make_image is None and again.plan_file == big.shard.plan_file
    remove()
    assert not os.path.exists(big.shard.plan_file)

    seen: list[str] = []
    spill = StoreImageLoader._spill

    def spy(self, shard):
        out = spill(self, shard)
        seen.append(shard.plan_file)
        return out

    n = store.count("samples")
    loader = StoreImageLoader(store.root, version, None, np.array_split(np.arange(n), 6), make_view, num_workers=2)
    monkeypatch.setattr(StoreImageLoader, "_spill", spy)
    ids = [sid for b in loader for sid in b.columns["sample_id"]]
    assert ids == store.read("samples", columns=["sample_id"]).column("sample_id").to_pylist()  # plan order
    assert len(seen) == 1 and not os.path.exists(seen[0])
    assert loader.shard.plan_file is None  # the caller's loader is left as it was


def test_workers_give_the_same_rows(store_root: Path) -> None:
    assert run(store_root, "pixels", "--num-workers", "2", "--batch-size", "5", "--name", "w2") == 0
    assert run(store_root, "pixels", "--batch-size", "7") == 0
    store = Store(store_root)
    a = store.read("emb_w2").sort_by("sample_id")
    b = store.read("emb_pixels").sort_by("sample_id")
    assert a.column("sample_id").to_pylist() == b.column("sample_id").to_pylist()
    np.testing.assert_array_equal(np.asarray(a.column("vector").to_pylist()), np.asarray(b.column("vector").to_pylist()))


def test_unknown_product_and_named_set_mismatch(store_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(store_root, "pixels", "--products", "nope") == 1
    assert "no product" in capsys.readouterr().err
    assert run(store_root, "pixels", "--limit", "2") == 0
    assert run(store_root, "pixels", "--limit", "2", "--dtype", "float16") == 1
    assert "pass --name" in capsys.readouterr().err


# --------------------------------------------------------------------------- device, OOM, weights
def test_device_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    from featurelt.extract import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")


def test_out_of_memory_retries_with_half_batch() -> None:
    from featurelt.extract import encode_batch

    enc = encoders.build_encoder("pixels")
    seen: list[int] = []
    real = enc.encode

    def encode(x, *, products=None):  # a GPU that fits at most 3 images
        seen.append(x.shape[0])
        if x.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x, products=products)

    enc.encode = encode
    x = torch.rand(10, 3, enc.image_size, enc.image_size)
    out = encode_batch(enc, x, ["pixels"], device="cpu")
    assert seen == [10, 5, 2, 3, 5, 2, 3]
    np.testing.assert_array_equal(out["pixels"], real(x)["pixels"].numpy())
    # the halves are cut from the batch as it came (uint8 from the workers), and finished on the device
    from featurelt.images.transforms import split_transform

    finish = split_transform(enc.transform)[1]
    u8 = torch.randint(0, 256, (10, 1, enc.image_size, enc.image_size), dtype=torch.uint8)
    seen.clear()
    out = encode_batch(enc, u8, ["pixels"], device="cpu", prepare=finish)
    assert seen == [10, 5, 2, 3, 5, 2, 3]
    np.testing.assert_array_equal(out["pixels"], real(finish(u8))["pixels"].numpy())
    # images of different sizes, packed in one buffer: the halves are slices of it
    from featurelt.images.packing import PackedImages

    resize = split_transform(enc.transform, resize_on_device=True)[1]
    mixed = [torch.randint(0, 256, (1, 20 + i, 30 - i), dtype=torch.uint8) for i in range(10)]
    seen.clear()
    out = encode_batch(enc, PackedImages.pack(mixed), ["pixels"], device="cpu", prepare=resize)
    assert seen == [10, 5, 2, 3, 5, 2, 3]
    np.testing.assert_array_equal(out["pixels"], real(resize(mixed))["pixels"].numpy())


def test_one_batch_in_flight_keeps_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """encoded() launches batch i+1 before it reads back batch i, and yields batches in order
    (a batch with no images left yields None)."""
    import featurelt.extract.encode as fx

    log: list[str] = []

    class Job:
        def __init__(self, i: int) -> None:
            self.i = i

        def result(self) -> dict[str, np.ndarray]:
            log.append(f"read {self.i}")
            return {"p": np.full((1, 2), self.i, np.float32)}

    def launch(encoder, x, products, *, device, prepare=None, min_batch=1):
        i = int(x[0, 0])
        log.append(f"launch {i}")
        return Job(i)

    monkeypatch.setattr(fx, "launch_batch", launch)
    batches = [{"id": i, "x": None if i == 2 else torch.full((1, 1), i)} for i in range(4)]
    got = [(b["id"], None if v is None else int(v["p"][0, 0])) for b, v in fx.encoded(batches, None, ["p"],
                                                                                        device="cpu", prepare=None)]
    assert got == [(0, 0), (1, 1), (2, None), (3, 3)]
    assert log == ["launch 0", "launch 1", "read 0", "read 1", "launch 3", "read 3"]
    assert list(fx.encoded([], None, ["p"], device="cpu", prepare=None)) == []


def test_loop_times_count_the_waits_of_each_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """encoded() adds the loader wait to ``images``, the launch to ``launch`` and the wait for a
    result to ``device``; the consumer's own time between batches goes to none of them."""
    import featurelt.extract.encode as fx

    class Job:
        def result(self) -> dict[str, np.ndarray]:
            time.sleep(0.03)
            return {"p": np.zeros((1, 2), np.float32)}

    def launch(encoder, x, products, *, device, prepare=None, min_batch=1):
        time.sleep(0.01)
        return Job()

    def loader():
        for i in range(3):
            time.sleep(0.02)
            yield {"x": torch.zeros(1, 1)}

    monkeypatch.setattr(fx, "launch_batch", launch)
    times = fx.LoopTimes()
    for _ in fx.encoded(loader(), None, ["p"], device="cpu", prepare=None, times=times):
        time.sleep(0.05)  # the consumer: rows and commits, timed by the caller
    assert times.images >= 3 * 0.02 and times.launch >= 3 * 0.01 and times.device >= 3 * 0.03
    assert times.images < 3 * 0.05 and times.device < 3 * 0.05 + 0.03  # the consumer's sleeps are not in them
    assert times.rows == times.commit == 0.0


def test_loop_times_summary_by_hand() -> None:
    from featurelt.extract import LoopTimes

    t = LoopTimes(images=3.0, launch=1.0, device=5.0, rows=0.5, commit=0.5)
    assert t.shares() == {"images": 0.3, "launch": 0.1, "device": 0.5, "rows": 0.05, "commit": 0.05}
    assert t.summary("cpu") == "loop time: images 30 %, launch 10 %, device 50 %, rows 5 %, commit 5 %"
    assert "waited for images" not in t.summary("cuda")  # 30 %: not over the threshold
    t.images = 6.0
    assert "the GPU waited for images" in t.summary("cuda") and "waited" not in t.summary("cpu")
    assert LoopTimes().shares()["images"] == 0.0


def test_extract_json_output(store_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert run(store_root, "pixels", "--json", "--limit", "5") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows_added"] == {"pixels": 5} and out["samples_embedded"] == 5 and out["sets"] == {"pixels": "pixels"}
    assert out["images_per_second"] == pytest.approx(5 / out["seconds"])
    assert set(out["times"]) == {"images", "launch", "device", "rows", "commit"}
    assert 0 < sum(out["times"].values()) <= out["seconds"]
    assert Store(store_root).count("emb_pixels") == 5
    assert run(store_root, "text:minilm", "--json") == 0
    text = json.loads(capsys.readouterr().out)
    assert text["encoder"] == "text:minilm" and text["rows_added"] == K


@pytest.mark.gpu
def test_extract_on_cuda_matches_cpu(store_root: Path) -> None:
    """The CUDA path (pinned uint8 batches, normalisation on the GPU, one batch in flight, bf16
    autocast) gives the CPU rows within bf16 tolerance."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    assert run(store_root, "clip:tiny", "--name", "cpu", "--batch-size", "4", "--device", "cpu") == 0
    assert run(store_root, "clip:tiny", "--name", "gpu", "--batch-size", "4", "--device", "cuda",
               "--num-workers", "2") == 0
    store = Store(store_root)
    a = store.read("emb_cpu").sort_by("sample_id")
    b = store.read("emb_gpu").sort_by("sample_id")
    assert a.column("sample_id").to_pylist() == b.column("sample_id").to_pylist()
    va, vb = (np.asarray(t.column("vector").to_pylist()) for t in (a, b))
    np.testing.assert_allclose(vb, va, atol=5e-2)
    assert np.mean(np.sum(va * vb, axis=1)) > 0.99  # unit vectors pointing the same way


def test_named_model_without_weights_is_an_error(store_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(store_root, "clip:ViT-B-32") == 1
    err = capsys.readouterr().err
    assert "checkpoint" in err and "clip:ViT-B-32" in err
    assert not Store(store_root).embedding_sets()


# --------------------------------------------------------------------------- Ray
@pytest.mark.ray
@pytest.mark.slow
def test_ray_engine_equals_local(store_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ray")
    name = "clip:tiny" if "clip:tiny" in encoders.ENCODERS.names() else "pixels"
    assert run(store_root, name, "--name", "loc", "--batch-size", "8", "--device", "cpu") == 0
    store = Store(store_root)
    version = store.version
    assert run(store_root, name, "--name", "ray", "--engine", "ray", "--batch-size", "8", "--device", "cpu") == 0
    store.refresh()
    assert store.version == version + 1  # one commit
    enc = encoders.build_encoder(name)
    for product in enc.products:
        suffix = "" if len(enc.products) == 1 else f"_{product}"
        a = store.read(f"emb_loc{suffix}").sort_by("sample_id")
        b = store.read(f"emb_ray{suffix}").sort_by("sample_id")
        assert b.schema.field("vector").type == a.schema.field("vector").type
        assert a.column("sample_id").to_pylist() == b.column("sample_id").to_pylist()
        np.testing.assert_allclose(np.asarray(b.column("vector").to_pylist()), np.asarray(a.column("vector").to_pylist()),
                                   rtol=1e-5, atol=1e-6)
    # re-run with ray (a local Ray of 1 CPU): nothing left, no duplicates
    assert run(store_root, name, "--name", "ray", "--engine", "ray", "--device", "cpu", "--ray-cpus", "1") == 0
    store.refresh()
    assert store.version == version + 1
    # GPU Ray tasks: a cluster without GPUs is a clear error; on a GPU machine they give the local rows
    capsys.readouterr()
    rc = run(store_root, name, "--name", "raygpu", "--engine", "ray", "--device", "cuda", "--num-workers", "1")
    if not torch.cuda.is_available():
        assert rc == 1 and "has 0 GPUs" in capsys.readouterr().err
        return
    assert rc == 0
    store.refresh()
    for product in enc.products:
        suffix = "" if len(enc.products) == 1 else f"_{product}"
        a = store.read(f"emb_loc{suffix}").sort_by("sample_id")
        b = store.read(f"emb_raygpu{suffix}").sort_by("sample_id")
        assert a.column("sample_id").to_pylist() == b.column("sample_id").to_pylist()
        np.testing.assert_allclose(np.asarray(b.column("vector").to_pylist()), np.asarray(a.column("vector").to_pylist()),
                                   atol=5e-2)  # bf16 autocast on the GPU


def test_ray_gpu_task_workers_fit_the_poorest_gpu_node() -> None:
    from featurelt.extract.ray_engine import ray_task_workers as _ray_task_workers

    nodes = [{"Alive": True, "Resources": {"CPU": 16.0, "GPU": 2.0}},   # 8 CPUs per 1-GPU task
             {"Alive": True, "Resources": {"CPU": 6.0, "GPU": 1.0}},    # 6 CPUs per task: 5 workers
             {"Alive": True, "Resources": {"CPU": 64.0}},               # no GPU: not counted
             {"Alive": False, "Resources": {"CPU": 1.0, "GPU": 1.0}}]   # dead: not counted
    assert _ray_task_workers(nodes, 8, 1.0) == 5
    assert _ray_task_workers(nodes, 2, 1.0) == 2
    assert _ray_task_workers(nodes, 8, 0.5) == 2  # two tasks per GPU on the 6-CPU node: 3 CPUs each
    assert _ray_task_workers(nodes[2:], 8, 1.0) == 0


# --------------------------------------------------------------------------- the shared digits store
def test_digits_store_pixels(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    pytest.importorskip("featurelt.commands.ingest_cmds")
    digits_store = request.getfixturevalue("digits_store")
    root = tmp_path / "digits"
    shutil.copytree(digits_store, root)
    assert run(root, "pixels", "--split", "train") == 0
    store = Store(root)
    n_train = store.count("samples", "split = 'train'")
    assert store.count("emb_pixels") == n_train
    res = store.sql("SELECT c.bucket, count(*) AS n FROM emb_pixels e JOIN samples s USING (sample_id) "
                    "JOIN classes c USING (label) GROUP BY 1").to_pylist()
    assert sum(r["n"] for r in res) == n_train
