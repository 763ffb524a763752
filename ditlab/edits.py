"""Interventions on one channel of a trained DiT, toy or image model (intervene.py, the mechanism and bridge
studies): what does the outlier channel carry?

At a chosen place (a block's output, which the rest of the network sees, or a normalization layer's
input, which only that norm sees) one channel is replaced, for every token, by
  mean   its mean over tokens, probe inputs and the probe's timesteps (a constant: if the channel acts
         as a bias, nothing changes; Sun et al. 2024's test of massive activations);
  zero   0 (a constant that is not the channel's own);
  per-t  its mean over tokens and probe inputs at the current timestep (keeps what it says about t,
         drops what it says about the particular input);
and the model is measured again: the per-timestep eps and x0 errors of the probe (ditlab.probe) on its
data (the toy's all-zero draws by default, or real images: probe.image_data) and, where a sampling
function is given (or, for the toy, a sampler), the quality of samples drawn under the edit. The channel
is the one the probe calls the outlier at that place: the largest RMS over tokens and probe timesteps of
the input-averaged activations (probe.signal_and_outlier's outlier_channel, pooled over t). The control
is a channel of ordinary size at the same place (the median RMS), edited the same way.
"""

import math
import time

import torch

from ditlab.probe import LEVEL, PROBE_SEED, TIMESTEP_GRID, norm_layers, timestep_batch, timestep_errors, toy_data
from ditlab.toy.evals import draw_samples
from ditlab.toy.task import sample_error

