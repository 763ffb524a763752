"""The digits study (ditlab/studies/digits*.py, ditlab/memorisation.py, python study.py digits): memorisation against brute force, the lr
choice, and a tiny end-to-end study that resumes from its records alone (as in a later session)."""

import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import study
from ditlab import memorisation
from ditlab.errors import InputError, JobError, UsageError
from ditlab.studies import digits as digits_study
from ditlab.studies import digits_lengths, digits_report, digits_runs
from ditlab.features import classifier_id, digits_rgb, to_gray
from ditlab.trainer import DIVERGED_EXIT

UNSCORED = "no-classifier-here.pt"  # a --digits-classifier that does not exist: the records keep None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def patch(monkeypatch, name, value):
    """Replace `name` in every module of the study that looks it up (the phases import the run helpers)."""
    for module in (digits_study, digits_runs, digits_report):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, value)

def test_nearest_distances_match_brute_force_numpy():
    rng = np.random.default_rng(0)
    samples, train = rng.normal(size=(7, 2, 3, 3)), rng.normal(size=(11, 2, 3, 3))
    samples[3] = train[5]  # an exact copy
    to_train, train_nn = memorisation.nearest_distances(samples, train, chunk=4)
    flat_s, flat_t = samples.reshape(7, -1), train.reshape(11, -1)
    want_s = [min(np.sqrt(((a - b) ** 2).sum()) for b in flat_t) for a in flat_s]
    want_t = [min(np.sqrt(((flat_t[i] - flat_t[j]) ** 2).sum()) for j in range(11) if j != i) for i in range(11)]
    np.testing.assert_allclose(to_train, want_s, rtol=1e-12)
    np.testing.assert_allclose(train_nn, want_t, rtol=1e-12)
    assert to_train[3] == 0


def test_memorisation_flags_copies_and_not_fresh_noise(tmp_path):
    """Training digits themselves are all near-copies (distance 0); the same digits shifted by one pixel
    are not copies of themselves, so their ratio is well above 0."""
    images, _ = digits_rgb()
    copies, shifted = tmp_path / "copies.npz", tmp_path / "shifted.npz"
    np.savez(copies, arr_0=images[:50], arr_1=np.zeros(50, int))
    np.savez(shifted, arr_0=np.roll(images[:50], 1, axis=2), arr_1=np.zeros(50, int))
    train = to_gray(torch.from_numpy(images).permute(0, 3, 1, 2))
    m = memorisation.memorisation(str(copies), train)
    assert m["median"] == 0 and m["near_copies"] == 1.0 and m["ratio"] == 0
    s = memorisation.memorisation(str(shifted), train)
    assert s["median"] > 0 and s["near_copies"] < 1.0
    # the training digits' own nearest-neighbour median, recomputed by brute force on the flattened pixels
    flat = train.double().flatten(1).numpy()
    nn = []
    for i in range(len(flat)):  # one row at a time: the full 1797 x 1797 x 256 difference array is 6.6 GB
        d = np.sqrt(((flat - flat[i]) ** 2).sum(1))
        d[i] = np.inf
        nn.append(d.min())
    assert s["train_median"] == pytest.approx(np.median(nn), rel=1e-12)


def test_best_lr_is_the_lowest_fd_at_the_sweep_length_with_ties_to_the_lower_lr():
    args = SimpleNamespace(variants=["layer-norm", "dyt"], lrs=[1e-3, 2e-3, 4e-3], sweep_steps=4)
    fds = {("layer-norm", 1e-3): 50, ("layer-norm", 2e-3): 30, ("layer-norm", 4e-3): 40,
           ("dyt", 1e-3): 20, ("dyt", 2e-3): 20, ("dyt", 4e-3): 25}
    # the final point decides, not an earlier one
    sweep = {k: {"curve": [[2, 1.0, 0.1], [4, fd, 0.5]]} for k, fd in fds.items()}
    assert digits_study.best_lrs(args, sweep) == {"layer-norm": 2e-3, "dyt": 1e-3}


def test_the_sweep_records_each_wave_before_the_next_trains(tmp_path, monkeypatch):
    """A session cut short in the sweep's third wave keeps the first two waves' records (run directories
    do not outlive a session), and the next session trains only what has no record."""
    args = SimpleNamespace(variants=["layer-norm", "none", "dyt"], lrs=[1e-3, 2e-3], sweep_steps=4, fid_every=2,
                           curve_samples=10, curve_sampling_steps=2, parallel=2, report=False,
                           records=str(tmp_path / "records"), digits_classifier=UNSCORED, out=str(tmp_path))
    waves = []

    def train_all(args, runs, final, diverged=None):
        waves.append([(v, lr) for v, lr, _, _ in runs])
        if len(waves) == 3:
            raise SystemExit("cut short")
        return {(v, lr, s): f"run-{v}-{lr:g}" for v, lr, s, _ in runs}

    patch(monkeypatch, "train_all", train_all)
    patch(monkeypatch, "find_run", lambda *a, **k: None)  # this session's run dirs: none finished
    patch(monkeypatch, "curve", lambda run, steps: [[steps, 100.0, 0.5]])
    patch(monkeypatch, "training_speed", lambda run: 5.0)
    with pytest.raises(SystemExit, match="cut short"):
        digits_study.lr_sweep(args)
    assert [len(w) for w in waves] == [2, 2, 2]
    kept = sorted(os.listdir(args.records))
    assert kept == sorted(f"sweep-{digits_runs.run_key(v, lr, 0)}.json" for w in waves[:2] for v, lr in w)
    waves.clear()
    patch(monkeypatch, "train_all", lambda args, runs, final, diverged: waves.append(runs) or
                        {(v, lr, s): f"run-{v}-{lr:g}" for v, lr, s, _ in runs})
    sweep = digits_study.lr_sweep(args)
    assert len(waves) == 1 and len(waves[0]) == 2 and len(sweep) == 6 and all(sweep.values())


