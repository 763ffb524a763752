"""Outlier statistics of token embeddings (massive activations) and their plots."""

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# Massive activations (Sun et al., 2024, "Massive Activations in Large Language Models"): an entry is
# massive when |x| > MASSIVE_ABS and |x| > MASSIVE_RATIO * (median |x| over the whole captured tensor).
MASSIVE_ABS = 100.0
MASSIVE_RATIO = 1000.0
# Guards a division by a zero median (a token or tensor that is exactly zero almost everywhere).
EPS = 1e-12


#################################################################################
#                              Per-layer statistics                             #
#################################################################################


def as_tokens(x):
    """View any (..., D) tensor as a (tokens, D) matrix: every leading axis counts as tokens."""
    return x.reshape(-1, x.shape[-1])


def max_abs(x):
    """Largest |x| over every entry."""
    return x.abs().max().item()


def median_abs(x):
    """Lower median of |x| over every entry."""
    return x.abs().flatten().median().item()


def max_median_ratio(x, eps=EPS):
    """For each token, max |x| over channels divided by the (lower) median |x| over channels; the mean
    over tokens. About 3-4 for Gaussian-like tokens; large when one channel dwarfs the rest (He et
    al., 2024). The median is clamped at `eps` so an all-zero token does not divide by zero."""
    a = as_tokens(x).abs()
    ratio = a.max(dim=-1).values / a.median(dim=-1).values.clamp_min(eps)
    return ratio.mean().item()


def channel_rms(x):
    """s_j = sqrt(mean over tokens of x_j^2) for every channel j: a (D,) tensor."""
    return as_tokens(x).square().mean(dim=0).sqrt()


def kurtosis_of_rms(s):
    """mean(s^4) / mean(s^2)^2 of channel RMS values s: 1 when all channels are equally loud, up to D
    when a single channel carries everything (He et al., 2024)."""
    s2 = s.square()
    return (s2.square().mean() / s2.mean().square().clamp_min(EPS)).item()


def rms_kurtosis(x):
    """Kurtosis of the channel RMS of x (He et al., 2024): kurtosis_of_rms(channel_rms(x))."""
    return kurtosis_of_rms(channel_rms(x))


def massive_mask(x, abs_threshold=MASSIVE_ABS, ratio_threshold=MASSIVE_RATIO):
    """Boolean mask of the massive activations of x (Sun et al., 2024): entries with |x| above
    `abs_threshold` AND above `ratio_threshold` times the lower median of |x| over the whole tensor."""
    a = x.abs()
    return (a > abs_threshold) & (a > ratio_threshold * a.flatten().median())


def massive_summary(x, max_channels=16, **thresholds):
    """Massive activations of x: how many entries, how many tokens hold at least one, and the channels
    holding them (at most `max_channels`, the most frequent first)."""
    mask = as_tokens(massive_mask(x, **thresholds))
    per_channel = mask.sum(dim=0)
    order = torch.argsort(per_channel, descending=True, stable=True)
    channels = [int(c) for c in order[:max_channels] if per_channel[c] > 0]
    return {
        "massive_count": int(mask.sum()),
        "massive_tokens": int(mask.any(dim=-1).sum()),
        "massive_channels": channels,
    }


def top_channels(s, k=5):
    """The k channels with the largest channel RMS s, loudest first, as [[channel, rms], ...]."""
    values, index = torch.topk(s, min(k, s.numel()))
    return [[int(i), float(v)] for i, v in zip(index, values)]


def argmax_channels(x):
    """For each token, the channel holding its largest |x|: a (tokens,) long tensor."""
    return as_tokens(x).abs().argmax(dim=-1)


def argmax_counts(x):
    """How many tokens have their largest |x| in each channel: a (D,) long tensor summing to tokens."""
    return torch.bincount(argmax_channels(x), minlength=x.shape[-1])


def dominant_channel(counts):
    """The channel that most often holds a token's largest value, and the share of tokens (0-1) for
    which it does, from argmax counts (a (D,) tensor or array; several layers may be summed first)."""
    counts = torch.as_tensor(counts)
    total = int(counts.sum())
    channel = int(torch.argmax(counts))
    return channel, (int(counts[channel]) / total if total else 0.0)


def layer_stats(x, top_k=5):
    """Every per-layer statistic of one captured tensor, as JSON-ready numbers.

    x: (..., D) token embeddings. Reduced in float64 for accuracy. Returns (stats, rms, counts):
    stats a dict of plain numbers, rms the (D,) channel RMS and counts the (D,) argmax counts (both on
    the CPU, small) for the heatmap and the cross-layer consistency."""
    x = x.detach().double()
    rms = channel_rms(x)
    counts = argmax_counts(x)
    channel, share = dominant_channel(counts)
    stats = {
        "max_abs": max_abs(x),
        "median_abs": median_abs(x),
        "max_median_ratio": max_median_ratio(x),
        "rms_kurtosis": kurtosis_of_rms(rms),
        **massive_summary(x),
        "top_channels": top_channels(rms, top_k),
        "argmax_channel": channel,
        "argmax_share": share,
    }
    return stats, rms.float().cpu(), counts.cpu()


def pool_counts(counts_list):
    """Pool several layers' argmax counts: the dominant channel of their sum, the share of all pooled
    tokens it holds, and the fraction of the layers whose own dominant channel it is."""
    channel, share = dominant_channel(sum(torch.as_tensor(c) for c in counts_list))
    agree = sum(dominant_channel(c)[0] == channel for c in counts_list) / len(counts_list)
    return {"channel": channel, "share": share, "layers_agree": agree}


def summarize_channels(counts_by_timestep, layers=None):
    """How consistently one channel holds each token's largest value across tokens, layers, timesteps.

    counts_by_timestep: {timestep: {layer name: (D,) argmax counts}}. Only `layers` are used (default:
    the "block.*" tensors, where the study sees the outliers; "embed" and "final" are left out).
    For every timestep, and then over all timesteps together, pool_counts reports:
      channel: the channel that is most often a token's argmax, over all the layers' tokens pooled;
      share: the fraction of (token, layer) pairs whose argmax is that channel;
      layers_agree: the fraction of layers (layer-timestep pairs overall) whose own most frequent
        argmax channel is that channel.
    """
    summary = {"per_timestep": {}, "overall": None}
    everything = []
    for t, per_layer in counts_by_timestep.items():
        names = layers if layers is not None else [n for n in per_layer if n.startswith("block.")]
        if names:
            summary["per_timestep"][str(t)] = pool_counts([per_layer[n] for n in names])
            everything += [per_layer[n] for n in names]
    if everything:
        summary["overall"] = pool_counts(everything)
    return summary


#################################################################################
#                                   Capture                                     #
#################################################################################


class EmbeddingRecorder:
    """A `capture` callback for DiT.forward that reduces each tensor as the forward goes.

    For every captured name it stores `stats[name]` (layer_stats numbers), `channel_rms[name]` and
    `argmax_counts[name]` ((D,) CPU tensors). The full embedding vector is kept only for the tokens
    listed in `keep`: {name: (sample index, token index)} -> `vectors[name]`, a (D,) CPU tensor.
    Nothing holds on to the captured (N, T, D) tensors after the callback returns.
    """

    def __init__(self, keep=None, top_k=5):
        self.keep = dict(keep or {})
        self.top_k = top_k
        self.stats, self.channel_rms, self.argmax_counts, self.vectors = {}, {}, {}, {}

    def __call__(self, name, tokens):
        stats, rms, counts = layer_stats(tokens, self.top_k)
        self.stats[name] = stats
        self.channel_rms[name] = rms
        self.argmax_counts[name] = counts
        if name in self.keep:
            sample, token = self.keep[name]
            self.vectors[name] = tokens[sample, token].detach().float().cpu().clone()


def pick_tokens(names, num_samples, num_tokens, seed=0):
    """One random (sample, token) per captured name, reproducible from `seed` (the study's grid shows
    one random token per layer)."""
    g = torch.Generator().manual_seed(seed)
    samples = torch.randint(num_samples, (len(names),), generator=g)
    tokens = torch.randint(num_tokens, (len(names),), generator=g)
    return {name: (int(s), int(k)) for name, s, k in zip(names, samples, tokens)}


@torch.no_grad()
def capture_embeddings(model, x, t, y, keep=None, top_k=5):
    """Run model(x, t, y) once with an EmbeddingRecorder and return the recorder."""
    recorder = EmbeddingRecorder(keep, top_k)
    model(x, t, y, capture=recorder)
    return recorder


