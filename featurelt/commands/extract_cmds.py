"""Extraction commands: extract, embeddings.

(``encoders``, which lists the registry, lives with the encoders' own command module when present.)
Heavy libraries (torch, open_clip, ray) are imported inside the command functions.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from featurelt.commands._common import non_negative_int, open_store, positive_int, print_rows


def register(sub: argparse._SubParsersAction, parents) -> None:
    p = sub.add_parser(
        "extract", parents=[parents.store, parents.json],
        help="embed the store's samples with a frozen encoder (one emb_<name> table per product)",
        description="Stream the samples table through an encoder and write the embeddings into the store: "
        "one embedding set (table emb_<name>) per encoder product, plus a provenance row per set in "
        "embedding_sets. Images are decoded in DataLoader workers (--num-workers; 0: in this process), "
        "resized and normalised in batches on the encoder's device (--resize-on) and encoded under "
        "torch.inference_mode() with bf16/fp16 autocast on CUDA; the last line printed says where the "
        "loop's time went (waiting for images, launching, waiting for the device, rows, commits). Rows are committed in chunks, so an "
        "interrupted run keeps what it committed; re-running the same command embeds only the missing "
        "samples (same encoder fingerprint = skipped), including samples ingested later. Images that fail "
        "to decode go to the rejects table (or stop the run with --strict). Text encoders (text:minilm) "
        "and the text tower of clip:* write class-name embeddings into text_embeddings.",
        epilog="examples: featurelt extract clip:tiny --split train;  featurelt extract clip:ViT-B-32 --pretrained "
        "laion2b_s34b_b79k;  featurelt extract clip:ViT-B-32 --pretrained openai --checkpoint open_clip_model.safetensors;  "
        "featurelt extract dinov2:facebook/dinov2-base;  featurelt extract sam:vit_b --checkpoint "
        "sam_vit_b_01ec64.pth --products latent pca_map --map-size 16;  featurelt extract text:minilm;  "
        "featurelt extract pixels --views 4 --augment randaugment;  featurelt extract finetuned:latest")
    p.add_argument("encoder", metavar="ENCODER",
                   help="encoder registry name: clip:<open_clip model> | clip:hf-hub:ORG/NAME | clip:tiny | "
                   "sam:vit_b|vit_l|vit_h|tiny | dinov2:<size>|ORG/NAME|tiny | timm:<model> | pixels | text:minilm | "
                   "finetuned:<run_id>|latest (a finished `featurelt finetune` run's backbone: writes ft_<run_id>, "
                   "skipping the samples its --export embedded) (see `featurelt encoders`)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="weights: an open_clip checkpoint file, a segment-anything .pth, or a Hugging Face "
                   "DINOv2 / sentence-transformers folder, e.g. from `hf download facebook/dinov2-small --local-dir "
                   "dinov2-small` (required for named models; tiny variants need none)")
    p.add_argument("--pretrained", metavar="TAG",
                   help="open_clip pretrained tag of a clip:<model> (e.g. openai, laion2b_s34b_b79k; `featurelt "
                   "encoders --all` lists them): the tag's activation (QuickGELU) and preprocessing (mean/std, resize "
                   "mode, interpolation); weights from --checkpoint, else the local open_clip / Hugging Face cache, "
                   "else downloaded. Required with --checkpoint for models whose tags disagree (ViT-B-32, ...); "
                   "recorded in the provenance")
    p.add_argument("--products", nargs="+", metavar="PRODUCT",
                   help="which encoder outputs to store (default: all), e.g. latent pca_map for SAM, cls "
                   "mean_patch for DINOv2")
    p.add_argument("--name", metavar="NAME",
                   help="embedding set name (table emb_NAME); with several products each set is NAME_<product> "
                   "(default: <family>_<model>_<product>, e.g. clip_tiny, sam_tiny_latent)")
    p.add_argument("--split", metavar="SPLIT",
                   help="embed only samples of this split (train, val, test, train_unused, ...; default: all)")
    p.add_argument("--limit", type=positive_int, metavar="N",
                   help="embed at most the first N samples (of the split, in store order)")
    p.add_argument("--batch-size", type=positive_int, default=64, metavar="N",
                   help="images per encoder forward pass (default 64; halved automatically on CUDA out-of-memory)")
    p.add_argument("--num-workers", type=non_negative_int, default=None, metavar="N",
                   help="DataLoader worker processes that read and decode images, and resize them with --resize-on host "
                   "(default: 0 on CPU, "
                   "where the encoder uses the cores; min(8, cores - 1) on CUDA)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the encoder runs (default auto: cuda when available, else cpu)")
    p.add_argument("--resize-on", dest="resize_on", choices=["auto", "host", "device"], default="auto",
                   help="where images are resized and cropped: device (in batches on the encoder's device, within "
                   "2 grey levels of PIL; workers only decode, plain PNG and JPEG files without PIL; keeps a GPU "
                   "fed, and on the CPU PyTorch's uint8 resampling is 2-4x faster than PIL's) or host (PIL in the "
                   "workers: the reference transform exactly). Default auto: device, host for finetuned:<run_id> "
                   "(its vectors equal the run's --export)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="stored vector type (default float32; float16 halves the table size)")
    p.add_argument("--views", type=non_negative_int, default=0, metavar="N",
                   help="also store N augmented views per sample (view 1..N, strength view/N; METHODS.md section 5); "
                   "needs --augment")
    p.add_argument("--augment", choices=["randaugment"],
                   help="augmentation of the extra views: torchvision RandAugment, 2 ops, magnitude "
                   "round(strength * 30) of 31 bins, seeded per (sample, view)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first image that fails to decode (default: record it in rejects and go on)")
    p.add_argument("--map-size", type=positive_int, default=16, metavar="N",
                   help="side of map products such as SAM pca_map (NxN, flattened; default 16)")
    p.add_argument("--image-size", type=positive_int, metavar="N",
                   help="encoder input size in pixels (default: the model's own)")
    p.add_argument("--templates", metavar="FILE",
                   help="prompt templates for class text embeddings, one per line with '{}' for the class name "
                   "(default: 'a photo of a {}'); used by text encoders and the clip text tower")
    p.add_argument("--untrained", action="store_true",
                   help="random weights for a named model (for timing and tests only; recorded as untrained in "
                   "the provenance)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of tiny/untrained weights and of the augmented views (default 0)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process (+ DataLoader workers); ray: Ray tasks write Lance fragments, one "
                   "commit at the end")
    p.add_argument("--ray-gpus-per-task", dest="ray_gpus_per_task", type=float, default=1.0, metavar="G",
                   help="with --engine ray --device cuda: GPUs each Ray task reserves (default 1; 0.5 packs two "
                   "tasks per GPU). --device auto runs Ray tasks on CPU")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="Ray cluster to join with --engine ray (default: a local Ray, see --ray-cpus)")
    p.add_argument("--ray-cpus", dest="ray_cpus", type=positive_int, default=None, metavar="N",
                   help="CPUs of the local Ray that --engine ray starts without --ray-address (default: this "
                   "machine's cores); CPU tasks run one per CPU")
    p.add_argument("--chunk-rows", type=positive_int, default=16384, metavar="N",
                   help="samples per store commit at most, local engine (default 16384)")
    p.add_argument("--commit-seconds", type=float, default=10.0, metavar="S",
                   help="commit at least every S seconds of work, so an interrupted run keeps all but the last "
                   "S seconds (default 10)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="do not show the progress bar")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("embeddings", parents=[parents.store, parents.as_of, parents.json],
                       help="list the embedding sets with their encoder, weights, trained, rows and time",
                       description="List the embedding sets (tables emb_<name>) with their provenance (from "
                       "embedding_sets, the last extraction run that wrote to each): name, encoder, product, dim, "
                       "dtype, rows in the table, trained (false: seeded random weights), weights (the "
                       "provenance's tag when it has one, else the first 12 hex digits of the checkpoint's "
                       "sha256; 'seed N' for random weights, 'none' for raw pixels), extraction runs and the time of the last one. "
                       "--json prints every field and the full provenance of each set.",
                       epilog="examples: featurelt embeddings;  featurelt embeddings --json")
    p.set_defaults(func=cmd_embeddings)


def cmd_extract(args: argparse.Namespace) -> int:
    from featurelt.encoders import ENCODERS
    from featurelt.extract import extract, extract_text

    store = open_store(args, write=True)
    if ENCODERS.get(args.encoder).kind == "text":
        ignored = [flag for flag, on in [("--views", args.views), ("--augment", args.augment),
                                         ("--products", args.products), ("--split", args.split),
                                         ("--limit", args.limit), ("--engine ray", args.engine == "ray")] if on]
        if ignored:
            raise ValueError(f"{args.encoder} is a text encoder (class names only); {', '.join(ignored)} do not apply")
        text = extract_text(store, args.encoder, name=args.name, checkpoint=args.checkpoint,
                            templates=args.templates, device=args.device, seed=args.seed, untrained=args.untrained,
                            pretrained=args.pretrained)
        print(json.dumps(dataclasses.asdict(text), indent=2) if args.json else text.summary())
        return 0
    result = extract(store, args.encoder, products=args.products, name=args.name, split=args.split,
                     limit=args.limit, batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
                     dtype=args.dtype, views=args.views, augment=args.augment, strict=args.strict,
                     checkpoint=args.checkpoint, map_size=args.map_size, image_size=args.image_size,
                     templates=args.templates, seed=args.seed, untrained=args.untrained, engine=args.engine,
                     ray_address=args.ray_address, ray_gpus_per_task=args.ray_gpus_per_task,
                     ray_cpus=args.ray_cpus,
                     chunk_rows=args.chunk_rows, commit_seconds=args.commit_seconds, resize_on=args.resize_on,
                     progress=args.progress, pretrained=args.pretrained)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(result.summary())
    return 0


def weights_label(prov: dict) -> str:
    """How the table names an encoder's weights: its tag, else the checkpoint sha256 (12 hex digits),
    else ``seed N`` (seeded random weights)."""
    if prov.get("pretrained") or prov.get("tag"):
        return str(prov.get("pretrained") or prov["tag"])
    if prov.get("checkpoint_sha256"):
        return str(prov["checkpoint_sha256"])[:12]
    if prov.get("family") == "pixels":
        return "none (raw pixels)"
    return f"seed {prov.get('seed')}" if prov.get("trained") is False else "(unknown)"


def embedding_set_rows(store) -> list[dict]:
    """One row per embedding set: name, encoder, product, dim, dtype, rows, trained, weights, runs, time,
    fingerprint and provenance (the parsed JSON of the last extraction run that wrote to the set)."""
    runs: dict[str, list[dict]] = {}
    if store.has_table("embedding_sets"):
        for r in store.read("embedding_sets").to_pylist():
            runs.setdefault(r["name"], []).append(r)
    out = []
    for name in store.embedding_sets():
        table = f"emb_{name}"
        vtype = store.dataset(table).schema.field("vector").type
        rs = sorted(runs.get(name, []), key=lambda r: r["time"])
        last = rs[-1] if rs else None
        prov = json.loads(last["provenance"]) if last is not None else {}
        out.append({"name": name, "encoder": last["encoder"] if last else None,
                    "product": last["product"] if last else None, "dim": vtype.list_size,
                    "dtype": "float16" if str(vtype.value_type) == "halffloat" else "float32",
                    "rows": store.count(table), "trained": prov.get("trained"),
                    "weights": weights_label(prov) if last else None, "runs": len(rs),
                    "time": last["time"] if last else None, "fingerprint": last["fingerprint"] if last else None,
                    "provenance": prov or None})
    return out


EMBEDDING_COLUMNS = ["name", "encoder", "product", "dim", "dtype", "rows", "trained", "weights", "runs", "time"]


def cmd_embeddings(args: argparse.Namespace) -> int:
    store = open_store(args)
    rows = embedding_set_rows(store)
    if not args.json:
        rows = [{**r, "trained": {True: "true", False: "false"}.get(r["trained"], r["trained"]),
                 "time": str(r["time"])[:19] if r["time"] is not None else None} for r in rows]
    print_rows(rows, as_json=args.json, columns=None if args.json else EMBEDDING_COLUMNS)
    return 0
