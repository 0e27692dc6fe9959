"""Head commands: train-head, runs, eval (see featurelt.train.head and featurelt.metrics)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from featurelt.commands._common import CommandError, open_store, print_rows

PROTO_ALL = "head,tail-std,tail-dist"
RUN_COLUMNS = ["run_id", "time", "head", "loss", "sampler", "features", "acc_all", "acc_many", "acc_medium",
               "acc_few", "macro_f1", "head_tail_gap", "train_seconds", "epochs", "seed"]
METRIC_COLUMNS = ["acc_all", "acc_many", "acc_medium", "acc_few", "macro_f1", "head_tail_gap"]


def _kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    if not k:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return k.strip(), v.strip()


def register(sub: argparse._SubParsersAction, parents) -> None:
    p = sub.add_parser(
        "train-head", parents=[parents.store, parents.as_of, parents.json],
        help="train a head from cached embeddings, evaluate it, record runs + predictions",
        description="Train a head (HEADS registry) on cached embedding sets with a loss (LOSSES) and a sampler "
        "(SAMPLERS), evaluate it on --eval-split with auxiliary classes masked out, and write one runs row and "
        "the predictions rows in one store transaction. The head checkpoint and the resolved config.yaml go to "
        "<store>/checkpoints/<run_id>/ (or --out-dir). No encoder is loaded. Settings merge as: defaults < "
        "--config FILE < flags.",
        epilog="examples:\n  featurelt train-head --features clip_tiny --loss balanced-softmax\n"
        "  featurelt train-head --features clip_tiny --text-set clip_tiny --head adapter --sampler class-balanced\n"
        "  featurelt train-head --features pixels --sweep loss=ce,balanced-softmax sampler=instance,sqrt",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("inputs")
    g.add_argument("--features", help="embedding sets to join on sample_id, comma-separated (tables emb_<name>); "
                   "ft_latest = the newest `featurelt finetune --export` set")
    g.add_argument("--text-set", dest="text_set", help="text_embeddings set_name for heads/samplers that use class "
                   "text embeddings (adapter, lfm-projection, cosine init=text, lfm sampler)")
    g.add_argument("--train-split", dest="train_split", help="samples.split to train on (default train)")
    g.add_argument("--eval-split", dest="eval_split", help="samples.split to evaluate (default test)")
    g.add_argument("--config", help="YAML config (e.g. a run's config.yaml); flags override its fields")
    g.add_argument("--stream-features", dest="stream_features", choices=["auto", "always", "never"],
                   help="read each batch's feature rows from the store instead of loading the split into RAM: "
                   "auto (default) when the features would take over half the available memory, always, never")
    g = p.add_argument_group("model")
    g.add_argument("--head", help="head name (default linear): linear, mlp, cosine, adapter, lfm-projection, fusion "
                   "(trained); ncm, knn (fitted in one pass over the train features: no epochs, and the loss, "
                   "sampler and optimizer do not apply)")
    g.add_argument("--head-opt", dest="head_opt", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="head option, repeatable (e.g. tau=0.05, init=text, lam=0.2, alpha=0.5, hidden=512; knn: k=20, "
                   "temperature=0.07)")
    g.add_argument("--loss", help="loss name (default ce): ce, balanced-softmax, logit-adjust, ldam, focal, "
                   "class-balanced, ns-ce, contrastive-vl")
    g.add_argument("--loss-opt", dest="loss_opt", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="loss option, repeatable (e.g. gamma=2, lambda_s=0.1; focal: alpha=class-balanced|none|A1,A2,..."
                   " (class-balanced focal loss, Cui et al.) with beta=0.9999; ldam: drw_epoch=N, default ceil(0.8 * "
                   "epochs))")
    g.add_argument("--proto", nargs="?", const=PROTO_ALL, metavar="TERMS",
                   help=f"prototype loss terms on the head's latent, comma-separated (bare --proto = {PROTO_ALL})")
    g.add_argument("--proto-M", dest="proto_m", type=int, help="memory bank size per class (default 64)")
    g.add_argument("--proto-beta", dest="proto_beta", type=float, help="weight of the prototype loss (default 1e-4)")
    g.add_argument("--proto-tau-head", dest="proto_tau_head", type=float,
                   help="L_head applies to classes with w < this (default 0.5)")
    g.add_argument("--proto-tau-tail-std", dest="proto_tau_tail_std", type=float,
                   help="L_tail-std applies to classes with w > this (default 0.5)")
    g.add_argument("--proto-tau-tail-dist", dest="proto_tau_tail_dist", type=float,
                   help="L_tail-dist applies to classes with w > this (default 0.5)")
    g = p.add_argument_group("sampling and optimisation")
    g.add_argument("--sampler", help="sampler name (default instance): instance, class-balanced, sqrt, lfm, "
                   "balancemix, momentum")
    g.add_argument("--sampler-opt", dest="sampler_opt", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="sampler option, repeatable (e.g. tau=0.05, alpha=1.0, a=1.0, beta=0.9)")
    g.add_argument("--aux-cap", dest="aux_cap", type=int, help="max samples per auxiliary class per epoch (default 50)")
    g.add_argument("--epochs", type=int, help="epochs (default 30)")
    g.add_argument("--batch-size", dest="batch_size", type=int, help="batch size (default 256)")
    g.add_argument("--lr", type=float, help="peak learning rate, cosine-annealed (default: sgd 0.1, adam / adamw 0.01)")
    g.add_argument("--standardize", choices=["auto", "on", "off"],
                   help="feed the head (x - mean) / std of the train features: auto (default) for heads that learn "
                   "their classifier from scratch (linear, mlp, fusion, cosine with random rows; adapter and "
                   "lfm-projection standardise only their learned part and keep the zero-shot start), on, off")
    g.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], help="optimizer (default sgd)")
    g.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, help="weight decay (default 5e-4)")
    g.add_argument("--seed", type=int, help="random seed (default 0); same seed + --as-of reproduces a run")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="device (default auto: cuda if available)")
    g = p.add_argument_group("evaluation and outputs")
    g.add_argument("--post-hoc-tau", dest="post_hoc_tau", type=float,
                   help="post-hoc logit adjustment z - tau log(prior) at inference (default 0 = off)")
    g.add_argument("--tau-norm", dest="tau_norm", type=float,
                   help="tau-normalised classifier at inference (Kang et al.): rows w_k / ||w_k||^tau, no bias; heads "
                   "linear and mlp (default 0 = off; 1 = unit rows)")
    g.add_argument("--out-dir", dest="out_dir", help="checkpoint directory root (default <store>/checkpoints)")
    g.add_argument("--sweep", nargs="+", metavar="KEY=V1,V2", type=_kv,
                   help="train a grid and print one comparison table; KEY is a config field (loss, sampler, head, lr, "
                   "head_opts.tau, ...); values comma-separated; within a list-valued field use '+' "
                   "(features=clip_tiny+sam_tiny_latent,clip_tiny)")
    p.set_defaults(func=cmd_train_head)

    p = sub.add_parser("runs", parents=[parents.store, parents.as_of, parents.json],
                       help="list train-head and finetune runs with their metrics",
                       description="List the runs table: run id, head, loss, sampler, features and the metrics "
                       "(top-1 all / many / medium / few, macro-F1, head-tail gap), newest last. Fine-tune runs "
                       "(head finetune-*) are listed beside head runs; with any in the store a status column marks "
                       "those not finished (running or killed, interrupted: continue with finetune --resume), with the epochs "
                       "trained and, below the table, the position and path of the checkpoint --resume continues from "
                       "(--json: keys resume_at, checkpoint).",
                       epilog="examples: featurelt runs --limit 5;  featurelt runs --run latest --json")
    p.add_argument("--limit", type=int, default=50, help="show the newest N runs (default 50; 0 = all)")
    p.add_argument("--run", dest="run_id", metavar="ID",
                   help="show only this run: an id, latest (the newest run) or latest~N (N runs before it)")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("eval", parents=[parents.store, parents.as_of, parents.json],
                       help="recompute a run's metrics from its stored predictions",
                       description="Recompute top-1 all / many / medium / few, macro-F1 and the head-tail gap from "
                       "the predictions rows of a run (buckets from the classes table at the run's pinned store "
                       "version) and compare them with the runs row. Exit status 1 when they differ.")
    p.add_argument("--run", required=True, dest="run_id", metavar="ID",
                   help="run id (see featurelt runs), latest (the newest run) or latest~N (N runs before it)")
    p.set_defaults(func=cmd_eval)


# ---------------------------------------------------------------------------------------- train-head
def _opts(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    from featurelt.config import parse_value

    return {k: parse_value(v) for k, v in pairs}


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line (None = not given)."""
    out: dict[str, Any] = {}
    for name in ("features", "text_set", "train_split", "eval_split", "head", "loss", "proto", "proto_m",
                 "proto_beta", "proto_tau_head", "proto_tau_tail_std", "proto_tau_tail_dist", "sampler", "aux_cap",
                 "epochs", "batch_size", "lr", "standardize", "optimizer", "momentum", "weight_decay", "seed", "device",
                 "post_hoc_tau", "tau_norm", "out_dir", "as_of", "stream_features"):
        v = getattr(args, name, None)
        if v is not None:
            out[name] = v
    for flag, name in (("head_opt", "head_opts"), ("loss_opt", "loss_opts"), ("sampler_opt", "sampler_opts")):
        pairs = getattr(args, flag, None) or []
        if pairs:
            out[name] = _opts(pairs)
    return out


