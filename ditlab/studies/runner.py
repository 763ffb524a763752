"""The studies' shared runner: jobs (command lines) dispatched through submitit, a few at a time, each with
its own log and a progress line per job; and the JSON records that keep each finished run.

Dispatch: `--cluster local` (the default) runs each job as a local subprocess through submitit's local
executor, `--parallel` at a time; `--cluster slurm` submits the same jobs to SLURM with a partition, a
time limit and GPUs per job, `--parallel` in the queue at once; `--cluster debug` runs them one by one in
this process (submitit's debug executor, for tests and debuggers). Whatever the cluster, a job is the
same command line run from the repository root, and it writes the same run directory and log.

Records: a study keeps each finished run as one small JSON file, never recomputed, so a study resumes from
its records alone (run directories, tens of MB each, need not outlive a machine) and `--report` rewrites
its page from them. A record remembers the settings it was made with; one made with other settings is
refused, not silently mixed in."""

import argparse
import json
import os
import signal
import subprocess
import time

from ditlab.cli import COUNT, POSITIVE
from ditlab.errors import JobError, UsageError
from ditlab.files import log_tail, provenance, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # jobs run from the repo root
CLUSTERS = ("local", "slurm", "debug")
UNLIMITED_MINUTES = 60 * 24 * 365  # submitit's local executor kills a job after 2 minutes unless told otherwise


#################################################################################
#                                 One job                                       #
#################################################################################

def run_command(argv, log_path, env=None, append=False):
    """The body of every job, run where submitit puts it: `argv` from the repository root, its output into
    `log_path`; returns the exit code. `env` holds changes to the environment of the machine the job runs on
    (None: unset), not a copy of the submitting one's. A stop signal (SLURM's pre-emption, a cancel) is passed
    on to the command, so a training run saves its checkpoint and exits 75 as it would under torchrun."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with open(log_path, "a" if append else "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731
        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
        try:
            return proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


#################################################################################
#                                 Dispatch                                      #
#################################################################################

def add_dispatch_args(p, parallel=2):
    """The flags every study shares for where its jobs run."""
    g = p.add_argument_group("where the jobs run (submitit)")
    g.add_argument("--parallel", type=COUNT, default=parallel,
                   help="jobs at a time (local: processes of one thread each; slurm: jobs in the queue at once)")
    g.add_argument("--cluster", choices=CLUSTERS, default="local",
                   help="local subprocesses (default), SLURM jobs, or one by one in this process (debug)")
    g.add_argument("--partition", default=None, help="SLURM partition (--cluster slurm)")
    g.add_argument("--time", type=POSITIVE, default=None, metavar="MINUTES",
                   help="time limit of each job (SLURM's --time; local: none unless given)")
    g.add_argument("--gpus-per-job", type=int, default=0, help="GPUs per job (SLURM, or local GPUs to expose)")
    return g


def dispatch_of(args, parallel=True):
    """The dispatch settings of parsed study flags (defaults where a caller built `args` without them);
    without `parallel` for a study that passes each wave's size itself."""
    found = dict(parallel=getattr(args, "parallel", 2), cluster=getattr(args, "cluster", "local"),
                 partition=getattr(args, "partition", None), time=getattr(args, "time", None),
                 gpus_per_job=getattr(args, "gpus_per_job", 0))
    if not parallel:
        del found["parallel"]
    return found


def executor_parameters(cluster="local", partition=None, time=None, gpus_per_job=0, name="study", **_):
    """submitit's parameters for one job: a name, a time limit (none locally unless given), GPUs, one task of
    one CPU, and on SLURM the partition (what sbatch is given as --partition, --time, --gpus-per-node)."""
    if cluster not in CLUSTERS:
        raise UsageError(f"--cluster {cluster}: choose one of {', '.join(CLUSTERS)}")
    if cluster == "slurm" and not partition:
        raise UsageError("--cluster slurm needs --partition NAME (and usually --time MINUTES)")
    params = dict(name=name, timeout_min=int(time or UNLIMITED_MINUTES), gpus_per_node=int(gpus_per_job),
                  tasks_per_node=1, nodes=1, cpus_per_task=1)
    if cluster == "slurm":
        params.update(slurm_partition=partition)
    return params


def make_executor(folder, cluster="local", **settings):
    """A submitit executor for the jobs: its own files (pickled jobs, submitit's logs) go to `folder`."""
    import submitit  # imported here: only a study that runs jobs needs it

    params = executor_parameters(cluster, **settings)
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    except RuntimeError as e:  # SLURM asked for where there is none
        raise UsageError(f"--cluster {cluster}: {e}") from None
    executor.update_parameters(**params)
    return executor


def echo_new_lines(log_path, offset, tag):
    """Print the lines a running job added to its log since `offset`, as "[tag] line"; returns the new offset."""
    try:
        with open(log_path) as f:
            f.seek(offset)
            text = f.read()
    except OSError:
        return offset
    complete = text[: text.rfind("\n") + 1]
    for line in complete.splitlines():
        print(f"[{tag}] {line}", flush=True)
    return offset + len(complete.encode())


def _progress(done, total, started, label):
    """One progress line: which job of how many finished, and the time left at the pace so far."""
    elapsed = time.perf_counter() - started
    eta = elapsed / done * (total - done)
    return f"[{done}/{total}] {label} ({elapsed / 60:.1f} min so far, about {eta / 60:.1f} min to go)"


