"""The mechanism study's report (ditlab/studies/mechanism.py) from records whose ratios are known."""

import os
from types import SimpleNamespace

from ditlab.studies import mechanism, mechanism_runs
from ditlab.studies.mechanism import REPORT_T
from ditlab.studies.runner import write_record


def record(cell, seed, eps_scale, rms):
    return {"cell": cell, "seed": seed, "eps": {str(t): eps_scale * (t + 1) for t in mechanism.REPORT_T},
            "sample_rms": rms, "max_median": {"block.0": {"0": 3.0 + seed}},
            "norm_inputs": {"final.norm": {"0": {"signal_to_outlier": 0.1}, "100": {"signal_to_outlier": 0.5}}}}


def test_ratio_rows_pair_seeds_and_give_mean_and_range():
    records = {("layer-norm", s, 10): record("layer-norm", s, 2.0 * (s + 1), 4.0) for s in (0, 1)}
    records.update({("ln-blocks", s, 10): record("ln-blocks", s, 1.0 * (s + 1), 1.0 + s) for s in (0, 1)})
    (row,) = mechanism.ratio_rows(records, ["ln-blocks"], 10, "layer-norm")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "ln-blocks" and cells[1] == "2"
    assert cells[2:2 + len(REPORT_T)] == ["0.5 [0.5, 0.5]"] * len(REPORT_T)  # eps halves at every t, both seeds
    assert cells[-1] == "0.375 [0.25, 0.5]"  # sampled: 1/4 and 2/4


def test_report_has_every_part_and_the_stress_twins(tmp_path):
    records = {}
    for cell, scale in (("layer-norm", 2.0), ("none", 1.0), ("layer-norm-wd0.1", 4.0), ("none-wd0.1", 1.0)):
        for s in (0, 1, 2):
            records[(cell, s, 10)] = record(cell, s, scale, scale)
    args = SimpleNamespace(steps=10, seeds=[0, 1, 2], probe_samples=8, num_eval_samples=4, long_steps=[],
                           cells=["layer-norm", "none", "layer-norm-wd0.1", "none-wd0.1"], out=str(tmp_path),
                           record=str(tmp_path / "results" / "page.md"))
    os.makedirs(tmp_path / "results")
    text = mechanism.write_report(args, records)
    # the page opens with its title, provenance, its result in words and one line of what was run, values only
    head = text.splitlines()[:8]
    assert head[0].startswith("# The mechanism study") and head[2].startswith("_Written by `")
    assert head[4] == ("At 10 steps, LayerNorm multiplies the toy's sampled error over no normalization's: "
                       "everywhere 2.00x (3 seeds).")
    assert head[6].startswith("Run: toy CPU preset") and "seeds [0, 1, 2]; 10 steps;" in head[6]
    assert "(8 draws per t) and 4 samples" in head[6] and head[1] == head[3] == head[5] == head[7] == ""
    for part in ("## 1. Localise", "## 2. Ablate", "## 3. Restore", "## 4. Stress", "signal/outlier"):
        assert part in text
    assert "| layer-norm / none | 3 | 2 [2, 2]" in text and "| layer-norm-wd0.1 / none-wd0.1 | 3 | 4 [4, 4]" in text
    # the page links its figure in ../figures/, summary.md the copy beside it
    assert f"]({mechanism.FIGURE})" in text
    page = (tmp_path / "results" / "page.md").read_text()
    assert page == text.replace(f"]({mechanism.FIGURE})", f"](../figures/{mechanism.FIGURE})")
    figure = (tmp_path / "figures" / mechanism.FIGURE).read_bytes()
    assert figure[:8] == b"\x89PNG\r\n\x1a\n" and figure == (tmp_path / mechanism.FIGURE).read_bytes()
    assert (tmp_path / "summary.json").exists()


