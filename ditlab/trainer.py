"""The training loop (Trainer): AdamW, EMA, precision and compile modes, exact checkpoints and resume."""

import contextlib
import logging
import math
import os
import time
from copy import deepcopy
from dataclasses import dataclass
from glob import glob

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ditlab.checkpoints import link_latest, save_checkpoint
from ditlab.distributed import barrier
# DIVERGED_EXIT (a sweep tells a diverged run, a result, from a crash by it) is importable from here too.
from ditlab.errors import DIVERGED_EXIT, PREEMPTED_EXIT, Diverged, Preempted, UsageError  # noqa: F401
from ditlab.preemption import StopFlag

#################################################################################
#                                  EMA, RNG                                     #
#################################################################################


def requires_grad(model, flag=True):
    for p in model.parameters():
        p.requires_grad = flag


def make_ema(model):
    """A frozen copy of the model in eval mode."""
    ema = deepcopy(model).eval()
    requires_grad(ema, False)
    return ema


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, over all trainable parameters in one fused call."""
    ema_params = [p for p in ema.parameters()]
    params = [p for p in model.parameters()]
    pairs = [(e, p) for e, p in zip(ema_params, params) if p.requires_grad]
    torch._foreach_lerp_([e for e, _ in pairs], [p.detach() for _, p in pairs], 1.0 - decay)


def get_rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(dist_info):
    """Every rank's RNG state as a list indexed by rank (rank 0 saves them all)."""
    state = get_rng_state()
    if not dist_info.distributed:
        return [state]
    states = [None] * dist_info.world_size
    dist.all_gather_object(states, state)
    return states


#################################################################################
#                                 The trainer                                   #
#################################################################################

PRECISIONS = ("fp32", "tf32", "bf16")
# torch.compile modes (--compile MODE); "reduce-overhead" replays the compiled step as CUDA graphs on a GPU.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_mode(value):
    """None (eager) or one of COMPILE_MODES; "none" (to switch off a preset's compiling) is None, and True
    (the old boolean --compile, in older run configs) is "default"."""
    if value is None or value is False or value == "none":
        return None
    if value is True:
        return "default"
    if value not in COMPILE_MODES:
        raise UsageError(f"unknown compile mode {value!r}; choose one of {', '.join(COMPILE_MODES)}")
    return value


def add_compile_arg(parser, help_suffix=""):
    """--compile [MODE]: bare --compile is torch.compile's default mode; --compile none is eager."""
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=("none", *COMPILE_MODES),
                        metavar="MODE", help="torch.compile the model; MODE: " + ", ".join(COMPILE_MODES)
                        + " (default when bare; reduce-overhead adds CUDA graphs on a GPU) or none" + help_suffix)


def format_duration(seconds):
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class Loop:
    """One training loop: its plan (to max_steps; log, checkpoint and hook intervals; where the log lines and
    the checkpoints' extra state go) and its running state: the loss and grad-norm sums since the last log
    line (device tensors: no host sync between log lines) and the clocks of steps/s and ETA."""

    max_steps: int
    log_every: int = 100
    ckpt_every: int = None
    hooks: tuple = ()
    tensorboard: object = None
    extra_state: object = None  # fn() -> a dict saved in every checkpoint (the data position)
    start_step: int = 0
    start_time: float = 0.0
    last_step: int = 0
    last_time: float = 0.0
    running_loss: torch.Tensor = None
    running_norm: torch.Tensor = None

    def pause(self, seconds):
        """Leave time spent in hooks and checkpoints out of steps/s and the ETA."""
        self.start_time += seconds
        self.last_time += seconds


