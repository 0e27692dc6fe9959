"""train-head end to end from the CLI (featurelt.train.head, featurelt.commands.train_cmds).

The stores are written directly through ``store.transaction()`` (schemas/*.json): scikit-learn's
digits with pixel features (64 dims, /16), a seeded stratified 80/20 split and a seeded exponential
long-tail profile of the train split (METHODS.md section 0), so these tests do not depend on the
ingest / extract commands. The "full" store adds what the section 3-5 samplers need: an auxiliary
class (neighbor of the rarest class), generated rows of the few-shot classes, and two augmented views.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from featurelt.cli import main
from featurelt.data.classes import classes_table
from featurelt.data.formats.builtin import DIGITS_CLASSES
from featurelt.store import Store

K = 10
MANY, FEW = 60, 20                # bucket thresholds for ~144 train rows per class


def _emb_rows(ids: list[str], x: np.ndarray, *, views: int, rng: np.random.Generator) -> pa.Table:
    vecs, sid, view, strength = [], [], [], []
    for v in range(views + 1):
        s = 0.0 if v == 0 else v / (views + 1)
        vecs.append(x if v == 0 else x + rng.normal(scale=0.2 * s, size=x.shape))
        sid += ids
        view += [v] * len(ids)
        strength += [s] * len(ids)
    flat = np.concatenate(vecs).astype(np.float32)
    return pa.table({"sample_id": sid, "view": pa.array(view, pa.int32()), "aug_strength": pa.array(strength, pa.float32()),
                     "fingerprint": ["pixels-test"] * len(sid),
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), x.shape[1])})


def build_digits_store(root: Path, *, imbalance: float = 100.0, seed: int = 0, full: bool = False) -> Store:
    """Long-tailed digits store: version 1 = samples + classes, version 2 = emb_pixels + text_embeddings 'means'."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_all = (digits.data / 16.0).astype(np.float32)
    y_all = digits.target.astype(np.int64)
    idx = np.arange(len(y_all))
    tr, te = train_test_split(idx, test_size=0.2, stratify=y_all, random_state=seed)
    rng = np.random.default_rng(seed)
    n_max = min(np.bincount(y_all[tr]))
    keep, unused = [], []
    for y in range(K):
        rows = rng.permutation(tr[y_all[tr] == y])
        n_y = max(1, int(n_max * (1 / imbalance) ** (y / (K - 1))))
        keep += rows[:n_y].tolist()
        unused += rows[n_y:].tolist()
    ids = [f"d{i:04d}" for i in range(len(y_all))]
    split = np.array(["test"] * len(y_all), dtype=object)
    split[keep], split[unused] = "train", "train_unused"
    sample_ids, labels, splits, source, feats = list(ids), y_all.tolist(), split.tolist(), ["original"] * len(ids), [x_all]
    registry = [{"label": y, "name": DIGITS_CLASSES[y], "source": "original", "neighbor_of": None} for y in range(K)]
    text = [x_all[tr][y_all[tr] == y].mean(0) for y in range(K)]
    if full:
        # auxiliary class K: the unused train rows of class K-1 (a "visually similar" neighbor class)
        aux = [i for i in unused if y_all[i] == K - 1]
        sample_ids += [f"aux{i:04d}" for i in aux]
        labels += [K] * len(aux)
        splits += ["train"] * len(aux)
        source += ["auxiliary"] * len(aux)
        feats.append(x_all[aux])
        registry.append({"label": K, "name": "aux", "source": "auxiliary", "neighbor_of": K - 1})
        text.append(x_all[aux].mean(0) + 0.01)
        # generated rows of the three rarest classes (noisy copies)
        gen = [i for i in keep if y_all[i] >= K - 3]
        sample_ids += [f"gen{i:04d}" for i in gen]
        labels += y_all[gen].tolist()
        splits += ["train"] * len(gen)
        source += ["generated"] * len(gen)
        feats.append(x_all[gen] + rng.normal(scale=0.05, size=(len(gen), 64)).astype(np.float32))
    n = len(sample_ids)
    x = np.concatenate(feats).astype(np.float32)
    samples = pa.table({
        "sample_id": sample_ids, "dataset": ["digits"] * n, "split": splits, "label": pa.array(labels, pa.int32()),
        "source": source, "uri": pa.array([None] * n, pa.string()), "image": pa.array([None] * n, pa.large_binary()),
        "content_sha256": ["0" * 64] * n, "width": pa.array([8] * n, pa.int32()), "height": pa.array([8] * n, pa.int32()),
        "description": pa.array([None] * n, pa.string())})
    counts = {y: int(sum(1 for l, s, src in zip(labels, splits, source) if l == y and s == "train" and src == "original"))
              for y in range(len(registry))}
    store = Store(root)
    with store.transaction("test: samples + classes") as tx:
        tx.append("samples", samples)
        tx.append("classes", classes_table(registry, counts, many=MANY, few=FEW))
    t = np.stack(text)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    kk = len(registry)
    with store.transaction("test: embeddings") as tx:
        tx.append("emb_pixels", _emb_rows(sample_ids, x, views=2 if full else 0, rng=rng))
        tx.append("text_embeddings", pa.table({
            "set_name": ["means"] * kk, "encoder": ["test"] * kk, "label": pa.array(range(kk), pa.int32()),
            "class_name": [r["name"] for r in registry], "templates": ["{}"] * kk, "dim": pa.array([64] * kk, pa.int32()),
            "vector": pa.array(t.astype(np.float32).tolist(), pa.list_(pa.float32())), "fingerprint": ["t"] * kk}))
    return store


