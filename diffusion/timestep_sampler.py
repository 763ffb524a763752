"""Samplers that choose training timesteps (and importance weights)."""

from abc import ABC, abstractmethod

import numpy as np
import torch as th


def create_named_schedule_sampler(name, diffusion):
    """Build a ScheduleSampler by name; only "uniform" is provided."""
    if name == "uniform":
        return UniformSampler(diffusion)
    raise NotImplementedError(f"unknown schedule sampler: {name!r} (available: 'uniform')")


class ScheduleSampler(ABC):
    """A distribution over timesteps, used to make the loss estimator.

    Subclasses give per-timestep weights; `sample` draws timesteps in
    proportion to them and returns importance weights that keep the
    weighted loss an unbiased estimate of the uniform-average objective.
    """

    @abstractmethod
    def weights(self):
        """Non-negative numpy array with one (unnormalised) weight per timestep."""

    def sample(self, batch_size, device):
        """Draw `batch_size` timesteps.

        :return: (timesteps, weights): a long tensor of indices and a float
            tensor of importance weights, both on `device`.
        """
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = th.from_numpy(indices_np).long().to(device)
        weights_np = 1.0 / (len(p) * p[indices_np])
        weights = th.from_numpy(weights_np).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    """Every timestep equally likely (all importance weights are 1)."""

    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights
