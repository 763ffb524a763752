"""The one job runner: run command lines as parallel subprocesses, each with its own log."""

import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.abspath(__file__))


def _pump(proc, log_path, tag):
    """Copy a job's output to its log file and, when tagged, to the console as "[tag] line"."""
    with open(log_path, "w") as log:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if tag:
                sys.stdout.write(f"[{tag}] {line}")
                sys.stdout.flush()


def log_tail(path, lines=15):
    """The last lines of a log file, for an error message."""
    try:
        with open(path) as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def run_jobs(commands, parallel, log_dir, tags=None):
    """Run every command (an argv list, run from the repository root) with at most `parallel` at a time.
    `tags[i]` (optional) prefixes job i's echoed lines; untagged jobs only log to <log_dir>/job<i>.log.
    Returns when all succeeded; raises SystemExit naming the first job that failed."""
    os.makedirs(log_dir, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending, running = list(enumerate(commands)), []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                i, cmd = pending.pop(0)
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, bufsize=1)
                log_path = os.path.join(log_dir, f"job{i}.log")
                pump = threading.Thread(target=_pump, args=(proc, log_path, tags[i] if tags else None), daemon=True)
                pump.start()
                running.append((i, proc, pump, log_path))
                if not tags:
                    print(f"  started: {' '.join(cmd[1:])}", flush=True)
            for item in list(running):
                i, proc, pump, log_path = item
                if proc.poll() is None:
                    continue
                pump.join()
                running.remove(item)
                if proc.returncode:
                    raise SystemExit(f"job failed (exit {proc.returncode}): {' '.join(commands[i])}\n"
                                     f"last lines of {log_path}:\n{log_tail(log_path)}")
            time.sleep(0.2)
    finally:
        for _, proc, _, _ in running:  # a failure or Ctrl-C: do not leave the other jobs running
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
