"""Tests for benchmarks/deadline.py, the GPU check's job runner: its jobs under one deadline. The contract it
shares with the studies' runner (logs, the parallel limit, a failure's log tail) is tested for both in
test_runner.py."""

import sys
import time

from benchmarks.deadline import run_jobs


def test_jobs_past_the_deadline_are_killed_and_reported(tmp_path):
    """Two jobs that would sleep 30 s, under a 1 s budget for both: both come back as "timeout" within
    seconds, with what they printed kept in their logs."""
    cmds = [[sys.executable, "-u", "-c", "print('started'); import time; time.sleep(30)"]] * 2
    start = time.perf_counter()
    assert run_jobs(cmds, 2, str(tmp_path), timeout=1, check=False) == ["timeout", "timeout"]
    assert time.perf_counter() - start < 10
    assert (tmp_path / "job0.log").read_text() == "started\n"
