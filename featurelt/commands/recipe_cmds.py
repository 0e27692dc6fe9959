"""``featurelt recipes``: the seeds' backbone stages (``featurelt finetune --recipe NAME``) and what each fixes."""
from __future__ import annotations

import argparse
import inspect

from featurelt.commands._common import print_rows


def register(sub: argparse._SubParsersAction, parents) -> None:
    p = sub.add_parser(
        "recipes", parents=[parents.json],
        help="list the finetune recipes (seed backbone stages) and the options each one fixes",
        description="List the recipes of `featurelt finetune --recipe NAME`: the seed paper, the METHODS.md "
        "section, the finetune settings the recipe fixes (applied over the defaults and --config; command-line "
        "flags still override them), the recipe's own options (--recipe-opt KEY=VALUE), what the store must hold "
        "first, and the train-head command of the seed's second stage on the exported set ft_<run_id>. "
        "With NAME: that recipe's full description.",
        epilog="examples: featurelt recipes; featurelt recipes sam-fusion; featurelt recipes --json\n"
        "  featurelt finetune --recipe lfm-stage1 --backbone clip:tiny --text-set clip_tiny --export",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="one recipe to describe in full")
    p.set_defaults(func=cmd_recipes)


def recipe_rows(names: list[str]) -> list[dict]:
    from featurelt.finetune.recipes import RECIPES

    rows = []
    for name in names:
        r = RECIPES.get(name)
        params = inspect.signature(r.hooks).parameters
        opts = {k: (None if p.default is inspect.Parameter.empty else p.default)
                for k, p in params.items() if k != "store"}
        rows.append({"name": r.name, "seed": r.seed, "section": r.section, "summary": r.summary,
                     "fixes": dict(r.defaults), "recipe_opts": opts, "needs": r.needs,
                     "stage2": "featurelt train-head --features ft_<run_id> " + " ".join(r.stage2)})
    return rows


def cmd_recipes(args: argparse.Namespace) -> int:
    from featurelt.finetune.recipes import RECIPES

    names = [args.name] if args.name else RECIPES.names()
    if args.name:
        RECIPES.get(args.name)  # unknown name: KeyError listing the recipes
    rows = recipe_rows(names)
    if args.json:
        print_rows(rows, as_json=True)
        return 0
    if args.name:
        r, module = rows[0], inspect.getmodule(RECIPES.get(args.name).hooks)
        print(f"{r['name']} (seed {r['seed']}, METHODS.md section {r['section']}): {r['summary']}\n")
        print((module.__doc__ or "").strip() + "\n")
        print("fixes: " + ", ".join(f"{k}={v}" for k, v in r["fixes"].items()))
        print("recipe options: " + (", ".join(f"{k}={v}" for k, v in r["recipe_opts"].items()) or "(none)"))
        print(f"needs: {r['needs']}")
        print(f"stage 2: {r['stage2']}")
        return 0
    print_rows([{**r, "fixes": ", ".join(f"{k}={v}" for k, v in r["fixes"].items()),
                 "recipe_opts": ", ".join(r["recipe_opts"]) or "-"} for r in rows],
               columns=["name", "seed", "summary", "fixes", "recipe_opts"])
    return 0
