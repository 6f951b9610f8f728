"""Map a function over chunks of work in spawned worker processes (or inline), with a progress bar: what
training's decoders, the generated non-garments and the photo renderer share."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context


def pool_map(fn: Callable[[object], Iterable], jobs: list, procs: int, initializer: Callable, initargs: tuple, *,
             total: int, desc: str, progress: bool, unit: str = "img") -> list:
    """The concatenated results of ``fn(job)`` for every job, in job order. ``initializer(*initargs)`` runs
    once per process (in this one when ``procs <= 1`` or there is one job). Processes are spawned, never
    forked (torch and its threads may already be loaded here). The bar counts the items each job returns."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
    results: list = []
    pool = None
    try:
        if procs <= 1 or len(jobs) <= 1:
            initializer(*initargs)
            parts = map(fn, jobs)
        else:
            pool = ProcessPoolExecutor(procs, mp_context=get_context("spawn"), initializer=initializer,
                                       initargs=initargs)
            parts = pool.map(fn, jobs)
        for part in parts:
            results.extend(part)
            if bar is not None:
                bar.update(len(part))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()
    return results
