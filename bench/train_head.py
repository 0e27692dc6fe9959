"""Benchmark: epoch time of train-head's training loop against a minimal PyTorch loop (issue 4, item 9).

Part 1 (always): an ImageNet-LT-sized feature table -- ``--rows`` x ``--dim`` float32 (default
116,000 x 1024), ``--classes`` classes (default 1000) with Pareto(shape 6) class counts, synthetic
class-clustered features -- is written to a temporary featurelt store (``emb_synthetic`` plus a text
set for the adapter). For each head (``linear``, ``adapter``) the features are read back with
featurelt's own loader (``load_train_data``: pinned store version, features on the device once) and
two loops train over the *same* in-memory tensors, interleaved, ``--repeats`` epochs each after one
warm-up epoch:

- featurelt: ``HeadTrainer.run_epoch`` -- what ``featurelt train-head`` runs per epoch (sampler
  ``instance``, loss ``ce``, SGD with momentum, cosine LR step);
- baseline: ``torch.randperm`` batches, the same module architecture written inline,
  ``F.cross_entropy``, the same optimizer.

Reported: median epoch seconds of each and the ratio featurelt / baseline (target <= 1.15).

Part 1b (``--stream``, store source only): the same table read per batch from the store
(``stream_features="always"``: only row offsets in memory, each batch's vectors read with
``LanceDataset.take``) against the same ``HeadTrainer`` epoch over features loaded into memory;
reported: median epoch seconds of each, the ratio, and the RSS each loaded train set holds.

Part 1c (``--knn Q``): the ``knn`` head (fitted, no epochs: faiss ``IndexFlatIP`` over the train rows,
weighted vote of the k = 20 nearest) against the same search written in PyTorch -- unit rows, one
matmul and ``topk`` per chunk of queries, the same vote with ``scatter_add`` -- on the same table,
for Q queries (train rows plus noise), interleaved; reported: median seconds of fit + predict of each,
the ratio, and the share of queries on which the two predict the same class.

Part 2 (``--fmnist``): Fashion-MNIST through the CLI -- ``ingest --builtin fashion-mnist`` +
``make-lt --imbalance 100`` + ``extract pixels`` + ``train-head`` (from scratch) against a second
``train-head`` re-run on the cached features (median of ``--fmnist-repeats`` re-runs).

Usage:
  python bench/train_head.py                          # full size, device auto
  python bench/train_head.py --rows 20000 --repeats 3  # smaller run
  python bench/train_head.py --device cuda --fmnist --results bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import gc
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from featurelt.config import TrainCfg  # noqa: E402
from featurelt.data.classes import classes_table  # noqa: E402
from featurelt.store import Store  # noqa: E402
from featurelt.train.head import HeadTrainer, load_train_data, resolve_device  # noqa: E402

SECTION = "## bench/train_head.py"


# ---------------------------------------------------------------------------------------------- data
def pareto_counts(rows: int, classes: int, *, shape: float = 6.0, seed: int = 0) -> np.ndarray:
    """Class counts shaped like ImageNet-LT's: sorted Pareto(shape) draws mapped to 1280 .. 5 images per
    class, then scaled to sum to ``rows`` (every class >= 1)."""
    rng = np.random.default_rng(seed)
    v = np.sort(rng.pareto(shape, classes))[::-1]
    profile = 5 + (v - v.min()) / (v.max() - v.min()) * (1280 - 5)
    counts = np.maximum(1, np.floor(profile / profile.sum() * rows)).astype(np.int64)
    counts[0] += rows - counts.sum()
    return counts


def write_synthetic_store(root: Path, *, rows: int, dim: int, classes: int, seed: int = 0) -> np.ndarray:
    """Samples, classes, ``emb_synthetic`` (streamed in 8192-row batches) and text set ``synthetic``."""
    rng = np.random.default_rng(seed)
    counts = pareto_counts(rows, classes, seed=seed)
    labels = np.repeat(np.arange(classes), counts)
    ids = [f"s{i:07d}" for i in range(rows)]
    store = Store(root)
    n = rows
    samples = pa.table({
        "sample_id": ids, "dataset": ["synthetic"] * n, "split": ["train"] * n, "label": pa.array(labels, pa.int32()),
        "source": ["original"] * n, "uri": pa.array([None] * n, pa.string()),
        "image": pa.array([None] * n, pa.large_binary()), "content_sha256": ["0" * 64] * n,
        "width": pa.array([1] * n, pa.int32()), "height": pa.array([1] * n, pa.int32()),
        "description": pa.array([None] * n, pa.string())})
    registry = [{"label": y, "name": f"class{y}", "source": "original", "neighbor_of": None} for y in range(classes)]
    means = rng.normal(size=(classes, dim)).astype(np.float32)

    def batches():
        for start in range(0, rows, 8192):
            sl = slice(start, min(rows, start + 8192))
            x = means[labels[sl]] + rng.normal(scale=2.0, size=(sl.stop - sl.start, dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            yield pa.record_batch({
                "sample_id": pa.array(ids[sl]), "view": pa.array(np.zeros(sl.stop - sl.start, np.int32)),
                "aug_strength": pa.array(np.zeros(sl.stop - sl.start, np.float32)),
                "fingerprint": pa.array(["synthetic"] * (sl.stop - sl.start)),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)})

    t = means / np.linalg.norm(means, axis=1, keepdims=True)
    with store.transaction("bench: synthetic ImageNet-LT-sized features") as tx:
        tx.append("samples", samples)
        tx.append("classes", classes_table(registry, dict(enumerate(counts.tolist())), many=100, few=20))
        tx.append("emb_synthetic", batches())
        tx.append("text_embeddings", pa.table({
            "set_name": ["synthetic"] * classes, "encoder": ["bench"] * classes,
            "label": pa.array(range(classes), pa.int32()), "class_name": [r["name"] for r in registry],
            "templates": ["{}"] * classes, "dim": pa.array([dim] * classes, pa.int32()),
            "vector": pa.array(t.tolist(), pa.list_(pa.float32())), "fingerprint": ["bench"] * classes}))
    return counts


def synthetic_train_data(*, rows: int, dim: int, classes: int, device: torch.device, seed: int = 0):
    """``--source memory``: the same synthetic table built in memory and placed like ``load_train_data``
    does (for machines without pylance; the epoch loop timed is the same)."""
    from featurelt.train.head import TrainData, fits_on_device, place

    rng = np.random.default_rng(seed)
    counts = pareto_counts(rows, classes, seed=seed)
    labels = np.repeat(np.arange(classes), counts)
    means = rng.normal(size=(classes, dim)).astype(np.float32)
    x = means[labels] + rng.normal(scale=2.0, size=(rows, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    stream = not fits_on_device(x.nbytes, device)
    return TrainData(x=place(x, device, stream=stream), y=place(labels.astype(np.int64), device, stream=stream),
                     source=np.full(rows, "original"), class_counts=torch.from_numpy(counts).float(),
                     neighbor_of=torch.full((classes,), -1, dtype=torch.long), num_target=classes, in_dims=[dim],
                     text=torch.from_numpy(means / np.linalg.norm(means, axis=1, keepdims=True)),
                     streamed=stream, device=device, bucket_many=100, bucket_few=20)


# ---------------------------------------------------------------------------------------------- baseline
class MinimalAdapter(nn.Module):
    """The adapter head written inline: lam ReLU(W f + b) + (1 - lam) f, cosine to text / tau."""

    def __init__(self, dim: int, text: torch.Tensor, lam: float = 0.2, tau: float = 0.05) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, text.shape[1])
        self.register_buffer("text", F.normalize(text, dim=1))
        self.lam, self.tau = lam, tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.lam * torch.relu(self.fc(x)) + (1 - self.lam) * x
        return F.normalize(f, dim=1) @ self.text.T / self.tau


def baseline_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                   batch_size: int, gen: torch.Generator) -> None:
    model.train()
    perm = torch.randperm(len(y), generator=gen).to(x.device)
    for start in range(0, len(y), batch_size):
        idx = perm[start:start + batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``(fn(), seconds)``, the device synchronised before and after."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def interleaved(label: str, ours: Callable[[int], Any], base: Callable[[int], Any], *, repeats: int,
                device: torch.device, baseline: str, name: str = "featurelt",
                note: Callable[[Any, Any], str] | None = None) -> tuple[float, float, tuple[Any, Any]]:
    """``ours(i)`` then ``base(i)`` for ``i = 0..repeats`` (0 warms up both), each line printed.
    Returns (median seconds of ours, of base, over i >= 1; the last outputs of both)."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeats + 1):
        out_ours, t_ours = timed(lambda: ours(i), device)
        out_base, t_base = timed(lambda: base(i), device)
        if i:
            times[0].append(t_ours)
            times[1].append(t_base)
        extra = f", {note(out_ours, out_base)}" if note is not None else ""
        print(f"  {label} {i}{' (warm-up)' if not i else ''}: {name} {t_ours:.3f} s, {baseline} {t_base:.3f} s"
              f"{extra}", flush=True)
    return statistics.median(times[0]), statistics.median(times[1]), (out_ours, out_base)


