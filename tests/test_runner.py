"""Tests for ditlab/studies/runner.py: the studies' one runner (submitit's local and debug executors, the
progress lines, a failure's log tail) and its records."""

import os
import sys
import time

import pytest
from submitit.slurm.slurm import _make_sbatch_string

from benchmarks import deadline
from ditlab.errors import JobError, UsageError
from ditlab.studies.runner import executor_parameters, make_executor, map_calls, read_record, run_jobs, write_record


RUNNERS = pytest.mark.parametrize("runner", [run_jobs, deadline.run_jobs], ids=["studies", "gpu-check"])


@RUNNERS
def test_runs_all_jobs_with_one_thread_and_a_log_each(tmp_path, capsys, runner):
    cmds = [[sys.executable, "-c", f"import os; print('job {i}', os.environ['OMP_NUM_THREADS'])"] for i in range(3)]
    assert runner(cmds, 2, str(tmp_path), tags=["a", "b", "c"]) == [0, 0, 0]
    for i in range(3):
        assert (tmp_path / f"job{i}.log").read_text() == f"job {i} 1\n"
    out = capsys.readouterr().out
    assert "[a] job 0 1" in out and "[c] job 2 1" in out
    if runner is run_jobs:
        assert "[3/3] finished" in out and "min to go" in out  # which job of how many, and the time left


@RUNNERS
def test_parallel_limit_is_respected(tmp_path, runner):
    """Three jobs that each sleep 1 s with two at a time take about 2 s, not 1 and not 3."""
    cmds = [[sys.executable, "-c", "import time; time.sleep(1)"]] * 3
    start = time.perf_counter()
    runner(cmds, 2, str(tmp_path))
    assert 1.9 < time.perf_counter() - start < 2.9 + 2  # generous: process start-up on a busy machine


@RUNNERS
def test_a_failed_job_stops_the_run_with_its_log_tail(tmp_path, runner):
    cmds = [[sys.executable, "-c", "print('about to fail'); raise SystemExit(3)"],
            [sys.executable, "-c", "import time; time.sleep(30)"]]
    start = time.perf_counter()
    with pytest.raises(JobError) as stop:
        runner(cmds, 2, str(tmp_path))
    message = str(stop.value)
    assert "exit 3" in message and "about to fail" in message and os.path.join(str(tmp_path), "job0.log") in message
    assert time.perf_counter() - start < 20  # the other job was stopped, not waited for


def test_without_check_every_exit_code_comes_back_in_order(tmp_path):
    cmds = [[sys.executable, "-c", f"raise SystemExit({code})"] for code in (0, 4, 0)]
    assert run_jobs(cmds, 2, str(tmp_path), check=False) == [0, 4, 0]


@pytest.mark.parametrize("cluster", ["local", "debug"])
def test_calls_go_through_submitit_and_come_back_in_order(tmp_path, cluster):
    """The same calls give the same results through submitit's local executor (subprocesses) and its debug
    executor (in this process); each job leaves submitit's own files in the runner's folder."""
    assert map_calls(pow, [(2, 3), (3, 2), (5, 0)], 2, str(tmp_path), cluster=cluster) == [8, 9, 1]
    assert os.path.isdir(tmp_path / "submitit")
    if cluster == "local":  # the local executor ran each call in its own process: its pickles and logs are there
        assert any(name.endswith("_submitted.pkl") for name in os.listdir(tmp_path / "submitit"))


def test_debug_executor_runs_a_command_in_this_process_with_its_log(tmp_path):
    assert run_jobs([[sys.executable, "-c", "print('here')"]], 1, str(tmp_path), cluster="debug") == [0]
    assert (tmp_path / "job0.log").read_text() == "here\n"


def test_slurm_needs_a_partition_and_gives_sbatch_the_time_limit_and_gpus(tmp_path):
    with pytest.raises(UsageError, match="--partition"):
        executor_parameters("slurm")
    params = executor_parameters("slurm", partition="gpu", time=90, gpus_per_job=2, name="toy")
    renamed = {"timeout_min": "time", "name": "job_name", "tasks_per_node": "ntasks_per_node"}  # AutoExecutor's
    slurm_params = {renamed.get(k, k.removeprefix("slurm_")): v for k, v in params.items()}   # translation
    script = _make_sbatch_string(command="python study.py toy", folder=str(tmp_path), **slurm_params)
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --gpus-per-node=2", "#SBATCH --job-name=toy"):
        assert line in script, script
    assert executor_parameters("local")["timeout_min"] >= 60 * 24  # submitit's local default (2 min) would kill a run


def test_slurm_where_there_is_none_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    with pytest.raises(UsageError, match="--cluster slurm: .*srun"):
        make_executor(str(tmp_path), cluster="slurm", partition="gpu")


def test_a_record_remembers_its_settings_and_refuses_others(tmp_path):
    write_record(str(tmp_path), "run-a", {"value": 1.5}, {"steps": 10}, scorer="abc")
    record = read_record(str(tmp_path), "run-a", {"steps": 10})
    assert record["value"] == 1.5 and record["settings"] == {"steps": 10} and record["scorer"] == "abc"
    assert "provenance" in record and read_record(str(tmp_path), "run-b") is None
    with pytest.raises(UsageError, match="steps: 10 there, 20 now"):
        read_record(str(tmp_path), "run-a", {"steps": 20})


def test_a_job_gets_changes_to_its_own_environment_not_a_copy_of_the_submitters(tmp_path, monkeypatch):
    """On a cluster a job runs elsewhere: it gets OMP_NUM_THREADS=1 and the changes asked for on top of the
    environment where it runs. Locally, with no GPUs asked for, it sees the GPUs this process sees."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    show = "import os; print(os.environ['OMP_NUM_THREADS'], os.environ.get('EXTRA'), os.environ.get('CUDA_VISIBLE_DEVICES'))"
    run_jobs([[sys.executable, "-c", show]], 1, str(tmp_path), env={"EXTRA": "x"})
    assert (tmp_path / "job0.log").read_text() == "1 x 3\n"