@pytest.fixture(scope="module")
def lt_root(tmp_path_factory) -> Path:
    """Clean long-tailed digits (imbalance 100): store versions 1, 2."""
    root = tmp_path_factory.mktemp("lt") / "store"
    build_digits_store(root)
    return root


@pytest.fixture(scope="module")
def full_root(tmp_path_factory) -> Path:
    """Digits + auxiliary class + generated rows + 2 augmented views."""
    root = tmp_path_factory.mktemp("full") / "store"
    build_digits_store(root, full=True)
    return root


def copy_store(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(src, dst)
    return dst


def train(root: Path, *args: str) -> int:
    return main(["--store", str(root), "train-head", "--features", "pixels", *args])


def last_run(root: Path) -> dict:
    return Store(root).sql("SELECT * FROM runs ORDER BY time DESC LIMIT 1").to_pylist()[0]


# ------------------------------------------------------------------------------------------ components
QUICK = ["--epochs", "2", "--batch-size", "64", "--lr", "0.05"]


def _names(module: str, attr: str) -> list[str]:
    import importlib

    return importlib.import_module(module).__dict__[attr].names()


@pytest.mark.parametrize("head", _names("featurelt.heads", "HEADS"))
def test_every_head_from_cli(full_root, tmp_path, head, capsys):
    root = copy_store(full_root, tmp_path)
    assert train(root, "--head", head, "--text-set", "means", *QUICK) == 0
    run = last_run(root)
    assert run["head"] == head and 0 <= run["acc_all"] <= 1
    assert Path(run["checkpoint"]).exists() and (Path(run["checkpoint"]).parent / "config.yaml").exists()


@pytest.mark.parametrize("loss", _names("featurelt.losses", "LOSSES"))
def test_every_loss_from_cli(full_root, tmp_path, loss):
    root = copy_store(full_root, tmp_path)
    assert train(root, "--loss", loss, *QUICK) == 0
    assert last_run(root)["loss"] == loss


@pytest.mark.parametrize("sampler", _names("featurelt.samplers", "SAMPLERS"))
def test_every_sampler_from_cli(full_root, tmp_path, sampler):
    root = copy_store(full_root, tmp_path)
    assert train(root, "--sampler", sampler, "--text-set", "means", *QUICK) == 0
    assert last_run(root)["sampler"] == sampler


def test_proto_terms_from_cli(full_root, tmp_path):
    root = copy_store(full_root, tmp_path)
    assert train(root, "--head", "fusion", "--proto", "--proto-M", "8", "--proto-beta", "1e-3", *QUICK) == 0
    cfg = last_run(root)["config"]
    assert "tail-dist" in cfg and "proto_m: 8" in cfg


def test_unknown_names_and_missing_set_fail_clearly(lt_root, capsys):
    assert train(lt_root, "--head", "nope") == 1
    assert "unknown head 'nope'; available: adapter" in capsys.readouterr().err
    assert main(["--store", str(lt_root), "train-head", "--features", "clip_nope"]) == 1
    err = capsys.readouterr().err
    assert "embedding set 'clip_nope'" in err and "embedding sets: pixels" in err
    assert train(lt_root, "--head", "adapter") == 1
    assert "--text-set" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ outputs
def test_runs_predictions_and_sql_bucket_accuracy(lt_root, tmp_path, capsys):
    root = copy_store(lt_root, tmp_path)
    assert train(root, "--loss", "balanced-softmax", "--epochs", "5", "--lr", "0.1") == 0
    run = last_run(root)
    store = Store(root)
    preds = store.sql(f"SELECT * FROM predictions WHERE run_id = '{run['run_id']}'")
    assert preds.num_rows == store.count("samples", "split = 'test'")
    top5 = preds.column("top5").to_pylist()
    assert all(len(t) == 5 and t[0] == p for t, p in zip(top5, preds.column("prediction").to_pylist()))
    by_bucket = {r["bucket"]: r["acc"] for r in store.sql(
        f"SELECT c.bucket, avg(CAST(p.label = p.prediction AS DOUBLE)) AS acc FROM predictions p "
        f"JOIN classes c ON c.label = p.label WHERE p.run_id = '{run['run_id']}' GROUP BY 1").to_pylist()}
    assert set(by_bucket) == {"many", "medium", "few"}
    for b in ("many", "medium", "few"):
        assert by_bucket[b] == pytest.approx(run[f"acc_{b}"], abs=1e-12)
    pinned = json.loads(run["pinned_versions"])
    assert pinned["store_version"] == 2 and set(pinned["tables"]) == {"samples", "classes", "emb_pixels"}
    capsys.readouterr()
    assert main(["--store", str(root), "eval", "--run", run["run_id"]]) == 0
    out = capsys.readouterr().out
    assert "acc_few" in out and "NO" not in out
    assert main(["--store", str(root), "runs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["run_id"] == run["run_id"]


def test_as_of_reproduces_a_run_exactly(lt_root, tmp_path):
    root = copy_store(lt_root, tmp_path)
    args = ["--head", "mlp", "--loss", "ldam", "--sampler", "sqrt", "--epochs", "3", "--seed", "7", "--lr", "0.05"]
    assert train(root, *args) == 0
    first = last_run(root)
    # the store moves on: more train rows (the unused ones) -> a different training set at the latest version
    store = Store(root)
    with store.transaction("test: use every train row") as tx:
        tx.update("samples", {"split": "'train'"}, where="split = 'train_unused'")
    assert train(root, *args, "--as-of", "2") == 0
    again = last_run(root)
    assert train(root, *args) == 0
    latest = last_run(root)
    for k in ("acc_all", "acc_many", "acc_medium", "acc_few", "macro_f1"):
        assert again[k] == first[k]
    q = "SELECT sample_id, prediction, top5, score FROM predictions WHERE run_id = '{}' ORDER BY sample_id"
    a = store.sql(q.format(first["run_id"])).to_pylist()
    b = store.sql(q.format(again["run_id"])).to_pylist()
    assert a == b
    assert json.loads(latest["metrics"])["num_train"] > json.loads(again["metrics"])["num_train"]
    # the run's config.yaml reads back with --config and reproduces it too
    cfg_path = Path(first["checkpoint"]).parent / "config.yaml"
    assert main(["--store", str(root), "train-head", "--config", str(cfg_path)]) == 0
    assert last_run(root)["acc_all"] == first["acc_all"]


def test_auxiliary_classes_are_masked(full_root, tmp_path):
    from featurelt.data.features import load_features
    from featurelt.heads import HEADS, HeadContext

    root = copy_store(full_root, tmp_path)
    assert train(root, "--loss", "ce", "--epochs", "15", "--lr", "0.2", "--aux-cap", "200") == 0
    run = last_run(root)
    preds = Store(root).sql(f"SELECT prediction, top5 FROM predictions WHERE run_id = '{run['run_id']}'").to_pylist()
    assert all(p["prediction"] < K and max(p["top5"]) < K for p in preds)
    # ...and without the mask the head would predict the auxiliary class: the test can fail
    from featurelt.train.head import load_checkpoint

    head = HEADS.get("linear")(HeadContext(in_dims=[64], num_classes=K + 1))
    ckpt = load_checkpoint(run["checkpoint"])
    head.load_state_dict(ckpt.state_dict)
    test = load_features(Store(root), ["pixels"], split="test")
    with torch.no_grad():
        raw = head(ckpt.standardized(torch.from_numpy(test.x))).argmax(1)
    assert (raw == K).any()


def test_encoders_unavailable(lt_root, tmp_path, monkeypatch):
    """Re-running a head never touches an encoder: importing any encoder module raises."""
    root = copy_store(lt_root, tmp_path)

    class Forbidden(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):  # module introspection (inspect.getmodule scans sys.modules)
                raise AttributeError(name)
            raise RuntimeError(f"train-head touched featurelt.encoders.{name}")

    for mod in [m for m in sys.modules if m == "featurelt.encoders" or m.startswith("featurelt.encoders.")
                or m == "featurelt.extract"]:
        monkeypatch.delitem(sys.modules, mod)
    import featurelt

    for name in ("encoders", "extract"):
        forbidden = Forbidden(f"featurelt.{name}")
        monkeypatch.setitem(sys.modules, f"featurelt.{name}", forbidden)
        monkeypatch.setattr(featurelt, name, forbidden, raising=False)  # the package attribute, too
    for lib in ("open_clip", "segment_anything", "transformers", "sentence_transformers"):
        monkeypatch.setitem(sys.modules, lib, None)  # `import open_clip` now raises ImportError
    with pytest.raises(RuntimeError):
        import featurelt.encoders as enc
        enc.ENCODERS  # noqa: B018
    assert train(root, "--head", "cosine", "--epochs", "2") == 0


def test_sweep_table(lt_root, tmp_path, capsys):
    root = copy_store(lt_root, tmp_path)
    capsys.readouterr()
    assert train(root, "--epochs", "2", "--sweep", "loss=ce,balanced-softmax", "sampler=instance,sqrt") == 0
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith(("ce ", "balanced-softmax"))]
    assert len(lines) == 4
    header = out.splitlines()[0].split()
    assert header[:7] == ["loss", "sampler", "acc_many", "acc_medium", "acc_few", "acc_all", "macro_f1"]
    assert Store(root).count("runs") == 4
    assert train(root, "--sweep", "nope=1,2") == 1


# ------------------------------------------------------------------------------------------ does it learn
def test_balanced_softmax_beats_ce_on_few_shot(lt_root, tmp_path):
    """Long-tailed digits (imbalance 100, pixel features): balanced softmax lifts few-shot accuracy (section 1)."""
    root = copy_store(lt_root, tmp_path)
    common = ["--epochs", "30", "--lr", "0.1", "--batch-size", "64", "--seed", "0"]
    assert train(root, "--loss", "ce", *common) == 0
    ce = last_run(root)
    assert train(root, "--loss", "balanced-softmax", *common) == 0
    bs = last_run(root)
    # standardised inputs (the default) lift CE's few-shot accuracy too (0.57 here), so the margin is 0.05
    assert bs["acc_few"] >= ce["acc_few"] + 0.05, (ce["acc_few"], bs["acc_few"])
    assert bs["acc_all"] > ce["acc_all"]


def test_bad_component_option_is_a_clear_error(lt_root, capsys):
    assert train(lt_root, "--head-opt", "tau=0.1", "--epochs", "1") == 1
    assert "head 'linear': bad option(s) ['tau']" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ streaming from the store
def test_store_rows_equal_in_memory_features(full_root, tmp_path):
    """StoreRows.take reads the same vectors as the in-memory join, for any rows / views, duplicates and
    several fragments with a deleted row in between (row offsets are LanceDataset.take offsets)."""
    from featurelt.data.features import StoreRows, load_features

    root = copy_store(full_root, tmp_path)
    store = Store(root)
    rng = np.random.default_rng(3)
    extra_ids = [f"x{i:03d}" for i in range(5)]  # rows of another split in a second fragment, one deleted
    with store.transaction("test: second fragment") as tx:
        tx.append("emb_pixels", _emb_rows(extra_ids, rng.normal(size=(5, 64)), views=2, rng=rng))
    with store.transaction("test: delete a row") as tx:
        tx.delete("emb_pixels", "sample_id = 'x002' AND view = 1")
    with store.transaction("test: third fragment") as tx:  # newer vectors of train samples: the last row wins
        ids = load_features(store, ["pixels"], split="train", views=True, stream="never").sample_ids[:7].tolist()
        tx.append("emb_pixels", _emb_rows(ids, rng.normal(size=(7, 64)), views=2, rng=rng))
    store = Store(root)
    mem = load_features(store, ["pixels"], split="train", views=True, stream="never")
    lazy = load_features(store, ["pixels"], split="train", views=True, stream="always")
    assert isinstance(lazy.x, StoreRows) and lazy.streamed and not mem.streamed
    assert lazy.x.shape == mem.x.shape and lazy.x.num_views == 3
    np.testing.assert_array_equal(lazy.view_strength, mem.view_strength)
    rows = rng.integers(0, len(mem), 500)  # with repeats, unsorted
    views = rng.integers(0, 3, 500)
    np.testing.assert_array_equal(lazy.x.take(rows), mem.x[rows])
    np.testing.assert_array_equal(lazy.x.take(rows, views), mem.views[rows, views])
    np.testing.assert_array_equal(lazy.x[10:30], mem.x[10:30])
    np.testing.assert_array_equal(lazy.x[3], mem.x[3])
    np.testing.assert_array_equal(lazy.x[-5::2], mem.x[-5::2])
    np.testing.assert_array_equal(mem.x[:7], mem.views[:7, 0])
    keep = mem.labels % 2 == 0
    sub_l, sub_m = lazy.select(keep), mem.select(keep)
    assert sub_l.streamed and list(sub_l.sample_ids) == list(sub_m.sample_ids)
    np.testing.assert_array_equal(sub_l.x[:], sub_m.x)


def test_stream_auto_follows_available_memory(lt_root, monkeypatch):
    import featurelt.data.features as features

    store = Store(lt_root)
    n_bytes = len(features.load_samples(store, split="train")[0]) * 64 * 4
    monkeypatch.setattr(features, "available_memory", lambda: 2 * n_bytes + 8)  # fits: n_bytes <= half
    assert not features.load_features(store, ["pixels"], split="train").streamed
    monkeypatch.setattr(features, "available_memory", lambda: 2 * n_bytes - 8)  # does not fit
    assert features.load_features(store, ["pixels"], split="train").streamed
    with pytest.raises(ValueError, match="stream must be one of"):
        features.load_features(store, ["pixels"], split="train", stream="sometimes")  # type: ignore[arg-type]


def test_streaming_never_holds_the_feature_matrix(tmp_path):
    """Reading 20 batches through StoreRows allocates far less than the N x D matrix; loading it does not."""
    import tracemalloc

    from featurelt.data.features import load_features

    n, d = 4000, 1024  # 16 MiB of float32
    rng = np.random.default_rng(0)
    ids = [f"s{i:05d}" for i in range(n)]
    store = Store(tmp_path / "store")
    samples = pa.table({
        "sample_id": ids, "dataset": ["t"] * n, "split": ["train"] * n, "label": pa.array([i % 3 for i in range(n)], pa.int32()),
        "source": ["original"] * n, "uri": pa.array([None] * n, pa.string()), "image": pa.array([None] * n, pa.large_binary()),
        "content_sha256": ["0" * 64] * n, "width": pa.array([1] * n, pa.int32()), "height": pa.array([1] * n, pa.int32()),
        "description": pa.array([None] * n, pa.string())})
    with store.transaction("test") as tx:
        tx.append("samples", samples)
        tx.append("emb_big", _emb_rows(ids, rng.normal(size=(n, d)).astype(np.float32), views=0, rng=rng))
    store = Store(tmp_path / "store")
    matrix = n * d * 4

    def peak(fn) -> int:
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    def stream() -> None:
        fs = load_features(store, ["big"], split="train", stream="always")
        for _ in range(20):
            assert fs.x.take(rng.integers(0, n, 256)).shape == (256, d)

    assert peak(stream) < matrix / 4
    assert peak(lambda: load_features(store, ["big"], split="train", stream="never")) >= matrix  # the test can fail


@pytest.mark.parametrize("sampler", ["instance", "momentum", "balancemix"])
def test_train_head_streamed_from_store_equals_in_memory(full_root, tmp_path, sampler, capsys, monkeypatch):
    """Features on the device, in host memory copied per batch (the path for features larger than GPU
    memory, forced here) and read per batch from the store give the same run."""
    import featurelt.train.head as head_mod

    root = copy_store(full_root, tmp_path)
    args = ["--sampler", sampler, "--epochs", "3", "--batch-size", "64", "--lr", "0.05", "--seed", "4",
            "--proto", "--json"]
    out = {}
    for where, mode in (("device", "never"), ("host", "never"), ("store", "always")):
        with monkeypatch.context() as m:
            if where == "host":
                m.setattr(head_mod, "fits_on_device", lambda nbytes, device: False)
            capsys.readouterr()
            assert train(root, *args, "--stream-features", mode) == 0
            out[where] = json.loads(capsys.readouterr().out)
        assert out[where]["features_in"] == where
    assert out["store"]["config"]["stream_features"] == "always"
    q = "SELECT sample_id, prediction, top5, score FROM predictions WHERE run_id = '{}' ORDER BY sample_id"
    store = Store(root)
    want = store.sql(q.format(out["device"]["run_id"])).to_pylist()
    for where in ("host", "store"):
        for k in ("acc_all", "acc_many", "acc_medium", "acc_few", "macro_f1"):
            assert out[where][k] == out["device"][k]
        assert store.sql(q.format(out[where]["run_id"])).to_pylist() == want
    metrics = json.loads(last_run(root)["metrics"])
    assert metrics["features_in"] == "store" and metrics["streamed"] is True


def test_available_memory_is_positive_and_capped_by_ram():
    from featurelt.data.features import available_memory

    free = available_memory()
    assert 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("head", ["knn", "ncm"])
def test_fitted_heads_from_cli_match_numpy(full_root, tmp_path, head, capsys, monkeypatch):
    """knn (k = 1: the label of the most cosine-similar train row of a target class) and ncm (the most cosine-similar
    normalised class mean) against numpy over the same features (METHODS.md section 1); the same
    predictions with the features on the device, in host memory and read from the store; the
    checkpoint predicts the same; the runs row says no loss, sampler or epochs."""
    import featurelt.train.head as head_mod
    from featurelt.data.features import load_features
    from featurelt.heads import HEADS, HeadContext

    root = copy_store(full_root, tmp_path)
    store = Store(root)
    tr = load_features(store, ["pixels"], split="train")
    te = load_features(store, ["pixels"], split="test")
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    target = tr.labels < K  # the auxiliary class K is masked out: fitted heads leave its rows out
    if head == "knn":
        expect = tr.labels[target][(unit(te.x) @ unit(tr.x[target]).T).argmax(1)]
    else:
        means = np.stack([unit(tr.x)[tr.labels == c].sum(0) for c in range(K)])
        expect = (unit(te.x) @ unit(means).T).argmax(1)
    opts = ["--head-opt", "k=1"] if head == "knn" else []
    runs = {}
    for where, mode in (("device", "never"), ("host", "never"), ("store", "always")):
        with monkeypatch.context() as m:
            if where == "host":
                m.setattr(head_mod, "fits_on_device", lambda nbytes, device: False)
            capsys.readouterr()
            assert train(root, "--head", head, *opts, "--stream-features", mode, "--json") == 0
            runs[where] = json.loads(capsys.readouterr().out)
        assert runs[where]["features_in"] == where
        got = Store(root).sql(f"SELECT sample_id, prediction FROM predictions WHERE run_id = '{runs[where]['run_id']}'")
        pred = dict(zip(got.column("sample_id").to_pylist(), got.column("prediction").to_pylist()))
        keep = te.labels < K
        assert [pred[s] for s in te.sample_ids[keep]] == expect[keep].tolist()
    run = last_run(root)
    assert (run["loss"], run["sampler"], run["epochs"]) == ("none", "none", 0)
    model = HEADS.get(head)(HeadContext(in_dims=[64], num_classes=K + 1), **({"k": 1} if head == "knn" else {}))
    from featurelt.train.head import load_checkpoint

    model.load_state_dict(load_checkpoint(run["checkpoint"]).state_dict)  # fitted heads: raw features
    with torch.no_grad():
        assert model(torch.from_numpy(te.x))[:, :K].argmax(1).tolist() == expect.tolist()
    assert train(root, "--head", head, "--proto") == 1
    assert "fitted, not trained: --proto does not apply" in capsys.readouterr().err


def test_tau_norm_from_cli(lt_root, tmp_path, capsys):
    """--tau-norm: the stored predictions are argmax of features @ (w_k / ||w_k||^tau)^T from the checkpoint."""
    from featurelt.data.features import load_features
    from featurelt.heads import HEADS, HeadContext

    root = copy_store(lt_root, tmp_path)
    assert train(root, "--loss", "ce", "--epochs", "10", "--lr", "0.2", "--tau-norm", "1") == 0
    run = last_run(root)
    assert "tau_norm: 1.0" in run["config"]
    from featurelt.train.head import load_checkpoint

    head = HEADS.get("linear")(HeadContext(in_dims=[64], num_classes=K))
    ckpt = load_checkpoint(run["checkpoint"])
    head.load_state_dict(ckpt.state_dict)
    test = load_features(Store(root), ["pixels"], split="test")
    w = head.fc.weight.detach()
    expect = (ckpt.standardized(torch.from_numpy(test.x)) @ (w / w.norm(dim=1, keepdim=True)).T).argmax(1).numpy()
    got = Store(root).sql(f"SELECT sample_id, prediction FROM predictions WHERE run_id = '{run['run_id']}'")
    pred = dict(zip(got.column("sample_id").to_pylist(), got.column("prediction").to_pylist()))
    assert [pred[s] for s in test.sample_ids] == expect.tolist()
    capsys.readouterr()
    assert train(root, "--head", "cosine", "--tau-norm", "1") == 1  # refused before training
    assert "needs a head whose classifier is one linear layer" in capsys.readouterr().err


def test_ldam_drw_starts_at_default_epoch_and_is_logged(lt_root, tmp_path, capsys):
    # default drw_epoch = ceil(0.8 * epochs): 4 of 5 epochs; the log line says so, the runs row keeps it
    root = copy_store(lt_root, tmp_path)
    assert train(root, "--loss", "ldam", "--epochs", "5", "--batch-size", "64") == 0
    err = capsys.readouterr().err
    assert "note: ldam: deferred re-weighting starts at epoch 4 of 0..4" in err
    metrics = json.loads(last_run(root)["metrics"])
    assert any("starts at epoch 4" in n for n in metrics["notes"])
    assert train(root, "--loss", "ldam", "--loss-opt", "drw_epoch=9", "--epochs", "2") == 0
    assert "it never applies" in capsys.readouterr().err


def test_class_balanced_focal_from_cli(lt_root, tmp_path):
    root = copy_store(lt_root, tmp_path)
    assert train(root, "--loss", "focal", "--loss-opt", "alpha=class-balanced", "--loss-opt", "beta=0.99", *QUICK) == 0
    assert "alpha: class-balanced" in last_run(root)["config"]
    assert train(root, "--loss", "focal", "--loss-opt", "alpha=1,2", *QUICK) == 1  # K = 10 weights needed


def _add_set(root: Path, name: str, x_of) -> None:
    """Add embedding set ``name`` with vectors ``x_of(sample_ids) -> [N, D]`` for every sample."""
    store = Store(root)
    ids = store.read("samples", columns=["sample_id"]).column(0).to_pylist()
    with store.transaction(f"test: {name}") as tx:
        tx.append(f"emb_{name}", _emb_rows(ids, x_of(ids), views=0, rng=np.random.default_rng(0)))


def test_one_class_predictions_warn(lt_root, tmp_path, capsys):
    # features that say nothing (every vector equal): every test row gets the same prediction
    root = copy_store(lt_root, tmp_path)
    _add_set(root, "const", lambda ids: np.ones((len(ids), 4), dtype=np.float32))
    capsys.readouterr()
    assert main(["--store", str(root), "train-head", "--features", "const", *QUICK]) == 0
    out, err = capsys.readouterr()
    assert "warning: the head predicts class" in err and "for 100% of the" in err and "collapsed" in err
    assert "warning: the head predicts class" in out  # repeated in the run's summary
    metrics = json.loads(last_run(root)["metrics"])
    assert metrics["collapsed"] is True and metrics["top_class_fraction"] == 1.0
    assert any(n.startswith("warning:") for n in metrics["notes"])
    # a head that trains: no warning
    assert train(root, *QUICK) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads(last_run(root)["metrics"])["collapsed"] is False


def test_standardized_input_trains_on_a_shared_mean_direction(lt_root, tmp_path, capsys):
    # the digits pixels pushed onto one large common direction with a 1/200 spread around it (as the tiny
    # random encoders' features): SGD on the raw features collapses, on standardised features it trains
    root = copy_store(lt_root, tmp_path)
    store = Store(root)
    pix = {r["sample_id"]: r["vector"] for r in store.read("emb_pixels", columns=["sample_id", "vector"]).to_pylist()}
    _add_set(root, "squashed", lambda ids: (np.asarray([pix[i] for i in ids]) / 200 + 1.0).astype(np.float32))
    capsys.readouterr()
    opts = ["--loss", "balanced-softmax", "--epochs", "10"]
    assert main(["--store", str(root), "train-head", "--features", "squashed", "--standardize", "off", *opts]) == 0
    assert json.loads(last_run(root)["metrics"])["top_class_fraction"] > 0.9
    assert main(["--store", str(root), "train-head", "--features", "squashed", *opts]) == 0
    run = last_run(root)
    assert json.loads(run["metrics"])["top_class_fraction"] < 0.3 and run["acc_all"] > 0.6
    assert "standardize: auto" in run["config"]
    ckpt = torch.load(run["checkpoint"], weights_only=True)
    assert ckpt["input_mean"].shape == (64,) and ckpt["input_std"].min() > 0


def test_auxiliary_class_before_an_original_one_trains(full_root, tmp_path, capsys):
    # as after `ingest` of an auxiliary folder, then a new original class: the auxiliary class has label 5,
    # original class '5' label 10 (K = 11). Training maps labels to head indices (targets first); the
    # predictions rows keep store labels and never name the auxiliary class.
    root = copy_store(full_root, tmp_path)
    store = Store(root)
    classes = store.read("classes").to_pylist()
    for c in classes:
        c["label"] = {5: 10, 10: 5}.get(c["label"], c["label"])
    with store.transaction("test: auxiliary label before an original one") as tx:
        for table in ("samples", "text_embeddings"):  # swap labels 5 and 10
            tx.update(table, {"label": "99"}, where="label = 5")
            tx.update(table, {"label": "5"}, where="label = 10")
            tx.update(table, {"label": "10"}, where="label = 99")
        tx.overwrite("classes", pa.Table.from_pylist(sorted(classes, key=lambda c: c["label"]),
                                                     schema=store.read("classes").schema))
    assert Store(root).read("classes").column("source").to_pylist()[5] == "auxiliary"
    for args in (["--loss", "ns-ce"], ["--head", "adapter", "--text-set", "means", "--sampler", "lfm"], ["--head", "knn"]):
        capsys.readouterr()
        assert train(root, *args, *QUICK) == 0, capsys.readouterr().err
        run = last_run(root)
        preds = Store(root).sql(f"SELECT label, prediction, top5 FROM predictions WHERE run_id = '{run['run_id']}'")
        labels, pred = preds.column("label").to_pylist(), preds.column("prediction").to_pylist()
        assert 10 in labels and 5 not in labels                      # original class '5' evaluated, auxiliary not
        assert 5 not in pred and all(5 not in t for t in preds.column("top5").to_pylist())
        assert run["acc_all"] > 0.5
    capsys.readouterr()
    assert main(["--store", str(root), "eval", "--run", run["run_id"]]) == 0  # metrics from store labels agree


@pytest.mark.parametrize("mode", ["never", "always"])
def test_non_finite_features_name_the_set_and_sample(lt_root, tmp_path, capsys, mode):
    root = copy_store(lt_root, tmp_path)
    train_ids = sorted(Store(root).read("samples", columns=["sample_id"], filter="split = 'train'").column(0).to_pylist())
    bad = {train_ids[7]: np.nan, train_ids[20]: np.inf}

    def vectors(ids):
        x = np.ones((len(ids), 4), dtype=np.float32)
        for i, sid in enumerate(ids):
            x[i, 2] = bad.get(sid, 1.0)
        return x

    _add_set(root, "broken", vectors)
    capsys.readouterr()
    assert main(["--store", str(root), "train-head", "--features", "pixels,broken", "--stream-features", mode,
                 *QUICK]) == 1
    err = capsys.readouterr().err
    assert f"embedding set 'broken' has a NaN or infinite value in the vector of sample {train_ids[7]}" in err
    assert "lr" not in err and "Traceback" not in err


def test_bad_config_yaml_and_damaged_checkpoint_are_one_line(lt_root, tmp_path, capsys):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("head: linear\nloss_opts: {gamma: 2\nepochs: 3\n")
    assert train(lt_root, "--config", str(cfg)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"featurelt train-head: error: config file {cfg} is not valid YAML at line") and "Traceback" not in err
    root = copy_store(lt_root, tmp_path)
    assert train(root, *QUICK) == 0
    run = last_run(root)
    Path(run["checkpoint"]).write_bytes(b"PK\x03\x04 not a checkpoint at all")
    capsys.readouterr()
    assert main(["--store", str(root), "eval", "--run", run["run_id"]]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"featurelt eval: error: head checkpoint {run['checkpoint']} cannot be read")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
