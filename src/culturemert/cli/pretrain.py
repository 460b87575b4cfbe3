"""``culturemert pretrain RECIPE --out DIR [key=value ...]``: (continual) pre-training from a recipe.

Runs every stage (or only ``--stage N``) in one process or under torchrun::

    torchrun --nproc_per_node 8 --no-python culturemert pretrain recipes/culturemert-95m.yaml --out runs/cm95

Re-running the same command continues from the newest valid checkpoint in ``OUT/checkpoints``
(``--resume auto``, the default); the result is bit-identical to an uninterrupted run on CPU.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (see docs/pretraining.md)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="recipe overrides right after RECIPE, e.g. stages.0.steps=100 seed=3 (list items by index)",
    )
    parser.add_argument("--set", dest="more_overrides", action="append", default=[], metavar="KEY=VALUE", help="an override anywhere on the line (repeatable)")
    parser.add_argument("--out", required=True, help="run directory (checkpoints, exports, metrics.jsonl, loss_curve.png)")
    parser.add_argument(
        "--resume",
        choices=("auto", "never"),
        default="auto",
        help="auto: continue from the newest valid checkpoint in OUT (default); never: refuse if OUT has checkpoints",
    )
    parser.add_argument("--stage", type=int, default=None, metavar="N", help="run only stage N (1-based); earlier stages must be done in OUT")
    parser.add_argument("--max-steps", type=int, default=None, metavar="N", help="stop after N optimizer steps in this invocation (checkpointed; resumable)")
    parser.add_argument("--check", action="store_true", help="validate the recipe and its paths, then exit without training")


def run(args: argparse.Namespace) -> int:
    from culturemert.errors import ConfigError
    from culturemert.train import Trainer, check_recipe_paths, load_recipe

    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {args.max_steps}")
    recipe = load_recipe(args.recipe, list(args.overrides) + list(args.more_overrides))
    check_recipe_paths(recipe)
    if args.check:
        total = sum(s.steps for s in recipe.stages)
        print(f"{args.recipe}: ok ({len(recipe.stages)} stage(s), {total} steps)")
        return 0
    trainer = Trainer(recipe, args.out, resume=args.resume, max_steps=args.max_steps, only_stage=args.stage)
    result = trainer.run()
    if result is None:
        print(f"stopped after {args.max_steps} step(s); continue with the same command (--resume auto)")
    else:
        print(f"done: {result}")
    return 0
