"""Gaussian diffusion process (DDPM / improved-DDPM / DDIM) used by DiT.

The public API (class, method and argument names) follows the reference
DiT / improved-diffusion code so existing sampling and training scripts run
unchanged. All noise-schedule arithmetic is done once, in float64 numpy, and
per-timestep coefficients are gathered into float32 tensors on demand.
"""

import enum
import math

import numpy as np
import torch as th

from .diffusion_utils import discretized_gaussian_log_likelihood, mean_flat, normal_kl


class ModelMeanType(enum.Enum):
    """Which quantity the network predicts for the reverse-process mean."""

    PREVIOUS_X = enum.auto()  # x_{t-1} directly
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise that was added


class ModelVarType(enum.Enum):
    """How the reverse-process variance is obtained.

    LEARNED_RANGE has the network output a value v in roughly [-1, 1] that
    interpolates (in log space) between the two fixed choices below.
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()  # posterior variance beta_tilde_t
    FIXED_LARGE = enum.auto()  # beta_t
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # plain MSE (plus the VB term when the variance is learned)
    RESCALED_MSE = enum.auto()  # VB term scaled by num_timesteps / 1000
    KL = enum.auto()  # variational lower bound only
    RESCALED_KL = enum.auto()  # VB scaled by num_timesteps, comparable to MSE

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


# ---------------------------------------------------------------------------
# Beta schedules
# ---------------------------------------------------------------------------

def _warmup_beta(beta_start, beta_end, num_diffusion_timesteps, warmup_frac):
    """Constant beta_end with a linear ramp from beta_start over the first part."""
    betas = beta_end * np.ones(num_diffusion_timesteps, dtype=np.float64)
    warmup_time = int(num_diffusion_timesteps * warmup_frac)
    betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
    return betas


def get_beta_schedule(beta_schedule, *, beta_start, beta_end, num_diffusion_timesteps):
    """Beta schedules parameterised by explicit start/end values (float64)."""
    T = num_diffusion_timesteps
    if beta_schedule == "quad":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif beta_schedule == "warmup10":
        betas = _warmup_beta(beta_start, beta_end, T, 0.1)
    elif beta_schedule == "warmup50":
        betas = _warmup_beta(beta_start, beta_end, T, 0.5)
    elif beta_schedule == "const":
        betas = beta_end * np.ones(T, dtype=np.float64)
    elif beta_schedule == "jsd":  # 1/T, 1/(T-1), ..., 1
        betas = 1.0 / np.linspace(T, 1, T, dtype=np.float64)
    else:
        raise NotImplementedError(f"unknown beta schedule: {beta_schedule!r}")
    assert betas.shape == (T,)
    return betas


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Discretise a continuous alpha_bar(t), t in [0, 1], into T betas.

    beta_i = 1 - alpha_bar((i+1)/T) / alpha_bar(i/T), capped at `max_beta` to
    avoid a singular final step.
    """
    T = num_diffusion_timesteps
    betas = [min(1.0 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return np.array(betas, dtype=np.float64)


_NAMED_SCHEDULES = ("linear", "cosine", "squaredcos_cap_v2")


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """Return a float64 beta schedule by name ("linear", "cosine" or "squaredcos_cap_v2").

    The linear schedule is the DDPM one (1e-4 .. 0.02 for 1000 steps), with
    both ends scaled by 1000 / T so other step counts give a comparable
    process. The cosine schedule is the improved-DDPM one; "squaredcos_cap_v2"
    is the reference DiT code's (and diffusers') name for it.
    """
    if num_diffusion_timesteps < 1:
        raise ValueError(f"num_diffusion_timesteps must be >= 1, got {num_diffusion_timesteps}")
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return get_beta_schedule(
            "linear",
            beta_start=scale * 0.0001,
            beta_end=scale * 0.02,
            num_diffusion_timesteps=num_diffusion_timesteps,
        )
    if schedule_name in ("cosine", "squaredcos_cap_v2"):
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(
        f"unknown beta schedule {schedule_name!r}; choose one of {', '.join(_NAMED_SCHEDULES)}"
    )


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

_DEVICE_TABLES = {}  # (float64 bytes of a schedule table, device) -> the table as float32 on that device


def _device_table(arr, device):
    """A schedule table as a float32 tensor on `device`, copied there once and then reused.

    Indexing a table that already lives on the GPU needs no host-device copy, so a training step or a
    sampling step makes no hidden synchronization here. The float32 cast happens on the CPU (some
    backends, e.g. MPS, lack float64); casting before or after indexing gives the same values.
    """
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    key = (arr.tobytes(), str(device))
    table = _DEVICE_TABLES.get(key)
    if table is None:
        if len(_DEVICE_TABLES) > 512:  # many schedules (respacings) in one process: start over
            _DEVICE_TABLES.clear()
        table = _DEVICE_TABLES[key] = th.from_numpy(arr).to(th.float32).to(device)
    return table


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """Gather arr[timesteps] as float32 on the timesteps' device, broadcast to shape.

    :param arr: 1-D numpy array indexed by timestep.
    :param timesteps: integer tensor of shape [batch].
    :param broadcast_shape: target shape whose first dim is the batch.
    """
    values = _device_table(arr, timesteps.device)[timesteps.detach().long()]
    values = values.view(-1, *([1] * (len(broadcast_shape) - 1)))
    return values.expand(broadcast_shape)


def _infer_device(model):
    """Device of a model's parameters; also understands bound methods of modules."""
    module = model if isinstance(model, th.nn.Module) else getattr(model, "__self__", None)
    if isinstance(module, th.nn.Module):
        param = next(module.parameters(), None)
        if param is not None:
            return param.device
    return th.device("cpu")


def _progress(iterable, enabled):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm  # lazy: only needed when progress is requested

    return tqdm(iterable, desc="sampling")


def _nonzero_mask(t, x):
    """1.0 where t != 0 and 0.0 at the final step, shaped to broadcast over x."""
    return (t != 0).float().view(-1, *([1] * (x.dim() - 1)))


# ---------------------------------------------------------------------------
# The diffusion process
# ---------------------------------------------------------------------------

class GaussianDiffusion:
    """Utilities for training and sampling diffusion models.

    :param betas: 1-D float64 array of per-step noise variances, in (0, 1].
    :param model_mean_type: a ModelMeanType.
    :param model_var_type: a ModelVarType.
    :param loss_type: a LossType.
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError("betas must be a non-empty 1-D array")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # Forward process q(x_t | x_0).
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # Posterior q(x_{t-1} | x_t, x_0).
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # The posterior variance is 0 at t=0, so its log is clipped by reusing
        # the t=1 value there. With a single step there is no t=1; fall back
        # to log(beta_0), which makes learned-range interpolation a no-op.
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
            )
        else:
            self.posterior_log_variance_clipped = np.log(betas.copy())
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

    # -- forward process ----------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) for a batch of (possibly different) timesteps."""
        if noise is None:
            noise = th.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        assert x_start.shape == x_t.shape
        mean = (
            _extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_variance = _extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # -- reverse process ----------------------------------------------------

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Run the model and turn its output into p(x_{t-1} | x_t) parameters.

        :param model: callable model(x, t, **model_kwargs). It may return a
            (output, extra) tuple; `extra` is passed through untouched.
        :param clip_denoised: clamp the predicted x_0 to [-1, 1].
        :param denoised_fn: optional function applied to the predicted x_0
            before clipping.
        :return: dict with 'mean', 'variance', 'log_variance', 'pred_xstart'
            and 'extra'.
        """
        if model_kwargs is None:
            model_kwargs = {}
        B, C = x.shape[:2]
        assert t.shape == (B,), f"expected timesteps of shape ({B},), got {tuple(t.shape)}"
        model_output = model(x, t, **model_kwargs)
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            expected = (B, C * 2, *x.shape[2:])
            assert model_output.shape == expected, (
                f"learned variance needs {expected} model output, got {tuple(model_output.shape)}"
            )
            model_output, var_values = th.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = var_values
            else:
                min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
                max_log = _extract_into_tensor(np.log(self.betas), t, x.shape)
                frac = (var_values + 1) / 2  # v in [-1, 1] -> [0, 1]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = th.exp(model_log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                # beta_t, except at t=0 where the (nonzero) posterior variance
                # of t=1 keeps the decoder likelihood well defined.
                if self.num_timesteps > 1:
                    variance = np.append(self.posterior_variance[1], self.betas[1:])
                else:
                    variance = self.betas
                log_variance = np.log(variance)
            else:
                variance = self.posterior_variance
                log_variance = self.posterior_log_variance_clipped
            model_variance = _extract_into_tensor(variance, t, x.shape)
            model_log_variance = _extract_into_tensor(log_variance, t, x.shape)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            if clip_denoised:
                return x0.clamp(-1, 1)
            return x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
            model_mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)

        assert model_mean.shape == model_log_variance.shape == pred_xstart.shape == x.shape
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "extra": extra,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        """Invert q_sample: x_0 = x_t / sqrt(acp) - sqrt(1/acp - 1) * eps."""
        assert x_t.shape == eps.shape
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        """Invert the posterior mean: x_0 = (x_{t-1} - coef2 * x_t) / coef1."""
        assert x_t.shape == xprev.shape
        return (
            _extract_into_tensor(1.0 / self.posterior_mean_coef1, t, x_t.shape) * xprev
            - _extract_into_tensor(self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t.shape)
            * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """The noise implied by x_t and a predicted x_0."""
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    # -- guidance -----------------------------------------------------------

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the mean by variance * grad log p(y | x) (Sohl-Dickstein et al.).

        `cond_fn(x, t, **model_kwargs)` must return that gradient.
        """
        if model_kwargs is None:
            model_kwargs = {}
        gradient = cond_fn(x, t, **model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Score-based guidance (Song et al. 2020), as used for DDIM sampling.

        The predicted noise is shifted by -sqrt(1 - acp) * grad log p(y | x),
        then x_0 and the mean are recomputed from it.
        """
        if model_kwargs is None:
            model_kwargs = {}
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, t, **model_kwargs)
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    # -- ancestral (DDPM) sampling -----------------------------------------

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                 step_noise=None):
        """Draw x_{t-1} from the model. No noise is added at t == 0.

        step_noise (an addition to the reference's signature): a function x -> this step's noise, shaped
        like x; None draws it from the global RNG (th.randn_like(x)), as the reference does.
        :return: dict with 'sample' and 'pred_xstart'.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        noise = th.randn_like(x) if step_noise is None else step_noise(x)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + _nonzero_mask(t, x) * th.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        step_noise=None,
    ):
        """Generate samples of the given shape; returns the final x_0 batch. step_noise: see p_sample."""
        final = None
        for final in self.p_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            step_noise=step_noise,
        ):
            pass
        return final["sample"]

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        step_noise=None,
    ):
        """Like p_sample_loop, but yield each step's p_sample dict (T down to 0)."""
        if device is None:
            device = _infer_device(model)
        assert isinstance(shape, (tuple, list))
        img = noise if noise is not None else th.randn(*shape, device=device)
        for i in _progress(list(range(self.num_timesteps))[::-1], progress):
            t = th.full((shape[0],), i, device=device, dtype=th.long)
            with th.no_grad():
                out = self.p_sample(
                    model,
                    img,
                    t,
                    clip_denoised=clip_denoised,
                    denoised_fn=denoised_fn,
                    cond_fn=cond_fn,
                    model_kwargs=model_kwargs,
                    step_noise=step_noise,
                )
            yield out
            img = out["sample"]

    # -- DDIM sampling -------------------------------------------------------

    def ddim_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        eta=0.0,
    ):
        """One DDIM step x_t -> x_{t-1}; eta=0 is deterministic, eta=1 is DDPM-like."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)

        # Re-derive eps from the (possibly clipped) x_0 prediction.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract_into_tensor(self.alphas_cumprod_prev, t, x.shape)
        sigma = (
            eta
            * th.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * th.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        noise = th.randn_like(x)
        mean_pred = (
            out["pred_xstart"] * th.sqrt(alpha_bar_prev)
            + th.sqrt((1 - alpha_bar_prev - sigma ** 2).clamp(min=0.0)) * eps
        )
        sample = mean_pred + _nonzero_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        eta=0.0,
    ):
        """Deterministic DDIM step in the noising direction, x_t -> x_{t+1}."""
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample is only defined for eta == 0")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = _extract_into_tensor(self.alphas_cumprod_next, t, x.shape)
        mean_pred = out["pred_xstart"] * th.sqrt(alpha_bar_next) + th.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
    ):
        """Generate samples with DDIM; returns the final x_0 batch."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            eta=eta,
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
    ):
        """Like ddim_sample_loop, but yield each step's ddim_sample dict."""
        if device is None:
            device = _infer_device(model)
        assert isinstance(shape, (tuple, list))
        img = noise if noise is not None else th.randn(*shape, device=device)
        for i in _progress(list(range(self.num_timesteps))[::-1], progress):
            t = th.full((shape[0],), i, device=device, dtype=th.long)
            with th.no_grad():
                out = self.ddim_sample(
                    model,
                    img,
                    t,
                    clip_denoised=clip_denoised,
                    denoised_fn=denoised_fn,
                    cond_fn=cond_fn,
                    model_kwargs=model_kwargs,
                    eta=eta,
                )
            yield out
            img = out["sample"]

    # -- likelihood terms and training --------------------------------------

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of the variational bound, in bits per dimension.

        For t > 0 this is KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)); at t == 0
        it is the discretised-Gaussian decoder NLL of x_0.

        :return: dict with 'output' (shape [batch]) and 'pred_xstart'.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)

        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)

        output = th.where(t == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample training losses for a batch at timesteps t.

        :return: dict of [batch] tensors; always 'loss', plus 'mse' and (with a
            learned variance) 'vb' for the MSE loss types.
        """
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = th.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model=model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
        elif self.loss_type in (LossType.MSE, LossType.RESCALED_MSE):
            model_output = model(x_t, t, **model_kwargs)
            if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
                B, C = x_t.shape[:2]
                assert model_output.shape == (B, C * 2, *x_t.shape[2:])
                model_output, var_values = th.split(model_output, C, dim=1)
                # The VB term trains only the variance: the mean is detached so
                # the MSE alone drives the mean prediction.
                frozen_out = th.cat([model_output.detach(), var_values], dim=1)
                terms["vb"] = self._vb_terms_bpd(
                    model=lambda *args, **kwargs: frozen_out,
                    x_start=x_start,
                    x_t=x_t,
                    t=t,
                    clip_denoised=False,
                )["output"]
                if self.loss_type == LossType.RESCALED_MSE:
                    # Keep the VB term's weight comparable to the original
                    # 1000-step setup (the bound sums over num_timesteps terms).
                    terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

            if self.model_mean_type == ModelMeanType.PREVIOUS_X:
                target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
            elif self.model_mean_type == ModelMeanType.START_X:
                target = x_start
            else:
                target = noise
            assert model_output.shape == target.shape == x_start.shape
            terms["mse"] = mean_flat((target - model_output) ** 2)
            terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        else:
            raise NotImplementedError(self.loss_type)
        return terms

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dim; constant w.r.t. the model."""
        batch_size = x_start.shape[0]
        t = th.full((batch_size,), self.num_timesteps - 1, device=x_start.device, dtype=th.long)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / math.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None):
        """Full variational bound in bits per dim, plus per-step diagnostics.

        :return: dict with 'total_bpd' and 'prior_bpd' ([batch]) and 'vb',
            'xstart_mse', 'mse' ([batch, num_timesteps]).
        """
        device = x_start.device
        batch_size = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for step in list(range(self.num_timesteps))[::-1]:
            t_batch = th.full((batch_size,), step, device=device, dtype=th.long)
            noise = th.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noise)
            with th.no_grad():
                out = self._vb_terms_bpd(
                    model,
                    x_start=x_start,
                    x_t=x_t,
                    t=t_batch,
                    clip_denoised=clip_denoised,
                    model_kwargs=model_kwargs,
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))

        vb = th.stack(vb, dim=1)
        xstart_mse = th.stack(xstart_mse, dim=1)
        mse = th.stack(mse, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        total_bpd = vb.sum(dim=1) + prior_bpd
        return {
            "total_bpd": total_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": xstart_mse,
            "mse": mse,
        }
