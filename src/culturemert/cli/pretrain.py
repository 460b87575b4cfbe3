"""``culturemert pretrain RECIPE --out DIR [key=value ...]``: (continual) pre-training from a recipe.

``RECIPE`` is a YAML file or the name of a recipe shipped with the package (``culturemert pretrain --list``)::

    culturemert pretrain culturemert-95m --out runs/cm95
    torchrun --nproc_per_node 8 --no-python culturemert pretrain culturemert-95m --out runs/cm95

Re-running the same command continues from the newest valid checkpoint in ``OUT/checkpoints``
(``--resume auto``, the default); the result is bit-identical to an uninterrupted run on CPU. ``--check`` reads
the recipe, its data directories and the validation set it would use, prints them and exits without compute.
Exit status 3: the forgetting alarm stopped the run (``validate.forgetting.action: stop``).
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)

#: exit status when the forgetting alarm stopped the run
EXIT_FORGETTING_STOP = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="recipe YAML, or a shipped recipe's name (see --list)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="recipe overrides right after RECIPE, e.g. stages.0.steps=100 seed=3 (list items by index)",
    )
    parser.add_argument("--set", dest="more_overrides", action="append", default=[], metavar="KEY=VALUE", help="an override anywhere on the line (repeatable)")
    parser.add_argument("--out", help="run directory (checkpoints, exports, metrics.jsonl, loss_curve.png); required to train")
    parser.add_argument(
        "--resume",
        choices=("auto", "never"),
        default="auto",
        help="auto: continue from the newest valid checkpoint in OUT (default); never: refuse if OUT has checkpoints",
    )
    parser.add_argument("--stage", type=int, default=None, metavar="N", help="run only stage N (1-based); earlier stages must be done in OUT")
    parser.add_argument("--max-steps", type=int, default=None, metavar="N", help="stop after N optimizer steps in this invocation (checkpointed; resumable)")
    parser.add_argument("--check", action="store_true", help="check the recipe, its data and its validation set, print them, exit without training")
    parser.add_argument("--list", action="store_true", help="list the recipes shipped with the package and exit")


def _check_report(recipe, recipe_path) -> list[str]:
    """What --check prints: the recipe, its data and the validation set; raises on anything a run would refuse."""
    from culturemert.data import PreparedDataset
    from culturemert.errors import ConfigError
    from culturemert.train import plan_validation
    from culturemert.train.validation import format_duration

    datasets = [PreparedDataset(d) for d in recipe.data.dirs]
    teachers = {(d.teacher.get("name"), d.n_codebooks, d.codebook_size) for d in datasets}
    if len(teachers) > 1:
        raise ConfigError(f"data.dirs: the directories were tokenised by different teachers {sorted(map(str, teachers))}")
    (tname, n_cb, size), = teachers
    if recipe.teacher.name is not None and recipe.teacher.name != tname:
        raise ConfigError(f"teacher.name is {recipe.teacher.name!r} but the prepared data was tokenised by {tname!r}")
    hours: dict[str, float] = {}
    for d in datasets:
        for c, h in d.hours_per_culture(recipe.data.split).items():
            hours[c] = hours.get(c, 0.0) + h
    total = sum(s.steps for s in recipe.stages)
    lines = [
        f"{recipe_path}: ok ({len(recipe.stages)} stage(s), {total} steps)",
        f"data: {len(datasets)} dir(s), teacher {tname} ({n_cb} x {size}), split {recipe.data.split!r}: "
        + ", ".join(f"{c} {format_duration(h * 3600)}" for c, h in sorted(hours.items())),
    ]
    lines += plan_validation(recipe, datasets=datasets).describe()
    return lines


def run(args: argparse.Namespace) -> int:
    from culturemert.errors import ConfigError
    from culturemert.train import Trainer, check_recipe_paths, load_recipe, resolve_recipe, shipped_recipes

    if args.list:
        for name, path in shipped_recipes().items():
            print(f"{name:24s} {path}")
        return 0
    if args.recipe is None:
        raise ConfigError("give a RECIPE (a YAML file or a shipped name; culturemert pretrain --list shows them)")
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {args.max_steps}")
    if not args.check and not args.out:
        raise ConfigError("--out DIR is required to train (or pass --check)")
    recipe_path = resolve_recipe(args.recipe)
    recipe = load_recipe(recipe_path, list(args.overrides) + list(args.more_overrides))
    check_recipe_paths(recipe)
    if args.check:
        print("\n".join(_check_report(recipe, recipe_path)))
        return 0
    trainer = Trainer(recipe, args.out, resume=args.resume, max_steps=args.max_steps, only_stage=args.stage)
    result = trainer.run()
    if trainer.stopped is not None:
        print(str(trainer.stopped))
        return EXIT_FORGETTING_STOP
    if result is None:
        print(f"stopped after {args.max_steps} step(s); continue with the same command (--resume auto)")
    else:
        print(f"done: {result}")
    return 0
