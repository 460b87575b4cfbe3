import multiprocessing
import os

from culturemert.workers import ProcessMap

_INIT = {}


def _init(tag):
    _INIT["tag"] = tag


def _square_tagged(x):
    return x * x, _INIT.get("tag")


def _die_in_a_worker(x):
    if multiprocessing.current_process().name != "MainProcess" and x == 3:
        os._exit(1)  # a worker killed mid-task (OOM killer, decoder crash)
    return x + 100


def test_pool_and_in_process_give_the_same_ordered_results_and_run_the_initializer():
    tasks = list(range(20))
    with ProcessMap(2, initializer=_init, initargs=("w",), progress=False) as pool:
        pooled = list(pool.map(_square_tagged, tasks, "t"))
    _INIT.clear()
    with ProcessMap(0, initializer=_init, initargs=("w",), progress=False) as pool:
        local = list(pool.map(_square_tagged, tasks, "t"))
    assert pooled == local == [(x * x, "w") for x in tasks]


def test_a_broken_pool_finishes_the_remaining_tasks_in_this_process():
    tasks = list(range(8))
    with ProcessMap(2, progress=False) as pool:
        out = list(pool.map(_die_in_a_worker, tasks, "t"))
        assert pool.workers == 0  # later maps stay in this process
    assert out == [x + 100 for x in tasks]