def test_report_at_a_long_length_has_its_own_errors_ratios_and_outliers(tmp_path):
    records = {}
    for n, scale in ((10, 2.0), (30, 6.0)):  # at the long length LayerNorm's gap triples
        for s in (0, 1, 2):
            records[("layer-norm", s, n)] = record("layer-norm", s, scale, scale)
            records[("none", s, n)] = record("none", s, 1.0, 1.0)
            records[("ln-blocks", s, n)] = record("ln-blocks", s, scale / 2, scale / 2)
    args = SimpleNamespace(steps=10, seeds=[0, 1, 2], probe_samples=8, num_eval_samples=4, long_steps=[30],
                           long_cells=["layer-norm", "none", "ln-blocks"], cells=["layer-norm", "none", "ln-blocks"],
                           out=str(tmp_path), record="")
    text = mechanism.write_report(args, records)
    long = text[text.index("### At 30 steps"):text.index("## 2. Ablate")]
    short = text[:text.index("### At 30 steps")]
    assert "| layer-norm | 3 | 6 [6, 6]" in long and "| ln-blocks | 3 | 3 [3, 3]" in long  # ratio to none
    assert "| ln-blocks | 3 | 0.5 [0.5, 0.5]" in long  # ratio to LayerNorm everywhere
    assert "| layer-norm | 3 | 2 [2, 2]" in short and "| layer-norm | 3 | 6 [6, 6]" not in short
    assert "Outliers at 30 steps" in long and "| layer-norm | 4 [3, 5]" in long  # max/median 3 + seed
    # the localise figure compares the two lengths
    assert f"]({mechanism.LENGTHS_FIGURE})" in text
    assert (tmp_path / mechanism.LENGTHS_FIGURE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_records_writes_no_figure(tmp_path):
    args = SimpleNamespace(steps=10, seeds=[0], probe_samples=8, num_eval_samples=4, long_steps=[],
                           cells=["layer-norm"], out=str(tmp_path), record="")
    text = mechanism.write_report(args, {})
    assert ".png" not in text and not (tmp_path / mechanism.FIGURE).exists()
    args.long_steps, args.long_cells = [30], ["layer-norm"]
    text = mechanism.write_report(args, {})
    assert ".png" not in text and not (tmp_path / mechanism.LENGTHS_FIGURE).exists()


def test_report_while_the_study_is_under_way_uses_the_recorded_runs_and_names_the_rest(tmp_path):
    args = mechanism.parser().parse_args(["--cells", "layer-norm", "none", "--seeds", "0", "1", "--long-steps", "30",
                                          "--long-cells", "layer-norm", "--steps", "10", "--out", str(tmp_path),
                                          "--report"])
    args.records = os.path.join(args.out, "records")
    for cell, seed in (("layer-norm", 0), ("layer-norm", 1), ("none", 0)):  # none s1 and both long runs missing
        write_record(args.records, mechanism.job_name(cell, seed, 10),
                     record(cell, seed, 2.0 if cell == "layer-norm" else 1.0, 1.0),
                     {k: getattr(args, k) for k in mechanism.RECORD_SETTINGS})
    records = mechanism.run_cells(args)  # trains nothing, refuses nothing
    assert set(records) == {("layer-norm", 0, 10), ("layer-norm", 1, 10), ("none", 0, 10)}
    text = mechanism.write_report(args, records)
    assert "**Not yet measured** (3 of 6 runs" in text
    assert "none-10-s1, layer-norm-30-s0, layer-norm-30-s1." in text
    assert "| layer-norm | 1 | 2 [2, 2]" in text  # the localise ratio to none: the one paired seed
    assert not (tmp_path / "runs").exists()
    args.seeds = [0]
    args.long_steps = []
    assert "Not yet measured" not in mechanism.write_report(args, {k: v for k, v in records.items() if k[1] == 0})


def test_every_cell_is_a_valid_train_toy_command_with_its_settings():
    import train_toy

    args = SimpleNamespace(probe_samples=8, num_eval_samples=4, out="results/x")
    for cell, (_, flags) in mechanism.CELLS.items():
        parsed, _ = train_toy.parse_args(mechanism.train_command(args, cell, 1, 100)[2:])
        assert parsed.max_steps == 100 and parsed.global_seed == 1 and parsed.resume == "auto"
        want = dict(zip(flags[::2], flags[1::2]))
        assert parsed.normalization == want["--normalization"]
        assert parsed.final_normalization == want.get("--final-normalization")
        assert parsed.weight_decay == float(want.get("--weight-decay", 0)) and parsed.dropout == float(want.get("--dropout", 0))


def test_tiny_study_records_every_run_with_interventions_and_a_rerun_trains_nothing(tmp_path, capsys, make):
    """The smallest study through its make target, then a rerun through study.py that finds every run recorded."""
    import json

    import study

    argv = ["mechanism", "--cells", "layer-norm", "ln-final", "--seeds", "0", "--steps", "20", "--probe-samples", "4",
            "--num-eval-samples", "4", "--stats-samples", "2", "--intervene-sampling-steps", "3",
            "--out", str(tmp_path / "study")]
    make("mechanism", MECHANISM_ARGS=" ".join(argv[1:]))
    records = {(cell, 0, 20): json.load(open(tmp_path / "study" / "records" / f"{cell}-20-s0.json"))
               for cell in ("layer-norm", "ln-final")}
    assert set(records) == {("layer-norm", 0, 20), ("ln-final", 0, 20)}
    ln = records[("layer-norm", 0, 20)]
    # the intervened cell: every place, every edit; the other cell has none
    assert set(ln["interventions"]["places"]) == {"block.0.norm1", "block.0.norm2", "block.0", "block.1.norm1",
                                                  "block.1.norm2", "block.1", "final.norm"}
    assert "interventions" not in records[("ln-final", 0, 20)]
    assert ln["settings"] == {"steps": 20, "probe_samples": 4, "num_eval_samples": 4}
    assert ln["run_seconds"] >= 0 and ln["intervene_seconds"] > 0
    assert ln["restoring_weights"] == {}  # plain LayerNorm has none
    folder = tmp_path / "study" / "records"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    capsys.readouterr()
    study.main(argv)
    assert "2 runs, 2 recorded, 0 to train" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_final_norm_test_ranks_the_gap_against_signal_to_outlier_squared():
    ts = (0, 10, 100, 999)

    def rec(eps, so=None):
        r = {"eps": {str(t): e for t, e in zip(ts, eps)}}
        if so is not None:
            r["norm_inputs"] = {"final.norm": {str(t): {"signal_to_outlier": v} for t, v in zip(ts, so)}}
        return r

    so = [0.1, 0.2, 0.4, 0.8]
    records = {("ln-final", 0, 5): rec([1.0, 2.0, 4.0, 8.0], so), ("none", 0, 5): rec([1.0, 1.0, 1.0, 1.0]),
               # seed 1: the gap falls as (s/M)^2 rises
               ("ln-final", 1, 5): rec([8.0, 4.0, 2.0, 1.0], so), ("none", 1, 5): rec([2.0, 2.0, 2.0, 2.0])}
    rows, rhos = mechanism.final_norm_test(records, "ln-final", "none", 5)
    assert rhos == [1.0, -1.0]
    assert rows[0] == "| 0 | 0.01 [0.01, 0.01] | 2.5 [1, 4] |"  # (0.1)^2; gaps 1/1 and 8/2
    assert [r.split("|")[1].strip() for r in rows] == ["0", "10", "100", "999"]
    assert mechanism.final_norm_test(records, "layer-norm", "ln-blocks", 5) == ([], [])


def test_run_seconds_spans_the_logs_first_and_last_timestamp(tmp_path):
    (tmp_path / "log.txt").write_text("[2026-12-02 15:48:03] start\nno stamp here\n[2026-12-02 15:48:32] step\n"
                                      "[bad stamp] x\n[2026-12-02 16:00:05] done\n")
    assert mechanism_runs.run_seconds(str(tmp_path)) == 12 * 60 + 2


def test_restoring_weights_reads_every_restoring_layer_and_the_report_line():
    import torch
    from models import DiT

    from ditlab.toy.task import TOY_MODEL

    model = DiT(depth=2, hidden_size=16, num_heads=2, patch_size=1, normalization="layer-norm-restore", **TOY_MODEL)
    got = mechanism_runs.restoring_weights(model)
    assert len(got) == 5 and all(w == dict(scale=0.0, mean=0.0) for w in got.values())  # 2 x 2 blocks + final
    with torch.no_grad():
        model.blocks[1].norm2.mean_weight[3] = -0.25
    assert mechanism_runs.restoring_weights(model)["blocks.1.norm2"] == dict(scale=0.0, mean=0.25)
    records = {("restore", 0, 5): {"restoring_weights": {"x": dict(scale=0.1, mean=0.2), "y": dict(scale=0.3, mean=0.0)}}}
    (line, _) = mechanism.restore_lines(records, 5)
    assert "|a| 0.3 [0.3, 0.3], |b| 0.2 [0.2, 0.2]" in line


def test_summary_interventions_write_progress_lines_to_their_log(tmp_path, monkeypatch):
    """A summary's interventions take minutes: each measurement adds a line (here every one: no spacing) to
    the log the study echoes, with the count and the time left."""
    import train_toy

    run = train_toy.main(["--depth", "1", "--hidden-size", "16", "--num-heads", "2", "--global-batch-size", "16",
                          "--steps", "3", "--eval-steps", "3", "--num-eval-samples", "4", "--sampling-steps", "5",
                          "--probe-samples", "4", "--results-dir", str(tmp_path / "runs"), "--threads", "1"])
    run = os.path.dirname(os.path.dirname(run)) if run.endswith(".pt") else run
    monkeypatch.setattr(mechanism_runs, "SUMMARY_PROGRESS_EVERY", 0.0)
    args = SimpleNamespace(intervene_sampling_steps=3, stats_samples=2, probe_samples=4, num_eval_samples=4)
    log = tmp_path / "summary.log"
    mechanism_runs.summarise_run(args, "layer-norm", 0, 3, run, log=str(log))
    lines = log.read_text().splitlines()
    assert len(lines) == 1 + 4 * 3  # unedited, then 4 places x 3 edits
    assert lines[0].startswith("unedited (1/13, ") and lines[-1].startswith("place final.norm, edit per-t (13/13, ")
    assert "so far, about" in lines[-1]