@dataclass
class ModelAnalysis:
    """Everything measured on one model. `stats` ({timestep: {name: numbers}}) and `summary` are what
    stats.json holds; the (D,) arrays are for the plots."""

    layers: list
    timesteps: list
    tokens: dict  # name -> (sample, token) whose vector is kept
    stats: dict = field(default_factory=dict)  # t -> name -> layer_stats numbers
    channel_rms: dict = field(default_factory=dict)  # t -> name -> (D,) array
    argmax_counts: dict = field(default_factory=dict)  # t -> name -> (D,) array
    vectors: dict = field(default_factory=dict)  # t -> name -> (D,) array
    summary: dict = field(default_factory=dict)

    def to_json(self):
        """The JSON-ready part: layer names, timesteps, kept token positions, stats and summary."""
        return {
            "layers": self.layers,
            "timesteps": self.timesteps,
            "grid_tokens": {name: list(pos) for name, pos in self.tokens.items()},
            "stats": {str(t): self.stats[t] for t in self.timesteps},
            "summary": self.summary,
        }


def model_device(model):
    """The device of the model's parameters."""
    return next(model.parameters()).device


@torch.no_grad()
def analyze_model(model, x0, y, timesteps, diffusion, seed=0, top_k=5):
    """Noise the clean batch x0 to each timestep with diffusion.q_sample (one noise draw from `seed`,
    shared by all timesteps), run the model with an EmbeddingRecorder and collect the results.

    x0: (N, C, H, W) clean inputs (latents or pixels), y: (N,) labels, timesteps: ints in
    [0, diffusion.num_timesteps). Keeps one random token per layer (pick_tokens) for the grid plot."""
    model.eval()
    device = model_device(model)
    x0 = x0.to(device)
    y = y.to(device)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    layers = model.embedding_names()
    num_tokens = model.pos_embed.shape[1]
    analysis = ModelAnalysis(layers=layers, timesteps=[int(t) for t in timesteps],
                             tokens=pick_tokens(layers, x0.shape[0], num_tokens, seed))
    for t in analysis.timesteps:
        tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=device)
        x_t = diffusion.q_sample(x0, tt, noise=noise)
        rec = capture_embeddings(model, x_t, tt, y, keep=analysis.tokens, top_k=top_k)
        analysis.stats[t] = rec.stats
        analysis.channel_rms[t] = {n: v.numpy() for n, v in rec.channel_rms.items()}
        analysis.argmax_counts[t] = {n: v.numpy() for n, v in rec.argmax_counts.items()}
        analysis.vectors[t] = {n: v.numpy() for n, v in rec.vectors.items()}
    analysis.summary = summarize_channels(analysis.argmax_counts)
    return analysis


def pooled_channel_rms(channel_rms_by_timestep):
    """Channel RMS over the tokens of all timesteps together, per layer: sqrt(mean over timesteps of
    s_j(t)^2), exact because every timestep has the same number of tokens. {name: (D,) array}."""
    per_t = list(channel_rms_by_timestep.values())
    return {name: np.sqrt(np.mean([np.square(v[name]) for v in per_t], axis=0)) for name in per_t[0]}


#################################################################################
#                                     Plots                                     #
#################################################################################


def new_figure(width, height):
    """A matplotlib Figure on the Agg canvas (no pyplot: no global state, works under any backend)."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path, dpi=100):
    """Write fig as a PNG to path and return path."""
    fig.savefig(path, dpi=dpi, format="png")
    return path


def grid_shape(n):
    """(rows, cols) for n panels, a little wider than tall: 30 -> (5, 6), 4 -> (2, 3), 14 -> (3, 5)."""
    cols = max(1, math.ceil(math.sqrt(n * 1.2)))
    return math.ceil(n / cols), cols


def plot_token_grid(vectors, path, title=None, tokens=None):
    """The study's grid: one panel per captured tensor, |value| against channel index of one token.

    vectors: {name: (D,) array} in layer order; tokens: optional {name: (sample, token)} for the panel
    titles. Panels do not share the y axis (the first and last layers are on other scales)."""
    names = list(vectors)
    rows, cols = grid_shape(len(names))
    fig = new_figure(2.6 * cols, 1.9 * rows)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        v = np.abs(np.asarray(vectors[name], dtype=np.float64))
        ax.plot(np.arange(v.size), v, linewidth=0.6)
        where = f" s{tokens[name][0]} t{tokens[name][1]}" if tokens and name in tokens else ""
        ax.set_title(f"{name}{where}  max {v.max():.3g}", fontsize=7)
        ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _layer_values(per_layer, metric):
    """Names and values of `metric` for every layer of one timestep's stats."""
    names = list(per_layer)
    return names, [per_layer[n][metric] for n in names]


