"""Plain re-sampling: instance, class-balanced, sqrt (METHODS.md sections 1 and 5)."""
from __future__ import annotations

import numpy as np

from featurelt.samplers import SAMPLERS, class_sampling_probs
from featurelt.samplers.base import Plan, Sampler


@SAMPLERS.register("instance")
class InstanceSampler(Sampler):
    """Uniform over rows: a random permutation of the epoch's pool (N_epoch = pool size; section 1)."""

    def plan(self, rng: np.random.Generator, pool: np.ndarray, epoch: int) -> Plan:
        return {"index": rng.permutation(np.nonzero(pool)[0])}


class ClassWiseSampler(Sampler):
    """Draw a class with ``class_sampling_probs(class_counts, kind)`` over the classes with pool rows,
    then a uniform pool row of it; N_epoch = pool size; auxiliary classes capped at ``aux_cap`` draws."""

    kind = "class-balanced"

    def class_probs(self, pool: np.ndarray) -> np.ndarray:
        """[K] class probabilities for this epoch's pool."""
        present = np.bincount(self.ctx.labels[pool], minlength=self.ctx.num_classes) > 0
        n = np.where(present, np.maximum(self.ctx.class_counts, 1.0), 0.0)  # auxiliary / generated-only classes: >= 1
        return class_sampling_probs(n, self.kind)  # type: ignore[arg-type]

    def draw(self, rng: np.random.Generator, pool: np.ndarray) -> np.ndarray:
        classes = self.capped_choice(rng, int(pool.sum()), self.class_probs(pool), self.aux_budget())
        return self.rows_of(rng, classes, pool)

    def plan(self, rng: np.random.Generator, pool: np.ndarray, epoch: int) -> Plan:
        return {"index": self.draw(rng, pool)}


@SAMPLERS.register("class-balanced")
class ClassBalancedSampler(ClassWiseSampler):
    """Class uniformly (1/K over classes with rows), then a uniform row of it (cRT, ECVL stage 2; sections 1, 5)."""

    kind = "class-balanced"


@SAMPLERS.register("sqrt")
class SqrtSampler(ClassWiseSampler):
    """Class with probability ∝ sqrt(n_c), then a uniform row of it (METHODS.md section 1)."""

    kind = "sqrt"
