"""The studies' one front door, study.py: it lists the studies, refuses an unknown one in one line, and each
study's smallest form runs through it and through its make target (the command line users already know):
ablation and the digits length check here; `make toy` in test_examples.py (then the README's commands on
its runs); the sweep in test_sweep.py, the mechanism study in test_mechanism.py and the digits study's own
runs in test_digits.py (through study.py)."""

import pytest

import study

TOY = ["--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--global-batch-size", "16",
       "--num-eval-samples", "4", "--sampling-steps", "4", "--probe-samples", "4", "--threads", "1"]


def test_help_lists_every_study(capsys):
    with pytest.raises(SystemExit) as stop:
        study.main(["--help"])
    assert stop.value.code == 0
    listed = capsys.readouterr().out
    for name in study.STUDIES:
        assert f"\n    {name} " in listed


def test_an_unknown_study_is_one_line():
    with pytest.raises(SystemExit, match="unknown study 'toys'; choose one of toy, sweep"):
        study.main(["toys"])


def test_a_study_that_passes_nothing_on_refuses_an_unknown_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        study.main(["mechanism", "--no-such-flag"])
    assert stop.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def toy_summary(steps, ln_rms, none_rms, seeds=1):
    """A toy study's summary (ditlab/studies/toy_report.summarize's layout) with one evaluation, EMA weights."""
    row = lambda norm, rms: dict(normalization=norm, weights="ema", step=steps,
                                 **{e: dict(mean=rms, min=rms, max=rms, n=seeds) for e in ("rms", "mean_abs", "max_abs")})
    ratio = {e: ln_rms / none_rms for e in ("rms", "mean_abs", "max_abs")}
    return dict(rows=[row("layer-norm", ln_rms), row("none", none_rms)],
                ratios=[dict(weights="ema", step=steps, **ratio)], final_loss={})


CONFIG = dict(model="DiT-XS/1", depth=2, hidden_size=64, global_batch_size=256, lr=1e-3, lr_schedule="cosine",
              ema_decay=0.999, max_steps=12000, preset="cpu", num_eval_samples=256, sampling_steps=1000)


def test_toy_summary_opens_with_its_result_whichever_way_it_goes():
    from ditlab.studies.toy_report import format_markdown

    lines = format_markdown(toy_summary(12000, 0.019, 0.01, seeds=3), CONFIG).splitlines()
    assert lines[:4] == ["# Toy identity study", "", "At 12,000 steps, 3 seeds: LayerNorm's sampled error is 1.90x "
                         "the no-LayerNorm model's (EMA weights; LayerNorm worse).", ""]
    assert lines[4].startswith("Run: ")  # long enough: no warning
    better = format_markdown(toy_summary(12000, 0.005, 0.01), CONFIG).splitlines()[2]
    assert better == "At 12,000 steps, 1 seed: LayerNorm's sampled error is 0.50x the no-LayerNorm model's " \
                     "(EMA weights; LayerNorm better)."
    text = format_markdown(toy_summary(12000, 0.005, 0.01), CONFIG)
    assert "EMA rows: the averaged weights lag the raw ones by about 1/(1 - 0.999) = 1,000 steps" in text


def test_toy_summary_says_when_runs_are_too_short():
    from ditlab.studies.toy_report import format_markdown

    short = format_markdown(toy_summary(300, 0.78, 0.79), CONFIG).splitlines()[4]
    assert short == ("**Too short to mean anything:** 300 steps is under 5x the EMA's lag of 1/(1 - 0.999) = 1,000 "
                     "steps; the EMA samples' RMS 0.79 is near the prior's 1.0 (the EMA has not warmed up). Train at "
                     "least 5,000 steps before reading the ratios.")
    lagging = format_markdown(toy_summary(12000, 0.9, 0.8), CONFIG).splitlines()[4]
    assert lagging.startswith("**Too short to mean anything:** the EMA samples' RMS 0.90 is near the prior's 1.0")


def test_make_ablation_runs_the_ablation(tmp_path, make):
    tiny = " ".join([*TOY, "--steps", "4", "--eval-steps", "4", "--variants", "dyt", "--out", str(tmp_path)])
    assert "| dyt | 4 | 1 |" in make("ablation", ABLATION_SEEDS="0", ABLATION_ARGS=tiny)
    assert (tmp_path / "summary.md").exists() and (tmp_path / "toy_errors.png").exists()


def test_make_digits_runs_the_length_check_from_the_committed_records(tmp_path, make):
    """The length check reads only records: the measured study's, committed in docs/results/."""
    make("digits", DIGITS_ARGS=f"--lengths docs/results/digits_runs docs/results/digits_long_runs --out {tmp_path}")
    assert (tmp_path / "lengths.md").read_text().startswith("# The digits study: how long is trained?")


def test_compare_legend_follows_the_variant_registry_whatever_the_errors(monkeypatch):
    """The widest cloud is drawn first, but every panel's legend lists the variants in ORDER."""
    import matplotlib.pyplot as plt
    import torch

    from ditlab.studies import toy_plots

    scale = {"run-ln": 0.1, "run-none": 1.0}  # no LayerNorm's cloud is the wider one
    monkeypatch.setattr(toy_plots, "load_samples", lambda run, step, weights: torch.ones(4, 2, 2, 2) * scale[run])
    monkeypatch.setattr(toy_plots, "load_config", lambda run: {"normalization": "layer-norm" if run == "run-ln" else "none"})
    fig, ax = plt.subplots()
    assert toy_plots.plot_scatter(ax, ["run-none", "run-ln"], 10) == 4
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)
    assert [lab.split(" (")[0] for lab in labels] == ["LayerNorm", "no LayerNorm"]


def test_log_tick_labels_of_a_narrow_range_do_not_overlap():
    """Errors within a decade (0.93 to 1.0): matplotlib would label a dozen minor ticks, crowded together."""
    import matplotlib.pyplot as plt

    from ditlab.studies.toy_plots import readable_log_ticks

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([0.02, 0.1, 1.0, 1.8], [0.999, 0.99, 0.95, 0.93])
    ax.set(xscale="log", yscale="log")
    readable_log_ticks(ax)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for axis in (ax.xaxis, ax.yaxis):
        ticks = axis.get_major_ticks() + axis.get_minor_ticks()
        boxes = [t.label1.get_window_extent(renderer) for t in ticks if t.label1.get_visible() and t.label1.get_text()]
        assert 2 <= len(boxes) <= 6
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)
