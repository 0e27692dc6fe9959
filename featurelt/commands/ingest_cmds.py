"""Data commands: ingest, make-lt, classes, neighbors, filter-auxiliary, filter-generated."""
from __future__ import annotations

import argparse
import json
import textwrap
from typing import Any

from featurelt.commands._common import non_negative_int, open_store, positive_int, print_rows

_SOURCES = ["original", "auxiliary", "generated"]


def _listing(registry, width: int = 14) -> str:
    """One ``  name  description`` line per registry entry (for a RawDescription help text)."""
    return "\n".join(f"  {name:<{width}}{registry.help(name)}" for name in registry.names())


def register(sub: argparse._SubParsersAction, parents) -> None:
    from featurelt.data.formats import BUILTINS, FORMATS

    p = sub.add_parser(
        "ingest", parents=[parents.store], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="add images (a folder, manifest, split list, iNat JSON, CIFAR, IDX, Parquet / WebDataset shards or a "
        "builtin) to the samples table",
        description=textwrap.fill(
            "Ingest a data set into the store in one transaction (samples, classes, rejects). "
            "sample_id is the id the source gives, else DATASET:PATH for files (PATH relative to the folder, or "
            "as the manifest or split list writes it; the same image at two paths stays two samples, counted in "
            "the summary), else for arrays (CIFAR, IDX, builtins) the content hash (first 32 hex digits of "
            "sha256); ingesting the same data twice adds no rows. Bad input (undecodable or missing images, unknown labels, "
            "paths outside --root, wrong column types, duplicate ids with different content, empty input) fails "
            "the whole ingest naming the first bad rows, unless --skip-bad.", 100)
        + "\n\ninput formats (--format; auto picks one by file name and folder contents):\n" + _listing(FORMATS)
        + "\n\nbuiltin data sets (--builtin):\n" + _listing(BUILTINS),
        epilog="examples:\n  featurelt ingest --builtin digits\n  featurelt ingest ./flowers\n"
        "  featurelt ingest ImageNet_LT_train.txt --root /data/imagenet --class-names imagenet_classes.txt\n"
        "  featurelt ingest manifest.csv\n  featurelt ingest ./cifar10/plain_text --format parquet\n"
        "  featurelt ingest ./shards --format webdataset --class-names names.txt")
    p.add_argument("path", nargs="?", help="folder, manifest (.csv/.jsonl), split list (.txt), iNat JSON, CIFAR "
                   "folder, IDX file/folder, Parquet or WebDataset shard (or a folder of shards); with --builtin fashion-mnist: the folder of its IDX files")
    p.add_argument("--builtin", choices=BUILTINS.names(), default=None,
                   help="ingest a bundled data set: digits (scikit-learn, 8x8, stratified 80/20 train/test) or "
                   "fashion-mnist (/usr/share/datasets/fashion-mnist from the Debian package dataset-fashion-mnist, or PATH)")
    p.add_argument("--path", dest="builtin_path", default=None, metavar="DIR",
                   help="with --builtin fashion-mnist: the folder holding its four IDX files "
                   "(default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--format", dest="fmt", choices=["auto", *FORMATS.names()], default="auto",
                   help="input format, one of those listed above (default auto: by file name and folder contents)")
    p.add_argument("--root", default=None,
                   help="folder that relative image paths start from (required for split lists; manifests and "
                   "iNat JSON default to their own folder); paths that resolve outside it are refused")
    p.add_argument("--split", default=None,
                   help="split for every row (default: from the source -- the manifest column, train/val/test in "
                   "the file or folder name, else train)")
    p.add_argument("--class-names", dest="class_names", metavar="FILE", default=None,
                   help="names of integer labels (split lists, IDX, Parquet without ClassLabel, WebDataset .cls): "
                   "one name per line, line i = label i, or 'i name' / 'i,name' / 'name i' lines; classes of the "
                   "store still called by their number take these names (text heads refuse number-only names)")
    p.add_argument("--test-fraction", dest="test_fraction", type=float, default=0.2, metavar="F",
                   help="when the input states no splits (a plain folder of class subfolders, a manifest without a "
                   "split column) and no --split is given: hold out a stratified, seeded fraction F of each "
                   "class's original images as split test (default 0.2; 0 keeps all in train)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --test-fraction choice (default 0)")
    p.add_argument("--source", choices=_SOURCES, default="original",
                   help="where the images come from: original data, auxiliary classes (e.g. retrieved "
                   "neighbours), or generated images (default original)")
    p.add_argument("--neighbor-of", dest="neighbor_of", metavar="CLASS", default=None,
                   help="with --source auxiliary: the target class (name or label) the new classes were queried "
                   "from; stored in classes.neighbor_of")
    p.add_argument("--reference", action="store_true",
                   help="store the files' URIs instead of their bytes (files must stay readable there)")
    p.add_argument("--skip-bad", dest="skip_bad", action="store_true",
                   help="ingest the good rows and record the bad ones with their reason in the rejects table "
                   "(default: any bad row fails the ingest, nothing committed)")
    p.add_argument("--dataset", default=None,
                   help="value of samples.dataset (default: builtin name, folder name or file stem)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="read only the first N images of the input")
    p.add_argument("--batch-size", dest="batch_size", type=positive_int, default=512,
                   help="rows per Arrow batch streamed into the store (default 512)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="do not show the progress bar")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser(
        "make-lt", parents=[parents.store],
        help="make the train split long-tailed (exp / pareto / imagenet-lt profile), moving dropped rows to "
        "train_unused",
        description="Derive a long-tailed train split from the balanced one: per target class keep a seeded "
        "random subset of n_y train rows and move the rest to split train_unused. exp: "
        "n_y = floor(n_max * (1/imbalance)^(y/(K-1))) (CIFAR-LT); pareto: Pareto(shape 6) draws sorted and mapped "
        "to [n_max/imbalance, n_max] (for 1000 classes from 1280 to 5 images: about 316 / 521 / 163 many / "
        "medium / few classes, not ImageNet-LT's 385 / 479 / 136); imagenet-lt: ImageNet-LT's published "
        "distribution (1280 to 5 images, 385 / 479 / 136 many (> 100) / medium / few (< 20) classes of 1000, "
        "115.8K images) as a curve scaled to [n_max/imbalance, n_max], --imbalance 256 by default; with "
        "--max-per-class 1280 on 1000 classes it gives those buckets exactly. Rows in train_unused return to the "
        "pool first, so make-lt can be re-run. Rebuilds the classes table (train_count, bucket). One new store "
        "version.")
    p.add_argument("--imbalance", type=float, default=None,
                   help="n_max / n_min, e.g. 100 (CIFAR-100-LT) or 10; required except for --profile imagenet-lt "
                   "(default 256 = 1280 / 5)")
    p.add_argument("--profile", choices=["exp", "pareto", "imagenet-lt"], default="exp",
                   help="class-size profile (default exp)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row choice and of the pareto draws (default 0)")
    p.add_argument("--max-per-class", dest="max_per_class", type=positive_int, default=None, metavar="N",
                   help="n_max, the head class size (default: the smallest class's balanced train count)")
    p.add_argument("--many", type=non_negative_int, default=None,
                   help="bucket many when train_count > MANY (default: current threshold, else 100)")
    p.add_argument("--few", type=non_negative_int, default=None,
                   help="bucket few when train_count < FEW (default: current threshold, else 20)")
    p.set_defaults(func=cmd_make_lt)

    p = sub.add_parser(
        "classes", parents=[parents.store, parents.as_of, parents.json],
        help="list the classes: label, name, source, train count, bucket",
        description="Print the classes table: label, name, source (original|auxiliary), neighbor_of, "
        "train_count (split train, source original) and bucket (many|medium|few) with the thresholds used.")
    p.set_defaults(func=cmd_classes)

    p = sub.add_parser(
        "neighbors", parents=[parents.store, parents.as_of, parents.json],
        help="suggest auxiliary neighbor classes: the vocabulary names nearest to each medium / few class",
        description="Offline neighbor-class search (METHODS.md section 3): for each target class to extend "
        "(medium and few by default), the --k names of a vocabulary file nearest to the class name in a text "
        "encoder's space (cosine of class-name embeddings, exact search with faiss). Names already in the "
        "classes table are never suggested. Collect images of the suggestions, then "
        "`featurelt ingest DIR --source auxiliary --neighbor-of CLASS`.",
        epilog="examples: featurelt neighbors --vocab names.txt;  featurelt neighbors --vocab names.txt --k 3 "
        "--classes Sandal,Bag --json;  featurelt neighbors --vocab names.txt --encoder clip:ViT-B-32 "
        "--pretrained laion2b_s34b_b79k --checkpoint clip.bin")
    p.add_argument("--vocab", required=True, metavar="FILE",
                   help="candidate class names, one per line ('#' comments and blank lines skipped)")
    p.add_argument("--k", type=positive_int, default=5, help="neighbors per class (default 5, the paper's)")
    p.add_argument("--buckets", default="medium,few",
                   help="extend the target classes of these buckets, comma-separated (default medium,few)")
    p.add_argument("--classes", dest="class_names", metavar="NAME,...",
                   help="extend these target classes instead (comma-separated names)")
    p.add_argument("--encoder", default="text:minilm",
                   help="text encoder (default text:minilm, bundled weights; or clip:<model> with --checkpoint)")
    p.add_argument("--checkpoint", help="weights of --encoder (see `featurelt encoders`)")
    p.add_argument("--pretrained", metavar="TAG",
                   help="open_clip pretrained tag of a clip:<model> --encoder: its activation and preprocessing, and "
                   "without --checkpoint its weights from the local cache or the hub (see `featurelt encoders --all`)")
    p.add_argument("--templates", metavar="FILE", help="prompt templates, one per line with {} (default 'a photo of a {}.')")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="text encoder device (default cpu)")
    p.set_defaults(func=cmd_neighbors)

    p = sub.add_parser(
        "filter-auxiliary", parents=[parents.store, parents.json],
        help="drop noisy auxiliary images: keep those with gamma1 < cos(target prototype, feature) < gamma2",
        description="The image filter of METHODS.md section 3. For each auxiliary train image r of an auxiliary "
        "class whose neighbor_of is target class i: keep it when its caption (samples.description, where there is "
        "one) names its class and gamma1 < cos(p_i, f_r) < gamma2, with f_r its cached feature (--features, "
        "DINOv2 in the paper) and p_i the mean feature of the original train rows of class i. Rejected rows move to "
        "split 'filtered' with a rejects row giving the reason, in one store transaction.",
        epilog="examples: featurelt filter-auxiliary --features dinov2_small_cls --dry-run;  "
        "featurelt filter-auxiliary --features dinov2_small_cls --gamma1 0.4 --gamma2 0.9  (dinov2_small_cls: "
        "the set `featurelt extract dinov2:small --checkpoint dinov2-small` writes)")
    p.add_argument("--features", required=True,
                   help="embedding sets to compare, comma-separated (joined on sample_id like train-head's)")
    p.add_argument("--gamma1", type=float, default=0.3,
                   help="keep images with cos > gamma1 (default 0.3; the paper gives no value: read the per-class "
                   "cos_min / cos_mean / cos_max of a --dry-run)")
    p.add_argument("--gamma2", type=float, default=0.95,
                   help="keep images with cos < gamma2, i.e. not near-duplicates of the target class (default 0.95)")
    p.add_argument("--no-caption-check", dest="caption", action="store_false",
                   help="do not reject images whose description does not name their class")
    p.add_argument("--dry-run", action="store_true", help="report what would be moved; write nothing")
    p.set_defaults(func=cmd_filter_auxiliary)

    p = sub.add_parser(
        "filter-generated", parents=[parents.store, parents.json],
        help="drop low-quality generated images: CLIP score cos(image, text it was generated from) < mu",
        description="The quality filter of METHODS.md section 4 (LTGC). For each generated train image: "
        "S = cos(CLIP_img(image), CLIP_text(C_y)), the image embedding from --features (a set made by "
        "`featurelt extract clip:<model>`), C_y the image's description (the text it was generated from; "
        "without one, 'a photo of a {class}.' through --templates), embedded by the same model's text tower. "
        "Images with S < mu move to split 'filtered' with a rejects row giving S, in one store "
        "transaction. Re-submit the rejected descriptions to your generator and ingest the new images.",
        epilog="examples: featurelt filter-generated --features clip_vit_b_32 --checkpoint clip.bin --dry-run;  "
        "featurelt filter-generated --features clip_vit_b_32 --checkpoint clip.bin --mu 0.25")
    p.add_argument("--features", required=True, help="the clip:<model> embedding set of the images")
    p.add_argument("--mu", type=float, default=0.2,
                   help="keep images with S >= mu (default 0.2; the paper's 0.8 / 0.6 are on its own scale: read the "
                   "per-class score_min / score_mean / score_max of a --dry-run)")
    p.add_argument("--checkpoint", help="the CLIP checkpoint the set was extracted with (checked by sha256; "
                   "without it, a set extracted with --pretrained TAG takes the tag's weights from the cache or the hub)")
    p.add_argument("--templates", metavar="FILE", help="prompt templates for rows without a description")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="text tower device (default cpu)")
    p.add_argument("--dry-run", action="store_true", help="report what would be moved; write nothing")
    p.set_defaults(func=cmd_filter_generated)


