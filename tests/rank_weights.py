"""Test helper (not a command): run a training script, e.g. under torchrun, and have every rank save its own
weights to <run>/rank<r>-weights.pt ({"initial", "model", "ema"}), so DDP tests can compare the ranks.

    python -m torch.distributed.run --nproc_per_node=2 tests/rank_weights.py train_toy.py FLAGS...

It imports ditlab from the installed package (make setup installs it in editable mode).

It wraps ditlab.trainer.Trainer (the initial weights when it is built, the final ones after fit) and runs
the script as __main__; the scripts themselves carry no test-only flag."""

import os
import runpy
import sys

import torch

from ditlab.trainer import Trainer

_init, _fit = Trainer.__init__, Trainer.fit


def _init_and_keep(self, model, *args, **kwargs):
    self.initial_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _init(self, model, *args, **kwargs)


def _fit_and_save(self, *args, **kwargs):
    finished = _fit(self, *args, **kwargs)
    torch.save({"initial": self.initial_weights, "model": self.raw.state_dict(), "ema": self.ema.state_dict()},
               os.path.join(self.run_dir, f"rank{self.dist.rank}-weights.pt"))
    return finished


if __name__ == "__main__":
    Trainer.__init__, Trainer.fit = _init_and_keep, _fit_and_save
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
