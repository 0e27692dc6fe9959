"""Report and demo commands: report (HTML + PNG figures for runs), demo (the whole pipeline on built-in data)."""
from __future__ import annotations

import argparse

from featurelt.commands._common import non_negative_int, positive_int


def register(sub: argparse._SubParsersAction, parents) -> None:
    p = sub.add_parser(
        "report", parents=[parents.store, parents.as_of],
        help="write an HTML report (PNG figures + report.json) for a run, compared with other runs",
        description="Write OUT/index.html with PNG figures (matplotlib) and OUT/report.json for run ID: "
        "the classes and train images of each bucket, per-class accuracy against train count (log x, "
        "many/medium/few regions shaded), accuracy per bucket comparing the runs with macro-F1 on its own axis "
        "(legends name each run's head, loss, sampler and features), one row-normalised confusion matrix of the "
        "evaluation split per run (the most confused classes when there are many), a 2-D projection of an "
        "embedding set coloured by bucket (PCA; UMAP when umap-learn is installed), example test images of "
        "few-shot classes with the run's prediction and their nearest train images (exact cosine over the "
        "embedding set), and each run's config and pinned store versions. The tables of "
        "numbers are SQL over the runs table (and predictions joined to classes), so they match "
        "`featurelt sql` exactly.",
        epilog="examples: featurelt report --run RUN_ID --compare OTHER_ID --out report/ && "
        "xdg-open report/index.html;  featurelt report --run latest --compare latest~1 --out report/")
    p.add_argument("--run", required=True, metavar="ID",
                   help="run id to report on (see `featurelt runs`), latest (the newest run) or latest~N (N runs "
                   "before it)")
    p.add_argument("--compare", action="append", default=[], metavar="ID",
                   help="another run to compare with, an id or latest~N (repeat the flag for more runs)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--embedding-set", dest="embedding_set", metavar="NAME",
                   help="embedding set to project and to search for the examples' nearest train images, e.g. "
                   "clip_tiny (default: the run's first feature set; a fine-tune run's --export set ft_<run_id>)")
    p.add_argument("--max-points", dest="max_points", type=int, default=3000, metavar="N",
                   help="at most N evaluation samples in the projection (default 3000)")
    p.add_argument("--projection", choices=["auto", "pca", "umap"], default="auto",
                   help="2-D projection: auto = UMAP when umap-learn is installed, else PCA (default auto)")
    p.add_argument("--max-confusion-classes", dest="max_confusion_classes", type=int, default=20, metavar="K",
                   help="show at most K classes (the most confused) in the confusion matrix (default 20)")
    p.add_argument("--examples", type=non_negative_int, default=8, metavar="N",
                   help="show a test image of N few-shot classes with their nearest train images (default 8; 0: none)")
    p.add_argument("--neighbors", type=positive_int, default=5, metavar="K",
                   help="nearest train images per example (default 5)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "demo", parents=[parents.store],
        help="run the whole pipeline on built-in data in a few minutes and write a report",
        description="ingest -> make-lt (imbalance 100) -> extract (pixels, clip:tiny, sam:tiny, dinov2:tiny, "
        "text:minilm class names) -> train a sweep of heads (CE, balanced softmax, LFM, fusion with prototype "
        "losses, ECVL adapter, ...) -> print the comparison table (all / many / medium / few / macro-F1, read "
        "back from the runs table) -> re-train one head from the cached features and time it against the "
        "full pipeline -> write an HTML report of the sweep. Data: fashion-mnist from the files of the Debian "
        "package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) when present, else scikit-learn's "
        "digits; a subsample "
        "of each split keeps it under 5 minutes on a 2-core CPU. The tiny encoders are randomly initialised "
        "(no downloads): the point is the pipeline, not their accuracy.",
        epilog="example: featurelt demo --store demo-store --out demo-report")
    p.add_argument("--dataset", choices=["auto", "digits", "fashion-mnist"], default="auto",
                   help="built-in data set (default auto: fashion-mnist when its Debian files exist, else digits)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="directory of the sweep's HTML report (default: STORE/report)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="fashion-mnist: ingest the first N train and N/3 test images (default 4000); digits: the "
                   "first N of its 1797 images (default all)")
    p.add_argument("--image-size", dest="image_size", type=int, default=None, metavar="PX",
                   help="input size of the tiny encoders (default 32)")
    p.add_argument("--epochs", type=int, default=None, metavar="E", help="epochs per head (default 20)")
    p.add_argument("--fresh", action="store_true",
                   help="delete the store directory first if it exists (otherwise an existing store is refused)")
    p.add_argument("--seed", type=int, default=0, help="seed of the long-tailed split and the heads (default 0)")
    p.set_defaults(func=cmd_demo)


def cmd_report(args: argparse.Namespace) -> int:
    from featurelt.commands._common import open_store
    from featurelt.report import write_report

    store = open_store(args)
    path = write_report(store, args.run, compare=args.compare, out_dir=args.out, embedding_set=args.embedding_set,
                        max_points=args.max_points, projection=args.projection,
                        max_confusion_classes=args.max_confusion_classes, examples=args.examples,
                        neighbors=args.neighbors)
    print(f"wrote {path} (figures and report.json in {path.parent})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from featurelt.demo import run_demo

    run_demo(args.store, dataset=args.dataset, out_dir=args.out, limit=args.limit, image_size=args.image_size,
             epochs=args.epochs, fresh=args.fresh, seed=args.seed)
    return 0