def cmd_ingest(args: argparse.Namespace) -> int:
    from featurelt.data.ingest import ingest

    if args.path is None and args.builtin is None:
        raise ValueError("give a PATH to ingest or --builtin digits|fashion-mnist")
    if args.builtin_path is not None:
        if args.builtin != "fashion-mnist":
            raise ValueError("--path is the folder of --builtin fashion-mnist; other inputs are given as PATH")
        if args.path is not None:
            raise ValueError(f"give the fashion-mnist folder once: PATH {args.path!r} or --path {args.builtin_path!r}")
        args.path = args.builtin_path
    store = open_store(args, write=True)
    result = ingest(store, args.path, fmt=args.fmt, builtin=args.builtin, root=args.root, split=args.split,
                    source=args.source, neighbor_of=args.neighbor_of, reference=args.reference,
                    skip_bad=args.skip_bad, dataset=args.dataset, limit=args.limit, batch_size=args.batch_size,
                    class_names=args.class_names, progress=args.progress, test_fraction=args.test_fraction,
                    seed=args.seed)
    print(result.summary())
    return 0


def cmd_make_lt(args: argparse.Namespace) -> int:
    from featurelt.data.longtail import make_lt

    store = open_store(args, write=True)
    result = make_lt(store, imbalance=args.imbalance, profile=args.profile, seed=args.seed,
                     max_per_class=args.max_per_class, many=args.many, few=args.few)
    print(result.summary())
    return 0


