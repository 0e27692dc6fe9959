"""Backbone fine-tuning command: finetune (see featurelt.finetune)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from featurelt.commands._common import non_negative_int, positive_int, print_rows
from featurelt.commands.train_cmds import _kv

FIELDS = ("backbone", "pretrained", "checkpoint", "image_size", "adapt", "lora_rank", "lora_alpha", "lora_dropout",
          "lora_targets", "last_n", "head", "head_scale", "text_set", "loss", "sampler", "aux_cap", "epochs",
          "batch_size", "accum", "lr", "min_lr_ratio", "optimizer", "momentum", "weight_decay", "layer_decay", "warmup", "amp",
          "ema", "ema_decay", "seed", "augment", "train_split", "eval_split", "val_split", "as_of", "loader_workers",
          "skip_bad", "eval_every", "checkpoint_every", "launcher", "num_workers", "use_gpu", "device", "sync_bn",
          "export", "out_dir")


def register(sub: argparse._SubParsersAction, parents) -> None:
    p = sub.add_parser(
        "finetune", parents=[parents.store, parents.as_of, parents.json],
        help="fine-tune a backbone on the store's images (full, LoRA, partial), evaluate, optionally export features",
        description="Fine-tune an image backbone with a head on the train split, reading images straight from the "
        "samples table at a pinned store version (decoded and augmented in loader workers, normalised on the device). "
        "The sampler (SAMPLERS) plans each epoch as train-head does, the loss comes from LOSSES. At the end the eval "
        "split (and val when present) is evaluated like train-head (runs + predictions rows), the run is recorded in "
        "finetune_runs, and --export writes the fine-tuned features as embedding set ft_<run_id> for train-head. "
        "Checkpoints (<store>/checkpoints/<run_id>/last.pt) are written at each epoch end and every "
        "--checkpoint-every steps; --resume RUN_ID|latest continues a killed or interrupted run. Settings merge as: "
        "defaults < --config FILE < --recipe NAME < flags.",
        epilog="examples:\n"
        "  featurelt finetune --backbone timm:resnet18 --pretrained none --image-size 32 --epochs 2 --export\n"
        "  featurelt finetune --backbone clip:ViT-B-32 --pretrained laion2b_s34b_b79k --adapt lora --head text "
        "--text-set clip_vit_b_32 --amp bf16\n"
        "  featurelt finetune --resume latest",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("backbone and adaptation")
    g.add_argument("--backbone", help="timm:<name> (any timm model, e.g. timm:resnet50, timm:vit_base_patch16_224), "
                   "clip:<open_clip model>|tiny, dinov2:<size>|tiny, sam:<vit_b|vit_l|vit_h>|tiny")
    g.add_argument("--pretrained", metavar="TAG|none", help="weights tag: timm (e.g. a1_in1k; default: timm's default) or open_clip "
                   "(e.g. laion2b_s34b_b79k), from the local cache or downloaded; none: random init (recorded untrained)")
    g.add_argument("--checkpoint", metavar="FILE", help="start from these weights (timm / open_clip / SAM file, DINOv2 "
                   "folder); a file of another architecture is refused")
    g.add_argument("--image-size", dest="image_size", type=positive_int, metavar="PX",
                   help="input side in pixels (default: the backbone's own)")
    g.add_argument("--adapt", choices=["full", "lora", "last-n", "ln", "bias", "frozen"],
                   help="what trains: full (default), lora (peft adapters), last-n (last N layer groups), ln (norm "
                   "affine parameters), bias (biases), frozen (the head only)")
    g.add_argument("--lora-rank", dest="lora_rank", type=positive_int, help="LoRA rank (default 8)")
    g.add_argument("--lora-alpha", dest="lora_alpha", type=float, help="LoRA alpha (default 16)")
    g.add_argument("--lora-dropout", dest="lora_dropout", type=float, help="LoRA dropout (default 0)")
    g.add_argument("--lora-targets", dest="lora_targets", metavar="NAMES",
                   help="comma-separated module names to adapt (default: timm ViT qkv,proj,fc1,fc2; open_clip "
                   "attn,c_fc,c_proj; ResNet conv1,conv2,conv3; DINOv2 query,key,value,dense,fc1,fc2; SAM qkv,proj,lin1,lin2)")
    g.add_argument("--last-n", dest="last_n", type=positive_int, help="--adapt last-n: layer groups that train (default 1)")
    g = p.add_argument_group("head, loss and sampler")
    g.add_argument("--head", choices=["linear", "cosine", "text"],
                   help="linear (default), cosine (scaled cosine to learned rows) or text (scaled cosine to the fixed "
                   "class text embeddings of --text-set)")
    g.add_argument("--head-scale", dest="head_scale", type=float, help="logit scale of cosine / text heads (default 16)")
    g.add_argument("--text-set", dest="text_set", help="text_embeddings set_name (--head text; lfm sampler)")
    g.add_argument("--loss", help="loss name (default ce): ce, balanced-softmax, logit-adjust, ldam (DRW: "
                   "--loss-opt drw_epoch=N), focal, class-balanced, ns-ce")
    g.add_argument("--loss-opt", dest="loss_opt", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="loss option, repeatable (e.g. gamma=2, drw_epoch=8)")
    g.add_argument("--sampler", help="sampler name (default instance): instance, class-balanced, sqrt, lfm, "
                   "balancemix, momentum")
    g.add_argument("--sampler-opt", dest="sampler_opt", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="sampler option, repeatable")
    g.add_argument("--aux-cap", dest="aux_cap", type=non_negative_int, help="max rows per auxiliary class per epoch (default 50)")
    g = p.add_argument_group("recipe (a seed's backbone stage; `featurelt recipes NAME` shows what it fixes)")
    g.add_argument("--recipe", help="sam-fusion (000: SAM map fused into a ResNet stage), auxiliary (001: + neighbor "
                   "classes, ns-ce), ltgc-lora (002: CLIP LoRA + BalanceMix with generated images), ecvl-stage1 (003: "
                   "image-text InfoNCE + momentum RandAugment), lfm-stage1 (004: LFM pixel mixup, cosine to text). "
                   "Its settings apply over the defaults and --config; flags still override them")
    g.add_argument("--recipe-opt", dest="recipe_opt", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="the recipe's own option, repeatable (sam-fusion: fuse_stage, map_set, proto, proto_beta; "
                   "ecvl-stage1: beta, k, train_text=true to train the CLIP text tower too)")
    g.add_argument("--fuse-stage", dest="fuse_stage", type=int, choices=[1, 2, 3, 4],
                   help="sam-fusion: ResNet stage fused with the SAM map (= --recipe-opt fuse_stage=N; default 3)")
    g.add_argument("--proto", action="store_true", default=None,
                   help="sam-fusion: add the prototype losses of METHODS.md section 2 on the pooled feature "
                   "(= --recipe-opt proto=true)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, help="epochs (default 10)")
    g.add_argument("--batch-size", dest="batch_size", type=positive_int,
                   help="global batch size, all ranks together (default 64)")
    g.add_argument("--accum", type=positive_int, help="loader batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 1e-3): linear warmup, then cosine per step "
                   "to lr * --min-lr-ratio")
    g.add_argument("--min-lr-ratio", dest="min_lr_ratio", type=float, metavar="R",
                   help="the cosine schedule ends at lr * R (default 0; lfm-stage1: 0.001, as in LFM's code)")
    g.add_argument("--optimizer", help="timm optimizer name (default adamw; sgd, adam, lamb, ...)")
    g.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", dest="weight_decay", type=float,
                   help="weight decay (default 0.05; none on norms, biases and 1-d parameters)")
    g.add_argument("--layer-decay", dest="layer_decay", type=float, metavar="D",
                   help="layer-wise lr decay: layer l of L gets lr * D^(L - l) (default off)")
    g.add_argument("--warmup", type=non_negative_int, metavar="STEPS", help="linear warmup optimizer steps (default 0)")
    g.add_argument("--amp", choices=["bf16", "fp16", "off"], help="mixed precision (default off; fp16 uses a GradScaler)")
    g.add_argument("--ema", action="store_true", default=None, help="keep an EMA of the weights (timm ModelEmaV3); "
                   "evaluation and export use it")
    g.add_argument("--ema-decay", dest="ema_decay", type=float, help="EMA decay (default 0.9998)")
    g.add_argument("--seed", type=int, help="seed of initialisation, sampler and augmentation (default 0)")
    g = p.add_argument_group("data")
    g.add_argument("--augment", choices=["none", "flip-crop", "randaugment"],
                   help="train augmentation (default flip-crop: random resized crop + flip; randaugment adds RandAugment)")
    g.add_argument("--train-split", dest="train_split", help="samples.split to train on (default train)")
    g.add_argument("--eval-split", dest="eval_split", help="samples.split evaluated (default test)")
    g.add_argument("--val-split", dest="val_split", help="also evaluated when it has rows (default val)")
    g.add_argument("--loader-workers", dest="loader_workers", type=non_negative_int,
                   help="image decoding worker processes (default 2; 0 = in the main process)")
    g.add_argument("--skip-bad", dest="skip_bad", action="store_true", default=None,
                   help="leave out samples whose image cannot be read (a rejects row each); default: stop with an "
                   "error naming the sample")
    g = p.add_argument_group("schedule, launch and outputs")
    g.add_argument("--eval-every", dest="eval_every", type=non_negative_int, metavar="E",
                   help="eval-split accuracy every E epochs into the history (default 1; 0 = only at the end)")
    g.add_argument("--checkpoint-every", dest="checkpoint_every", type=non_negative_int, metavar="STEPS",
                   help="also checkpoint every STEPS optimizer steps (default 0: epoch ends only)")
    g.add_argument("--launcher", choices=["local", "torchrun", "ray"],
                   help="local (default: this process, CPU or one GPU); torchrun (run under `torchrun --nproc-per-node "
                   "N -m featurelt finetune ...`: DDP, gloo on CPU, NCCL on GPUs); ray (Ray Train, --num-workers N)")
    g.add_argument("--num-workers", dest="num_workers", type=positive_int, help="--launcher ray: workers (default 1)")
    g.add_argument("--use-gpu", dest="use_gpu", action="store_true", default=None, help="--launcher ray: a GPU per worker")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="device (default auto: cuda if available)")
    g.add_argument("--sync-bn", dest="sync_bn", action="store_true", default=None,
                   help="DDP: SyncBatchNorm (small per-device batches with BatchNorm backbones)")
    g.add_argument("--export", action="store_true", default=None,
                   help="write the fine-tuned features of every sample as embedding set ft_<run_id>")
    g.add_argument("--out-dir", dest="out_dir", help="run directory root (default <store>/checkpoints)")
    g.add_argument("--config", help="YAML config (a run's config.yaml); flags override its fields")
    g.add_argument("--resume", metavar="RUN_ID|latest",
                   help="continue a fine-tune run from its last checkpoint with its saved config (latest: the newest "
                   "unfinished run)")
    p.set_defaults(func=cmd_finetune)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from featurelt.config import parse_value

    out = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    for flag, name in (("loss_opt", "loss_opts"), ("sampler_opt", "sampler_opts")):
        pairs = getattr(args, flag, None) or []
        if pairs:
            out[name] = {k: parse_value(v) for k, v in pairs}
    return out


def recipe_options(args: argparse.Namespace) -> dict[str, Any]:
    """--recipe-opt pairs plus the --fuse-stage / --proto shorthands."""
    from featurelt.config import parse_value

    opts = {k: parse_value(v) for k, v in (getattr(args, "recipe_opt", None) or [])}
    if getattr(args, "fuse_stage", None) is not None:
        opts["fuse_stage"] = args.fuse_stage
    if getattr(args, "proto", None):
        opts["proto"] = True
    return opts


def cmd_finetune(args: argparse.Namespace) -> int:
    from featurelt.finetune.config import FinetuneCfg, from_yaml, merge
    from featurelt.finetune.launch import launch

    overrides = overrides_from_args(args)
    recipe_opts = recipe_options(args)
    if args.resume and (overrides or args.config or args.recipe or recipe_opts):
        ignored = sorted({*overrides, *(["config"] if args.config else []), *(["recipe"] if args.recipe else []),
                          *(["recipe_opt"] if recipe_opts else [])})
        print(f"note: --resume continues the run with its saved config; ignored: {', '.join(ignored)}", file=sys.stderr)
        cfg = FinetuneCfg()
    elif args.recipe:
        from featurelt.finetune.recipes import resolve

        base = from_yaml(args.config) if args.config else FinetuneCfg()
        cfg, _ = resolve(args.recipe, base, overrides, opts=recipe_opts, store=args.store)
    elif recipe_opts:
        raise ValueError("--recipe-opt / --fuse-stage / --proto need --recipe NAME")
    else:
        cfg = merge(from_yaml(args.config) if args.config else FinetuneCfg(), overrides)
    try:
        res = launch(args.store, cfg, resume=args.resume, progress=True,
                     log=lambda line: print(line if line.startswith("warning:") else f"note: {line}", file=sys.stderr))
    except KeyboardInterrupt:
        print("featurelt finetune: interrupted; the last checkpoint is kept (continue with --resume latest)",
              file=sys.stderr)
        return 130
    if res is None:  # a non-zero rank
        return 0
    m = res.metrics
    cols = ["acc_all", "acc_many", "acc_medium", "acc_few", "macro_f1"]
    if args.json:
        json.dump({"run_id": res.run_id, "checkpoint": res.checkpoint, "export_set": res.export_set,
                   "history": res.history, **{k: m.get(k) for k in cols},
                   **{k: m.get(k) for k in ("train_seconds", "images_per_second", "data_stall_fraction",
                                            "peak_memory_bytes", "trainable_params", "total_params")},
                   "config": res.config.to_dict()}, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
        return 0
    c = res.config
    print(f"finetune run {res.run_id}: {c.backbone} adapt {c.adapt} ({res.trainable_params:,} of {res.total_params:,} "
          f"parameters train), head {c.head}, loss {c.loss}, sampler {c.sampler}, store version {c.as_of}")
    print_rows([{k: ("" if m.get(k) is None else round(float(m[k]), 4)) for k in cols}], columns=cols)
    since = " since the resume" if args.resume else ""  # time and img/s are this process's part of the run
    print(f"trained {len(res.history)} epoch{'' if len(res.history) == 1 else 's'}, {m['train_seconds']:.1f} s{since} "
          f"({m['images_per_second']:.0f} img/s, data stall {100 * m['data_stall_fraction']:.0f}%)")
    print(f"checkpoint: {res.checkpoint}")
    if res.export_set:
        print(f"exported embedding set: {res.export_set} (featurelt train-head --features {res.export_set})")
    return 0