def test_a_diverging_sweep_run_is_recorded_as_diverged_and_never_chosen(tmp_path, monkeypatch):
    """train.py stops a run whose loss became non-finite (exit DIVERGED_EXIT): in the sweep that is a result
    (the lr is too large), the other runs go on; any other failure still stops the study, naming the log."""
    args = SimpleNamespace(variants=["none"], lrs=[2e-3, 8e-3], sweep_steps=4, fid_every=2, curve_samples=10,
                           curve_sampling_steps=2, parallel=2, report=False, records=str(tmp_path / "records"),
                           digits_classifier=UNSCORED, out=str(tmp_path))
    said = {2e-3: "print('step 4/4'); raise SystemExit(0)",
            8e-3: "print('error: loss became nan between steps 0 and 500; stopping.'); "
                  f"raise SystemExit({DIVERGED_EXIT})"}
    patch(monkeypatch, "train_command", lambda args, v, lr, s, steps, final: [sys.executable, "-c", said[lr]])
    # the diverged run made no checkpoint (train.py checks the loss before the first one), so there is no run
    patch(monkeypatch, "find_run", lambda args, v, lr, *a, **k: None if lr == 8e-3 else "runs/000-x")
    patch(monkeypatch, "run_step", lambda run: 0)
    patch(monkeypatch, "curve", lambda run, steps: [[steps, 100.0, 0.5]])
    patch(monkeypatch, "training_speed", lambda run: 5.0)
    sweep = digits_study.lr_sweep(args)
    assert sweep[("none", 8e-3)]["diverged"] == "loss became nan between steps 0 and 500"
    assert sweep[("none", 8e-3)]["curve"] == [] and sweep[("none", 2e-3)]["curve"] == [[4, 100.0, 0.5]]
    assert digits_study.best_lrs(args, sweep) == {"none": 2e-3}
    lines = digits_report.sweep_lines({"sweep": {digits_runs.run_key("none", lr, 0): sweep[("none", lr)] for lr in args.lrs},
                                      "best_lr": {"none": 2e-3}}, args)
    assert "| none | **100** | diverged |" in lines
    # every lr diverged: a clear error, not a run at a diverging lr
    with pytest.raises(UsageError, match="every lr of the sweep diverged for none"):
        digits_study.best_lrs(args, {("none", lr): sweep[("none", 8e-3)] for lr in args.lrs})
    # a finite blow-up (a final run's --stop-loss-ratio) is a divergence too, recorded with its size
    said[2e-3] = ("print('error: loss became 0.7243 between steps 7500 and 8000, 33.1x its lowest logged value "
                  f"0.02188 (--stop-loss-ratio 5); stopping.'); raise SystemExit({DIVERGED_EXIT})")
    diverged = {}
    digits_runs.train_all(args, [("none", 2e-3, 0, 4)], final=True, diverged=diverged)
    assert diverged == {("none", 2e-3, 0): "loss became 0.7243 between steps 7500 and 8000, 33.1x its lowest "
                                           "logged value 0.02188"}
    # a failure that is not a divergence stops the study, whatever its log says: the exit code decides
    said[2e-3] = "print('loss became nan between steps 0 and 2'); raise SystemExit(1)"
    with pytest.raises(JobError, match="none-lr0.002-s0 failed \\(exit 1\\)"):
        digits_runs.train_all(args, [("none", 2e-3, 0, 4)], final=False, diverged={})