def bench_head(store: Store | None, head: str, *, device: torch.device, repeats: int, batch_size: int,
               memory: dict | None = None) -> dict:
    cfg = TrainCfg(features=("synthetic",), text_set="synthetic" if head == "adapter" else None, head=head,
                   loss="ce", sampler="instance", epochs=repeats + 1, batch_size=batch_size, lr=0.01,
                   optimizer="sgd", device=device.type)
    if store is not None:
        data, _train, _classes = load_train_data(store, cfg, device=device, views=False)
    else:
        data = synthetic_train_data(device=device, **memory)  # type: ignore[arg-type]
        if head != "adapter":
            data.text = None
    torch.manual_seed(0)
    trainer = HeadTrainer(cfg, data)
    dim, k = int(data.x.shape[1]), data.num_classes
    model = (nn.Linear(dim, k) if head == "linear" else MinimalAdapter(dim, data.text)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(0)
    mo, mb, _ = interleaved(f"{head} epoch", trainer.run_epoch,
                            lambda epoch: baseline_epoch(model, opt, data.x, data.y, batch_size, gen),
                            repeats=repeats, device=device, baseline="minimal loop")
    return {"head": head, "featurelt_s": mo, "baseline_s": mb, "ratio": mo / mb, "streamed": data.streamed}


def rss_mib() -> float:
    """Resident set size of this process now (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_stream(store: Store, *, device: torch.device, repeats: int, batch_size: int) -> dict:
    """Epoch time of the linear head with features streamed from the store vs loaded into memory."""
    base = TrainCfg(features=("synthetic",), head="linear", loss="ce", sampler="instance", epochs=repeats + 1,
                    batch_size=batch_size, lr=0.01, device=device.type)
    trainers, rss = {}, {}
    for mode in ("always", "never"):
        gc.collect()
        before = rss_mib()
        data, _train, _classes = load_train_data(store, base.replace(stream_features=mode), device=device, views=False)
        rss[mode] = rss_mib() - before  # memory the loaded train data holds
        torch.manual_seed(0)
        trainers[mode] = HeadTrainer(base, data)
    ms, mm, _ = interleaved("stream epoch", trainers["always"].run_epoch, trainers["never"].run_epoch,
                            repeats=repeats, device=device, name="from the store", baseline="in memory")
    return {"store_s": ms, "memory_s": mm, "ratio": ms / mm, "rss_store_mib": rss["always"],
            "rss_memory_mib": rss["never"], "features_in": trainers["always"].data.features_in}


def baseline_knn(x: torch.Tensor, y: torch.Tensor, queries: torch.Tensor, *, k: int, temperature: float,
                 num_classes: int, chunk: int = 4096) -> torch.Tensor:
    """kNN written in PyTorch: cosine = matmul of unit rows, ``topk``, votes ``exp(cos / T)`` summed per class."""
    xu = F.normalize(x, dim=1)
    preds = []
    for q in F.normalize(queries, dim=1).split(chunk):
        sims, ids = (q @ xu.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, device=q.device).scatter_add_(1, y[ids], (sims / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def bench_knn(store: Store | None, *, queries: int, device: torch.device, repeats: int,
              memory: dict | None = None) -> dict:
    """fit + predict of the knn head vs :func:`baseline_knn` on the same features (module docstring)."""
    cfg = TrainCfg(features=("synthetic",), head="knn", device=device.type)
    if store is not None:
        data, _train, _classes = load_train_data(store, cfg, device=device, views=False)
    else:
        data = synthetic_train_data(device=device, **memory)  # type: ignore[arg-type]
    x, y = torch.as_tensor(data.x), torch.as_tensor(data.y)
    gen = torch.Generator().manual_seed(1)
    pick = torch.randperm(len(y), generator=gen)[:queries]
    q = (x[pick].cpu() + 0.05 * torch.randn(len(pick), x.shape[1], generator=gen)).to(x.device)
    def ours(_: int) -> torch.Tensor:
        trainer = HeadTrainer(cfg, data)
        trainer.fit()
        return trainer.predict(q).argmax(1)

    def same(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.cpu() == b.cpu()).float().mean())

    head = HeadTrainer(cfg, data).head  # its defaults: k, temperature
    mo, mb, last = interleaved(
        "knn rep", ours, lambda _: baseline_knn(x, y, q, k=head.k, temperature=head.temperature,
                                                num_classes=data.num_classes),
        repeats=repeats, device=device, baseline="torch", note=lambda a, b: f"same prediction {100 * same(a, b):.2f} %")
    return {"queries": len(pick), "featurelt_s": mo, "baseline_s": mb, "ratio": mo / mb, "agree": same(*last)}


# ---------------------------------------------------------------------------------------------- fashion-mnist
def cli(root: Path, *argv: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "featurelt", "--store", str(root), *argv], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def bench_fmnist(tmp: Path, *, limit: int | None, epochs: int, repeats: int, device: str) -> dict:
    root = tmp / "fmnist"
    ingest = ["ingest", "--builtin", "fashion-mnist", "--no-progress"] + (["--limit", str(limit)] if limit else [])
    t_ingest = cli(root, *ingest) + cli(root, "make-lt", "--imbalance", "100", "--seed", "0")
    train = ["train-head", "--features", "pixels", "--loss", "balanced-softmax", "--epochs", str(epochs),
             "--device", device]
    t_extract = cli(root, "extract", "pixels", "--no-progress", "--device", device)
    t_first = cli(root, *train)
    reruns = [cli(root, *train) for _ in range(repeats)]
    rows = Store(root).count("emb_pixels")
    return {"ingest_make_lt_s": t_ingest, "extract_s": t_extract, "first_train_s": t_first,
            "rerun_s": statistics.median(reruns), "rows": rows,
            "ratio": (t_extract + t_first) / statistics.median(reruns)}


# ---------------------------------------------------------------------------------------------- report
def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()}), torch {torch.__version__}"


def markdown(args: argparse.Namespace, device: torch.device, results: list[dict], fm: dict | None,
             write_s: float, st: dict | None = None, kn: dict | None = None) -> str:
    lines = [f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} -- {machine(device)}", "",
             f"`python bench/train_head.py {' '.join(sys.argv[1:])}`", "",
             f"Feature table: {args.rows} x {args.dim} float32, {args.classes} classes (Pareto counts), "
             f"{'written to a temporary store and read back' if args.source == 'store' else 'built in memory'} "
             f"({write_s:.1f} s). Batch {args.batch_size}, SGD, loss ce, sampler instance; "
             f"median of {args.repeats} epochs after 1 warm-up, loops interleaved.", "",
             "| head | train-head epoch (s) | minimal loop epoch (s) | ratio (target <= 1.15) |",
             "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['head']} | {r['featurelt_s']:.3f} | {r['baseline_s']:.3f} | {r['ratio']:.3f} |")
    if st:
        lines += ["", f"Streaming (linear head, features in `{st['features_in']}`): epoch {st['store_s']:.3f} s "
                  f"reading each batch from the store vs {st['memory_s']:.3f} s over features in memory "
                  f"(ratio {st['ratio']:.2f}, median of {args.repeats}); the loaded train data holds {st['rss_store_mib']:.0f} MiB "
                  f"of RSS streamed vs {st['rss_memory_mib']:.0f} MiB in memory."]
    if kn:
        lines += ["", f"kNN head (k = 20, {kn['queries']} queries against the {args.rows} train rows): fit + predict "
                  f"{kn['featurelt_s']:.3f} s (faiss IndexFlatIP) vs {kn['baseline_s']:.3f} s (PyTorch matmul + topk, "
                  f"same vote): ratio {kn['ratio']:.2f}, median of {args.repeats}; the same class for "
                  f"{100 * kn['agree']:.2f} % of the queries."]
    if fm:
        lines += ["", f"Fashion-MNIST ({fm['rows']} rows with pixel features, imbalance 100, {args.fmnist_epochs} epochs, "
                  f"balanced-softmax): ingest + make-lt {fm['ingest_make_lt_s']:.1f} s; extract pixels "
                  f"{fm['extract_s']:.1f} s + first train-head {fm['first_train_s']:.1f} s vs train-head re-run "
                  f"{fm['rerun_s']:.1f} s (median of {args.fmnist_repeats}; each a fresh `featurelt` process): "
                  f"re-run is {fm['ratio']:.1f}x faster than extract + train."]
    return "\n".join(lines) + "\n"


def write_results(path: Path, block: str) -> None:
    """Append ``block`` to this script's section of RESULTS.md (replacing the placeholder line)."""
    text = path.read_text()
    if SECTION not in text:
        text = text.rstrip() + f"\n\n{SECTION}\n\n"
    head, rest = text.split(SECTION, 1)
    nxt = rest.find("\n## ")
    body, tail = (rest, "") if nxt < 0 else (rest[:nxt], rest[nxt:])
    body = body.replace("(section owned by bench/train_head.py)", "").rstrip()
    path.write_text(head + SECTION + body + "\n\n" + block + tail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=116_000, help="feature rows (ImageNet-LT train: ~116k)")
    p.add_argument("--dim", type=int, default=1024, help="feature width")
    p.add_argument("--classes", type=int, default=1000, help="classes")
    p.add_argument("--batch-size", type=int, default=256, help="batch size of both loops")
    p.add_argument("--repeats", type=int, default=5, help="timed epochs per loop (median)")
    p.add_argument("--heads", default="linear,adapter", help="heads to time, comma-separated")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device")
    p.add_argument("--source", choices=["store", "memory"], default="store",
                   help="store: features written to a temporary store and read back with load_train_data "
                   "(default); memory: built in memory (machines without pylance)")
    p.add_argument("--stream", action="store_true",
                   help="also time epochs with features read per batch from the store (--source store)")
    p.add_argument("--knn", type=int, default=0, metavar="Q",
                   help="also time the knn head (fit + predict of Q queries) against PyTorch matmul + topk")
    p.add_argument("--fmnist", action="store_true", help="also time extract + train vs re-run on Fashion-MNIST")
    p.add_argument("--fmnist-limit", type=int, default=None, help="ingest --limit for Fashion-MNIST")
    p.add_argument("--fmnist-epochs", type=int, default=10, help="train-head epochs on Fashion-MNIST")
    p.add_argument("--fmnist-repeats", type=int, default=3, help="train-head re-runs (median)")
    p.add_argument("--results", type=Path, default=None, help="append the results to this RESULTS.md")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="featurelt-bench-") as tmp:
        t = time.perf_counter()
        store, memory = None, None
        if args.source == "store":
            write_synthetic_store(Path(tmp) / "synthetic", rows=args.rows, dim=args.dim, classes=args.classes)
            store = Store(Path(tmp) / "synthetic")
        else:
            memory = {"rows": args.rows, "dim": args.dim, "classes": args.classes}
        write_s = time.perf_counter() - t
        print(f"wrote {args.rows} x {args.dim} features in {write_s:.1f} s", flush=True)
        # streaming first: its RSS is measured before the other loops have held (and freed) features
        st = bench_stream(store, device=device, repeats=args.repeats, batch_size=args.batch_size) \
            if args.stream and store is not None else None
        results = [bench_head(store, h, device=device, repeats=args.repeats, batch_size=args.batch_size,
                              memory=memory) for h in args.heads.split(",")]
        kn = bench_knn(store, queries=args.knn, device=device, repeats=args.repeats, memory=memory) \
            if args.knn else None
        fm = bench_fmnist(Path(tmp), limit=args.fmnist_limit, epochs=args.fmnist_epochs, repeats=args.fmnist_repeats,
                          device=args.device) if args.fmnist else None
    block = markdown(args, device, results, fm, write_s, st, kn)
    print(block)
    if args.results:
        write_results(args.results, block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
