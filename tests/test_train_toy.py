"""Tests for train_toy.py and the toy study (ditlab/studies/toy.py): the evaluation maths, metrics.jsonl, exact resume, the report,
torchrun, and the ToyDiT notebook."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_toy
from diffusion import create_diffusion
from ditlab.checkpoints import load_checkpoint, load_model
from ditlab.errors import PREEMPTED_EXIT, UsageError
from ditlab.toy.evals import draw_samples
from ditlab.probe import TIMESTEP_GRID, probe
from ditlab.toy.readers import last_probe, load_config, load_embeddings, load_metrics, load_samples
from ditlab.studies.toy_report import log_correlations, summarize
from ditlab.studies.toy import write_report
from ditlab.toy.task import TOY_MODEL, sample_error, toy_batches
from ditlab.trainer import Trainer, compile_mode
from models import build_model_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--global-batch-size", "16", "--lr", "1e-3",
        "--num-eval-samples", "8", "--sampling-steps", "20", "--log-every", "5", "--threads", "1", "--preset", "cpu"]


def run_toy(tmp, *extra):
    return train_toy.main([*TINY, "--results-dir", str(tmp), *extra])


def test_sample_error_matches_direct_computation():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(7, 2, 2, 2, generator=gen) * 1e-3
    v = s.double().numpy().ravel()
    got = sample_error(s)
    assert got["num_values"] == 56
    np.testing.assert_allclose(got["mean_abs"], np.mean(np.abs(v)), rtol=1e-12)
    np.testing.assert_allclose(got["max_abs"], np.max(np.abs(v)), rtol=1e-12)
    np.testing.assert_allclose(got["rms"], np.sqrt(np.mean(v**2)), rtol=1e-12)
    np.testing.assert_allclose(got["max_abs_8bit"], np.max(np.abs(v)) * 127.5, rtol=1e-12)


def test_draw_samples_is_fixed_and_leaves_global_rng_alone():
    from diffusion import create_diffusion
    from models import build_model

    model = build_model("DiT-XS/1", depth=1, hidden_size=32, num_heads=2, input_size=2, in_channels=2,
                        num_classes=1, class_dropout_prob=0.0).eval()
    diff = create_diffusion("10")
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = draw_samples(model, diff, 4, 123, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)
    b = draw_samples(model, diff, 4, 123, torch.device("cpu"))
    assert torch.equal(a, b) and a.shape == (4, 2, 2, 2)
    # A new model outputs zero noise, so samples are the DDPM chain of pure noise: not zero.
    assert a.abs().max() > 0


def test_run_writes_metrics_samples_config_and_checkpoints(tmp_path):
    run = run_toy(tmp_path, "--steps", "10", "--eval-steps", "5", "--ckpt-every", "5", "--no-layernorm")
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert cfg["normalization"] == "none" and cfg["max_steps"] == 10 and cfg["eval_steps"] == [5, 10]
    rows = load_metrics(run)
    assert [(r["step"], r["weights"]) for r in rows] == [(5, "raw"), (5, "ema"), (10, "raw"), (10, "ema")]
    required = {"kind", "step", "weights", "mean_abs", "max_abs", "rms", "num_samples", "sampling_steps", "normalization"}
    for r in rows:
        assert required <= set(r)
        assert r["num_samples"] == 8 and r["sampling_steps"] == 20 and r["normalization"] == "none"
        # the stored metrics are those of the stored samples
        s = load_samples(run, r["step"], r["weights"])
        assert s.shape == (8, 2, 2, 2)
        assert r["rms"] == pytest.approx(float(s.double().square().mean().sqrt()), rel=1e-12)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["0000005.pt", "0000010.pt", "latest.pt"]
    ckpt = load_checkpoint(run)
    assert ckpt["step"] == 10 and ckpt["config"]["normalization"] == "none"
    log = open(os.path.join(run, "log.txt")).read()
    assert "steps/s" in log and "ETA" in log


def test_probe_rows_every_probe_step_and_at_evaluations(tmp_path):
    """--probe-every 4 with evaluations at 6 and 10: probes at 4, 6, 8, 10 (raw and EMA, every grid t) in
    metrics.jsonl as kind "timestep"; samples only at 6 and 10, with their keys; embeddings.jsonl alike."""
    run = run_toy(tmp_path, "--steps", "10", "--eval-steps", "6", "--probe-every", "4", "--probe-samples", "8")
    every = load_metrics(run, kind=None)
    assert {r["kind"] for r in every} == {"sample", "timestep"}
    assert sorted({r["step"] for r in load_metrics(run)}) == [6, 10]
    probes = load_metrics(run, "timestep")
    assert sorted({(r["step"], r["weights"]) for r in probes}) == [(s, w) for s in (4, 6, 8, 10) for w in ("ema", "raw")]
    for step in (4, 6, 8, 10):
        for weights in ("raw", "ema"):
            ts = [r["t"] for r in probes if r["step"] == step and r["weights"] == weights]
            assert ts == list(TIMESTEP_GRID)
    assert all(r["num_samples"] == 8 and 0 < r["eps_rel_error"] and r["normalization"] == "layer-norm" for r in probes)
    outliers = load_embeddings(run, "outliers")
    assert {(r["step"], r["layer"]) for r in outliers} == {(s, n) for s in (4, 6, 8, 10) for n in ("embed", "block.0")}
    assert last_probe(run)[999]["step"] == 10
    # the probe of the final EMA weights is what probe computes on them
    ema = build_model_from_config(load_config(run))
    ema.load_state_dict(load_checkpoint(run)["ema"])
    again, _ = probe(ema, create_diffusion(""), 8)
    assert [r["eps_rel_error"] for r in again] == [last_probe(run)[r["t"]]["eps_rel_error"] for r in again]


@pytest.mark.parametrize("data_std", ["0", "0.5"])
def test_resume_ends_with_identical_metrics_and_weights(tmp_path, monkeypatch, data_std):
    """Also with Gaussian data: a resumed run draws from its step on exactly what it would have drawn."""
    args = ("--steps", "20", "--eval-steps", "8", "16", "--ckpt-every", "8", "--data-std", data_std)
    full = run_toy(tmp_path / "full", *args)

    # Crash after step 12: the last checkpoint is step 8; the evaluation at 8 is already written.
    real_step = Trainer.train_step

    def crashing(self, x, y):
        if self.step == 12:
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_toy(tmp_path / "cut", *args)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    cut = os.path.join(tmp_path / "cut", os.listdir(tmp_path / "cut")[0])
    assert load_checkpoint(cut)["step"] == 8
    resumed = train_toy.main(["--resume", cut, "--threads", "1"])
    assert resumed == cut

    assert load_metrics(cut, kind=None) == load_metrics(full, kind=None)  # samples and probes alike
    for kind in ("outliers", "norm_input"):
        assert load_embeddings(cut, kind) == load_embeddings(full, kind) != []
    a, b = load_checkpoint(full), load_checkpoint(cut)
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"


def test_report_and_ratios(tmp_path):
    runs = [run_toy(tmp_path / "runs", "--steps", "6", "--eval-steps", "3", "--normalization", n) for n in ("layer-norm", "none")]
    text = write_report(runs, str(tmp_path / "out"))
    for name in ("compare.png", "errors.png", "summary.md", "summary.json"):
        assert os.path.getsize(tmp_path / "out" / name) > 100
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    ln = {(r["step"], r["weights"]): r for r in load_metrics(runs[0])}
    no = {(r["step"], r["weights"]): r for r in load_metrics(runs[1])}
    for ratio in summary["ratios"]:
        key = (ratio["step"], ratio["weights"])
        assert ratio["rms"] == pytest.approx(ln[key]["rms"] / no[key]["rms"])
    assert len(summary["ratios"]) == 4 and "LayerNorm error / no-LayerNorm error" in text
    head = text.splitlines()[:9]  # title, provenance, the result in words, too short, EMA rows, what was run
    assert head[0] == "# Toy identity study" and head[2].startswith("_Written by `") and head[1] == head[3] == ""
    assert head[4].startswith("At 6 steps, 1 seed: LayerNorm's sampled error is ")
    assert "**Too short to mean anything:**" in text.split("Run: model")[0]  # 6 steps: the EMA has not warmed up
    assert head[8].startswith("Run: model DiT-XS/1") and "6 steps, preset" in head[8]
    # the probe's figures and the per-t ratio: LayerNorm / no-LayerNorm eps error at the last probe
    for name in ("timestep_errors.png", "outlier_growth.png", "mechanism.png", "mechanism_raw.png"):
        assert os.path.getsize(tmp_path / "out" / name) > 1000
    ln_t, no_t = last_probe(runs[0]), last_probe(runs[1])
    per_t = summary["timesteps"]["ema"]["rows"]
    assert [r["t"] for r in per_t] == list(TIMESTEP_GRID)
    for r in per_t:
        assert r["ratio"] == pytest.approx(ln_t[r["t"]]["eps_rel_error"] / no_t[r["t"]]["eps_rel_error"], rel=1e-12)
        assert f"| {r['t']} | {ln_t[r['t']]['eps_rel_error']:.2e}" in text
    for weights in ("ema", "raw"):
        layers = summary["mechanism"][weights]["layers"]
        assert set(layers) == {"block.0.norm1", "block.0.norm2", "final.norm", "max over layers"}
        # the correlation is the one of the stored ratios and errors
        ratio = layers["final.norm"]["signal_to_outlier"]
        errors = summary["mechanism"][weights]["error"]
        ts = sorted(errors, key=int)
        assert layers["final.norm"]["signal_to_outlier_vs_error"] == pytest.approx(
            list(log_correlations([ratio[str(t)] for t in ts], [errors[t] for t in ts])))
    assert "log Pearson / Spearman" in text


def test_seed_spread_in_summary(tmp_path):
    runs = [run_toy(tmp_path, "--steps", "4", "--eval-steps", "4", "--global-seed", str(s), "--no-layernorm") for s in (0, 1)]
    rows = [r for r in summarize(runs)["rows"] if r["weights"] == "ema"]
    values = [load_metrics(r)[-1]["rms"] for r in runs]
    assert rows[0]["rms"]["n"] == 2
    assert rows[0]["rms"]["mean"] == pytest.approx(np.mean(values))
    assert rows[0]["rms"]["min"] == min(values) and rows[0]["rms"]["max"] == max(values)


def test_torchrun_two_processes(tmp_path):
    """Two gloo ranks: the same initial weights on both and as a single process (the init does not depend
    on the world size), and every rank's EMA and weights equal after training (the EMA starts from the
    broadcast weights on every rank, not only on rank 0)."""
    helper = [os.path.join("tests", "rank_weights.py")]  # every rank saves its weights
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", *helper,
           "train_toy.py", *TINY, "--steps", "4", "--eval-steps", "4", "--results-dir", str(tmp_path / "two")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run = os.path.join(tmp_path / "two", os.listdir(tmp_path / "two")[0])
    assert len(load_metrics(run)) == 2
    assert load_checkpoint(run)["world_size"] == 2
    ranks = [torch.load(os.path.join(run, f"rank{r}-weights.pt"), weights_only=True) for r in (0, 1)]
    one_proc = subprocess.run([sys.executable, *helper, "train_toy.py", *TINY, "--steps", "1", "--eval-steps", "1",
                               "--results-dir", str(tmp_path / "one")], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    assert one_proc.returncode == 0, one_proc.stderr[-3000:]
    one = os.path.join(tmp_path / "one", os.listdir(tmp_path / "one")[0])
    single = torch.load(os.path.join(one, "rank0-weights.pt"), weights_only=True)
    for key in ("initial", "model", "ema"):
        for name, value in ranks[0][key].items():
            assert torch.equal(value, ranks[1][key][name]), f"{key}.{name} differs between ranks"
    for name, value in single["initial"].items():
        assert torch.equal(value, ranks[0]["initial"][name]), f"initial {name} depends on the world size"


def test_bad_batch_split_is_a_clear_error(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518", "train_toy.py",
           *TINY, "--global-batch-size", "15", "--steps", "2", "--results-dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "--global-batch-size 15 is not divisible by the world size 2" in out.stdout + out.stderr


def test_notebook_runs_top_to_bottom(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    runs = [run_toy(tmp_path / "runs", "--steps", "4", "--eval-steps", "2", "--normalization", n) for n in ("layer-norm", "none")]
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "ToyDiT_visualization.ipynb"), as_version=4)
    os.environ["TOY_RUN_LN"], os.environ["TOY_RUN_NOLN"] = runs
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
    finally:
        del os.environ["TOY_RUN_LN"], os.environ["TOY_RUN_NOLN"]
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2


def test_stop_signal_saves_and_exits_75_then_resume_auto_continues(tmp_path, monkeypatch):
    """A stop signal (simulated at step 3) saves and exits 75; the same command line with --resume auto
    then continues that run to its last step, and other settings start a new run."""
    real = Trainer._stop_everywhere
    monkeypatch.setattr(Trainer, "_stop_everywhere", lambda self: self.step == 3 or real(self))
    flags = ["--steps", "5", "--eval-steps", "5", "--num-eval-samples", "4", "--sampling-steps", "3",
             "--resume", "auto"]
    with pytest.raises(SystemExit) as stop:
        run_toy(tmp_path, *flags)
    assert stop.value.code == PREEMPTED_EXIT
    (first,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    assert load_checkpoint(first)["step"] == 3
    monkeypatch.setattr(Trainer, "_stop_everywhere", real)
    assert run_toy(tmp_path, *flags, "--steps", "6") == first
    assert load_checkpoint(first)["step"] == 6
    assert json.load(open(os.path.join(first, "config.json")))["max_steps"] == 6  # rewritten when extended
    other = run_toy(tmp_path, *flags, "--global-seed", "1")
    assert other != first and load_checkpoint(other)["step"] == 5


def test_resume_refuses_a_contradicting_flag_like_train_py(tmp_path):
    """train_toy.py resumes with train.py's rule (merge_resume_config): --steps may extend the
    run, a flag that contradicts its config (--lr) is an error, not silently ignored."""
    run = run_toy(tmp_path, "--steps", "2", "--eval-steps", "2", "--num-eval-samples", "4", "--sampling-steps", "3")
    with pytest.raises(SystemExit, match="--lr 0.5 contradicts the run being resumed"):
        train_toy.main(["--resume", run, "--lr", "0.5", "--threads", "1"])
    assert train_toy.main(["--resume", run, "--steps", "3", "--threads", "1"]) == run
    assert load_checkpoint(run)["step"] == 3
    # a resume that would do nothing says so and exits non-zero, leaving config.json as it was
    before = open(os.path.join(run, "config.json")).read()
    for steps in ("3", "1"):
        with pytest.raises(SystemExit, match="has reached step 3 and --max-steps is .*: nothing to do"):
            train_toy.main(["--resume", run, "--steps", steps, "--threads", "1"])
    assert open(os.path.join(run, "config.json")).read() == before


def printed_settings(capsys, argv):
    """What train_toy.main(argv) with --dry-run prints, as a dict (each line is `name: JSON value`)."""
    capsys.readouterr()
    assert train_toy.main([*argv, "--dry-run"]) is None
    lines = capsys.readouterr().out.splitlines()
    return dict((name, json.loads(value)) for name, value in (line.split(": ", 1) for line in lines))


def test_dry_run_prints_the_preset_and_typed_flags_and_creates_nothing(tmp_path, capsys):
    results = tmp_path / "runs"
    shown = printed_settings(capsys, ["--preset", "cpu", "--lr", "0.5", "--eval-every", "4000", "--results-dir",
                                      str(results)])
    assert (shown["max_steps"], shown["depth"], shown["hidden_size"], shown["lr_schedule"]) == (12_000, 2, 64, "cosine")
    assert shown["lr"] == 0.5  # typed: beats the preset's 1e-3
    assert shown["eval_steps"] == [4000, 8000, 12000]  # derived from --eval-every, not the preset's list
    assert not results.exists()
    paper = printed_settings(capsys, ["--preset", "paper", "--steps", "20", "--results-dir", str(results)])
    assert (paper["global_batch_size"], paper["compile"], paper["depth"], paper["max_steps"]) == (2048, "default",
                                                                                                  None, 20)
    assert paper["eval_steps"] == [20] and not results.exists()


def test_dry_run_of_a_resume_shows_the_extended_run_and_changes_nothing(tmp_path, capsys):
    run = run_toy(tmp_path, "--steps", "2", "--eval-steps", "2", "--num-eval-samples", "4", "--sampling-steps", "3")
    before = {name: open(os.path.join(run, name), "rb").read() for name in ("config.json", "log.txt", "metrics.jsonl")}
    shown = printed_settings(capsys, ["--resume", run, "--steps", "6", "--threads", "1"])
    assert (shown["max_steps"], shown["eval_steps"], shown["hidden_size"], shown["lr"]) == (6, [2, 6], 32, 1e-3)
    assert {name: open(os.path.join(run, name), "rb").read() for name in before} == before
    assert load_checkpoint(run)["step"] == 2
    with pytest.raises(SystemExit, match="--lr 0.5 contradicts the run being resumed"):  # refused as for a resume
        train_toy.main(["--resume", run, "--lr", "0.5", "--dry-run"])


def test_what_a_resume_may_change_is_marked_on_the_settings():
    """A toy resume may extend the run and change its intervals, never its optimisation (its lr is not reset)."""
    assert set(train_toy.ToyConfig.names("resumable")) == {"max_steps", "eval_steps", "ckpt_every", "log_every",
                                                            "compile", "stop_loss_ratio"}
    assert set(train_toy.ToyConfig.names("runtime")) == {"resume", "threads", "device", "no_layernorm", "eval_every",
                                                          "dry_run"}


def test_paper_preset_compiles_and_none_switches_it_off():
    """The paper preset (a GPU's) compiles the model by default; --compile none or a mode overrides it;
    the cpu preset stays eager."""
    assert train_toy.parse_args(["--preset", "paper"])[0].compile == "default"
    assert train_toy.parse_args(["--preset", "paper", "--compile", "none"])[0].compile == "none"
    assert train_toy.parse_args(["--preset", "paper", "--compile", "reduce-overhead"])[0].compile == "reduce-overhead"
    assert train_toy.parse_args(["--preset", "cpu"])[0].compile is None
    assert compile_mode("none") is None


def test_final_normalization_and_dropout_travel_with_the_run(tmp_path):
    """--final-normalization and --dropout are model settings: in config.json and the checkpoint (the
    mixed model reloads as itself, its run directory says so), fixed on resume."""
    run = run_toy(tmp_path, "--final-normalization", "none", "--dropout", "0.1", "--steps", "2", "--eval-steps", "2",
                  "--num-eval-samples", "4", "--sampling-steps", "3")
    assert os.path.basename(run).endswith("-layer-norm-final-none")
    model, config = load_model(run)
    assert (config["final_normalization"], config["dropout"]) == ("none", 0.1)
    assert isinstance(model.final_layer.norm_final, torch.nn.Identity) and model.blocks[0].mlp.dropout == 0.1
    assert isinstance(model.blocks[0].norm1, torch.nn.LayerNorm)
    with pytest.raises(SystemExit, match="--final-normalization layer-norm contradicts the run being resumed"):
        train_toy.main(["--resume", run, "--final-normalization", "layer-norm", "--threads", "1"])


def test_bad_model_shape_and_huge_probe_are_refused_before_any_run_directory(tmp_path):
    """Heads that do not divide the width, and a probe too large to allocate, are one-line
    errors before anything is written (the first used to leave an empty run directory behind)."""
    with pytest.raises(SystemExit, match="hidden size 64 must be divisible by the number of heads 5"):
        train_toy.main(["--num-heads", "5", "--results-dir", str(tmp_path), "--threads", "1"])
    assert not os.path.exists(tmp_path) or os.listdir(tmp_path) == []
    with pytest.raises(UsageError, match="--probe-samples 100000000: at most 100,000"):
        train_toy.parse_args(["--probe-samples", "100000000"])


def test_evaluation_steps_and_intervals_beyond_the_run_are_warned_about_in_dry_run_and_log(tmp_path, capsys):
    """Typed --eval-steps after the last step used to be dropped in silence, like a typed --eval-every,
    --probe-every or --ckpt-every longer than the run: one warning line each (the last step still
    evaluates and checkpoints, so the run keeps an evaluation), on --dry-run too and in log.txt."""
    flags = ["--steps", "2", "--num-eval-samples", "4", "--sampling-steps", "3", "--probe-every", "9",
             "--ckpt-every", "9"]
    capsys.readouterr()
    train_toy.main([*TINY, *flags, "--eval-steps", "1", "99999", "--dry-run"])
    dry = capsys.readouterr()
    assert "eval_steps: [1, 2]" in dry.out.splitlines()
    run_toy(tmp_path, *flags, "--eval-steps", "1", "99999")
    expected = ["warning: --ckpt-every 9 is longer than the run (--max-steps 2): a checkpoint is written only at its "
                "last step",
                "warning: --probe-every 9 is longer than the run (--max-steps 2): the probe runs only at the "
                "evaluations",
                "warning: --eval-steps 99999: after the run's last step (--max-steps 2), so dropped; the last step is "
                "always evaluated"]
    assert dry.err.splitlines() == capsys.readouterr().err.splitlines() == expected
    log = open(os.path.join(tmp_path, os.listdir(tmp_path)[0], "log.txt")).read()
    assert all(line in log for line in expected)
    train_toy.main([*TINY, *flags, "--eval-every", "5", "--dry-run"])
    assert "warning: --eval-every 5 is longer than the run (--max-steps 2): the run evaluates only at its last step" \
        in capsys.readouterr().err
    printed_settings(capsys, [*TINY, "--steps", "2"])  # the preset's intervals (3,000 steps) are not warned about
    assert "warning" not in capsys.readouterr().err


def test_zero_spread_is_the_all_zero_task_and_leaves_the_rng_alone():
    """--data-std 0 (the default) feeds exact zeros and draws nothing, so a run is bitwise what it was before
    the option existed (checked once against the commit before it: weights, EMA, samples and probe equal)."""
    state = torch.get_rng_state()
    x, y = next(toy_batches(16, torch.device("cpu"), 0.0, seed=3))
    assert torch.equal(x, torch.zeros(16, 2, 2, 2)) and torch.equal(y, torch.zeros(16, dtype=torch.long))
    assert torch.equal(torch.get_rng_state(), state)


def test_a_spread_trains_on_fresh_gaussian_data_of_that_std(tmp_path):
    """S > 0: every step a new N(0, S^2) batch (not the zero task), fixed by (seed, rank, step), the global RNG
    untouched; the run records its spread and its samples' variance against the data's."""
    state = torch.get_rng_state()
    stream = toy_batches(4096, torch.device("cpu"), 0.3, seed=1, rank=0)
    first, second = next(stream)[0], next(stream)[0]
    assert torch.equal(torch.get_rng_state(), state)
    assert first.std().item() == pytest.approx(0.3, rel=0.03) and abs(first.mean().item()) < 0.01
    assert not torch.equal(first, second)
    assert torch.equal(next(toy_batches(4096, torch.device("cpu"), 0.3, seed=1, rank=0, start_step=1))[0], second)
    assert not torch.equal(next(toy_batches(4096, torch.device("cpu"), 0.3, seed=1, rank=1))[0], first)
    run = run_toy(tmp_path, "--steps", "4", "--eval-steps", "4", "--data-std", "0.3")
    assert load_config(run)["data_std"] == 0.3
    (row,) = [r for r in load_metrics(run) if r["weights"] == "ema"]
    assert row["var_ratio"] == pytest.approx(row["std"] ** 2 / 0.09)
    probe_rows = [r for r in load_metrics(run, "timestep") if r["step"] == 4]
    assert all("eps_excess_error" in r and r["data_std"] == 0.3 for r in probe_rows)


def test_samples_are_clipped_for_the_zero_task_only_when_asked():
    """A new (adaLN-Zero) model predicts eps = 0, so its x0 estimate x_t / sqrt(abar) leaves [-1, 1]: clipped
    (the all-zero task) the samples stay inside; unclipped (Gaussian data) they do not."""
    model = build_model_from_config(dict(model="DiT-XS/1", depth=1, hidden_size=16, num_heads=2, image_size=2,
                                         vae="none", **TOY_MODEL)).eval()
    diff = create_diffusion("10")
    clipped = draw_samples(model, diff, 64, 0, torch.device("cpu"))
    free = draw_samples(model, diff, 64, 0, torch.device("cpu"), clip=False)
    assert clipped.abs().max() <= 1 < free.abs().max()