def test_final_runs_with_a_decaying_lr_never_extend_the_sweeps_constant_lr_run(tmp_path):
    def fake_run(index, **config):
        run = tmp_path / "runs" / f"{index:03d}-DiT-S-4-layer-norm"
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "latest.pt").write_bytes(b"")
        (run / "config.json").write_text(json.dumps(dict(normalization="layer-norm", lr=2e-3, global_seed=0, **config)))
        return str(run)

    sweep = fake_run(0, lr_schedule="constant", max_steps=3000, grad_clip=None)
    args = SimpleNamespace(out=str(tmp_path), lr_schedule="cosine", final_fid_every=2000, fid_every=1000, grad_clip=None,
                           digits_ref="d/digits", curve_samples=10, curve_sampling_steps=2, digits_classifier="c.pt",
                           stop_loss_ratio=5.0)
    assert digits_study.find_run(args, "layer-norm", 2e-3, 0, 3000, final=False) == sweep
    assert digits_study.find_run(args, "layer-norm", 2e-3, 0, 8000, final=True) is None
    cmd = digits_runs.train_command(args, "layer-norm", 2e-3, 0, 8000, final=True)
    assert "--resume" not in cmd and cmd[cmd.index("--lr-schedule") + 1] == "cosine" and "--grad-clip" not in cmd
    assert cmd[cmd.index("--fid-every") + 1] == "2000" and cmd[cmd.index("--max-steps") + 1] == "8000"
    assert cmd[cmd.index("--stop-loss-ratio") + 1] == "5"  # final runs stop at a finite blow-up; the sweep's not
    assert "--stop-loss-ratio" not in digits_runs.train_command(args, "layer-norm", 2e-3, 0, 3000, final=False)
    final = fake_run(1, lr_schedule="cosine", max_steps=8000, grad_clip=None)
    assert digits_study.find_run(args, "layer-norm", 2e-3, 0, 8000, final=True) == final
    assert digits_study.find_run(args, "layer-norm", 2e-3, 0, 3000, final=False) == sweep  # still the sweep's
    assert digits_study.find_run(args, "layer-norm", 2e-3, 0, 12000, final=True) is None  # another length
    # clipped finals are runs of their own (an unclipped run of the same length is not continued clipped)
    args.grad_clip = 0.5
    assert digits_study.find_run(args, "layer-norm", 2e-3, 0, 8000, final=True) is None
    cmd = digits_runs.train_command(args, "layer-norm", 2e-3, 0, 8000, final=True)
    assert "--resume" not in cmd and cmd[cmd.index("--grad-clip") + 1] == "0.5"
    clipped = fake_run(2, lr_schedule="cosine", max_steps=8000, grad_clip=0.5)
    assert digits_study.find_run(args, "layer-norm", 2e-3, 0, 8000, final=True) == clipped
    assert digits_study.find_run(args, "layer-norm", 2e-3, 0, 3000, final=False) == sweep  # the sweep never clips
    args.grad_clip = None
    # constant-lr finals extend the sweep's run (the run that would have gone there directly)
    args.lr_schedule = "constant"
    cmd = digits_runs.train_command(args, "layer-norm", 2e-3, 0, 8000, final=True)
    assert cmd[cmd.index("--resume") + 1] == sweep and cmd[cmd.index("--fid-every") + 1] == "2000"
    assert cmd[cmd.index("--stop-loss-ratio") + 1] == "5"  # also when a final run is resumed


def test_a_variant_whose_final_run_diverges_trains_all_its_seeds_at_the_next_lower_lr(tmp_path, monkeypatch):
    """The sweep (short) cannot see a divergence late in a long run: a final run that diverges is recorded as
    such, and every seed of its variant, also one already recorded at that lr, trains at the next lower --lrs
    value; the other variants keep theirs; the report says so; past the lowest lr it is a clear error."""
    args = SimpleNamespace(variants=["layer-norm", "none"], seeds=[0, 1], lrs=[1e-3, 2e-3, 4e-3], parallel=2,
                           report=False, records=str(tmp_path / "records"), digits_classifier=UNSCORED,
                           out=str(tmp_path), steps=8, sweep_steps=4,
                           fid_every=2, curve_samples=10, curve_sampling_steps=2, lr_schedule="cosine",
                           final_fid_every=2, samples=10, sampling_steps=2, grad_clip=None, cfg_scale=1.5,
                           cfg_candidates=[1.5], cfg_samples=10, noise_seeds=[1])
    diverges = {("none", 4e-3, 1)}  # seed 0 at 4e-3 trains fine, seed 1 does not
    waves, noised = [], []
    # phase 7 follows each wave, for the runs it recorded (not the diverged one), while their directories exist
    patch(monkeypatch, "sampling_noise",
                        lambda args, finals: noised.append(sorted((v, s, r["lr"]) for (v, s), r in finals.items())))

    def train_all(args, runs, final, diverged=None):
        waves.append(sorted((v, lr, s) for v, lr, s, _ in runs))
        for v, lr, s, _ in runs:
            if (v, lr, s) in diverges:
                diverged[(v, lr, s)] = "loss became nan between steps 4 and 6"
        return {(v, lr, s): f"run-{v}-{lr:g}-{s}" for v, lr, s, _ in runs}

    patch(monkeypatch, "train_all", train_all)
    patch(monkeypatch, "sample_all", lambda args, items: {it: (dict(fd_digits=1.0, precision=1.0,
                        recall=1.0, accuracy=1.0), "x.npz") for it in items})
    for name in ("curve", "training_speed", "outliers_of", "memorisation", "save_grid_images"):
        patch(monkeypatch, name, lambda *a: None)
    best = {"layer-norm": 4e-3, "none": 4e-3}
    finals, cfg = digits_study.final_runs(args, best)
    assert waves == [[("layer-norm", 4e-3, 0), ("none", 4e-3, 0)], [("layer-norm", 4e-3, 1), ("none", 4e-3, 1)],
                     [("none", 2e-3, 0), ("none", 2e-3, 1)]]
    assert {k: r["lr"] for k, r in finals.items()} == {("layer-norm", 0): 4e-3, ("layer-norm", 1): 4e-3,
                                                        ("none", 0): 2e-3, ("none", 1): 2e-3}
    assert cfg["scale"] == 1.5 and "diverged" not in finals[("none", 0)]
    assert noised == [[("layer-norm", 0, 4e-3), ("none", 0, 4e-3)], [("layer-norm", 1, 4e-3)],
                      [("none", 0, 2e-3), ("none", 1, 2e-3)]]
    diverged = digits_study.read_record(args, "final-none-lr0.004-s1", digits_study.FINAL_SETTINGS)
    assert diverged["diverged"] == "loss became nan between steps 4 and 6" and "unguided" not in diverged
    lrs, stepped = digits_study.final_lrs(args, best)
    assert lrs == {"layer-norm": 4e-3, "none": 2e-3} and [r["seed"] for r in stepped["none"]] == [1]
    waves.clear()  # a rerun (a later session) trains nothing, but first tops up every recorded model's noise sets
    assert digits_study.final_runs(args, best)[0] == finals and waves == []
    assert noised[-1] == [("layer-norm", 0, 4e-3), ("layer-norm", 1, 4e-3), ("none", 0, 2e-3), ("none", 1, 2e-3)]
    summary = dict(table={}, floor=dict(fd_digits=1, precision=1, recall=1, accuracy=1), missing=[], cfg_scale=1.5,
                   cfg_candidates={}, final_lr=lrs, stepped_down={"none": ["none-lr0.004-s1 loss became nan between "
                                                                            "steps 4 and 6"]})
    text = "\n".join(digits_report.final_lines(summary, args))
    assert "none at 0.002 (none-lr0.004-s1 loss became nan between steps 4 and 6)" in text
    # every lr down to the lowest diverged: an error naming the runs, not a run at a diverging lr
    diverges.update({("none", 2e-3, 0), ("none", 1e-3, 1)})
    for key in ("none-lr0.002-s1", "none-lr0.002-s0"):
        os.remove(os.path.join(args.records, f"final-{key}.json"))
    with pytest.raises(UsageError, match="none: a final run diverged at every lr up to its sweep's best 0.004"):
        digits_study.final_runs(args, best)