EDITS = ("mean", "zero", "per-t")


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
def channel_statistics(model, diffusion, num=64, seed=PROBE_SEED, chunk=100, data=None):
    """Per place, from the probe batch of `data` (a probe.ProbeData; default the toy's `num` all-zero draws)
    at every timestep 0..T-1: the input- and token-mean of every channel per timestep (T, D), and the outlier
    channel (largest RMS over tokens and the probe's TIMESTEP_GRID of the input-averaged activations).
    Returns {name: dict(channel, per_t (T,) means of that channel, mean (over the grid timesteps), rms_share
    (its share of the input mean's RMS), and the same for `control`, the channel of median RMS)}."""
    data = data if data is not None else toy_data(num, seed)
    timesteps = list(range(diffusion.num_timesteps))
    draw_mean = {}  # name -> (T, tokens, D) mean over the probe inputs

    def record(name, h, t):
        per_t = h.double().reshape(-1, len(data), *h.shape[1:]).mean(1)  # timestep-major batch
        draw_mean.setdefault(name, []).append(per_t)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with Hooks(model, record):
            for i in range(0, len(timesteps), chunk):
                steps = timesteps[i:i + chunk]
                x_t, t, _ = timestep_batch(diffusion, steps, data)
                model(x_t.to(device), t.to(device), data.y.repeat(len(steps)).to(device))
    finally:
        model.train(was_training)
    grid = list(TIMESTEP_GRID)
    stats = {}
    for name, parts in draw_mean.items():
        m = torch.cat(parts).cpu()  # (T, tokens, D)
        rms = m[grid].square().mean(dim=(0, 1)).sqrt()
        total = rms.square().sum().sqrt()

        def channel(c):
            per_t = m[:, :, c].mean(1)
            return dict(channel=c, per_t=per_t, mean=float(per_t[grid].mean()), rms_share=float(rms[c] / total))

        order = rms.argsort()
        stats[name] = dict(channel(int(order[-1])), control=channel(int(order[len(order) // 2])))
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


def toy_sampler(sampler_diffusion, num_samples=256, seed=0):
    """The toy's sampling function for `intervene`: the error of `num_samples` samples from fixed noise."""
    def sample(model):
        device = next(model.parameters()).device
        return sample_error(draw_samples(model, sampler_diffusion, num_samples, seed, device).cpu())
    return sample


@torch.no_grad()
def measure(model, diffusion, fn=None, data=None, sample_fn=None):
    """(per-t probe error rows, sample metrics or None) of the model with the edit `fn` in place (None: as
    it is), on the probe `data` (default: the toy's 256 all-zero draws); `sample_fn(model)` -> metrics."""
    data = data if data is not None else toy_data(256)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with Hooks(model, fn or (lambda *a: None)):
            x_t, t, target = timestep_batch(diffusion, TIMESTEP_GRID, data)
            y = data.y.repeat(len(TIMESTEP_GRID)).to(device)
            rows = timestep_errors(model(x_t.to(device), t.to(device), y).cpu(), x_t, t, target, diffusion, data)
            sample = sample_fn(model) if sample_fn else None
    finally:
        model.train(was_training)
    return rows, sample


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


def intervene(model, diffusion, sampler_diffusion=None, place_names=None, edits=EDITS, probe_samples=256,
              num_samples=256, seed=0, stats=None, progress=None, data=None, sample_fn=None, sample_places=None,
              sample_key="rms", control=False, sample_top=0):
    """Every edit at every place (default: all places), on the probe `data` (default: the toy's
    `probe_samples` all-zero draws). Samples are drawn under an edit at `sample_places` (default: every
    place) with `sample_fn(model)` -> metrics (default for the toy: toy_sampler(sampler_diffusion); none
    without either); `sample_key` is the metric whose ratio to the unedited model is `sample_ratio`. With
    `control`, the channel of median size at each place is edited the same way (no samples). With
    `sample_top` K, samples are also drawn under the edits of the K places not in `sample_places` whose edits
    move the probe's error most (the largest geometric-mean ratio over t >= 10 of any edit), leaving out a
    place whose edits give exactly a sampled place's errors (the same tensor under another name).

    Returns {"baseline": {"per_t", "x0_per_t", "sample", "sample_rms"}, "places": {name: {"channel",
    "channel_mean", "rms_share", edit: {"per_t": {t: eps_rel_error}, "ratio_per_t": {t: ratio to baseline},
    "x0_per_t": {t: x0 error in 8-bit levels}, and where sampled "sample", "sample_rms", "sample_ratio"},
    "control": {"channel", "rms_share", edit: {...}}}}}. `progress(done, total, label)` (e.g. a Progress)
    is called after each measurement (the unedited one, then every place and edit)."""
    stats = stats or channel_statistics(model, diffusion, data=None if data is None else data.subset(64))
    data = data if data is not None else toy_data(probe_samples)
    if sample_fn is None and sampler_diffusion is not None:
        sample_fn = toy_sampler(sampler_diffusion, num_samples, seed)
    chosen = [name for name, _, _ in places(model) if place_names is None or name in place_names]
    total, done = 1 + len(chosen) * len(edits) * (2 if control else 1), 1
    base_rows, base_sample = measure(model, diffusion, None, data, sample_fn)
    if progress:
        progress(done, total, "unedited")
    base = {r["t"]: r["eps_rel_error"] for r in base_rows}
    result = dict(baseline=dict(per_t=base, x0_per_t={r["t"]: r["x0_rmse"] / LEVEL for r in base_rows}),
                  places={})
    if base_sample is not None:
        result["baseline"].update(sample=base_sample, sample_rms=base_sample.get("rms"))

    def edited(name, s, edit, sampled):
        fn = edit_fn(name, s["channel"], edit, per_t=s["per_t"], value=s["mean"])
        rows, sample = measure(model, diffusion, fn, data, sample_fn if sampled else None)
        per_t = {r["t"]: r["eps_rel_error"] for r in rows}
        out = dict(per_t=per_t, ratio_per_t={t: per_t[t] / base[t] for t in per_t},
                   x0_per_t={r["t"]: r["x0_rmse"] / LEVEL for r in rows})
        if sample is not None:
            out.update(sample=sample, sample_rms=sample.get("rms"),
                       sample_ratio=sample[sample_key] / base_sample[sample_key])
        return out

    for name in chosen:
        s = stats[name]
        sampled = sample_fn is not None and (sample_places is None or name in sample_places)
        entry = dict(channel=s["channel"], channel_mean=s["mean"], rms_share=s["rms_share"])  # "mean" names an edit
        for edit in edits:
            entry[edit] = edited(name, s, edit, sampled)
            done += 1
            if progress:
                progress(done, total, f"place {name}, edit {edit}")
        if control:
            c = s["control"]
            entry["control"] = dict(channel=c["channel"], channel_mean=c["mean"], rms_share=c["rms_share"])
            for edit in edits:
                entry["control"][edit] = edited(name, c, edit, False)
                done += 1
                if progress:
                    progress(done, total, f"place {name}, control channel, edit {edit}")
        result["places"][name] = entry
    if sample_fn is not None and sample_top and sample_places is not None:
        def moved(name):
            ratios = result["places"][name]
            return max(abs(math.log(geomean(r for t, r in ratios[e]["ratio_per_t"].items() if t >= 10))) for e in edits)
        def same_as_sampled(name):  # e.g. the last block's output is the final norm's input: one tensor
            return any(all(result["places"][name][e]["per_t"] == result["places"][p][e]["per_t"] for e in edits)
                       for p in sample_places if p in result["places"])
        others = [n for n in chosen if n not in sample_places and not same_as_sampled(n)]
        for name in sorted(others, key=moved, reverse=True)[:sample_top]:
            s, entry = stats[name], result["places"][name]
            for edit in edits:
                entry[edit] = dict(edited(name, s, edit, True), sampled_because="moved most")
                if progress:
                    progress(done, total, f"place {name}, edit {edit}, samples")
    return result


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def markdown(label, result, timesteps=(0, 10, 100, 999)):
    """One table per model: every place and edit (and the control channel's, where measured), the samples'
    metric and the probe's eps error relative to the unedited model (1 = no change; "-" where no samples
    were drawn under the edit)."""
    base = result["baseline"]
    sampled = f"sampled RMS {base['sample_rms']:.3e}; " if base.get("sample_rms") is not None else ""
    lines = [f"### {label}", "",
             f"Unedited: {sampled}probe eps error "
             + ", ".join(f"t={t}: {base['per_t'][t]:.2e}" for t in timesteps if t in base["per_t"]) + ".", "",
             "| place | channel (RMS share) | edit | samples / unedited | "
             + " | ".join(f"eps t={t}" for t in timesteps) + " | eps geo-mean t>=10 |",
             "|---|---|---|---:|" + "---:|" * (len(timesteps) + 1)]
    for name, entry in result["places"].items():
        for which, e_all in (("", entry), (" (control)", entry.get("control"))):
            for edit in EDITS if e_all else ():
                if edit not in e_all:
                    continue
                e = e_all[edit]
                cells = " | ".join(f"{e['ratio_per_t'][t]:.3g}" for t in timesteps if t in e["ratio_per_t"])
                late = geomean(r for t, r in e["ratio_per_t"].items() if t >= 10)
                ratio = f"{e['sample_ratio']:.3g}" if "sample_ratio" in e else "-"
                lines.append(f"| {name}{which} | {e_all['channel']} ({e_all['rms_share']:.2f}) | {edit} | {ratio} | "
                             f"{cells} | {late:.3g} |")
    return lines + [""]
