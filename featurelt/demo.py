"""``featurelt demo``: the whole pipeline on built-in data in a few minutes, through the CLI commands.

Steps (each one is the ``featurelt`` command a user would type, run in-process through
:func:`featurelt.cli.main`; nothing here re-implements them):

1. ``ingest`` fashion-mnist (Debian package files) or scikit-learn's digits, a subsample per split;
2. ``make-lt --imbalance 100``: exponential long-tailed train split (METHODS.md section 0), with
   bucket thresholds that give many, medium and few classes on the chosen data;
3. ``extract`` ``pixels`` and the tiny encoders ``clip:tiny``, ``sam:tiny``, ``dinov2:tiny`` (randomly
   initialised, no downloads), and ``text:minilm`` for the class names;
4. ``train-head``: a sweep of heads and losses from the cached features;
5. the comparison table, read back from the ``runs`` table with SQL;
6. one head trained again from the cached features, timed against the full pipeline;
7. ``report`` of the sweep (HTML + PNG figures).
"""
from __future__ import annotations

import contextlib
import io
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
IMAGE_ENCODERS = ("pixels", "clip:tiny", "sam:tiny", "dinov2:tiny")
TEXT_ENCODER = "text:minilm"
IMBALANCE = 100.0
FASHION_MNIST_LIMIT = 4000   # train images ingested by default (test: a third of it)
# columns of the printed comparison table (all from the runs table)
TABLE_COLUMNS = ("run_id", "head", "loss", "sampler", "acc_all", "acc_many", "acc_medium", "acc_few", "macro_f1")

Dataset = Literal["auto", "digits", "fashion-mnist"]


@dataclass(frozen=True)
class DemoSizes:
    """Sizes that keep the demo within its time budget (printed at the start)."""

    limit: int | None     # images ingested per split (None: all)
    image_size: int       # input size of the tiny encoders, pixels
    epochs: int           # epochs per head
    many: int             # bucket threshold: many when train_count > many
    few: int              # bucket threshold: few when train_count < few


@dataclass
class DemoResult:
    """What the demo did: the runs of the sweep, the table it printed, the timings, the report."""

    store: str
    dataset: str
    sizes: DemoSizes
    run_ids: list[str]
    table: str
    timings: dict[str, float] = field(default_factory=dict)   # step -> seconds
    rerun_id: str | None = None
    rerun_seconds: float = 0.0
    pipeline_seconds: float = 0.0
    report: Path | None = None


def choose_dataset(dataset: Dataset, *, fashion_dir: Path = FASHION_MNIST_DIR) -> tuple[str, str]:
    """``(name, reason)``: fashion-mnist when asked or when its Debian files exist (auto), else digits."""
    present = all((fashion_dir / f).is_file() for f in FASHION_MNIST_FILES)
    if dataset == "fashion-mnist":
        if not present:
            missing = [f for f in FASHION_MNIST_FILES if not (fashion_dir / f).is_file()]
            raise FileNotFoundError(f"--dataset fashion-mnist needs {fashion_dir}/{{{','.join(missing)}}} "
                                    "(Debian package dataset-fashion-mnist); use --dataset digits")
        return "fashion-mnist", f"asked for with --dataset (files in {fashion_dir})"
    if dataset == "digits":
        return "digits", "asked for with --dataset (scikit-learn's 8x8 digits, bundled with scikit-learn)"
    if dataset != "auto":
        raise ValueError(f"dataset must be auto, digits or fashion-mnist, got {dataset!r}")
    if present:
        return "fashion-mnist", f"auto: the Debian fashion-mnist files are present in {fashion_dir}"
    return "digits", (f"auto: {fashion_dir} has no fashion-mnist files (apt install dataset-fashion-mnist to use it); "
                      "using scikit-learn's 8x8 digits")