def study_command(digits, classifier, *flags):
    """The tiny study's command on a digits folder of its own (train.py --demo writes it there) and the
    session's classifier; later flags win. Its jobs go through submitit's debug executor, one by one from
    this process (quicker; the local executor is tested in test_runner.py and through the make targets)."""
    return [sys.executable, "study.py", "digits", "--digits-ref", digits, "--digits-classifier", classifier,
            "--variants", "layer-norm", "--lrs", "2e-3",
            "--sweep-steps", "2", "--steps", "4", "--fid-every", "2", "--final-fid-every", "2", "--lr-schedule", "constant",
            "--curve-samples", "10",
            "--curve-sampling-steps", "2", "--samples", "20", "--sampling-steps", "2", "--cfg-scale", "1",
            "--noise-seeds", "1", "--cluster", "debug", *flags]


def report(capsys, digits, classifier, *flags):
    """The tiny study's --report (it trains nothing); its stdout."""
    return run_study(capsys, digits, classifier, "--report", *flags)


def run_study(capsys, digits, classifier, *flags):
    """The tiny study through study.py's main, in this process (its runs are subprocesses all the same); its
    stdout, the jobs' echoed lines included."""
    capsys.readouterr()
    study.main(study_command(digits, classifier, *flags)[2:])
    return capsys.readouterr().out


def test_tile_by_class_puts_each_pick_in_its_digits_column_with_grey_gaps():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (25, 3, 5, 3), dtype=np.uint8)
    labels = np.array([i % 10 for i in range(25)])  # digits 0-4 three times, 5-9 twice
    gap, fill, per_class = 1, 96, 3
    canvas = digits_report.tile_by_class(images, labels, per_class, gap=gap, fill=fill)
    assert canvas.shape == (gap + 3 * (3 + gap), gap + 10 * (5 + gap), 3)
    expected = np.full(canvas.shape, fill, np.uint8)
    for digit in range(10):
        for row, i in enumerate(np.flatnonzero(labels == digit)[:per_class]):  # brute force: pick by pick
            expected[1 + 4 * row:4 + 4 * row, 1 + 6 * digit:6 + 6 * digit] = images[i]
    np.testing.assert_array_equal(canvas, expected)
    assert (canvas[9:12, 1 + 6 * 7:6 + 6 * 7] == fill).all()  # digit 7 has two picks: its third cell stays grey


def test_the_report_names_runs_scored_with_another_or_an_unknown_classifier():
    same = {"floor": "aaa", "none s0": "aaa", "dyt s0": "aaa"}
    assert digits_report.classifier_lines(same) == []
    mixed = {**same, "layer-norm s0": None, "none s1": "bbb", "dyt s1": "bbb"}
    (line, _), = [digits_report.classifier_lines(mixed)]
    assert "the other runs with aaa" in line and "none s1, dyt s1 with bbb" in line
    assert "layer-norm s0 with one not recorded" in line and "none s0" not in line


