"""Which task each step of a multitask run draws, and the step batches that follow: pure functions of (seed, step).

Samplers (config.MixtureConfig): proportional p_i ~ n_i (every row seen about equally often; large tasks dominate),
temperature p_i ~ n_i^(1/T) (T = 1 is proportional, T -> inf uniform; Arivazhagan et al. 2019 used T = 5 for
many-language MT), round_robin (task step % n), annealed p_i ~ n_i^a with a going linearly from 1 to 0.2 over the
run (Stickland & Murray 2019, "BERT and PALs", section 4). Draws come from a generator seeded by (seed, step) alone,
so any step's task is known without replaying the run; each task's stream keeps its own epochs (its step batches
are `step_batches` of its rows, as a single-task run's), and where a stream stands at an epoch's start is the count
of its earlier draws. So an epoch's plan is a pure function of (seed, epoch), resume needs only the loop's own
position, and a one-task mixture is the single-task run's batches exactly.
An epoch is as many steps as one pass over every task's rows would take (the sum of each task's step batches).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from .batches import step_batches


def probabilities(sizes: list[int], sampler: str, temperature: float | None, step: int, total: int) -> np.ndarray:
    n = np.asarray(sizes, dtype=np.float64)
    if sampler == "temperature":
        p = n ** (1.0 / (temperature or 2.0))
    elif sampler == "annealed":
        p = n ** (1.0 - 0.8 * step / max(total - 1, 1))
    else:  # proportional (round_robin does not draw)
        p = n
    return p / p.sum()


def task_at(step: int, seed: int, sizes: list[int], sampler: str, temperature: float | None, total: int) -> int:
    """The task (index) step `step` trains on."""
    if len(sizes) == 1:
        return 0
    if sampler == "round_robin":
        return step % len(sizes)
    u = torch.rand((), generator=torch.Generator().manual_seed(seed * 1_000_003 + step), dtype=torch.float64)
    cdf = np.cumsum(probabilities(sizes, sampler, temperature, step, total))
    return min(int(np.searchsorted(cdf, float(u), side="right")), len(sizes) - 1)


class Mixture:
    """The step batches of a multitask run, epoch by epoch (row ids of the joined row space)."""

    def __init__(self, lengths: list[list[int]], offsets: list[int], step_size: int, seed: int,
                 group_by_length: bool, sampler: str = "proportional", temperature: float | None = None,
                 total_steps: int | None = None):
        self.lengths, self.offsets, self.step_size, self.seed = lengths, offsets, step_size, seed
        self.group_by_length, self.sampler, self.temperature = group_by_length, sampler, temperature
        self.sizes = [len(x) for x in lengths]
        self.per_task = [math.ceil(n / step_size) for n in self.sizes]  # step batches per pass of each task
        self.steps_per_epoch = sum(self.per_task)
        self.total = total_steps or self.steps_per_epoch
        self._counts = {0: [0] * len(lengths)}  # draws per task before step e * steps_per_epoch
        self._batches = lru_cache(maxsize=2 * len(lengths) + 2)(self._task_epoch)

    def task_at(self, step: int) -> int:
        return task_at(step, self.seed, self.sizes, self.sampler, self.temperature, self.total)

    def _task_epoch(self, k: int, epoch: int) -> list[list[int]]:
        return step_batches(self.lengths[k], self.step_size, self.seed, epoch, self.group_by_length)

    def counts_before(self, epoch: int) -> list[int]:
        done = max(e for e in self._counts if e <= epoch)
        counts = list(self._counts[done])
        for e in range(done, epoch):
            for s in range(e * self.steps_per_epoch, (e + 1) * self.steps_per_epoch):
                counts[self.task_at(s)] += 1
            self._counts[e + 1] = list(counts)
        return counts

    def epoch(self, epoch: int) -> list[list[int]]:
        counts = self.counts_before(epoch)
        plan = []
        for s in range(epoch * self.steps_per_epoch, (epoch + 1) * self.steps_per_epoch):
            k = self.task_at(s)
            task_epoch, at = divmod(counts[k], self.per_task[k])
            counts[k] += 1
            plan.append([self.offsets[k] + i for i in self._batches(k, task_epoch)[at]])
        return plan
