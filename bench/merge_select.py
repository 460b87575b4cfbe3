"""Wall time of the quickstart's merge-vs-mix step: a methods x λ sweep of two single-culture models selected by
held-out masked-prediction loss (``culturemert.merge.select.sweep_methods``), at the quickstart's model size.

Builds a preset-``small`` base (the quickstart's, with heads for a 2 x 16 teacher instead of 1 x 128; the heads
are a small part of the compute), two perturbed copies as single-culture models, a synthetic prepared directory
with three cultures and a valid split, then times the sweep. Reproduce with:

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/merge_select.py --crops 96 --methods task_arithmetic ties tsv iso_c
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=96, help="held-out crops per culture (quickstart: heldout_crops)")
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties", "tsv", "iso_c"])
    parser.add_argument("--lambdas", nargs="+", type=float, default=[0.5, 1.0])
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _train_fakes import make_prepared_dir

    from culturemert.merge.select import HeldOutLoss, sweep_methods
    from culturemert.model import build_model, model_fingerprint, save_export

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepared = make_prepared_dir(root / "prep", cultures=("german", "chinese", "irish"), files_per_culture=4,
                                     seconds=20.0, valid_files=2)
        base = build_model("small", seed=0, n_codebooks=2, codebook_size=16)
        save_export(base, root / "base")
        singles = []
        g = torch.Generator().manual_seed(0)
        for i in range(2):
            model = copy.deepcopy(base)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * p.detach().abs().mean() * torch.randn(p.shape, generator=g))
            save_export(model, root / f"single{i}", base_fingerprint=model_fingerprint(base))
            singles.append(root / f"single{i}")
        t0 = time.perf_counter()
        held_out = HeldOutLoss([prepared], crops_per_culture=args.crops)
        result = sweep_methods(root / "base", singles, args.methods, args.lambdas, root / "sweep", ssl=held_out,
                               protected="german", max_protected_increase=0.05, mix_source=singles[0],
                               require_selection=False)
        seconds = time.perf_counter() - t0
    n = len(result.candidates)
    print(f"merge-vs-mix sweep: {len(args.methods)} methods x {len(args.lambdas)} λ = {n} merges, {n + 2} held-out "
          f"evaluations of {args.crops} crops x 3 cultures (preset small): {seconds:.1f} s")
    print("command: OMP_NUM_THREADS=1 PYTHONPATH=src python bench/merge_select.py --crops "
          f"{args.crops} --methods {' '.join(args.methods)} --lambdas {' '.join(f'{v:g}' for v in args.lambdas)}")


if __name__ == "__main__":
    main()
