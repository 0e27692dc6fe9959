"""Directional evidence for the finetune recipes on real long-tailed data (issue 17), CPU.

Fashion-MNIST-LT: the first --train-images Fashion-MNIST train images (balanced), ``make-lt --imbalance 100
--profile exp --max-per-class 500`` (train counts 500, 299, 179, 107, 64, 38, 23, 13, 8, 5: many / medium /
few = 4 / 3 / 3 classes at the 100 / 20 thresholds), the first --test-images test images (about balanced);
class-name text embeddings from the bundled ``text:minilm`` (LFM's partner similarities). Every config trains
the same small ResNet from scratch (``timm:test_resnet`` at 32 px, random init, seed S), same optimizer, lr,
batch, epochs and augmentation; only loss / sampler / recipe differ:

- ``ce``                : plain cross-entropy, instance sampling (the baseline);
- ``balanced-softmax``  : balanced softmax, instance sampling;
- ``pixel-mixup``       : mixup on pixels, partner of another class uniformly (sampler ``lfm`` with tau 1000,
                          alpha 0: no label shift), lambda ~ Beta(0.2, 0.2) per batch -- the baseline beside LFM;
- ``lfm-stage1``        : the recipe (text-similar partners, tau 0.05, label shift alpha 1), with ``--head linear``
                          since a from-scratch ResNet has no text space (the recipe's own head is ``text``).

``auxiliary`` is left out: Fashion-MNIST has no auxiliary classes (the recipe refuses a store without them).
Metrics are read back from the ``runs`` table (all / many / medium / few accuracy, macro-F1).

Run: ``python bench/recipes.py --epochs 4 --seeds 0 1`` (appends nothing: paste the printed table into RESULTS.md).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FASHION = "/usr/share/datasets/fashion-mnist"
CONFIGS = {
    "ce": (None, {}),
    "balanced-softmax": (None, {"loss": "balanced-softmax"}),
    "pixel-mixup": (None, {"sampler": "lfm", "sampler_opts": {"tau": 1000.0, "alpha": 0.0, "a": 0.2}}),
    "lfm-stage1": ("lfm-stage1", {"head": "linear"}),
}
METRICS = ("acc_all", "acc_many", "acc_medium", "acc_few", "macro_f1")


def build_store(root: str, *, train_images: int, test_images: int) -> None:
    from featurelt.cli import main

    steps = [
        ["ingest", "--builtin", "fashion-mnist", "--limit", str(train_images), "--no-progress"],
        ["ingest", f"{FASHION}/t10k-images-idx3-ubyte.gz", "--format", "idx", "--split", "test", "--limit",
         str(test_images), "--dataset", "fashion-mnist", "--no-progress"],
        ["make-lt", "--imbalance", "100", "--profile", "exp", "--seed", "0", "--max-per-class", "500",
         "--many", "100", "--few", "20"],
        ["extract", "text:minilm", "--no-progress"],
    ]
    for argv in steps:
        if main(["--store", root, *argv]) != 0:
            raise SystemExit(f"bench/recipes.py: step failed: featurelt {' '.join(argv)}")


def run_config(root: str, name: str, *, seed: int, epochs: int, lr: float, batch_size: int, workers: int) -> dict:
    from featurelt.finetune.config import FinetuneCfg, merge
    from featurelt.finetune.recipes import resolve
    from featurelt.finetune.train import finetune
    from featurelt.store import Store

    recipe, changes = CONFIGS[name]
    common = {"backbone": "timm:test_resnet", "pretrained": "none", "image_size": 32, "epochs": epochs,
              "batch_size": batch_size, "optimizer": "adam", "lr": lr, "weight_decay": 0.0, "seed": seed,
              "augment": "flip-crop", "eval_every": 0, "loader_workers": workers, "text_set": "minilm"}
    flags = {**common, **changes}
    cfg = resolve(recipe, FinetuneCfg(), flags)[0] if recipe else merge(FinetuneCfg(), flags)
    t0 = time.perf_counter()
    res = finetune(root, cfg)
    wall = time.perf_counter() - t0
    row = Store(root).sql(f"SELECT {', '.join(METRICS)} FROM runs WHERE run_id = '{res.run_id}'").to_pylist()
    if len(row) != 1:
        raise SystemExit(f"bench/recipes.py: no runs row for {res.run_id}")
    return {**row[0], "wall_s": wall, "run_id": res.run_id}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", help="store directory (default: a new temporary one)")
    ap.add_argument("--train-images", type=int, default=8000)
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = ap.parse_args()
    if not os.path.isdir(FASHION):
        raise SystemExit(f"bench/recipes.py needs Fashion-MNIST's IDX files in {FASHION} (Debian dataset-fashion-mnist)")
    root = args.store or str(Path(tempfile.mkdtemp(prefix="bench-recipes-")) / "store")
    t0 = time.perf_counter()
    if not Path(root).exists():
        build_store(root, train_images=args.train_images, test_images=args.test_images)
    results: dict[str, list[dict]] = {c: [] for c in args.configs}
    for seed in args.seeds:  # interleaved: machine load drifts affect every config alike
        for name in args.configs:
            r = run_config(root, name, seed=seed, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                           workers=args.workers)
            results[name].append(r)
            print(f"seed {seed} {name}: " + ", ".join(f"{m} {r[m]:.4f}" for m in METRICS) + f" ({r['wall_s']:.0f} s)",
                  flush=True)
    base = {m: statistics.median(r[m] for r in results["ce"]) for m in METRICS} if "ce" in results else None
    print(f"\nmachine: {platform.node()} {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"store {root}; total {(time.perf_counter() - t0) / 60:.1f} min; load average {os.getloadavg()}")
    print("| config | " + " | ".join(METRICS) + " | delta all / few vs ce | runs (acc_all per seed) |")
    print("|---|" + "---|" * (len(METRICS) + 2))
    for name, rs in results.items():
        med = {m: statistics.median(r[m] for r in rs) for m in METRICS}
        delta = (f"{100 * (med['acc_all'] - base['acc_all']):+.1f} / {100 * (med['acc_few'] - base['acc_few']):+.1f} pt"
                 if base and name != "ce" else "-")
        print(f"| {name} | " + " | ".join(f"{100 * med[m]:.1f}" for m in METRICS) + f" | {delta} | "
              + ", ".join(f"{100 * r['acc_all']:.1f}" for r in rs) + " |")


if __name__ == "__main__":
    main()