def map_calls(fn, calls, parallel=2, folder="logs", labels=None, watch=None, on_done=None, **dispatch):
    """Call fn(*call) for every call through submitit, at most `parallel` at a time, in order of submission;
    returns the results in order. The one dispatcher of the studies: training commands (run_jobs) and the
    studies' own per-run work (e.g. the mechanism study's interventions) both go through it. `watch(i)` runs
    for every running call at each poll; `on_done(i, result)` as each call finishes (it may raise to stop
    the rest, which are then cancelled). A call that submitit itself fails (killed, timed out) raises
    JobError."""
    if not calls:
        return []
    executor = make_executor(os.path.join(folder, "submitit"), **dispatch)
    labels = labels or [f"job{i}" for i in range(len(calls))]
    pending, running, results = list(range(len(calls))), {}, [None] * len(calls)
    started, done = time.perf_counter(), 0
    try:
        while pending or running:
            while pending and len(running) < parallel:
                i = pending.pop(0)
                running[i] = executor.submit(fn, *calls[i])
                print(f"[{done}/{len(calls)}] started {labels[i]}", flush=True)
            for i, job in list(running.items()):
                if watch:
                    watch(i)
                if not job.done():
                    continue
                del running[i]
                try:
                    results[i] = job.result()
                except Exception as e:  # submitit's own errors: the job was killed, timed out or crashed
                    raise JobError(f"{labels[i]} failed: {str(e).strip().splitlines()[-1]} "
                                   f"(submitit's logs: {os.path.join(folder, 'submitit')})") from None
                done += 1
                print(_progress(done, len(calls), started, f"finished {labels[i]}"), flush=True)
                if on_done:
                    on_done(i, results[i])
            time.sleep(0.05 if running else 0)
    finally:
        for job in running.values():  # a failure or Ctrl-C: do not leave the other jobs running
            job.cancel(check=False)
    return results


def run_jobs(commands, parallel=2, log_dir="logs", names=None, tags=None, append=False, check=True, env=None,
             **dispatch):
    """Run every command (an argv list, from the repository root, with OMP_NUM_THREADS=1 and the changes in
    `env` to the environment where it runs) through map_calls, at most `parallel` at a time. Job i logs to
    <log_dir>/<names[i]>.log (default job<i>); with `tags`, its lines are echoed as "[tag] line" while it runs.
    `dispatch`: cluster, partition, time, gpus_per_job (add_dispatch_args). check=True raises JobError naming
    the first job that fails (the others are cancelled); check=False returns every job's exit code, in order."""
    if not commands:
        return []
    os.makedirs(log_dir, exist_ok=True)
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    if dispatch.get("cluster", "local") != "slurm" and not dispatch.get("gpus_per_job"):
        # submitit's local executor hides every GPU from a job that asks for none: keep this process's view
        env.setdefault("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES"))
    names = names or [f"job{i}" for i in range(len(commands))]
    logs = [os.path.join(log_dir, f"{name}.log") for name in names]
    for path in logs if not append else []:
        open(path, "w").close()  # a fresh log: the echo must not show a previous job's lines
    offsets = [os.path.getsize(p) if os.path.exists(p) else 0 for p in logs]

    def echo(i):
        """Echo a running job's new log lines as "[tag] line"."""
        if tags:
            offsets[i] = echo_new_lines(logs[i], offsets[i], tags[i])

    def finished(i, code):
        """The rest of a finished job's log; with check, a failure stops the study."""
        echo(i)
        if code and check:
            raise JobError(f"job failed (exit {code}): {' '.join(commands[i])}\n"
                           f"last lines of {logs[i]}:\n{log_tail(logs[i])}")

    calls = [(cmd, log, env, append) for cmd, log in zip(commands, logs)]
    labels = tags or [" ".join(cmd[1:]) for cmd in commands]
    return map_calls(_run_command_safely, calls, parallel, log_dir, labels=labels, watch=echo, on_done=finished,
                     **dispatch)


def _run_command_safely(argv, log_path, env, append):
    """run_command, with a failure of the job's own machinery (not of the command) as an exit code string."""
    try:
        return run_command(argv, log_path, env, append)
    except OSError as e:
        return f"error ({e})"


#################################################################################
#                                 Records                                       #
#################################################################################

def record_path(folder, name):
    return os.path.join(folder, f"{name}.json")


def read_record(folder, name, settings=None):
    """The record `name` in `folder`, or None. With `settings` (a dict), a record made with other values of
    those keys is refused (UsageError), not reused."""
    path = record_path(folder, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    kept = record.get("settings", {})
    differ = {k: (kept.get(k), v) for k, v in (settings or {}).items() if kept.get(k) != v}
    if differ:
        raise UsageError(f"{path} was made with other settings ("
                         f"{', '.join(f'{k}: {a} there, {b} now' for k, (a, b) in differ.items())}); "
                         "pass another --records folder (or the same settings)")
    return record


def write_record(folder, name, record, settings=None, **extra):
    """Write the record `name` with the settings it was made with and its provenance (atomic)."""
    os.makedirs(folder, exist_ok=True)
    write_json(record_path(folder, name), {**record, "settings": dict(settings or {}), **extra,
                                           "provenance": provenance()})


def study_parser(name, doc, parallel=2):
    """The argument parser of one study (`python study.py NAME`), with the shared dispatch flags."""
    p = argparse.ArgumentParser(prog=f"study.py {name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dispatch_args(p, parallel)
    return p
