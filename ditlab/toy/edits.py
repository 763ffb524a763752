"""Interventions on one channel of a trained toy DiT (intervene.py): what does the outlier channel carry?

At a chosen place (a block's output, which the rest of the network sees, or a normalization layer's
input, which only that norm sees) one channel is replaced, for every token, by
  mean   its mean over tokens, probe draws and the probe's timesteps (a constant: if the channel acts
         as a bias, nothing changes; Sun et al. 2024's test of massive activations);
  zero   0 (a constant that is not the channel's own);
  per-t  its mean over tokens and probe draws at the current timestep (keeps what it says about t,
         drops what it says about the particular input);
and the model is measured again: the per-timestep eps error of the probe (ditlab.toy.probe) and the
error of samples drawn from fixed noise (ditlab.toy.evals.draw_samples). The channel is the one the
probe calls the outlier at that place: the largest RMS over tokens and probe timesteps of the
draw-averaged input (probe.signal_and_outlier's outlier_channel, pooled over t).
"""

import math
import time

import torch

from ditlab.errors import InputError
from ditlab.toy.evals import draw_samples
from ditlab.toy.probe import PROBE_SEED, TIMESTEP_GRID, norm_layers, timestep_batch, timestep_errors
from ditlab.toy.task import TOY_CHANNELS, TOY_IMAGE_SIZE, sample_error

EDITS = ("mean", "zero", "per-t")


def check_toy_model(model, name):
    """Raise InputError unless `model` takes the toy task's inputs (TOY_CHANNELS x TOY_IMAGE_SIZE^2): the
    edits probe and sample toy images, so an image model (train.py's) cannot be measured."""
    if (model.in_channels, model.input_size) != (TOY_CHANNELS, TOY_IMAGE_SIZE):
        raise InputError(
            f"{name} is an image model ({model.in_channels} channels, {model.input_size}x{model.input_size}), "
            f"not a toy model ({TOY_CHANNELS} channels, {TOY_IMAGE_SIZE}x{TOY_IMAGE_SIZE}): give a train_toy.py "
            f"run directory or checkpoint (make one with `python train_toy.py` or `make toy`)")


def places(model):
    """(name, module, where) of every place an edit can go, in forward order: "block.<i>" (the block's
    output, where="output") and every normalization layer's input (where="input", probe.norm_layers' names)."""
    norms = dict(norm_layers(model))
    out = []
    for i, block in enumerate(model.blocks):
        out += [(f"block.{i}.norm1", norms[f"block.{i}.norm1"], "input"),
                (f"block.{i}.norm2", norms[f"block.{i}.norm2"], "input"), (f"block.{i}", block, "output")]
    return out + [("final.norm", norms["final.norm"], "input")]


class Hooks:
    """Forward hooks on a model that see (and may replace) the tensor at every place, with the current
    timesteps of the call at hand. `fn(name, h, t)` returns the replacement or None."""

    def __init__(self, model, fn, names=None):
        self.t = None
        self.handles = [model.register_forward_pre_hook(self._grab_t)]
        for name, module, where in places(model):
            if names is None or name in names:
                if where == "input":
                    self.handles.append(module.register_forward_pre_hook(self._pre(name, fn)))
                else:
                    self.handles.append(module.register_forward_hook(self._post(name, fn)))

    def _grab_t(self, module, args):
        self.t = args[1]

    def _pre(self, name, fn):
        def hook(module, args):
            new = fn(name, args[0], self.t)
            return None if new is None else (new, *args[1:])
        return hook

    def _post(self, name, fn):
        def hook(module, args, output):
            return fn(name, output, self.t)
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def channel_statistics(model, diffusion, num=64, seed=PROBE_SEED, chunk=100):
    """Per place, from the probe batch (x0 = 0, fixed noise) at every timestep 0..T-1: the draw- and
    token-mean of every channel per timestep (T, D), and the outlier channel (largest RMS over tokens
    and the probe's TIMESTEP_GRID of the draw-averaged input). Returns {name: dict(channel, per_t (T,)
    means of that channel, mean (over the grid timesteps), rms_share (its share of the draw mean's RMS))}."""
    timesteps = list(range(diffusion.num_timesteps))
    draw_mean = {}  # name -> (T, tokens, D) mean over draws

    def record(name, h, t):
        per_t = h.double().reshape(-1, num, *h.shape[1:]).mean(1)  # timestep-major batch
        draw_mean.setdefault(name, []).append(per_t)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with Hooks(model, record):
            for i in range(0, len(timesteps), chunk):
                x_t, t, _ = timestep_batch(diffusion, timesteps[i:i + chunk], num, seed)
                model(x_t.to(device), t.to(device), torch.zeros(len(t), dtype=torch.long, device=device))
    finally:
        model.train(was_training)
    grid = list(TIMESTEP_GRID)
    stats = {}
    for name, parts in draw_mean.items():
        m = torch.cat(parts).cpu()  # (T, tokens, D)
        rms = m[grid].square().mean(dim=(0, 1)).sqrt()
        c = int(rms.argmax())
        per_t = m[:, :, c].mean(1)
        stats[name] = dict(channel=c, per_t=per_t, mean=float(per_t[grid].mean()),
                           rms_share=float(rms[c] / rms.square().sum().sqrt()))
    return stats


