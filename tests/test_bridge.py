"""The bridge study (ditlab/studies/bridge.py, bridge_report.py): its commands, its records and its report on
records whose answer is known."""

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest

from ditlab.probe import TIMESTEP_GRID
from ditlab.studies import bridge, bridge_report


def args_for(tmp_path, **over):
    p = bridge.parser()
    args = p.parse_args(["--out", str(tmp_path / "out"), "--records", str(tmp_path / "rec")])
    for k, v in over.items():
        setattr(args, k, v)
    return args


def test_each_variant_trains_with_its_own_norms(tmp_path):
    args = args_for(tmp_path)
    for variant, blocks, final in (("layer-norm", "layer-norm", None), ("none", "none", None),
                                   ("ln-blocks", "layer-norm", "none"), ("ln-final", "none", "layer-norm")):
        cmd = bridge.digits_train_command(args, variant, 1)
        assert cmd[cmd.index("--normalization") + 1] == blocks
        assert (cmd[cmd.index("--final-normalization") + 1] if "--final-normalization" in cmd else None) == final
        assert cmd[cmd.index("--lr") + 1] == "0.004" and cmd[cmd.index("--max-steps") + 1] == "8000"
        assert cmd[cmd.index("--global-seed") + 1] == "1" and "--demo" in cmd


def fake_run(folder, name, config):
    """A run directory as newest_run sees it: config.json and a checkpoint file."""
    run = os.path.join(folder, name)
    os.makedirs(os.path.join(run, "checkpoints"))
    open(os.path.join(run, "checkpoints", "latest.pt"), "w").close()
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(config, f)
    return run


def test_runs_are_found_by_variant_seed_and_spread_and_resumed(tmp_path):
    args = args_for(tmp_path)
    base = dict(lr=0.004, global_seed=0, lr_schedule="cosine", max_steps=8000)
    runs = os.path.join(args.out, "runs")
    none = fake_run(runs, "000-DiT-S-4-none", dict(base, normalization="none", final_normalization=None))
    final = fake_run(runs, "001-DiT-S-4-none", dict(base, normalization="none", final_normalization="layer-norm"))
    assert bridge.find_digits_run(args, "none", 0) == none and bridge.find_digits_run(args, "ln-final", 0) == final
    assert bridge.find_digits_run(args, "none", 1) is None
    assert bridge.digits_train_command(args, "ln-final", 0)[2:4] == ["--resume", final]
    toy = os.path.join(args.out, "toy-runs")
    spread = fake_run(toy, "000-DiT-XS-1-none", dict(normalization="none", data_std=0.3, global_seed=2, max_steps=12000))
    assert bridge.find_toy_run(args, "none", 0.3, 2) == spread and bridge.find_toy_run(args, "none", 0.0, 2) is None
    cmd = bridge.toy_command(args, "layer-norm", 1.0, 0)
    assert cmd[cmd.index("--data-std") + 1] == "1" and cmd[cmd.index("--max-steps") + 1] == "12000"


def toy_record(variant, spread, seed, eps):
    """A toy record whose excess eps error is eps(t) at every grid timestep."""
    probe = {str(t): dict(eps_rel_error=eps(t), eps_excess_error=eps(t), eps_opt_error=0.0, x0_rmse_8bit=1.0)
             for t in TIMESTEP_GRID}
    sample = dict(step=12000, rms=eps(0), **({"std": spread, "var_ratio": 1.0} if spread else {}))
    return dict(variant=variant, spread=spread, seed=seed, probe=probe, sample=sample)


def digits_record(variant, seed, eps, fd, zero_fd_ratio):
    probe = {str(t): dict(eps_rel_error=eps(t), x0_rmse_8bit=2.0, var_rel_error=0.1) for t in TIMESTEP_GRID}
    edit = lambda ratio, fd_ratio: dict(ratio_per_t={str(t): ratio for t in TIMESTEP_GRID}, sample_ratio=fd_ratio,
                                        sample=dict(fd_digits=fd * fd_ratio, accuracy=0.8))
    entry = dict(channel=3, rms_share=0.5, **{"mean": edit(1.0, 1.0), "per-t": edit(1.0, 1.0),
                                              "zero": edit(4.0, zero_fd_ratio)},
                 control={"channel": 7, "rms_share": 0.1, **{e: dict(ratio_per_t={str(t): 1.0 for t in TIMESTEP_GRID})
                                                             for e in ("mean", "per-t", "zero")}})
    return dict(variant=variant, seed=seed, probe=probe, max_median=70.0 if variant == "layer-norm" else 9.0,
                baseline=dict(sample=dict(fd_digits=fd, accuracy=0.8)), places={"final.norm": entry})