class Trainer:
    """Owns the model (DDP-wrapped when distributed), its EMA, the AdamW optimizer and the loop: `fit`, or
    `start`, then `train_step` and `end_step` per batch inside `with trainer.stop:` (train.py's main).

    hooks: list of (every, fn) called as fn(step) after steps that are multiples of `every` (and at the
    last step); used for evaluations and sample grids. A hook must not consume the global RNG
    (use torch.random.fork_rng) so that resumed runs stay exact.
    """

    def __init__(self, model, diffusion, *, dist_info, run_dir=None, logger=None, config=None, lr=1e-4, weight_decay=0.0,
                 ema_decay=0.9999, grad_clip=None, precision="fp32", compile=False, lr_schedule=None,
                 stop_loss_ratio=None):
        if precision not in PRECISIONS:
            raise UsageError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
        self.dist = dist_info
        self.run_dir = run_dir
        self.logger = logger or logging.getLogger("ditlab.trainer")
        self.config = config or {}
        self.diffusion = diffusion
        self.ema_decay = ema_decay
        self.grad_clip = grad_clip
        self.stop_loss_ratio = stop_loss_ratio  # a logged loss this many times the lowest so far: diverged
        self.precision = precision
        self.lr = lr
        self.lr_schedule = lr_schedule  # fn(step) -> multiplier of lr, or None for constant
        cuda = dist_info.device.type == "cuda"
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
            torch.backends.cudnn.allow_tf32 = precision == "tf32"
        model = model.to(dist_info.device)
        self.ema = make_ema(model)
        self.raw = model
        model.train()
        if dist_info.distributed:
            model = DDP(model, device_ids=[dist_info.local_rank] if cuda else None)
        self.compile_mode = compile_mode(compile)
        if self.compile_mode:  # the model's forward (and so its backward) as one graph; the loss stays eager
            model = torch.compile(model, mode=None if self.compile_mode == "default" else self.compile_mode)
        self.model = model
        self.opt = torch.optim.AdamW(
            [p for p in self.raw.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay, fused=cuda or None
        )
        self.step = 0
        self.stop = StopFlag()  # set by a stop signal inside `with self.stop:` (fit, train.py's loop)
        self.loop = None  # the running loop's plan and state (start)
        self.loss_history = []  # [step, mean loss since the previous log line], saved in checkpoints

    # ----------------------------------------------------------------------------------------------
    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, x, y):
        """One optimisation step on the local batch. Returns (loss, grad_norm) as device tensors (no
        host sync here: the loop reads them only when it logs)."""
        if self.lr_schedule is not None:
            for group in self.opt.param_groups:
                group["lr"] = self.lr * self.lr_schedule(self.step)
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device)
        if self.compile_mode in CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the last step's graph outputs are spent
        with self.autocast():
            loss = self.diffusion.training_losses(self.model, x, t, dict(y=y))["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.grad_clip)
        else:  # only the norm, for the log: clip_grad_norm_(inf) would also rescale every gradient by 1
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.raw.parameters() if p.grad is not None])
        self.opt.step()
        update_ema(self.ema, self.raw, self.ema_decay)
        self.step += 1
        return loss.detach(), grad_norm.detach()

    # ----------------------------------------------------------------------------------------------
    def state_dict(self, extra=None):
        """Everything needed to continue exactly, as tensors and plain Python types."""
        return {
            "model": self.raw.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "step": self.step,
            "loss_history": [list(item) for item in self.loss_history],
            "rng": gather_rng_states(self.dist),
            "world_size": self.dist.world_size,
            "config": self.config,
            **(extra or {}),
        }

    def save(self, extra=None):
        """Write checkpoints/<step>.pt and point checkpoints/latest.pt at it (rank 0 writes)."""
        state = self.state_dict(extra)  # collective on all ranks (RNG gather)
        if self.dist.is_main:
            path = os.path.join(self.run_dir, "checkpoints", f"{self.step:07d}.pt")
            save_checkpoint(state, path)
            link_latest(path, os.path.join(self.run_dir, "checkpoints", "latest.pt"))
            self.logger.info(f"saved checkpoint {path}")
        barrier()

    def load(self, ckpt):
        """Restore from a checkpoint dict written by `save`; remove the temporary files that a writer
        killed mid-checkpoint left in the run's checkpoints folder (rank 0)."""
        if self.dist.is_main and self.run_dir:
            for stale in glob(os.path.join(self.run_dir, "checkpoints", ".tmp-*")):
                os.unlink(stale)
                self.logger.info(f"removed {stale}, left by a checkpoint write that was killed")
        self.raw.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["opt"])
        self.step = ckpt["step"]
        self.loss_history = [list(item) for item in ckpt.get("loss_history", [])]
        rng = ckpt.get("rng") or []
        if len(rng) == self.dist.world_size:
            set_rng_state(rng[self.dist.rank])
        else:
            self.logger.info(f"checkpoint has RNG states for {len(rng)} processes, not {self.dist.world_size}: "
                             "continuing with fresh RNG states (the run will not be bitwise identical)")
            torch.manual_seed(self.config.get("global_seed", 0) * 1000 + self.step * self.dist.world_size + self.dist.rank)

    # ----------------------------------------------------------------------------------------------
    def fit(self, batches, max_steps, *, log_every=100, ckpt_every=None, hooks=(), tensorboard=None, extra_state=None):
        """Train from self.step to max_steps on `batches` (an iterator of (x, y) on the device, already
        positioned at self.step): the loop train.py writes out in its main. Returns the step reached;
        Preempted after a stop signal (its checkpoint saved), Diverged on a bad loss (see end_step)."""
        self.start(max_steps, log_every=log_every, ckpt_every=ckpt_every, hooks=hooks, tensorboard=tensorboard,
                   extra_state=extra_state)
        with self.stop:
            while self.step < max_steps:
                x, y = next(batches)
                loss, grad_norm = self.train_step(x, y)
                self.end_step(loss, grad_norm, len(x))
        return self.step

    def start(self, max_steps, *, log_every=100, ckpt_every=None, hooks=(), tensorboard=None, extra_state=None):
        """Begin a loop to `max_steps` (end_step follows its plan): checkpoints every `ckpt_every` steps and
        at the end, log lines every `log_every` steps, `hooks` as in the class docstring."""
        now = time.time()
        zero = torch.zeros((), device=self.dist.device)
        self.loop = Loop(max_steps, log_every, ckpt_every, tuple(hooks), tensorboard, extra_state, self.step, now,
                         self.step, now, zero, zero.clone())
        if self.dist.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def end_step(self, loss, grad_norm, batch_size):
        """After a train_step (on a local batch of `batch_size`): a log line at log and checkpoint steps,
        the last step and a stop; the hooks; a checkpoint at checkpoint steps, the last step and a stop.
        Raises Diverged on a non-finite loss or a spike (before saving: the last good checkpoint stays), and
        Preempted after a stop signal, its checkpoint saved (every rank stops at the same step)."""
        loop = self.loop
        loop.running_loss += loss
        loop.running_norm += grad_norm
        at_ckpt = bool(loop.ckpt_every) and self.step % loop.ckpt_every == 0
        final = self.step == loop.max_steps
        stop = self._stop_everywhere()  # the same answer on every rank
        if self.step % loop.log_every == 0 or at_ckpt or final or stop:
            self._log(batch_size * self.dist.world_size)
        pause = time.time()
        for every, fn in loop.hooks:
            if (every and self.step % every == 0) or final:
                fn(self.step)
        if at_ckpt or final or stop:
            self.save(loop.extra_state() if loop.extra_state else None)
        loop.pause(time.time() - pause)
        if stop and not final:
            signal_name = self.stop.name or "a stop signal (sent to another rank)"
            message = (f"{signal_name} received: saved a checkpoint at step {self.step}; exiting with code "
                       f"{PREEMPTED_EXIT} (continue with --resume {self.run_dir} or --resume auto)")
            self.logger.info(message)
            raise Preempted(message)

    def _log(self, samples_per_step):
        """The log line of the steps since the last one (mean loss and grad norm over them and the ranks,
        speed, ETA), after checking the mean loss; the loss joins loss_history."""
        loop = self.loop
        n = self.step - loop.last_step
        avg_loss = self._mean_over_ranks(loop.running_loss / n)
        if not math.isfinite(avg_loss):
            raise Diverged(f"loss became {avg_loss} between steps {loop.last_step} and {self.step}; "
                           f"stopping. {self._last_good_checkpoint()}")
        self._check_spike(avg_loss, loop.last_step)
        self.loss_history.append([self.step, avg_loss])
        now = time.time()
        rate = n / max(now - loop.last_time, 1e-9)
        eta = (loop.max_steps - self.step) / max((self.step - loop.start_step) / (now - loop.start_time), 1e-9)
        grad_norm = loop.running_norm.item() / n
        msg = (f"step {self.step:7d}/{loop.max_steps} | loss {avg_loss:.4g} | grad norm {grad_norm:.3g} | "
               f"{rate:.2f} steps/s | {rate * samples_per_step:.1f} img/s | ETA {format_duration(eta)}")
        if self.dist.device.type == "cuda":
            msg += f" | peak mem {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        self.logger.info(msg)
        if loop.tensorboard is not None:
            loop.tensorboard.add_scalar("train/loss", avg_loss, self.step)
            loop.tensorboard.add_scalar("train/grad_norm", grad_norm, self.step)
            loop.tensorboard.add_scalar("train/steps_per_sec", rate, self.step)
        loop.running_loss.zero_()
        loop.running_norm.zero_()
        loop.last_step, loop.last_time = self.step, now

    def _check_spike(self, loss, last_step):
        """With stop_loss_ratio, a logged mean loss that many times the lowest logged so far (also before a
        resume: the history is in the checkpoint) stops the run as diverged: a blow-up that stays finite (the
        loss jumps 30x or more and may recover slowly) would otherwise train on and be scored as a model."""
        if not self.stop_loss_ratio or not self.loss_history:
            return
        lowest = min(value for _, value in self.loss_history)
        if loss > self.stop_loss_ratio * lowest:
            raise Diverged(f"loss became {loss:.4g} between steps {last_step} and {self.step}, "
                           f"{loss / lowest:.3g}x its lowest logged value {lowest:.4g} (--stop-loss-ratio "
                           f"{self.stop_loss_ratio:g}); stopping. {self._last_good_checkpoint()}")

    def _last_good_checkpoint(self):
        """What a NaN stop leaves to resume from: the newest checkpoint, if one was written."""
        folder = os.path.join(self.run_dir or "", "checkpoints")
        steps = [int(n[:-3]) for n in (os.listdir(folder) if os.path.isdir(folder) else []) if n[:-3].isdigit()]
        if self.run_dir and steps:
            return (f"The last good checkpoint (step {max(steps)}) is untouched: resume from it with a lower --lr "
                    f"or --grad-clip")
        return "No checkpoint was written before it: start again with a lower --lr or --grad-clip"

    def _mean_over_ranks(self, value):
        if self.dist.distributed:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.dist.world_size
        return value.item()

    def _stop_everywhere(self):
        """True when any rank got a stop signal. Single process: checked every step. Distributed: one tiny
        all-reduce every 10 steps (so the step stays free of host syncs otherwise)."""
        if not self.dist.distributed:
            return bool(self.stop)
        if self.step % 10:
            return False
        flag = torch.tensor([1.0 if self.stop else 0.0], device=self.dist.device)
        dist.all_reduce(flag)
        return flag.item() > 0