def edit_fn(place, channel, edit, per_t=None, value=None):
    """The hook function of one edit: channel `channel` at `place` replaced by `value` (mean), 0 (zero),
    or per_t[t] for each sample's timestep (per-t)."""
    def fn(name, h, t):
        if name != place:
            return None
        h = h.clone()
        if edit == "zero":
            h[..., channel] = 0.0
        elif edit == "mean":
            h[..., channel] = value
        else:
            h[..., channel] = per_t.to(h.device, h.dtype)[t].view(-1, *([1] * (h.dim() - 2)))
        return h
    return fn


@torch.no_grad()
def measure(model, diffusion, sampler_diffusion, fn=None, probe_samples=256, num_samples=256, seed=0):
    """(per-t probe error rows, sample error dict) of the model with the edit `fn` in place (None: as it is)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with Hooks(model, fn or (lambda *a: None)):
            x_t, t, target = timestep_batch(diffusion, TIMESTEP_GRID, probe_samples)
            y = torch.zeros(len(t), dtype=torch.long, device=device)
            rows = timestep_errors(model(x_t.to(device), t.to(device), y).cpu(), x_t, t, target, diffusion)
            samples = draw_samples(model, sampler_diffusion, num_samples, seed, device).cpu()
    finally:
        model.train(was_training)
    return rows, sample_error(samples)


def _duration(seconds):
    """A duration for a progress line: seconds under two minutes, else minutes."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class Progress:
    """A progress callback for `intervene`: progress(done, total, label) prints "<prefix> <label> (done/total,
    <elapsed> so far, about <left> to go)" at most every `every` seconds, so a run shorter than that prints
    nothing and a long one a line every `every` seconds. The clock starts when it is made."""

    def __init__(self, prefix="", every=10.0, clock=time.monotonic, echo=print):
        self.prefix, self.every, self.clock, self.echo = prefix, every, clock, echo
        self.started = self.last = clock()

    def __call__(self, done, total, label):
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.started
        left = elapsed / max(done, 1) * (total - done)
        self.echo(f"{self.prefix}{label} ({done}/{total}, {_duration(elapsed)} so far, about {_duration(left)} to go)")


def intervene(model, diffusion, sampler_diffusion, place_names=None, edits=EDITS, probe_samples=256, num_samples=256,
              seed=0, stats=None, progress=None):
    """Every edit at every place (default: all places): {"baseline": {...}, "places": {name: {"channel",
    "mean", "rms_share", edit: {"per_t": {t: eps_rel_error}, "ratio_per_t": {t: ratio to baseline},
    "sample_rms", "sample_ratio"}}}}. `progress(done, total, label)` (e.g. a Progress) is called after each
    measurement (the unedited one, then every place and edit)."""
    stats = stats or channel_statistics(model, diffusion)
    chosen = [name for name, _, _ in places(model) if place_names is None or name in place_names]
    total, done = 1 + len(chosen) * len(edits), 1
    base_rows, base_sample = measure(model, diffusion, sampler_diffusion, None, probe_samples, num_samples, seed)
    if progress:
        progress(done, total, "unedited")
    base = {r["t"]: r["eps_rel_error"] for r in base_rows}
    result = dict(baseline=dict(per_t=base, sample_rms=base_sample["rms"]), places={})
    for name in chosen:
        s = stats[name]
        entry = dict(channel=s["channel"], channel_mean=s["mean"], rms_share=s["rms_share"])  # "mean" names an edit
        for edit in edits:
            fn = edit_fn(name, s["channel"], edit, per_t=s["per_t"], value=s["mean"])
            rows, sample = measure(model, diffusion, sampler_diffusion, fn, probe_samples, num_samples, seed)
            done += 1
            if progress:
                progress(done, total, f"place {name}, edit {edit}")
            per_t = {r["t"]: r["eps_rel_error"] for r in rows}
            entry[edit] = dict(per_t=per_t, ratio_per_t={t: per_t[t] / base[t] for t in per_t},
                               sample_rms=sample["rms"], sample_ratio=sample["rms"] / base_sample["rms"])
        result["places"][name] = entry
    return result


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def markdown(label, result, timesteps=(0, 10, 100, 999)):
    """One table per model: every place and edit, the sampled error and the probe error relative to the
    unedited model (1 = no change)."""
    base = result["baseline"]
    lines = [f"### {label}", "",
             f"Unedited: sampled RMS {base['sample_rms']:.3e}; probe eps error "
             + ", ".join(f"t={t}: {base['per_t'][t]:.2e}" for t in timesteps if t in base["per_t"]) + ".", "",
             "| place | channel (RMS share) | edit | sampled RMS / unedited | "
             + " | ".join(f"eps t={t}" for t in timesteps) + " | eps geo-mean t>=10 |",
             "|---|---|---|---:|" + "---:|" * (len(timesteps) + 1)]
    for name, entry in result["places"].items():
        for edit in EDITS:
            if edit not in entry:
                continue
            e = entry[edit]
            cells = " | ".join(f"{e['ratio_per_t'][t]:.3g}" for t in timesteps if t in e["ratio_per_t"])
            late = geomean(r for t, r in e["ratio_per_t"].items() if t >= 10)
            lines.append(f"| {name} | {entry['channel']} ({entry['rms_share']:.2f}) | {edit} | {e['sample_ratio']:.3g} | "
                         f"{cells} | {late:.3g} |")
    return lines + [""]
