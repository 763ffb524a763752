"""Pre-emption: stop signals become a checkpoint at the next step boundary and exit code 75."""

import contextlib
import signal
import threading

# The exit code after such a stop (EX_TEMPFAIL in sysexits.h: "try again later"; a requeue script tests for
# it) is ditlab.errors' Preempted's, importable from here too.
from ditlab.errors import PREEMPTED_EXIT  # noqa: F401

# Signals that stop training at the next step boundary with a checkpoint: SLURM and `timeout` send
# SIGTERM (to the whole process group), Ctrl-C sends SIGINT, `sbatch --signal=USR1@120` sends SIGUSR1.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


def ignore_stop_signals(worker_id=None):
    """DataLoader `worker_init_fn`: workers ignore the stop signals, which reach them too when the whole
    process group is signalled, so they keep serving batches until the main process has saved and
    shuts them down (a worker killed by SIGTERM would crash the main process before it can save)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def stop_signals(handler):
    """Route the stop signals to `handler(signum, frame)` inside the block (main thread only: Python
    delivers signals there), restoring the previous handlers afterwards."""
    if not _in_main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class StopFlag:
    """`with StopFlag() as stop:` routes the stop signals to a flag that a loop checks at its own safe
    points (after a batch of images or a shard is written): `if stop: ...`; `stop.name` names the signal.
    A second Ctrl-C stops at once."""

    def __init__(self):
        self.name = None
        self._signals = None

    def _handler(self, signum, frame):
        if self.name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name

    def __bool__(self):
        return self.name is not None

    def __enter__(self):
        self.name = None
        self._signals = stop_signals(self._handler)
        self._signals.__enter__()
        return self

    def __exit__(self, *exc):
        return self._signals.__exit__(*exc)


def _in_main_thread():
    return threading.current_thread() is threading.main_thread()
