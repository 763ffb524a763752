"""Tests for benchmarks/gpu_check.py: the CPU dry run end to end (what CI machines run), the verdicts
against the targets, the parsing of pytest's summary, the time limits and the flag errors. No timing is
asserted: the GPU figures live in docs/benchmarks.md."""

import json
import os
import sys
import time

import pytest

from benchmarks import gpu_check as gc


def test_cpu_dry_run_end_to_end(tmp_path):
    record, out = tmp_path / "bench.md", tmp_path / "out"
    rc = gc.main(["--cpu", "--record", str(record), "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["header"]["gpu"] is False
    assert {name: (rc, ) for name, (rc, _) in summary["parts"].items()} == {p: (0,) for p in gc.PARTS}
    verdicts = {name: verdict for name, verdict, _ in summary["verdicts"]}
    assert verdicts["GPU-only tests"] == "figure"  # skipped cleanly without a GPU
    assert [v for n, v in verdicts.items() if n.startswith("train.py")] == ["pass"]
    assert {"tiny training fp32", "tiny guided sampling", "toy cpu preset fp32"} <= set(verdicts)
    assert "fail" not in verdicts.values()
    text = record.read_text()
    assert "| gpu-check |" in text and "no GPU found" in text
    assert "| tiny training fp32 | figure |" in text


def train_row(setting, mfu, ratio=None, impl="ours"):
    row = dict(impl=impl, setting=setting, images_per_s=400.0, mfu=mfu, peak_mib=1000.0)
    if ratio is not None:
        row["ratio"] = ratio
    return row


@pytest.mark.parametrize("mfu,ratio,verdict", [
    (0.46, 0.90, "pass"),
    (0.44, 0.90, "fail"),  # below the MFU target
    (0.50, 1.05, "fail"),  # slower than the peer
    (0.50, None, "fail"),  # no peer in the run: the comparison is not shown
])
def test_training_verdict_needs_mfu_and_beating_the_peer(mfu, ratio, verdict):
    rows = [train_row("bf16", 0.1, 0.5), train_row("bf16", 0.1, impl="peer"), train_row("bf16+compile", mfu, ratio)]
    got = gc.training_verdicts(True, rows)
    assert [(name, v) for name, v, _ in got] == [("DiT-XL/2 training bf16", "figure"),
                                                ("DiT-XL/2 training bf16+compile", verdict)]
    assert all(v == "figure" for _, v, _ in gc.training_verdicts(False, rows))  # no targets on a CPU


def test_sampling_verdict_against_mfu_target():
    rows = [dict(impl="ours", guidance="cfg 4.0", images_per_s=3.0, mfu=gc.TARGET_SAMPLE_MFU + 0.01)]
    assert gc.sampling_verdicts(True, rows)[0][1] == "pass"
    rows[0]["mfu"] = gc.TARGET_SAMPLE_MFU - 0.01
    assert gc.sampling_verdicts(True, rows)[0][1] == "fail"


def test_toy_verdict_takes_the_slower_variant_side_by_side():
    """The variants train at the same time, so the preset's wall time is the slower one's (not the sum)."""
    def row(norm, minutes):
        return dict(setting="fp32+compile", normalization=norm, steps=50_000, steps_per_s=50_000 / minutes / 60,
                    preset_minutes=minutes)
    (name, verdict, text), = gc.toy_verdicts(True, [row("layer-norm", 6.0), row("none", 9.0)])
    assert verdict == "pass" and "9.0 min" in text
    assert gc.toy_verdicts(True, [row("layer-norm", 6.0), row("none", 11.0)])[0][1] == "fail"


@pytest.mark.parametrize("gpu,rc,out,verdict", [
    (True, 0, "3 passed, 170 deselected in 60.75s", "pass"),
    (True, 0, "2 passed, 1 skipped, 170 deselected", "fail"),  # a GPU test that skips on a GPU proves nothing
    (True, 1, "1 failed, 2 passed", "fail"),
    (False, 0, "3 skipped, 170 deselected", "figure"),
    (False, 1, "1 error", "fail"),
])
def test_pytest_summary_verdicts(gpu, rc, out, verdict):
    assert gc.check_tests(gpu, rc, out)[0] == verdict


def test_budget_never_passes_the_deadline():
    budget = gc.Budget({"toy": 100.0, "train": 3.0}, time.perf_counter() + 10)
    assert 9 < budget["toy"] <= 10 and budget["train"] == 3.0
    assert gc.Budget({"toy": 100.0}, time.perf_counter() - 1)["toy"] == 0.0


def test_part_timeout_kills_and_reports(tmp_path):
    start = time.perf_counter()
    rc, seconds, out = gc.run_part("sleepy", [sys.executable, "-c", "print('hi', flush=True); import time; "
                                              "time.sleep(60)"], 6, str(tmp_path), dict(os.environ))
    assert rc == "timeout" and time.perf_counter() - start < 20 and "hi" in out
    assert gc.run_part("late", [sys.executable, "-c", "pass"], 1, str(tmp_path), dict(os.environ))[0] == "skipped"
    assert gc.run_concurrently("late", [[sys.executable, "-c", "pass"]], 1, str(tmp_path), dict(os.environ)) == \
        ("skipped", 0.0)


def test_concurrent_parts_report_the_first_failure(tmp_path):
    cmds = [[sys.executable, "-c", "pass"], [sys.executable, "-c", "raise SystemExit(3)"]]
    rc, _ = gc.run_concurrently("two", cmds, 60, str(tmp_path), dict(os.environ))
    assert rc == 3 and (tmp_path / "two-1.log").exists()


def test_missing_diffusers_without_wheels_skips_the_peer_with_a_message(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "diffusers.py").write_text("raise ImportError('not here')\n")
    env = dict(os.environ, PYTHONPATH=str(shadow))
    note = gc.install_wheels(str(tmp_path / "no-wheels"), env)
    assert "diffusers is not installed" in note and "peer is skipped" in note
    assert gc.install_wheels(str(tmp_path), dict(os.environ)) is None  # installed: nothing to do


@pytest.mark.parametrize("flag", ["foo=3", "toy=x", "toy=0", "toy"])
def test_bad_budget_flag_names_the_choices(flag, capsys):
    with pytest.raises(SystemExit):
        gc.parse_args(["--budget", flag])
    assert "PART=SECONDS" in capsys.readouterr().err


def test_the_gpu_tests_part_collects_exactly_the_files_with_gpu_tests():
    """Every test marked gpu lives in a file the part collects, and the part collects no other file."""
    import glob

    marked = {os.path.basename(f) for f in glob.glob(os.path.join(gc.REPO, "tests", "test_*.py"))
              if "@pytest.mark.gpu" in open(f).read() or "pytestmark = pytest.mark.gpu" in open(f).read()}
    assert marked and {os.path.basename(f) for f in gc.gpu_test_files()} == marked
