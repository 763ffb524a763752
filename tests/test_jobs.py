"""Tests for benchmarks/deadline.py: the GPU check's job runner, its jobs under one deadline."""

import os
import sys
import time

import pytest

from benchmarks.deadline import run_jobs
from ditlab.errors import JobError


def test_runs_all_jobs_with_one_thread_and_a_log_each(tmp_path, capsys):
    cmds = [[sys.executable, "-c", f"import os; print('job {i}', os.environ['OMP_NUM_THREADS'])"] for i in range(3)]
    run_jobs(cmds, 2, str(tmp_path), tags=["a", "b", "c"])
    for i in range(3):
        assert (tmp_path / f"job{i}.log").read_text() == f"job {i} 1\n"
    out = capsys.readouterr().out
    assert "[a] job 0 1" in out and "[c] job 2 1" in out


def test_parallel_limit_is_respected(tmp_path):
    """Three jobs that each sleep 1 s with two at a time take about 2 s, not 1 and not 3."""
    cmds = [[sys.executable, "-c", "import time; time.sleep(1)"]] * 3
    start = time.perf_counter()
    run_jobs(cmds, 2, str(tmp_path))
    assert 1.9 < time.perf_counter() - start < 2.9 + 2  # generous: process start-up on a busy machine


def test_a_failed_job_stops_the_run_with_its_log_tail(tmp_path):
    cmds = [[sys.executable, "-c", "print('about to fail'); raise SystemExit(3)"],
            [sys.executable, "-c", "import time; time.sleep(30)"]]
    start = time.perf_counter()
    with pytest.raises(JobError) as stop:
        run_jobs(cmds, 2, str(tmp_path))
    message = str(stop.value)
    assert "exit 3" in message and "about to fail" in message and os.path.join(str(tmp_path), "job0.log") in message
    assert time.perf_counter() - start < 20  # the other job was stopped, not waited for


def test_jobs_past_the_deadline_are_killed_and_reported(tmp_path):
    """Two jobs that would sleep 30 s, under a 1 s budget for both: both come back as "timeout" within
    seconds, with what they printed kept in their logs."""
    cmds = [[sys.executable, "-u", "-c", "print('started'); import time; time.sleep(30)"]] * 2
    start = time.perf_counter()
    assert run_jobs(cmds, 2, str(tmp_path), timeout=1, check=False) == ["timeout", "timeout"]
    assert time.perf_counter() - start < 10
    assert (tmp_path / "job0.log").read_text() == "started\n"