def test_tiny_study_runs_resumes_from_records_and_reports(tmp_path, digits_classifier, capsys):
    out = tmp_path / "study"
    common = (str(tmp_path / "digits"), digits_classifier)
    first = run_study(capsys, *common, "--seeds", "0", "--out", str(out))
    assert "lr sweep: 0 of 1 runs recorded, 1 to train" in first
    assert "training 1 of 1 runs (2 steps to go)" in first.split("sampling")[0].split("[digits]")[3]  # seed 0 extended
    records = out / "records"
    sweep = json.load(open(records / "sweep-layer-norm-lr0.002-s0.json"))
    final = json.load(open(records / "final-layer-norm-lr0.002-s0.json"))
    assert sweep["run"] == final["run"]  # the sweep's run, extended
    # the curve is the run's own metrics.jsonl
    rows = [json.loads(line) for line in open(out / "runs" / final["run"] / "metrics.jsonl")]
    assert final["curve"] == [[r["step"], r["fd_digits"], r["accuracy"]] for r in rows] and len(rows) == 2
    assert final["guided"]["memorisation"]["median"] > 0
    assert set(final["unguided"]) >= {"fd_digits", "precision", "recall", "accuracy"}
    assert final["digits_classifier"] == sweep["digits_classifier"] == classifier_id(digits_classifier)
    summary = json.load(open(out / "summary.json"))
    assert summary["best_lr"] == {"layer-norm": 2e-3}
    assert summary["table"]["layer-norm"]["guided"]["accuracy"]["values"] == [final["guided"]["accuracy"]]
    # guidance 1 is the unguided set, sampled once and scored the same
    assert final["guided"]["fd_digits"] == final["unguided"]["fd_digits"]
    assert sorted(os.listdir(out / "samples")) == [f"{final['run']}-cfg1-n20" + x for x in ("", "-seed1")]
    # phase 7: the unguided set drawn again at the noise seed, scored the same way
    noise = json.load(open(records / "noise-layer-norm-lr0.002-s0.json"))
    assert sorted(noise["sets"]) == ["1"] and noise["sets"]["1"]["fd_digits"] != final["unguided"]["fd_digits"]
    assert "### Sampling noise" in first
    # the floor at the sets' labels assumes sample_ddp.py's labels: set_labels must be them, seed by seed
    for folder, seed in ((f"{final['run']}-cfg1-n20", 0), (f"{final['run']}-cfg1-n20-seed1", 1)):
        (npz,) = glob.glob(str(out / "samples" / folder / "*.npz"))
        assert np.load(npz)["arr_1"].tolist() == digits_report.set_labels(20, seed).tolist()
    assert sorted(summary["floor_at_labels"]) == ["0", "1"] and "| real digits, the sets' labels |" in first

    # a later session: no run directories, only the records; adding seed 1 trains only seed 1
    shutil.rmtree(out / "runs")
    shutil.rmtree(out / "samples")
    second = run_study(capsys, *common, "--seeds", "0", "1", "--out", str(out), "--noise-seeds")  # (no noise sets: quicker)
    assert "lr sweep: 1 of 1 runs recorded, 0 to train" in second and second.count("[digits] training") == 1
    assert "training 1 of 1 runs (4 steps to go)" in second
    again = report(capsys, *common, "--seeds", "0", "1", "--out", str(out))
    assert "Not all scored with one digits classifier" not in again
    table = json.load(open(out / "summary.json"))["table"]["layer-norm"]
    assert table["seeds"] == [0, 1] and "real digits" in again
    assert os.path.isfile(out / "grid.png") and os.path.isfile(out / "curves.png")
    # --record PAGE: the page links its figures in ../figures/, named after the page
    os.makedirs(tmp_path / "results")
    report(capsys, *common, "--seeds", "0", "1", "--out", str(out), "--record", str(tmp_path / "results" / "long.md"))
    page = (tmp_path / "results" / "long.md").read_text()
    head = page.splitlines()[:7]  # title, provenance, the result in words, one line of what was run
    assert head[0].startswith("# The digits study") and head[2].startswith("_Written by `") and head[1] == head[3] == ""
    noise_s0 = json.load(open(records / "noise-layer-norm-lr0.002-s0.json"))["sets"]["1"]["fd_digits"]
    s0 = (final["unguided"]["fd_digits"] + noise_s0) / 2  # seed 0: its two sets; seed 1: its one set
    s1 = json.load(open(records / "final-layer-norm-lr0.002-s1.json"))["unguided"]["fd_digits"]
    assert head[4] == (f"At 4 steps, seeds 0 1: unguided FD-digits (lower is better; mean over seeds of each "
                       f"model's 1 to 2 sample sets), lowest first: layer-norm {(s0 + s1) / 2:.3g}.")
    assert head[6] == ("Run: variants layer-norm; lr sweep 0.002 at seed 0, 2 steps; curves of 10 samples (2 DDPM "
                       "steps); final runs at seeds 0 1, 4 steps (constant lr), 20 samples per set (2 DDPM steps), "
                       "guided at scale 1.")
    for name in ("lr_sweep", "curves", "grid"):
        assert f"](../figures/long_{name}.png)" in page and f"]({name}.png)" not in page
        assert (tmp_path / "figures" / f"long_{name}.png").read_bytes() == (out / f"{name}.png").read_bytes()
    # a report while the study is under way (seed 2 not trained): the recorded runs, the missing one named
    partial = report(capsys, *common, "--seeds", "0", "1", "2", "--out", str(out))
    assert "**Not yet measured** (1 of 3 final runs" in partial and "): layer-norm s2." in partial
    assert "| layer-norm | 0.002 | 0 1 |" in partial and "[digits] training" not in partial
    # records made with other settings are refused, not silently mixed in
    with pytest.raises(SystemExit, match="^error: .*other settings"):  # one line through study.py, no traceback
        report(capsys, *common, "--out", str(out), "--sweep-steps", "4")
    # another guidance scale would leave the recorded runs guided at the old one: refused, the scale named
    with pytest.raises(SystemExit, match="^error: .*guides at 1, not --cfg-scale 2"):
        report(capsys, *common, "--seeds", "0", "1", "--out", str(out), "--cfg-scale", "2")


