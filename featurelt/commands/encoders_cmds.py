"""``featurelt encoders``: list the encoder registry (names, kind, products and dims, weights needed)."""
from __future__ import annotations

import argparse

from featurelt.commands._common import print_rows


def register(sub: argparse._SubParsersAction, parents) -> None:
    p = sub.add_parser(
        "encoders", parents=[parents.json],
        help="list the frozen encoders: name, kind, products with dims, weights needed, tags / hub ids / checksums",
        description="List the encoders `featurelt extract NAME` accepts: kind (image or text), "
        "whether it has a text tower (class text embeddings), its products with their dimensions, and "
        "what --checkpoint must be (a file, a Hugging Face folder, none, or bundled weights). "
        "Named models (clip:<model>, sam:vit_b|vit_l|vit_h, dinov2:small|base|large|giant) need "
        "--checkpoint (DINOv2: a Hugging Face folder, e.g. `hf download facebook/dinov2-small --local-dir "
        "dinov2-small`); the tiny variants are seeded random weights for tests and demos. "
        "clip:<model> is any open_clip model name (--all lists them with their pretrained tags); "
        "--pretrained TAG picks a tag's activation and preprocessing (and its weights from the local cache or "
        "the hub when no --checkpoint is given). Hub ids: clip:hf-hub:ORG/NAME, dinov2:ORG/NAME (e.g. "
        "dinov2:facebook/dinov2-base). The notes column lists tags, hub ids and the official SAM "
        "checkpoints' sha256 (a different file loads with a warning).",
        epilog="examples: featurelt encoders; featurelt encoders --all --json; "
        "featurelt encoders --map-size 64  (sam pca_map dim = map_size**2)")
    p.add_argument("--all", action="store_true",
                   help="list every open_clip model as its own clip:<model> row with its embedding dim and "
                   "pretrained tags")
    p.add_argument("--map-size", dest="map_size", type=int, default=16, metavar="N",
                   help="side of SAM's pca_map used for the dims shown (default 16: 256-d)")
    p.set_defaults(func=cmd_encoders)


def cmd_encoders(args: argparse.Namespace) -> int:
    from featurelt.encoders import list_encoders

    if args.map_size <= 0:
        raise ValueError(f"--map-size must be > 0, got {args.map_size}")
    rows = list_encoders(expand_clip=args.all, map_size=args.map_size)
    if args.json:
        print_rows(rows, as_json=True)
        return 0
    table = [{"name": r["name"], "kind": r["kind"] + ("+text" if r["kind"] == "image" and r["text"] else ""),
              "products": ", ".join(f"{p} ({d})" for p, d in r["products"].items()) or "(per model)",
              "checkpoint": ("required: " if r["needs_checkpoint"] else "optional: " if r["checkpoint"] in
                             ("file", "dir") else "") + r["checkpoint"],
              "help": r["help"]} for r in rows]
    print_rows(table, columns=["name", "kind", "products", "checkpoint", "help"])
    noted = [r for r in rows if r["notes"]]
    if noted:  # in full (tags, hub ids, sha256 are no use truncated)
        print("\nnotes (pretrained tags, hub ids, official checkpoints):")
        for r in noted:
            print(f"  {r['name']}: {r['notes']}")
    return 0