def parse_sweep(pairs: list[tuple[str, str]]) -> dict[str, list[Any]]:
    """``[("loss", "ce,balanced-softmax")]`` -> ``{"loss": ["ce", "balanced-softmax"]}`` (values typed later)."""
    from featurelt.config import field_names, parse_value

    fields = field_names()
    grid: dict[str, list[Any]] = {}
    for key, values in pairs:
        key = key.replace("-", "_")
        base = key.split(".", 1)[0]
        if base not in fields or ("." in key) != base.endswith("_opts"):
            raise ValueError(f"--sweep: unknown key '{key}'; keys are config fields ({', '.join(fields)}) or "
                             f"head_opts.NAME / loss_opts.NAME / sampler_opts.NAME")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not items:
            raise ValueError(f"--sweep {key}= has no values")
        if base in ("features", "proto"):
            grid[key] = [v.replace("+", ",") for v in items]
        elif "." in key:
            grid[key] = [parse_value(v) for v in items]
        else:
            grid[key] = items
    return grid


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else round(v, 4)
    return "" if v is None else v


def _note(line: str) -> None:
    """A note of the run as it arises, on stderr (``warning: ...`` lines as they are, others as ``note: ...``)."""
    print(line if line.startswith("warning:") else f"note: {line}", file=sys.stderr)


