"""Wall time of building the quickstart-size corpus (``culturemert corpus``), split into parse and render.

Builds into a fresh temporary folder (nothing cached), then runs the same build again to time a resume. The
machine load at the start and end is printed because the figure scales with the CPU actually available.
Reproduce with:

    python bench/corpus.py --per-culture 300 --workers 2 --symbtr ../shared/data/symbtr

(omit --symbtr for the 3-culture corpus a fresh machine builds).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the worker processes, once the pool has exited
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-culture", type=int, default=300)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--symbtr", type=Path)
    parser.add_argument("--keep", type=Path, help="build here instead of a temp dir (kept afterwards)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    from culturemert.corpus import CorpusConfig, build_corpus

    config = CorpusConfig(pieces_per_culture=args.per_culture, duration_s=args.duration, workers=args.workers,
                          symbtr=args.symbtr)
    out = args.keep or Path(tempfile.mkdtemp(prefix="culturemert-corpus-bench-"))
    load_before = os.getloadavg()
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    summary = build_corpus(config, out, progress=False)
    wall = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu_before
    resume_started = time.perf_counter()
    again = build_corpus(config, out, progress=False)
    resume_wall = time.perf_counter() - resume_started
    load_after = os.getloadavg()
    hours = summary.n_pieces * args.duration / 3600
    command = " ".join(["python", "bench/corpus.py", *sys.argv[1:]])
    print(f"pieces: {summary.pieces_per_culture} ({hours:.2f} h of audio, {summary.synthesizer})")
    print(f"build: {wall:.1f} s wall (scan+parse {summary.parse_s:.1f} s, render {summary.render_s:.1f} s) "
          f"with {args.workers} workers; {hours * 3600 / max(summary.render_s, 1e-9):.0f}x real time rendering")
    print(f"CPU time of the build (main + workers): {cpu:.1f} s, i.e. about {cpu / args.workers:.0f} s of wall time "
          f"on {args.workers} otherwise idle cores")
    print(f"resume (nothing to do): {resume_wall:.1f} s, {again.resumed} pieces found complete")
    print(f"load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"reproduce: {command}")
    if args.keep is None:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