def test_real_digit_floor_scores_real_digits_as_near_perfect(tmp_path, digits_classifier):
    """The floor of the report's table: --samples real digits against the reference itself. The classifier
    recognises them, their features sit inside the reference's (precision), and the count is the one asked."""
    from ditlab import data

    ref = data.write_digits_folder(str(tmp_path / "digits"))
    floor = digits_report.real_floor(SimpleNamespace(samples=300, digits_ref=ref, digits_classifier=digits_classifier))
    assert set(floor) == set(digits_runs.QUALITY)
    assert floor["accuracy"] >= 0.97 and floor["precision"] >= 0.9 and floor["fd_digits"] < 20


def test_the_floor_at_an_uneven_label_draw_is_higher_than_the_balanced_floor(tmp_path, digits_classifier):
    """Sample seed 0 at 1,000 digits draws 81 to 123 of a class; real digits at those counts still are
    recognised, but their FD-digits against the (nearly balanced) 1,797 rises well above the balanced draw's:
    the reason the report gives both floors (measured at 1,000: 8.6 against 3.3)."""
    from ditlab import data

    labels = digits_report.set_labels(1000, 0)
    counts = np.bincount(labels, minlength=10)
    assert counts.min() == 81 and counts.max() == 123  # the docstring's and the docs' figures
    args = SimpleNamespace(samples=1000, digits_ref=data.write_digits_folder(str(tmp_path / "digits")),
                           digits_classifier=digits_classifier)
    balanced, uneven = digits_report.real_floor(args), digits_report.real_floor(args, 0)
    assert uneven["accuracy"] >= 0.97 and uneven["fd_digits"] > 2 * balanced["fd_digits"]


def test_noise_report_removes_the_label_effect_and_pairs_variants_at_the_same_sample_seeds():
    """Excess = FD minus the floor at that seed's labels; minus layer-norm = per sample seed, the variant's
    mean over its models minus layer-norm's, over the seeds every model has. Checked by hand."""
    noise = {"layer-norm s0": {"0": dict(fd_digits=22.0), "1": dict(fd_digits=17.0), "2": dict(fd_digits=16.0)},
             "layer-norm s1": {"0": dict(fd_digits=20.0), "1": dict(fd_digits=15.0)},
             "none s0": {"0": dict(fd_digits=19.0), "1": dict(fd_digits=15.0), "2": dict(fd_digits=14.0)}}
    floors = {"0": dict(fd_digits=8.0), "1": dict(fd_digits=5.0), "2": dict(fd_digits=6.0)}
    summary = dict(table={"layer-norm": {}, "none": {}}, settings=dict(samples=10), noise=noise, floor_at_labels=floors)
    lines = digits_report.noise_lines(summary)
    assert "8 (seed 0), 5 (seed 1), 6 (seed 2)" in " ".join(lines)
    cells = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines if line.startswith("| layer-norm") or
             line.startswith("| none")}
    ln_excess = [statistics.fmean([22 - 8, 17 - 5, 16 - 6]), statistics.fmean([20 - 8, 15 - 5])]
    assert cells["layer-norm"][4] == f"{statistics.fmean(ln_excess):.3g} [{min(ln_excess):.3g}, {max(ln_excess):.3g}]"
    assert cells["layer-norm"][5] == f"{statistics.fmean([(22 - 8) - (16 - 6), (20 - 8) - (15 - 5)]):.3g}"
    assert cells["layer-norm"][6] == f"{max(ln_excess) - min(ln_excess):.3g}"
    assert cells["layer-norm"][7] == "-"
    gaps = [19 - (22 + 20) / 2, 15 - (17 + 15) / 2]  # seeds 0 and 1: seed 2 is missing for layer-norm s1
    assert cells["none"][7] == f"{statistics.fmean(gaps):.3g} [{min(gaps):.3g}, {max(gaps):.3g}]"
    # without floors (summaries from before they were measured) the excess goes, the paired gaps stay
    del summary["floor_at_labels"]
    lines = digits_report.noise_lines(summary)
    assert all("excess" not in line for line in lines)
    none = [line.split(" | ") for line in lines if line.startswith("| none")][0]
    assert none[4] == f"{statistics.fmean(gaps):.3g} [{min(gaps):.3g}, {max(gaps):.3g}]"


