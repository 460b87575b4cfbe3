"""Validation overhead of a pre-training recipe: what the held-out validation points cost next to the training.

Builds prepared data for the recipe's cultures (synthetic tone sequences, tokenised by the quickstart's shipped
k-means teacher; ``--files-per-culture`` files of ``--seconds`` each, the last of each culture in the ``valid``
split), then times, with the recipe's model, objective and validation set:

* ``--steps`` training steps of every stage (the trainer's own step: mixture, masks, forward, backward, AdamW);
* ``--repeats`` validation points (every held-out crop of every culture, forward only);

and prints the projected share of the whole run spent validating,
``points * t_point / sum_s(steps_s * t_step_s)``, next to the recipe's FLOP-based estimate
(``validate.max_overhead`` is checked against that estimate before a run starts).

    python bench/validation.py                                    # the quickstart CPT recipe, as the quickstart runs it
    python bench/validation.py --steps 2 --repeats 1 --files-per-culture 2 --seconds 12   # tiny: a minute on 2 cores
    python bench/validation.py --recipe quickstart/control --set validate.crops_per_culture=32
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _prepared(root: Path, cultures: list[str], files: int, seconds: float) -> Path:
    """One prepared directory with ``files`` synthetic pieces per culture (the last one in the valid split)."""
    import soundfile as sf

    from culturemert.data import prepare
    from culturemert.quickstart import SHIPPED_BASE
    from culturemert.teachers import KMeansTeacher

    sr = 24_000
    rng = np.random.default_rng(0)
    (root / "audio").mkdir(parents=True)
    lines = ["path,culture,split"]
    for c_i, culture in enumerate(cultures):
        for f in range(files):
            n = int(seconds * sr)
            t = np.arange(n) / sr
            notes = rng.integers(0, 12, size=int(seconds * 4) + 1)
            freq = 110 * 2 ** (notes[(t * 4).astype(int)] / 12 + c_i / 3)
            wav = (0.3 * np.sin(2 * np.pi * np.cumsum(freq) / sr)).astype(np.float32)
            path = root / "audio" / f"{culture}-{f}.wav"
            sf.write(path, wav, sr, subtype="PCM_16")
            lines.append(f"{path},{culture},{'valid' if f == files - 1 else 'train'}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    teacher = KMeansTeacher.load(SHIPPED_BASE / "teacher" / "kmeans.safetensors")
    prepare(root / "manifest.csv", root / "prepared", teacher, progress=False, workers=1)
    return root / "prepared"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="quickstart/cpt", help="a shipped recipe name or a YAML path")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per stage (after one warm-up)")
    ap.add_argument("--repeats", type=int, default=2, help="timed validation points")
    ap.add_argument("--files-per-culture", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each synthetic piece")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    print("reproduce: python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]))

    from culturemert.quickstart import SHIPPED_BASE
    from culturemert.train import Trainer, load_recipe, lr_at
    from culturemert.train.validation import evaluate_validation_set

    probe = load_recipe(args.recipe)
    cultures = sorted({c for s in probe.stages for m in [s.mixture or probe.data.mixture] if m
                       for c in (*m.sources, *m.replay)}) or ["a", "b"]
    with tempfile.TemporaryDirectory() as tmp:
        data = _prepared(Path(tmp) / "data", cultures, args.files_per_culture, args.seconds)
        overrides = [f"data.dirs=[{data}]", f"base.source={SHIPPED_BASE / 'base'}", f"runtime.device={args.device}",
                     "runtime.progress=false", "data.num_workers=0", *args.overrides]
        recipe = load_recipe(args.recipe, overrides)
        trainer = Trainer(recipe, Path(tmp) / "run")
        trainer.setup()
        plan = trainer.validation_plan
        if not plan.enabled:
            raise SystemExit(f"{args.recipe}: {plan.describe()[0]}")
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        step_seconds = []
        for index, stage in enumerate(recipe.stages):
            trainer.state.stage_index = index
            trainer._enter_stage(index, None)
            source = trainer._source(stage, index)
            times = []
            for k in range(args.steps + 1):  # the first step warms up (allocations, kernels)
                batch = source.batch(k)
                sync()
                t0 = time.perf_counter()
                trainer._train_step(batch, stage, k, lr_at(k, stage.lr, stage.steps))
                sync()
                times.append(time.perf_counter() - t0)
            step_seconds.append(float(np.median(times[1:])))
            print(f"stage {index + 1} {stage.name}: {stage.global_clips()} clips/step, "
                  f"{step_seconds[-1]:.3f} s/step (median of {args.steps}), {stage.steps} steps in the recipe")
        point_seconds = []
        for _ in range(args.repeats + 1):
            sync()
            t0 = time.perf_counter()
            evaluate_validation_set(trainer.model, trainer.objective, plan.vset, device=trainer.device,
                                    dist_info=trainer.dist, autocast=trainer._autocast)
            sync()
            point_seconds.append(time.perf_counter() - t0)
        t_point = float(np.median(point_seconds[1:]))
        train_total = sum(s.steps * t for s, t in zip(recipe.stages, step_seconds))
        measured = len(plan.points) * t_point / train_total
        spec = plan.spec
        print(f"validation point: {plan.vset.crops} crops ({len(plan.vset.cultures)} cultures x "
              f"{spec.crops_per_culture} x {plan.crop_seconds:g} s), {t_point:.2f} s (median of {args.repeats})")
        print(f"{args.recipe}: {len(plan.points)} validation points, {train_total:.0f} s of training projected -> "
              f"validation overhead {100 * measured:.1f} % measured, {100 * plan.overhead:.1f} % estimated "
              f"(validate.max_overhead {100 * spec.max_overhead:g} %), device {trainer.device}, "
              f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
