"""The demo's runs in worker processes: each run seeds itself, so the results do not depend on
the number of processes or on the order in which they finish."""
from __future__ import annotations

import os

import torch

from .arms import run_one

__all__ = ["available_cpus", "run_jobs", "default_jobs"]

def available_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells, else the CPU count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_jobs(jobs, options: dict, *, workers: int = 1, threads: int = 1, on_done=None) -> list:
    """``run_one(arm, regime, n, seed, **options)`` for each ``(regime, n, seed, arm)`` of ``jobs``.

    Returns the accuracies in the order of ``jobs``. Every run seeds itself, so a run's result
    does not depend on which process runs it or when: ``workers > 1`` runs them in that many
    spawned processes (each with ``threads`` torch threads) and gives the same list as one
    process. ``on_done(job)`` is called as each run finishes, in the order they finish.
    """
    jobs = list(jobs)
    accs = [None] * len(jobs)
    workers = max(1, min(int(workers), len(jobs)))
    if workers == 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for i, (regime, n, seed, arm) in enumerate(jobs):
                accs[i] = run_one(arm, regime, n, seed, **options)
                if on_done is not None:
                    on_done(jobs[i])
        finally:
            torch.set_num_threads(previous)
        return accs
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: a forked child of a process whose OpenMP pool has started can hang
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        index = {pool.submit(run_one, arm, regime, n, seed, **options): i
                 for i, (regime, n, seed, arm) in enumerate(jobs)}
        for future in as_completed(index):
            i = index[future]
            accs[i] = future.result()
            if on_done is not None:
                on_done(jobs[i])
    return accs


def default_jobs(device: str, threads: int = 1) -> int:
    """Worker processes by default: one per available CPU (``threads`` each) on the CPU, else one."""
    if device != "cpu":
        return 1
    return max(1, available_cpus() // max(1, threads))