def bucket_thresholds(counts: Sequence[int], *, many: int = 100, few: int = 20) -> tuple[int, int]:
    """``(many, few)`` thresholds for ``counts``: the paper's 100 / 20 when they give all three buckets,
    else relative ones that put about a third of the classes in each bucket."""
    def buckets(m: int, f: int) -> set[str]:
        return {"many" if c > m else "few" if c < f else "medium" for c in counts}

    if buckets(many, few) == {"many", "medium", "few"}:
        return many, few
    s = sorted(counts, reverse=True)
    third = max(1, len(s) // 3)
    m, f = s[third], s[len(s) - third] + 1   # s[:third] > m ; s[-third:] < f
    if f > m or buckets(m, f) != {"many", "medium", "few"}:
        raise ValueError(f"cannot split train counts {s} into many / medium / few buckets")
    return m, f


def default_sizes(dataset: str, *, limit: int | None, image_size: int | None, epochs: int | None,
                  per_class_train: int, k: int) -> DemoSizes:
    """Sizes for ``dataset``; ``per_class_train`` is n_max of make-lt (the smallest class's train pool)."""
    from featurelt.data.longtail import exp_profile

    counts = exp_profile(per_class_train, k, IMBALANCE)
    many, few = bucket_thresholds(counts)
    return DemoSizes(limit=limit, image_size=image_size or 32, epochs=epochs or 20, many=many, few=few)


def input_size(encoder: str, size: int) -> int:
    """``size`` for ``encoder``, rounded to a multiple of 14 for DINOv2 (its ViT patch size)."""
    if encoder.startswith("dinov2:"):
        return max(14, round(size / 14) * 14)
    return size


class StepFailed(RuntimeError):
    """A pipeline step exited non-zero; the message holds its command and output."""


class Pipeline:
    """Runs ``featurelt`` commands in-process, one line of progress each, and times them."""

    def __init__(self, store: str, *, verbose: bool = False) -> None:
        self.store = store
        self.verbose = verbose
        self.timings: dict[str, float] = {}
        self.step = 0

    def run(self, name: str, argv: list[str]) -> tuple[float, str]:
        """Run ``featurelt --store STORE *argv``; returns (seconds, stdout). Raises :class:`StepFailed`."""
        from featurelt.cli import main

        self.step += 1
        full = ["--store", self.store, *argv]
        shown = "featurelt " + " ".join(_quote(a) for a in argv)
        print(f"[{self.step:2d}] {shown}", flush=True)
        out, err = io.StringIO(), io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(full)
            except SystemExit as exc:  # argparse usage errors exit; report them like a failed step
                rc = exc.code if isinstance(exc.code, int) else 2
        dt = time.perf_counter() - t0
        self.timings[name] = self.timings.get(name, 0.0) + dt
        text = out.getvalue()
        if rc != 0:
            raise StepFailed(f"step '{shown}' failed with exit status {rc}:\n{text}{err.getvalue()}")
        last = [line for line in text.strip().splitlines() if line.strip()][-1:] if text.strip() else []
        summary = f" -> {summary_line(last[0])}" if last else ""
        print(f"     {dt:6.1f} s{summary}", flush=True)
        if self.verbose and text:
            print(text, end="")
        return dt, text


def summary_line(text: str, width: int = 110) -> str:
    """``text`` on one line of at most ``width`` characters, cut between words and ending in `` …`` when
    it is longer (a single word longer than ``width`` is cut inside it)."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    keep = text[:width - 2]                      # room for " …"
    if text[width - 2] != " " and " " in keep:   # the cut falls inside a word: drop that word
        keep = keep[:keep.rfind(" ")]
    return keep.rstrip() + " …"


def _quote(a: str) -> str:
    return a if a and all(c.isalnum() or c in "-_.:/=,@" for c in a) else "'" + a.replace("'", "'\\''") + "'"


def comparison_table(store_path: str, run_ids: Sequence[str]) -> tuple[str, str]:
    """``(text table, SQL)``: the sweep's rows of the runs table in sweep order, as ``featurelt sql`` prints."""
    import pyarrow as pa

    from featurelt.report import sql_literal
    from featurelt.store import Store
    from featurelt.store.sql import format_table

    ids = ", ".join(sql_literal(r) for r in run_ids)
    query = f"SELECT {', '.join(TABLE_COLUMNS)} FROM runs WHERE run_id IN ({ids})"
    result = Store(store_path).sql(query)
    order = {r: i for i, r in enumerate(run_ids)}
    rows = sorted(result.to_pylist(), key=lambda r: order[r["run_id"]])
    table = pa.Table.from_pylist(rows, schema=result.schema)
    return format_table(table), query


def _run_ids(store_path: str) -> list[str]:
    from featurelt.store import Store

    store = Store(store_path)
    if not store.has_table("runs"):
        return []
    return store.sql("SELECT run_id FROM runs ORDER BY time").column(0).to_pylist()


# The sweep: (label, train-head arguments). Embedding set names are ARCHITECTURE.md's defaults.
SINGLE_FEATURES = "pixels"                                   # the single-source heads read raw pixels
FUSED_FEATURES = "pixels,clip_tiny,dinov2_tiny_cls,sam_tiny_latent"  # the fusion head reads every image set
TEXT_SET = "minilm"                                          # class-name embeddings of text:minilm
RERUN = 1                                                    # index of the head trained a second time


def sweep_specs(epochs: int, seed: int) -> list[tuple[str, list[str]]]:
    """The heads the demo trains (METHODS.md sections): CE and balanced softmax (1), LFM text-guided mixup
    (6), fusion of all cached sources (token width 64) with the prototype losses (2), the ECVL adapter with
    class-balanced sampling (5), and the kNN classifier on the cached features (1: fitted, no training). SGD, lr 0.1 cosine-annealed (0.01 for the LFM projection, whose cosine logits diverge at 0.1)."""
    common = ["--epochs", str(epochs), "--seed", str(seed)]
    return [
        ("linear + CE", ["--head", "linear", "--loss", "ce", "--features", SINGLE_FEATURES, "--lr", "0.1", *common]),
        ("linear + balanced softmax", ["--head", "linear", "--loss", "balanced-softmax",
                                       "--features", SINGLE_FEATURES, "--lr", "0.1", *common]),
        ("LFM text-guided mixup", ["--head", "lfm-projection", "--sampler", "lfm", "--loss", "ce",
                                   "--features", SINGLE_FEATURES, "--text-set", TEXT_SET, "--lr", "0.01", *common]),
        ("fusion + prototype losses", ["--head", "fusion", "--head-opt", "width=64", "--loss", "balanced-softmax",
                                       "--proto", "head,tail-std,tail-dist", "--features", FUSED_FEATURES,
                                       "--lr", "0.1", *common]),
        ("ECVL adapter", ["--head", "adapter", "--sampler", "class-balanced", "--loss", "ce",
                          "--features", SINGLE_FEATURES, "--text-set", TEXT_SET, "--lr", "0.1", *common]),
        ("kNN on the cached features", ["--head", "knn", "--features", SINGLE_FEATURES, "--seed", str(seed)]),
    ]


def run_demo(store_path: str | Path, *, dataset: Dataset = "auto", out_dir: str | Path | None = None,
             limit: int | None = None, image_size: int | None = None, epochs: int | None = None,
             fresh: bool = False, seed: int = 0, verbose: bool = False) -> DemoResult:
    """Run the demo into the store at ``store_path`` (must be empty or missing; ``fresh`` deletes it first).

    Prints each step, the comparison table and the re-run timing; returns a :class:`DemoResult`.
    """
    from featurelt.store import Store

    t_start = time.perf_counter()
    store_path = str(store_path)
    name, reason = choose_dataset(dataset)
    root = Path(store_path)
    if "://" not in store_path and root.exists() and any(root.iterdir()):
        if not fresh:
            raise ValueError(f"store {root} exists and is not empty; the demo writes a new store: pass "
                             f"--fresh to delete it first, or --store NEW_DIR")
        if not (root / "commits.lance").exists():
            raise ValueError(f"--fresh refuses to delete {root}: it is not a featurelt store (no commits.lance)")
        shutil.rmtree(root)
    print(f"featurelt demo -- dataset: {name} ({reason})")
    pipe = Pipeline(store_path, verbose=verbose)
    if name == "fashion-mnist":
        # one ingest per IDX file, so that --limit subsamples each split (the files are in class-mixed order)
        limit = limit or FASHION_MNIST_LIMIT
        for fname, n in (("train-images-idx3-ubyte.gz", limit), ("t10k-images-idx3-ubyte.gz", max(10, limit // 3))):
            pipe.run("ingest", ["ingest", "--builtin", "fashion-mnist", str(FASHION_MNIST_DIR / fname),
                                "--limit", str(n), "--no-progress"])
    else:
        pipe.run("ingest", ["ingest", "--builtin", "digits", "--no-progress"]
                 + (["--limit", str(limit)] if limit else []))
    store = Store(store_path)
    row = store.sql("SELECT min(n) AS n, count(*) AS k FROM (SELECT label, count(*) AS n FROM samples "
                    "WHERE split = 'train' GROUP BY label)").to_pylist()[0]
    per_class, k = int(row["n"]), int(row["k"])
    sizes = default_sizes(name, limit=limit, image_size=image_size, epochs=epochs, per_class_train=per_class, k=k)
    splits = {r["split"]: r["n"] for r in store.sql("SELECT split, count(*) AS n FROM samples GROUP BY 1").to_pylist()}
    print(f"     sizes: {', '.join(f'{n} {sp}' for sp, n in sorted(splits.items()))} images, {k} classes "
          f"(smallest train class {per_class}); imbalance {IMBALANCE:g}; buckets: many > {sizes.many}, "
          f"few < {sizes.few}; encoder input {sizes.image_size} px; {sizes.epochs} epochs per head", flush=True)
    pipe.run("make-lt", ["make-lt", "--imbalance", f"{IMBALANCE:g}", "--many", str(sizes.many),
                         "--few", str(sizes.few), "--seed", str(seed)])
    # only the splits heads read: the rows make-lt moved to train_unused are not embedded
    for enc in IMAGE_ENCODERS:
        for split in ("train", "test"):
            size = input_size(enc, sizes.image_size)
            pipe.run(f"extract {enc}", ["extract", enc, "--split", split, "--image-size", str(size),
                                        "--seed", str(seed), "--no-progress"])
    pipe.run(f"extract {TEXT_ENCODER}", ["extract", TEXT_ENCODER, "--no-progress"])

    run_ids: list[str] = []
    specs = sweep_specs(sizes.epochs, seed)
    for label, argv in specs:
        before = set(_run_ids(store_path))
        pipe.run(f"train-head {label}", ["train-head", *argv])
        new = [r for r in _run_ids(store_path) if r not in before]
        if len(new) != 1:
            raise StepFailed(f"train-head ({label}) should add one run to the runs table, added {len(new)}")
        run_ids.extend(new)
    table, query = comparison_table(store_path, run_ids)
    print(f"\nComparison: top-1 accuracy per bucket on the test split, macro-F1; read back from the runs table. "
          f"Features: {SINGLE_FEATURES} (fusion: {FUSED_FEATURES}); text: {TEXT_SET}.")
    print(table, end="")
    print(f"same numbers: featurelt --store {store_path} sql \"{query}\"")

    pipeline_seconds = time.perf_counter() - t_start
    rerun_label, rerun_argv = specs[RERUN]
    before = set(_run_ids(store_path))
    t0 = time.perf_counter()
    pipe.run("re-run", ["train-head", *rerun_argv])
    rerun_seconds = time.perf_counter() - t0
    rerun_id = next((r for r in _run_ids(store_path) if r not in before), None)
    print(f"\nre-trained {rerun_label} from the cached features in {rerun_seconds:.3f} s (run {rerun_id}) vs "
          f"full pipeline {pipeline_seconds:.1f} s (ingest + make-lt + extract + sweep): "
          f"{pipeline_seconds / max(rerun_seconds, 1e-9):.0f}x faster; no encoder ran again")
    if rerun_id is not None:
        from featurelt.report import sql_literal

        pair = Store(store_path).sql(
            f"SELECT run_id, acc_all, macro_f1 FROM runs WHERE run_id IN ({sql_literal(run_ids[RERUN])}, "
            f"{sql_literal(rerun_id)})").to_pylist()
        same = len(pair) == 2 and all(pair[0][c] == pair[1][c] for c in ("acc_all", "macro_f1"))
        print(f"     same seed, same cached features: acc_all and macro_f1 {'identical' if same else 'DIFFER'} "
              f"to run {run_ids[RERUN]}")

    if out_dir is not None:
        out = Path(out_dir)
    else:
        out = root / "report" if "://" not in store_path else Path("demo-report")
    report_argv = ["report", "--run", run_ids[0], "--out", str(out)]
    for r in run_ids[1:]:
        report_argv += ["--compare", r]
    pipe.run("report", report_argv)
    total = time.perf_counter() - t_start
    print(f"\nreport of the sweep: {out / 'index.html'}")
    print(f"demo finished in {total:.1f} s; explore with: featurelt --store {store_path} sql \"SELECT * FROM runs\"")
    return DemoResult(store=store_path, dataset=name, sizes=sizes, run_ids=run_ids, table=table,
                      timings=dict(pipe.timings), rerun_id=rerun_id, rerun_seconds=rerun_seconds,
                      pipeline_seconds=pipeline_seconds, report=out / "index.html")