def test_report_states_the_known_ratios(tmp_path):
    """Records built so that the answer is known: toy LayerNorm 3x none at std 0 and 1x at std 1 (per seed,
    with seed scatter that pairing cancels); digits LayerNorm 1.5x none; zeroing the channel quadruples the
    eps error and doubles FD-digits."""
    seeds = (0, 1, 2)
    toy = {}
    for s in seeds:
        for S, gap in ((0.0, 3.0), (1.0, 1.0)):
            toy[("none", S, s)] = toy_record("none", S, s, lambda t, s=s: 1e-3 * (1 + s))
            toy[("layer-norm", S, s)] = toy_record("layer-norm", S, s, lambda t, s=s, g=gap: g * 1e-3 * (1 + s))
    digits = {}
    for s in seeds:
        digits[("none", s)] = digits_record("none", s, lambda t: 0.1, 50.0 + s, 2.0)
        digits[("layer-norm", s)] = digits_record("layer-norm", s, lambda t: 0.15, 52.0 + s, 2.0)
    args = args_for(tmp_path, variants=["layer-norm", "none"], spreads=[0.0, 1.0], record=str(tmp_path / "docs" /
                    "results" / "bridge.md"))
    os.makedirs(args.records)
    rng = np.random.default_rng(0)
    for v in ("layer-norm", "none"):  # seed 0's samples under the edits, as intervene.py keeps them
        digits[(v, 0)]["grid"] = f"digits-{v}-s0.grid.npz"
        np.savez(os.path.join(args.records, digits[(v, 0)]["grid"]),
                 **{k: rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8) for k in bridge_report.GRID_COLUMNS})
    bridge_report.write_report(args, dict(toy=toy, digits=digits))
    text = open(os.path.join(args.out, "summary.md")).read()
    first = text.split("\n\n")[2]
    assert "LayerNorm's eps error is 1.50x none's at t >= 10 (range 1.50-1.50)" in first
    assert "3.00x none's at data std 0, 1.00x none's at data std 1 (3 seeds per spread)" in first
    assert "| 0 | 3 | 3 [3, 3] | 3 [3, 3] | 3 [3, 3] |" in text and "| 1 | 3 | 1 [1, 1] |" in text
    assert "| digits LayerNorm | " + " | ".join(["1.5 [1.5, 1.5]"] * len(bridge_report.REPORT_T)) + " |" in text
    assert "x4 [4, 4] zeroed; FD-digits x1 [1, 1] (mean), x1 [1, 1] (per-t), x2 [2, 2] (zero)." in text
    assert "- (b) Toy, LayerNorm / none excess eps error (t >= 10): std 0: 3 [3, 3]; std 1: 1 [1, 1]." in text
    assert "(a) Digits, LayerNorm / none eps error: largest at t = 0, 1.5 [1.5, 1.5]. FD-digits" in text  # t = 0 once
    assert "| final.norm | zero | 3 | 4 [4, 4] | 4 [4, 4] | 3 | 2 [2, 2] | 0.8 [0.8, 0.8] |" in text
    assert "| final.norm (control channel) | zero | 3 | 1 [1, 1] | 1 [1, 1] | 0 | - | - |" in text
    assert "| LayerNorm | 3 | 53 [52, 54] | 0.8 [0.8, 0.8] | 70 [70, 70] | 1.5 [1.5, 1.5] |" in text
    page = open(tmp_path / "docs" / "results" / "bridge.md").read()
    assert "](../figures/bridge_ratio_per_t.png)" in page and "](../figures/bridge_edit_grid.png)" in page
    for name in bridge_report.FIGURES.values():
        assert os.path.getsize(tmp_path / "docs" / "figures" / name) > 1000


