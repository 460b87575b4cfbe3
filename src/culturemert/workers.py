"""An ordered ``map`` over worker processes, for decoding audio (``prepare``) and rendering the corpus.

Processes are *spawned*, not forked: the caller may already have imported torch or started threads, which a fork
would copy in an undefined state. The pool starts on first use and is kept for later maps (interpreter start-up
and imports are paid once per worker). With ``workers <= 1`` everything runs in this process, through the same
``initializer``. If the pool breaks (a worker killed by the OOM killer or a decoder crash, or a main module that
spawn cannot re-import, e.g. code piped to ``python -``), the remaining tasks run in this process instead of
hanging or failing the whole job.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

__all__ = ["ProcessMap"]


class ProcessMap:
    """``map(fn, tasks, desc)`` yields ``fn(task)`` in task order over ``workers`` spawned processes.

    ``initializer(*initargs)`` runs once in each worker (and in this process before an in-process map); ``fn`` and
    the tasks must be picklable. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, workers: int, *, initializer: Callable[..., None] | None = None, initargs: tuple = (),
                 unit: str = "file", progress: bool = True) -> None:
        self.workers = int(workers)
        self.initializer = initializer
        self.initargs = initargs
        self.unit = unit
        self.progress = progress
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> ProcessMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], desc: str) -> Iterator[Any]:
        if not tasks:
            return
        bar = tqdm(total=len(tasks), desc=desc, unit=self.unit, disable=not self.progress, leave=False)
        done = 0
        try:
            if self.workers > 1 and (len(tasks) > 1 or self._pool is not None):
                if self._pool is None:
                    self._pool = ProcessPoolExecutor(
                        self.workers, mp_context=multiprocessing.get_context("spawn"),
                        initializer=self.initializer, initargs=self.initargs,
                    )
                chunk = max(1, min(8, len(tasks) // (self.workers * 8)))
                try:
                    for result in self._pool.map(fn, tasks, chunksize=chunk):
                        done += 1
                        bar.update(1)
                        yield result
                    return
                except BrokenProcessPool:
                    log.warning("worker pool broke; running the remaining %d task(s) in this process", len(tasks) - done)
                    self.close()
                    self.workers = 0
            if self.initializer is not None:
                self.initializer(*self.initargs)
            for task in tasks[done:]:
                result = fn(task)
                bar.update(1)
                yield result
        finally:
            bar.close()

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