def cmd_train_head(args: argparse.Namespace) -> int:
    from featurelt.config import resolve
    from featurelt.train.head import SWEEP_COLUMNS, sweep, train_head

    cfg = resolve(config_file=args.config, overrides=overrides_from_args(args))
    if args.sweep:
        grid = parse_sweep(args.sweep)
        results, rows = sweep(args.store, cfg, grid, progress=True, log=_note)
        if args.json:
            print_rows(rows, as_json=True)
        else:
            keys = list(grid)
            print_rows([{k: _fmt(v) for k, v in r.items()} for r in rows], columns=[*keys, *SWEEP_COLUMNS, "run_id"])
        return 0
    res = train_head(args.store, cfg, progress=True, log=_note)
    m = res.metrics
    if args.json:
        out = {"run_id": res.run_id, "checkpoint": res.checkpoint, "pinned_versions": res.pinned_versions,
               "train_seconds": res.train_seconds, "eval_seconds": res.eval_seconds, "load_seconds": res.load_seconds,
               "device": res.device, "features_in": res.features_in, "notes": res.notes,
               "top_class_fraction": m["top_class_fraction"],
               **{k: m[k] for k in METRIC_COLUMNS},
               "config": res.config.to_dict()}
        json.dump(out, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
        return 0
    print(f"run {res.run_id}: head {cfg.head}, loss {cfg.loss}, sampler {cfg.sampler}, features "
          f"{','.join(res.config.features)} (store version {res.pinned_versions['store_version']}, device {res.device}, "
          f"features in {res.features_in})")
    print_rows([{k: _fmt(m[k]) for k in METRIC_COLUMNS}], columns=METRIC_COLUMNS)
    print(f"trained {cfg.epochs} epochs in {res.train_seconds:.2f} s ({m['num_train']} train rows), evaluated "
          f"{m['num_evaluated']} '{cfg.eval_split}' rows in {res.eval_seconds:.2f} s")
    print(f"checkpoint: {res.checkpoint}")
    for line in res.notes:
        if line.startswith("warning:"):
            print(line)
    return 0


# ---------------------------------------------------------------------------------------- runs / eval
def cmd_runs(args: argparse.Namespace) -> int:
    store = open_store(args)
    if not store.has_table("runs") and not store.has_table("finetune_runs"):
        print_rows([], as_json=args.json)
        return 0
    limit = f" LIMIT {int(args.limit)}" if args.limit and args.limit > 0 else ""
    where = ""
    if args.run_id:
        from featurelt.report import resolve_run_id, sql_literal

        where = f" WHERE run_id = {sql_literal(resolve_run_id(store, args.run_id))}"
    rows = store.sql(f"SELECT * FROM (SELECT {', '.join(RUN_COLUMNS)} FROM runs{where} ORDER BY time DESC{limit}) "
                     "ORDER BY time").to_pylist() if store.has_table("runs") else []
    columns = RUN_COLUMNS
    if store.has_table("finetune_runs") and not args.run_id:  # fine-tune runs not finished yet, marked
        columns = [*RUN_COLUMNS, "status"]
        for r in rows:
            r["status"] = "finished"
        from featurelt.finetune.runs import progress_text, read_position

        for f in store.sql("SELECT run_id, time, head, loss, sampler, backbone, epochs, status, run_dir "
                           "FROM finetune_runs WHERE status <> 'finished'").to_pylist():
            pos = read_position(f["run_dir"])  # the checkpoint's sidecar: where --resume continues
            rows.append({**{c: None for c in RUN_COLUMNS}, "run_id": f["run_id"], "time": f["time"],
                         "head": f"finetune-{f['head']}", "loss": f["loss"], "sampler": f["sampler"],
                         "features": f"finetune:{f['backbone']}",
                         "epochs": f["epochs"] if pos is None else min(pos["epoch"], pos["epochs"]),
                         "status": f"unfinished ({f['status']})", "resume_at": None if pos is None else progress_text(pos),
                         "checkpoint": None if pos is None else pos["checkpoint"]})
        rows.sort(key=lambda r: r["time"])
    if args.run_id and not rows:
        raise ValueError(f"unknown run '{args.run_id}' (see featurelt runs)")
    if not args.json:
        rows = [{k: _fmt(v) for k, v in r.items()} for r in rows]
    print_rows(rows, as_json=args.json, columns=columns)
    for r in rows if not args.json else []:  # the checkpoint path is too long for a table cell
        if r.get("checkpoint"):
            print(f"{r['run_id']}: resume at {r['resume_at']} from {r['checkpoint']} "
                  f"(featurelt finetune --resume {r['run_id']})")
    return 0


def recompute_run_metrics(store: Any, run_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(stored runs row, metrics recomputed from the run's predictions and the classes table it read)."""
    import numpy as np

    from featurelt.metrics import buckets_from_classes, compute_metrics
    from featurelt.store import Store

    if not store.has_table("runs"):
        raise ValueError(f"store {store.root} has no runs table; train a head first (featurelt train-head)")
    lit = "'" + run_id.replace("'", "''") + "'"
    rows = store.sql(f"SELECT * FROM runs WHERE run_id = {lit}").to_pylist()
    if not rows:
        latest = store.sql("SELECT run_id FROM runs ORDER BY time DESC LIMIT 10").column(0).to_pylist()
        raise ValueError(f"unknown run '{run_id}'; latest runs: {', '.join(latest)}")
    run = rows[0]
    preds = store.read("predictions", columns=["label", "prediction"], filter=f"run_id = {lit}")
    if preds.num_rows == 0:
        raise ValueError(f"run {run_id} has no rows in the predictions table")
    pinned = json.loads(run["pinned_versions"])
    classes = Store(store.root, as_of=pinned["store_version"], storage_options=store.storage_options).read("classes")
    m = compute_metrics(preds.column("label").to_numpy().astype(np.int64),
                        preds.column("prediction").to_numpy().astype(np.int64), buckets_from_classes(classes))
    return run, m


def cmd_eval(args: argparse.Namespace) -> int:
    from featurelt.report import resolve_run_id

    store = open_store(args)
    args.run_id = resolve_run_id(store, args.run_id)
    run, m = recompute_run_metrics(store, args.run_id)
    if run.get("checkpoint") and os.path.exists(run["checkpoint"]):  # a damaged head.pt: one error line naming it
        from featurelt.train.head import load_checkpoint

        load_checkpoint(run["checkpoint"])

    def same(a: Any, b: Any) -> bool:
        if a is None or b is None:
            return a is None and b is None
        return abs(float(a) - float(b)) <= 1e-9

    rows = [{"metric": k, "stored": run[k], "recomputed": m[k], "match": same(run[k], m[k])} for k in METRIC_COLUMNS]
    if args.json:
        print_rows(rows, as_json=True)
    else:
        print(f"run {args.run_id}: {m['num_evaluated']} predictions; head {run['head']}, loss {run['loss']}, "
              f"sampler {run['sampler']}")
        print_rows([{k: _fmt(v) if k != "match" else ("yes" if v else "NO") for k, v in r.items()} for r in rows],
                   columns=["metric", "stored", "recomputed", "match"])
    if not all(r["match"] for r in rows):
        raise CommandError(f"recomputed metrics of run {args.run_id} differ from the runs row: "
                           f"{', '.join(r['metric'] for r in rows if not r['match'])}")
    return 0
