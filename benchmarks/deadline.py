"""The GPU check's job runner: command lines as subprocesses, at most `parallel` at a time, each with its own
log, all under ONE deadline in seconds (each job in its own process group, killed whole when the deadline
passes, compile workers included), so the check fits the minutes a lent GPU machine gives it.

The studies dispatch through submitit instead (ditlab/studies/runner.py). submitit cannot serve this use:
its time limit is per job and in whole minutes, and its local executor signals a job before killing it
only after a fixed delay; the check needs one budget in seconds shared by its parts, and the leftovers of
a killed part (torch.compile workers) killed with it."""

import os
import subprocess
import sys
import threading
import time

from ditlab.errors import JobError
from ditlab.files import log_tail

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root: jobs run from there


def _pump(proc, log_path, tag, append):
    """Copy a job's output to its log file and, when tagged, to the console as "[tag] line"."""
    with open(log_path, "a" if append else "w") as log:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if tag:
                sys.stdout.write(f"[{tag}] {line}")
                sys.stdout.flush()


def kill_group(proc):
    """Kill a job's whole process group: the job if it still runs, and anything it left behind (compile
    workers, data-loader workers)."""
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _start(cmd, log_path, tag, env, options):
    """Start one job with its output pumped into its log; returns (proc, pump thread)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=options["timeout"] is not None)
    pump = threading.Thread(target=_pump, args=(proc, log_path, tag, options["append"]), daemon=True)
    pump.start()
    return proc, pump


def run_jobs(commands, parallel, log_dir, tags=None, **options):
    """Run every command (an argv list, run from the repository root, OMP_NUM_THREADS=1 unless `env` says
    otherwise) with at most `parallel` at a time. Job i logs to <log_dir>/<names[i]>.log (default job<i>);
    `tags[i]` echoes its lines to the console as "[tag] line".

    Options: env (the environment), names, append (add to existing logs), timeout (seconds for all jobs
    together; a job still running then is killed with its process group and reported as "timeout"),
    check (default True: raise JobError naming the first job that fails, stopping the others; False:
    return every job's exit code, in order)."""
    options = {"env": None, "names": None, "append": False, "timeout": None, "check": True, **options}
    os.makedirs(log_dir, exist_ok=True)
    env = options["env"] or {**os.environ, "OMP_NUM_THREADS": "1"}
    deadline = None if options["timeout"] is None else time.perf_counter() + options["timeout"]
    names = options["names"] or [f"job{i}" for i in range(len(commands))]
    pending, running, codes = list(enumerate(commands)), [], [None] * len(commands)
    try:
        while pending or running:
            while pending and len(running) < parallel:
                i, cmd = pending.pop(0)
                log_path = os.path.join(log_dir, f"{names[i]}.log")
                running.append((i, *_start(cmd, log_path, tags[i] if tags else None, env, options), log_path))
                if not tags:
                    print(f"  started: {' '.join(cmd[1:])}", flush=True)
            for item in list(running):
                i, proc, pump, log_path = item
                if proc.poll() is None and (deadline is None or time.perf_counter() < deadline):
                    continue
                if proc.poll() is None:  # past the deadline
                    kill_group(proc)
                    codes[i] = "timeout"
                else:
                    codes[i] = proc.returncode
                    if deadline is not None:
                        kill_group(proc)  # what it left behind
                pump.join()
                running.remove(item)
                if codes[i] and options["check"]:
                    raise JobError(f"job failed (exit {codes[i]}): {' '.join(commands[i])}\n"
                                     f"last lines of {log_path}:\n{log_tail(log_path)}")
            time.sleep(0.05)
    finally:
        for _, proc, _, _ in running:  # a failure or Ctrl-C: do not leave the other jobs running
            if proc.poll() is None:
                if deadline is not None:
                    kill_group(proc)
                else:
                    proc.terminate()
                    proc.wait()
    return codes