def test_the_grid_shows_the_seed_whose_mean_edit_moves_fd_the_median_amount():
    recs = [digits_record("ln-blocks", s, lambda t: 0.1, 50.0, 2.0) for s in (0, 1, 2)]
    for rec, fd_ratio in zip(recs, (1.02, 2.9, 2.5)):  # seed 0 the mildest, seed 1 the worst
        rec["places"]["final.norm"]["mean"]["sample_ratio"] = fd_ratio
    assert bridge_report.typical_record(recs)["seed"] == 2
    assert bridge_report.typical_record(recs[:2])["seed"] == 0  # an even count: the lower median
    assert bridge_report.typical_record(recs[1:2])["seed"] == 1


def test_a_report_on_one_seed_says_it_is_too_few(tmp_path):
    toy = {(v, 0.0, 0): toy_record(v, 0.0, 0, lambda t: 1e-3) for v in ("layer-norm", "none")}
    args = args_for(tmp_path, spreads=[0.0])
    bridge_report.write_report(args, dict(toy=toy, digits={}))
    assert "Only 1 seed per cell so far: too few" in open(os.path.join(args.out, "summary.md")).read()


def test_toy_part_trains_records_and_reuses_runs(tmp_path):
    """The toy part end to end, in this process (submitit's debug executor), on 3-step runs: both variants at
    one spread, recorded with the probe's excess error; a rerun trains nothing; --report reads the records."""
    args = args_for(tmp_path, toy_steps=3, toy_sampling_steps=5, toy_samples=50, spreads=[0.5], seeds=[0],
                    cluster="debug", skip_digits=True)
    recs = bridge.run(args)["toy"]
    assert len(recs) == 2 and all(r and set(r["probe"]["0"]) >= {"eps_excess_error", "eps_opt_error"}
                                  for r in recs.values())
    sample = recs[("none", 0.5, 0)]["sample"]
    assert sample["var_ratio"] > 0 and sample["step"] == 3 and sample["num_samples"] == 50
    stamp = os.path.getmtime(os.path.join(args.records, "toy-none-std0.5-s0.json"))
    bridge.run(args)
    assert os.path.getmtime(os.path.join(args.records, "toy-none-std0.5-s0.json")) == stamp
    args.report = True
    assert bridge.run(args)["toy"].keys() == recs.keys()
    os.remove(os.path.join(args.records, "toy-none-std0.5-s0.json"))  # a finished run: recorded again, not trained
    before = sorted(os.listdir(os.path.join(args.out, "toy-runs")))
    args.report = False
    assert bridge.run(args)["toy"][("none", 0.5, 0)]["sample"] == sample
    assert sorted(os.listdir(os.path.join(args.out, "toy-runs"))) == before
    cut_short = args_for(tmp_path, toy_steps=3, toy_sampling_steps=5, toy_samples=50, spreads=[0.5, 2.0], seeds=[0],
                         report=True,
                         skip_digits=True)
    before = sorted(os.listdir(os.path.join(cut_short.out, "toy-runs")))
    assert bridge.run(cut_short)["toy"][("none", 2.0, 0)] is None
    assert sorted(os.listdir(os.path.join(cut_short.out, "toy-runs"))) == before  # --report trains nothing
    text = open(os.path.join(cut_short.out, "summary.md")).read()
    assert "Not recorded yet (2), so not in the tables: toy layer-norm std 2 seed 0, toy none std 2 seed 0." in text


def test_digits_record_reads_intervene_output():
    """digits_record keeps the probe per timestep, the norm inputs' ratios and the blocks' largest max/median."""
    model = dict(probe=dict(
        errors=[dict(t=t, eps_rel_error=0.1, x0_rmse_8bit=3.0, var_rel_error=0.2) for t in (0, 10)],
        norm_inputs=[dict(layer="final.norm", t=0, signal_to_outlier=0.5, outlier_channel=4)],
        outliers=[dict(layer="block.0", t=0, max_median_ratio=12.0), dict(layer="block.1", t=10, max_median_ratio=40.0),
                  dict(layer="x_embed", t=0, max_median_ratio=99.0)]), baseline={}, places={})
    rec = bridge.digits_record(model)
    assert rec["max_median"] == 40.0 and rec["probe"][10]["x0_rmse_8bit"] == 3.0
    assert rec["norm_inputs"]["final.norm"][0]["outlier_channel"] == 4 and not math.isnan(rec["probe"][0]["eps_rel_error"])
