"""A pool of real worker processes forming one torch.distributed world (gloo on CPU).

Spawning a world per test case costs seconds (each process imports torch), so a pool is
spawned once per world size and runs many module-level functions on every rank:

    pool = DistPool(world_size=3)
    results = pool.run(my_module_fn, arg1, timeout=60)   # list, one entry per rank

`fn(*args, **kwargs)` runs on each rank after `init_process_group` (file:// rendezvous, so
ports never clash). Rank and world size come from torch.distributed inside fn.
- An exception on any rank fails the call with every failing rank's traceback.
- A rank that does not answer within `timeout` seconds (a hang) fails the call with a message
  naming the ranks; the pool is then killed and respawned on next use, never stuck.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
import traceback


def _worker(rank, world_size, init_file, backend, pg_timeout_s, tasks, results):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=pg_timeout_s),
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        task_id, fn, args, kwargs = task
        try:
            results.put((task_id, rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            results.put((task_id, rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistFailure(AssertionError):
    pass


class DistPool:
    def __init__(self, world_size: int, backend: str = "gloo", pg_timeout_s: float = 60.0):
        self.world_size = world_size
        self.backend = backend
        self.pg_timeout_s = pg_timeout_s
        self._procs = None
        self._next_id = 0

    def _start(self):
        ctx = mp.get_context("spawn")
        self._tmp = tempfile.mkdtemp(prefix="ringattn_pool_")
        init_file = os.path.join(self._tmp, "rendezvous")
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, self.world_size, init_file, self.backend, self.pg_timeout_s, self._tasks[r], self._results),
                daemon=True,
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def close(self, kill: bool = False):
        if self._procs is None:
            return
        if not kill:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._procs = None

    def run(self, fn, *args, timeout: float = 120.0, **kwargs) -> list:
        """Run fn(*args, **kwargs) on every rank; return the per-rank results."""
        if self._procs is None:
            self._start()
        task_id = self._next_id
        self._next_id += 1
        for q in self._tasks:
            q.put((task_id, fn, args, kwargs))
        results: dict[int, object] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < self.world_size:
            remaining = deadline - time.monotonic()
            # Once one rank failed, give the others a short grace period, then stop waiting.
            if errors:
                remaining = min(remaining, 5.0)
            if remaining <= 0:
                break
            try:
                tid, rank, ok, value = self._results.get(timeout=remaining)
            except queue.Empty:
                break
            if tid != task_id:
                continue  # a late answer from an earlier, abandoned task
            (results if ok else errors)[rank] = value
            if not all(p.is_alive() for p in self._procs) and len(results) + len(errors) < self.world_size:
                time.sleep(0.5)
        missing = sorted(set(range(self.world_size)) - set(results) - set(errors))
        if errors or missing:
            self.close(kill=True)  # the process group may be wedged: respawn next time
            msg = [f"{getattr(fn, '__name__', fn)} failed in a world of {self.world_size}:"]
            for r in sorted(errors):
                msg.append(f"--- rank {r} raised:\n{errors[r]}")
            if missing:
                msg.append(
                    f"--- ranks {missing} did not finish within {timeout:.0f} s "
                    "(a hang or a crash; the pool was killed)"
                )
            raise DistFailure("\n".join(msg))
        return [results[r] for r in range(self.world_size)]
