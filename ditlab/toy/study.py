"""The toy study (make toy): the outlier analysis of its runs and its report (summary.md, figures)."""
import json
import os
import sys

from ditlab.files import provenance
from ditlab.jobs import run_jobs
from ditlab.toy.plots import (
    LABELS,
    plot_compare,
    plot_error_curves,
    plot_mechanism,
    plot_outlier_growth,
    plot_timestep_errors,
)
from ditlab.toy.readers import (
    first_seed_runs,
    last_probe,
    load_config,
)
from ditlab.toy.report import (
    format_markdown,
    growth_markdown,
    mechanism,
    mechanism_markdown,
    summarize,
    timestep_markdown,
    timestep_summary,
)


def outlier_lines(stats_path):
    """Markdown lines: per variant and timestep, the largest |x| over the blocks' token embeddings and
    how consistently one channel carries each token's largest value (from analyze_embeddings' stats)."""
    with open(stats_path) as f:
        stats = json.load(f)
    lines = ["", "Token embeddings of the final EMA weights (analyze_embeddings.py, x0 = 0 noised to each timestep):", "",
             "| variant | timestep | max abs over blocks | max/median (last block) | dominant channel | its share of tokens |",
             "|---|---:|---:|---:|---:|---:|"]
    for model in stats["models"].values():
        norm = model["config"]["normalization"]
        for t, per_layer in model["stats"].items():
            blocks = [v for k, v in per_layer.items() if k.startswith("block.")]
            chan = model["summary"]["per_timestep"].get(str(t), {})
            lines.append(f"| {LABELS.get(norm, norm)} | {t} | {max(b['max_abs'] for b in blocks):.3g} | "
                         f"{blocks[-1]['max_median_ratio']:.3g} | {chan.get('channel')} | {chan.get('share', 0):.2f} |")
    return lines


def analyze_outliers(runs, out, timesteps=(0, 10, 100, 500, 999)):
    """Run the embedding-outlier analysis (analyze_embeddings.py, as a job) on the
    first seed of each variant; returns its stats.json path."""
    target = os.path.join(out, "outliers")
    run_jobs([[sys.executable, "analyze_embeddings.py", "--ckpt", *first_seed_runs(runs), "--zero-data", "--out",
               target, "--batch-size", "100", "--timesteps", *map(str, timesteps)]], 1, os.path.join(out, "logs"),
             tags=["outliers"])
    return os.path.join(target, "stats.json")


def probe_report(runs, out, summary):
    """The probe's figures (timestep_errors.png, outlier_growth.png, mechanism.png) and markdown lines;
    adds the per-timestep tables and the mechanism's correlations to `summary`. Nothing for old runs."""
    if not any(last_probe(run) for run in runs):
        return []
    plot_timestep_errors(runs, os.path.join(out, "timestep_errors.png"))
    plot_outlier_growth(runs, os.path.join(out, "outlier_growth.png"))
    summary["timesteps"] = {w: timestep_summary(runs, w) for w in ("ema", "raw")}
    lines = timestep_markdown(runs) + ["", "![per-timestep errors](timestep_errors.png)"]
    lines += growth_markdown(runs) + ["", "![outlier growth](outlier_growth.png)"]
    for weights in ("ema", "raw"):  # the EMA lags far behind in short runs: the raw weights are shown too
        result = mechanism(runs, weights)
        if result:
            name = "mechanism.png" if weights == "ema" else "mechanism_raw.png"
            plot_mechanism(result, os.path.join(out, name))
            summary.setdefault("mechanism", {})[weights] = result
            lines += mechanism_markdown(result) + ["", f"![mechanism, {weights} weights]({name})"]
    return lines


def write_report(runs, out, outlier_stats=None):
    """compare.png (first seed of each variant), errors.png, the probe's figures (probe_report),
    summary.md and summary.json in `out`."""
    os.makedirs(out, exist_ok=True)
    plot_compare(first_seed_runs(runs), os.path.join(out, "compare.png"))
    plot_error_curves(runs, os.path.join(out, "errors.png"))
    summary = summarize(runs)
    summary["runs"] = list(runs)
    lines = probe_report(runs, out, summary)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    text = format_markdown(summary, load_config(runs[0]))
    title, rest = text.split("\n", 1)
    text = f"{title}\n\n{provenance()}\n{rest}"
    if lines:
        text += "\n".join(lines) + "\n"
    if outlier_stats:
        text += "\n".join(outlier_lines(outlier_stats)) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return text