def cmd_classes(args: argparse.Namespace) -> int:
    store = open_store(args)
    rows = store.read("classes").sort_by("label").to_pylist()
    print_rows(rows, as_json=args.json,
               columns=["label", "name", "source", "neighbor_of", "train_count", "bucket", "bucket_many", "bucket_few"])
    return 0


def cmd_neighbors(args: argparse.Namespace) -> int:
    from featurelt.data.neighbors import neighbor_search
    from featurelt.extract import resolve_device

    names = [n.strip() for n in args.class_names.split(",") if n.strip()] if args.class_names else None
    rows = neighbor_search(open_store(args), args.vocab, k=args.k, buckets=[b.strip() for b in args.buckets.split(",")],
                           classes=names, encoder=args.encoder, checkpoint=args.checkpoint, templates=args.templates,
                           device=resolve_device(args.device), pretrained=args.pretrained)
    print_rows(rows, as_json=args.json)
    return 0


def cmd_filter_auxiliary(args: argparse.Namespace) -> int:
    from featurelt.data.filters import filter_auxiliary

    sets = [f.strip() for f in args.features.split(",") if f.strip()]
    result = filter_auxiliary(open_store(args, write=not args.dry_run), sets, gamma1=args.gamma1, gamma2=args.gamma2,
                              caption=args.caption, dry_run=args.dry_run)
    return _print_filter_result(result, as_json=args.json)


def cmd_filter_generated(args: argparse.Namespace) -> int:
    from featurelt.data.filters import filter_generated
    from featurelt.extract import resolve_device

    result = filter_generated(open_store(args, write=not args.dry_run), args.features, mu=args.mu,
                              checkpoint=args.checkpoint, templates=args.templates,
                              device=resolve_device(args.device), dry_run=args.dry_run)
    return _print_filter_result(result, as_json=args.json)


def _print_filter_result(result: Any, *, as_json: bool) -> int:
    """A filter's per-class table and summary line (or the whole result as JSON)."""
    from dataclasses import asdict

    if as_json:
        print(json.dumps(asdict(result), indent=1))
        return 0
    print_rows(result.per_class)
    print(result.summary())
    return 0