def write_length_record(folder, variant, seed, steps, fd, accuracy, lr=4e-3, grad_clip=None):
    """A final-run record as the study writes it, with the fields the length check reads."""
    os.makedirs(folder, exist_ok=True)
    quality = dict(fd_digits=fd, precision=0.9, recall=0.8, accuracy=accuracy)
    memo = dict(ratio=1.1, near_copies=0.01)
    record = dict(variant=variant, lr=lr, seed=seed, cfg_scale=1.5, settings=dict(steps=steps, grad_clip=grad_clip),
                  curve=[[steps // 2, 2 * fd, accuracy - 0.1], [steps, 1.2 * fd, accuracy]],
                  unguided=dict(quality, memorisation=memo), guided=dict(quality, fd_digits=fd + 5, memorisation=memo),
                  outliers=dict(max_median_ratio=40.0))
    with open(os.path.join(folder, f"final-{digits_runs.run_key(variant, lr, seed)}.json"), "w") as f:
        json.dump(record, f)


def test_length_check_finds_the_first_length_whose_doubling_no_longer_helps(tmp_path):
    """LayerNorm: 100 -> 50 -> 47 (-6%, accuracy +0.005): trained at the middle length. none: 100 -> 60 -> 40:
    still improving. dyt: FD -5% but accuracy +0.05: still improving (both criteria count). A run at one
    length only is listed as not compared."""
    folders = [str(tmp_path / f"L{n}") for n in (1000, 2000, 4000)]
    series = {"layer-norm": [(100, 0.8), (50, 0.9), (47, 0.905)], "none": [(100, 0.8), (60, 0.85), (40, 0.9)],
              "dyt": [(100, 0.8), (95, 0.85)]}
    for v, points in series.items():
        for folder, steps, (fd, acc) in zip(folders, (1000, 2000, 4000), points):
            write_length_record(folder, v, 0, steps, fd, acc)
    write_length_record(folders[0], "derf", 1, 1000, 80, 0.8)
    found = digits_lengths.length_records(folders)
    verdict = {k[0]: v for k, v in {k: digits_lengths.length_verdict(r, 0.1, 0.01) for k, r in found.items()}.items()}
    assert verdict["layer-norm"][0] == 2000 and verdict["layer-norm"][1]["fd"] == pytest.approx(-0.06)
    assert verdict["none"] == (None, dict(to=4000, fd=pytest.approx(-1 / 3), accuracy=pytest.approx(0.05), sets=1))
    assert verdict["dyt"][0] is None and verdict["derf"] == (None, None)
    # a looser tolerance moves none's length; the accuracy criterion alone keeps dyt improving
    assert digits_lengths.length_verdict(found[("none", 0)], 0.5, 0.1)[0] == 1000
    assert digits_lengths.length_verdict(found[("dyt", 0)], 0.1, 0.1)[0] == 1000

    out, page = tmp_path / "out", tmp_path / "results" / "digits_lengths.md"
    cmd = [sys.executable, "study.py", "digits", "--lengths", *folders, "--out", str(out), "--record", str(page)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    text = page.read_text()
    head = text.splitlines()[:5]  # title, provenance, one line of what was run
    assert head[0] == "# The digits study: how long is trained?" and head[2].startswith("_Written by `")
    assert head[4].startswith(f"Run: the final runs recorded in `{folders[0]}`") and "less than 10%" in head[4]
    assert "| layer-norm | 0.004 | 0 | 2000 | 50 | 1 | -50% | 0.9 |" in text and "| layer-norm | 0.004 | 0 | 4000 | 47 | 1 | -6% |" in text
    assert "- layer-norm seed 0: trained at 2000 steps (to 4000 steps: FD-digits -6%, accuracy +0.005)" in text
    assert "- none seed 0: still improving at its longest length (to 4000 steps: FD-digits -33%" in text
    assert "**Not every run has stopped improving** (2 of 3" in text and "1 more run(s) are recorded at one length" in text
    assert "| derf |" not in text and "](../figures/digits_lengths.png)" in text
    assert (tmp_path / "figures" / "digits_lengths.png").read_bytes() == (out / "lengths.png").read_bytes()
    # with LayerNorm alone every compared run is trained: the study's length is its length
    for name, steps, (fd, acc) in zip("abc", (1000, 2000, 4000), series["layer-norm"]):
        write_length_record(str(tmp_path / "ln" / name), "layer-norm", 0, steps, fd, acc)
    args = SimpleNamespace(lengths=[str(tmp_path / "ln" / n) for n in "abc"], converged_within=0.1, accuracy_within=0.01)
    text = "\n".join(digits_lengths.length_lines(digits_lengths.length_records(args.lengths), args))
    assert "**Every run compared is trained at 2000 steps**" in text


def test_length_check_compares_the_means_over_the_sample_seeds_both_lengths_have(tmp_path):
    """With noise records (phase 7) the comparison is paired: seed 0 alone says 50 -> 47 (-6%, trained), the
    mean over seeds 0 and 1 says 55 -> 43.5 (-21%, still improving); seed 2, drawn at the shorter length only,
    is left out of the change but shown with its length."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_length_record(a, "layer-norm", 0, 1000, 50, 0.9)
    write_length_record(b, "layer-norm", 0, 2000, 47, 0.9)
    for folder, sets in ((a, {"1": 60.0, "2": 10.0}), (b, {"1": 40.0})):
        with open(os.path.join(folder, "noise-layer-norm-lr0.004-s0.json"), "w") as f:
            json.dump(dict(sets={k: dict(fd_digits=x, precision=0.9, recall=0.8, accuracy=0.9) for k, x in sets.items()}), f)
    runs = digits_lengths.length_records([a, b])[("layer-norm", 0)]
    assert sorted(runs[1000]["sets"]) == [0, 1, 2]
    length, changes = digits_lengths.length_verdict(runs, 0.1, 0.01)
    assert length is None and changes["sets"] == 2 and changes["fd"] == pytest.approx(43.5 / 55 - 1)
    args = SimpleNamespace(lengths=[a, b], converged_within=0.1, accuracy_within=0.01)
    text = "\n".join(digits_lengths.length_lines(digits_lengths.length_records([a, b]), args))
    assert "| layer-norm | 0.004 | 0 | 1000 | 40 | 50 60 10 | - |" in text
    assert "| layer-norm | 0.004 | 0 | 2000 | 43.5 | 47 40 | -21% (2 paired) |" in text


def test_length_check_follows_a_variant_whose_lr_changes_with_the_length(tmp_path):
    """none at 4e-3 for 1000 steps and at 2e-3 with clipping for 2000 (its 4e-3 diverging there): one run
    compared across the two lengths, each row with its own recipe and the verdict naming the change."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_length_record(a, "none", 0, 1000, 50, 0.9)
    write_length_record(b, "none", 0, 2000, 40, 0.9, lr=2e-3, grad_clip=1.0)
    found = digits_lengths.length_records([a, b])
    assert list(found) == [("none", 0)] and sorted(found[("none", 0)]) == [1000, 2000]
    args = SimpleNamespace(lengths=[a, b], converged_within=0.1, accuracy_within=0.01)
    text = "\n".join(digits_lengths.length_lines(found, args))
    assert "| none | 0.004 | 0 | 1000 | 50 |" in text and "| none | 0.002 clip 1 | 0 | 2000 | 40 | 1 | -20% |" in text
    assert "- none seed 0: still improving at its longest length (to 2000 steps, lr 0.004 -> 0.002 clip 1: " \
           "FD-digits -20%, accuracy +0.000)" in text


@pytest.mark.parametrize("case, message", [
    ("empty", "no final-\\*.json records there"),
    ("same length", "are both layer-norm seed 0 at 1000 steps; pass one folder per length"),
    ("one length", "no variant and seed is recorded at two lengths there"),
])
def test_length_check_refuses_folders_it_cannot_compare(tmp_path, case, message):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    os.makedirs(a)
    if case != "empty":
        write_length_record(a, "layer-norm", 0, 1000, 50, 0.9)
        write_length_record(b, "layer-norm" if case == "same length" else "none", 0, 1000, 40, 0.9)
    args = SimpleNamespace(lengths=[a, b] if case != "empty" else [a], out=str(tmp_path / "out"), record="",
                           converged_within=0.1, accuracy_within=0.01)
    with pytest.raises(InputError, match=message):
        digits_lengths.write_lengths_report(args)


def test_sampling_noise_draws_each_model_again_tops_up_and_reports_the_spreads(tmp_path, monkeypatch):
    """Phase 7 samples only the (model, seed) sets it has not recorded, keeps them as noise records, adds
    seed 3 later without redrawing 1 and 2, and with --report (or a run directory gone) samples nothing.
    The report's within-model and between-seed spreads are checked against a hand computation."""
    args = SimpleNamespace(records=str(tmp_path / "records"), digits_classifier=UNSCORED, out=str(tmp_path), steps=8,
                           samples=10, report=False,
                           noise_seeds=[1, 2], sweep_steps=4, fid_every=2, curve_samples=10, curve_sampling_steps=2,
                           lr_schedule="cosine", final_fid_every=2, sampling_steps=2, grad_clip=None)
    fd = {("run-a", 0): 50.0, ("run-a", 1): 40.0, ("run-a", 2): 45.0, ("run-a", 3): 47.0,
          ("run-b", 0): 30.0, ("run-b", 1): 20.0, ("run-b", 2): 25.0, ("run-b", 3): 26.0}
    finals = {("layer-norm", s): dict(lr=4e-3, unguided=dict(fd_digits=fd[(run, 0)], precision=0.9, recall=0.8,
                                                               accuracy=0.9))
              for s, run in ((0, "run-a"), (1, "run-b"))}
    runs = {0: "run-a", 1: "run-b"}
    drawn = []

    def sample_all(args, items):
        drawn.extend(items)
        return {it: (dict(fd_digits=fd[(it[0], it[3])], precision=0.9, recall=0.8, accuracy=0.9), "x.npz") for it in items}

    patch(monkeypatch, "sample_all", sample_all)
    patch(monkeypatch, "find_run", lambda args, v, lr, s, steps, final: runs[s])
    patch(monkeypatch, "run_step", lambda run: 8 if run else 0)
    noise = digits_study.sampling_noise(args, finals)
    assert sorted(drawn) == [("run-a", 1.0, 10, 1), ("run-a", 1.0, 10, 2), ("run-b", 1.0, 10, 1), ("run-b", 1.0, 10, 2)]
    assert {k: m["fd_digits"] for k, m in noise[("layer-norm", 0)].items()} == {0: 50.0, 1: 40.0, 2: 45.0}
    drawn.clear()
    args.noise_seeds = [1, 2, 3]
    runs[1] = None  # run-b's directory is gone: it keeps seeds 1 and 2
    noise = digits_study.sampling_noise(args, finals)
    assert drawn == [("run-a", 1.0, 10, 3)] and sorted(noise[("layer-norm", 1)]) == [0, 1, 2]
    drawn.clear()
    args.report = True
    assert digits_study.sampling_noise(args, finals) == noise and drawn == []
    summary = dict(table={"layer-norm": {}}, settings=dict(samples=10),
                   noise={f"layer-norm s{s}": {str(k): m for k, m in sets.items()} for (_, s), sets in noise.items()})
    row = [line for line in digits_report.noise_lines(summary) if line.startswith("| layer-norm")][0]
    means = [(50 + 40 + 45 + 47) / 4, (30 + 20 + 25) / 3]
    within = ((50 - 40) + (30 - 20)) / 2
    assert row.startswith(f"| layer-norm | {statistics.fmean(means):.3g} [{min(means):.3g}, {max(means):.3g}] | "
                          f"{within:.3g} | {means[0] - means[1]:.3g} |")
    assert "s0: 50 40 45 47 (45.5)" in row
