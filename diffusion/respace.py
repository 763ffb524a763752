"""Timestep respacing: run a diffusion process on a subset of its steps.

A model trained with T steps can be sampled with fewer by keeping a subset S
of timesteps and recomputing betas so that the cumulative alpha products at
the kept steps are unchanged. The model itself is still called with the
original timestep indices.
"""

import numpy as np
import torch as th

from .gaussian_diffusion import GaussianDiffusion


def _parse_count(text, what):
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"invalid {what} {text!r}: expected an integer") from None


def space_timesteps(num_timesteps, section_counts):
    """Choose which of `num_timesteps` original steps to keep.

    :param num_timesteps: number of steps in the original process.
    :param section_counts: one of
        - an int-like string such as "250": that many evenly spaced steps;
        - "ddimN": the DDIM striding range(0, T, stride) with the integer
          stride that gives exactly N steps;
        - a comma list such as "10,15,20", or a list of ints: the steps are
          split into equal sections and each section gets that many evenly
          spaced steps (first and last step of the section included).
    :return: a set of kept (original) timestep indices.
    :raises ValueError: if the request cannot be satisfied.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")

    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            desired = _parse_count(spec[len("ddim"):], "DDIM step count in")
            if not 1 <= desired <= num_timesteps:
                raise ValueError(
                    f"cannot take {desired} DDIM steps from {num_timesteps} timesteps"
                )
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"no integer stride gives exactly {desired} steps out of {num_timesteps}"
            )
        section_counts = [_parse_count(part.strip(), "section count") for part in spec.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    else:
        section_counts = [int(count) for count in section_counts]

    if not section_counts:
        raise ValueError("section_counts must not be empty")
    if any(count < 0 for count in section_counts):
        raise ValueError(f"section counts must be non-negative, got {section_counts}")
    if sum(section_counts) == 0:
        raise ValueError("at least one timestep must be kept")

    # Split [0, T) into len(section_counts) contiguous sections; the first
    # (T mod n) sections get one extra step.
    base_size, extra = divmod(num_timesteps, len(section_counts))
    kept = []
    start = 0
    for i, count in enumerate(section_counts):
        size = base_size + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps")
        # Evenly spaced fractional positions from the section's first to last step.
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept.extend(start + round(j * stride) for j in range(count))
        start += size
    return set(kept)


class _WrappedModel:
    """Calls the model with original timesteps instead of respaced indices.

    Works with any callable, including bound methods such as
    `model.forward_with_cfg`.
    """

    def __init__(self, model, timestep_map, original_num_steps, maps=None):
        self.model = model
        self.timestep_map = timestep_map
        self.original_num_steps = original_num_steps
        # The map as a tensor per (device, dtype), shared by the diffusion's wrappers and copied to the
        # device once, so that a step makes no host-device copy (and no synchronization) for it.
        self._maps = {} if maps is None else maps

    def __call__(self, x, ts, **kwargs):
        key = (ts.device, ts.dtype)
        if key not in self._maps:
            self._maps[key] = th.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        return self.model(x, self._maps[key][ts], **kwargs)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion that only steps through `use_timesteps`.

    :param use_timesteps: collection of original timesteps to keep.
    :param kwargs: GaussianDiffusion arguments for the original process.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(int(t) for t in use_timesteps)
        self._timestep_maps = {}  # timestep_map on each (device, dtype), shared by every _WrappedModel
        self.original_num_steps = len(kwargs["betas"])
        if not self.use_timesteps:
            raise ValueError("use_timesteps must not be empty")
        bad = [t for t in self.use_timesteps if not 0 <= t < self.original_num_steps]
        if bad:
            raise ValueError(f"timesteps out of range [0, {self.original_num_steps}): {sorted(bad)}")

        base = GaussianDiffusion(**kwargs)
        # The full process's betas (float64): what the ODE solvers of ditlab/sampling.py are configured from.
        self.original_betas = base.betas
        # Choose betas so that the new process's alphas_cumprod equal the
        # original ones at the kept steps: beta_i = 1 - acp_i / acp_prev_kept.
        self.timestep_map = []
        new_betas = []
        last_alpha_cumprod = 1.0
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1.0 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas, dtype=np.float64)
        super().__init__(**kwargs)

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.original_num_steps, self._timestep_maps)

    def _scale_timesteps(self, t):
        # DiT feeds the original integer timesteps; no rescaling to [0, 1000).
        return t