def plot_layer_curves(models, path, metrics=("max_median_ratio", "rms_kurtosis")):
    """Per-layer curves of outlier metrics, several models overlaid (one line per label).

    models: {label: {timestep: {layer name: stats}}} (a stats.json "stats" entry per model). One row
    per metric, one column per timestep (those of the first model), log y axes."""
    timesteps = list(next(iter(models.values())))
    fig = new_figure(3.6 * len(timesteps), 2.8 * len(metrics))
    for row, metric in enumerate(metrics):
        for col, t in enumerate(timesteps):
            ax = fig.add_subplot(len(metrics), len(timesteps), row * len(timesteps) + col + 1)
            for label, stats in models.items():
                if t in stats:
                    names, values = _layer_values(stats[t], metric)
                    ax.plot(range(len(names)), values, marker=".", linewidth=1, label=label)
            ax.set_yscale("log")
            ax.set_title(f"{metric}, t={t}", fontsize=8)
            ax.set_xlabel("layer (0 = embed, last = final)", fontsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=6)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def most_common_width(arrays):
    """The vector length shared by most of the arrays (the hidden size, not the final layer's)."""
    widths = Counter(len(v) for v in arrays)
    return widths.most_common(1)[0][0]


def plot_channel_rms_heatmap(rms, path, title=None):
    """Layers x channels heatmap of channel RMS on a log color scale; a persistent outlier channel
    shows as a bright vertical line. rms: {name: (D,) array}; layers of another width (the final
    layer's output) are left out. The loudest channel over all layers is marked on the x axis."""
    width = most_common_width(rms.values())
    names = [n for n, v in rms.items() if len(v) == width]
    matrix = np.stack([np.asarray(rms[n], dtype=np.float64) for n in names])
    positive = matrix[matrix > 0]
    floor = positive.min() if positive.size else 1.0
    matrix = np.maximum(matrix, floor)  # exact zeros cannot go on a log scale
    fig = new_figure(10, 1.5 + 0.22 * len(names))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="magma",
                      norm=LogNorm(vmin=floor, vmax=max(matrix.max(), floor * 1.0001)))
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xlabel("channel", fontsize=8)
    loudest = int(np.argmax(matrix.max(axis=0)))
    ax.set_xticks([0, loudest, width - 1], ["0", f"{loudest}*", str(width - 1)], fontsize=7)
    fig.colorbar(image, ax=ax, label="channel RMS")
    ax.set_title(title or f"channel RMS per layer (loudest channel {loudest})", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def block_values(per_layer, metric, layer_prefix="block."):
    """The values of `metric` over the layers whose name starts with layer_prefix."""
    return [stats[metric] for name, stats in per_layer.items() if name.startswith(layer_prefix)]


def plot_outliers_vs_timestep(models, path, layer_prefix="block."):
    """Outlier magnitude against the diffusion timestep, one line per model: the largest |x| over the
    blocks (left), and the mean over blocks of the max-median ratio (right).
    models: as for plot_layer_curves."""
    fig = new_figure(9, 3.4)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for label, stats in models.items():
        ts = sorted(stats, key=int)
        peak = [max(block_values(stats[t], "max_abs", layer_prefix), default=np.nan) for t in ts]
        ratio = [np.mean(block_values(stats[t], "max_median_ratio", layer_prefix) or [np.nan]) for t in ts]
        left.plot([int(t) for t in ts], peak, marker="o", label=label)
        right.plot([int(t) for t in ts], ratio, marker="o", label=label)
    for ax, ylabel in ((left, "max |x| over blocks"), (right, "mean max-median ratio over blocks")):
        ax.set_yscale("log")
        ax.set_xlabel("timestep", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
