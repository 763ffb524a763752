"""Training machinery shared by train.py and train_toy.py: distributed set-up, run directories, logging,
EMA, atomic checkpoints, and the training loop itself (`Trainer.fit`).

A script builds a model, a diffusion and a batch source, then hands them to `Trainer`. The loop
checkpoints every `ckpt_every` steps (atomically, loadable with weights_only=True), resumes exactly
(weights, optimizer, EMA, RNG states and data position), saves a checkpoint at the next step boundary and
exits with PREEMPTED_EXIT on SIGTERM, SIGINT or SIGUSR1 (a cluster's pre-emption; DataLoader workers
ignore these signals, see `ignore_stop_signals`), and stops on a NaN/inf loss without overwriting the
last good checkpoint.
"""

import argparse
import contextlib
import json
import logging
import math
import os
import pickle
import signal
import sys
import tempfile
import time
import zipfile
from copy import deepcopy
from dataclasses import dataclass
from glob import glob

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

#################################################################################
#                              Distributed set-up                               #
#################################################################################


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def setup_distributed(device=None):
    """Join the torchrun process group (NCCL on GPUs, gloo on CPUs), or run as a single process.

    device: "cuda", "cpu" or None (CUDA when available).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but no CUDA device is available; use --device cpu")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src=0):
    """Send a small picklable Python object from rank `src` to every rank (identity when not distributed)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def truncate_jsonl(paths, step):
    """On resume, drop the rows of these .jsonl logs newer than the checkpoint's step: training continues
    from there and writes them again (identically), so nothing appears twice."""
    for path in paths:
        if os.path.exists(path):
            with open(path) as f:
                rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            atomic_write(path, lambda f: f.write("".join(rows).encode()))


def gather_objects(obj):
    """Every rank's picklable `obj`, as a list in rank order, on every rank ([obj] when not distributed)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_global_batch(global_batch_size, world_size):
    """The global batch is split evenly over the processes; refuse a split that is not exact."""
    if global_batch_size % world_size:
        raise SystemExit(
            f"--global-batch-size {global_batch_size} is not divisible by the world size {world_size}; "
            f"use a multiple of {world_size}"
        )
    return global_batch_size // world_size


#################################################################################
#                         Run directories and logging                           #
#################################################################################


def run_indices(results_dir):
    """The indices of the run directories `<index>-...` in results_dir."""
    names = (os.path.basename(p) for p in glob(os.path.join(results_dir, "[0-9][0-9][0-9]-*")))
    return {int(name.split("-", 1)[0]) for name in names}


def new_run_dir(results_dir, model_name, normalization):
    """Claim `<results_dir>/<index>-<model>-<normalization>/` with the next free index, atomically: the
    index is taken by creating `.claim-<index>` exclusively, so runs started at the same moment (the job
    runner, several jobs on one file system) never share an index or a directory."""
    os.makedirs(results_dir, exist_ok=True)
    index = max(run_indices(results_dir), default=-1) + 1
    while True:
        claim = os.path.join(results_dir, f".claim-{index:03d}")
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:  # another run is claiming this index right now
            index += 1
            continue
        try:
            if index in run_indices(results_dir):  # claimed and created by a run that has let go of its claim
                index += 1
                continue
            path = os.path.join(results_dir, f"{index:03d}-{model_name.replace('/', '-')}-{normalization}")
            os.makedirs(os.path.join(path, "checkpoints"))
            return path
        finally:
            os.unlink(claim)


def create_logger(run_dir, is_main):
    """Log to stdout and `<run_dir>/log.txt` on rank 0; other ranks log nothing."""
    logger = logging.getLogger(f"dit.{run_dir}")
    logger.handlers.clear()
    logger.propagate = False
    if is_main:
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(run_dir, "log.txt"))):
            handler.setFormatter(fmt)
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


#################################################################################
#                              Checkpoint I/O                                   #
#################################################################################


def atomic_write(path, write_fn):
    """Write a file through `write_fn(fileobj)` into a temp file next to `path`, then rename it over
    `path`: a crash at any point leaves either the old file or the new one, never a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_checkpoint(obj, path):
    """torch.save `obj` (tensors and plain Python types only) atomically to `path`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def link_latest(path, latest):
    """Point `latest` at the checkpoint `path` atomically (hard link, or a copy where links fail)."""
    tmp = latest + ".tmp-link"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.link(path, tmp)
        os.replace(tmp, latest)
    except OSError:
        with open(path, "rb") as src:
            atomic_write(latest, lambda f: f.write(src.read()))


def parse_with_explicit(parser, argv):
    """(args, explicit): the parsed flags, and the names of those given on the command line (a second
    parse with every default suppressed). The parser is spent afterwards."""
    args = parser.parse_args(argv)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return args, set(vars(parser.parse_args(argv)))


def apply_preset(args, preset, explicit):
    """A preset's values (the digits demo, the toy's paper/cpu presets) for every flag not given."""
    for key, value in preset.items():
        if key not in explicit:
            setattr(args, key, value)


def merge_resume_config(args, explicit, config, overrides):
    """A resumed run takes its settings from its checkpoint's config; explicit flags may change only
    `overrides` (to extend a run, move its data, tune the step); any other explicit flag that contradicts
    the config is an error. Returns the merged flags."""
    merged = argparse.Namespace(**vars(args))
    for key, value in config.items():
        if not hasattr(merged, key):
            continue
        if key in explicit and getattr(args, key) != value:
            if key not in overrides:
                raise SystemExit(f"--{key.replace('_', '-')} {getattr(args, key)} contradicts the run being resumed "
                                 f"({key}={value!r}); drop the flag (a resumed run keeps its settings)")
            continue
        setattr(merged, key, value)
    return merged


def checkpoint_file(path):
    """A run directory means its checkpoints/latest.pt; anything else is the file itself."""
    return os.path.join(path, "checkpoints", "latest.pt") if os.path.isdir(path) else path


def load_checkpoint(path, map_location="cpu", mmap=False):
    """The one function that opens checkpoint files (resume, sampling, analysis, the toy report, the
    benchmarks): torch.load(weights_only=True), with argparse.Namespace allowed (the reference repo's
    training checkpoints hold their args). A run directory means its checkpoints/latest.pt. `mmap`
    memory-maps a zip-format file, so entries nobody uses (optimizer states) are never read.

    FileNotFoundError for a missing file; ValueError naming the file for a corrupt, truncated or unsafe
    one (a file that pickles code is refused, never executed)."""
    path = checkpoint_file(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}; pass a .pt checkpoint file or a run directory "
                                f"containing checkpoints/latest.pt")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            lines = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "global" in line]
            detail = lines[0] if lines else str(e).splitlines()[0]
            raise ValueError(f"refusing to load {path!r}: it pickles objects other than tensors and plain Python "
                             f"types, which could run arbitrary code ({detail}). Only weights_only checkpoints are "
                             f"loaded.") from None
        raise ValueError(f"could not load {path!r}: not a PyTorch checkpoint, or corrupt ({e})") from e
    except Exception as e:  # truncated zip, garbage
        raise ValueError(f"could not load {path!r}: the file is corrupt, truncated or not a PyTorch checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


# The config keys that decide what a checkpoint's weights are: a run's checkpoints must all agree on them.
MODEL_KEYS = ("model", "depth", "hidden_size", "num_heads", "normalization", "input_size", "in_channels",
              "num_classes", "learn_sigma", "image_size", "vae")


def check_checkpoint_belongs(run_dir, ckpt_path, ckpt_config):
    """Refuse to resume a run directory from a checkpoint of another model (one copied in by hand, say):
    its config must agree with the run's config.json on MODEL_KEYS."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            run_config = json.load(f)
    except (OSError, ValueError):
        return  # no config.json (a bare checkpoint file): nothing to compare with
    differ = [k for k in MODEL_KEYS if k in run_config and k in ckpt_config and run_config[k] != ckpt_config[k]]
    if differ:
        detail = ", ".join(f"{k} {ckpt_config[k]!r} (run: {run_config[k]!r})" for k in differ)
        raise SystemExit(f"{ckpt_path} does not belong to the run {run_dir}: it has {detail}. Resume from the "
                         f"checkpoint's own run directory, or remove it from this one")


def auto_resume(args, exclude):
    """`--resume auto`: the newest run in --results-dir whose config agrees with the flags (those in
    `exclude`, which a resumed run may change or which steer only this process, aside), or None for a
    new run; says which."""
    wanted = {k: v for k, v in vars(args).items() if v is not None and k not in exclude}
    run_dir = newest_run(args.results_dir, wanted)
    print(f"--resume auto: continuing {run_dir}" if run_dir else
          f"--resume auto: no run with these settings in {args.results_dir}: starting a new one", flush=True)
    return run_dir


def newest_run(results_dir, wanted):
    """The newest run directory in `results_dir` that has a checkpoint and whose config.json agrees with
    `wanted` on every key both hold, or None. `--resume auto` passes the command line's settings (so one
    job script can be requeued unchanged); the job runners find the runs their jobs made."""
    for run_dir in sorted(glob(os.path.join(results_dir, "[0-9][0-9][0-9]-*")), reverse=True):
        try:
            with open(os.path.join(run_dir, "config.json")) as f:
                config = json.load(f)
        except (OSError, ValueError):
            continue
        if not os.path.isfile(checkpoint_file(run_dir)):
            continue
        if all(config[k] == v for k, v in wanted.items() if k in config):
            return run_dir
    return None


def resolve_resume(path):
    """`--resume` takes a run directory (its latest checkpoint) or a checkpoint file; returns
    (run_dir, checkpoint_file)."""
    ckpt = checkpoint_file(path)
    run_dir = path if os.path.isdir(path) else os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if not os.path.isfile(ckpt):
        raise SystemExit(f"--resume {path}: no checkpoint found at {ckpt}")
    return run_dir, ckpt


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
        raise SystemExit(f"unknown compile mode {value!r}; choose one of {', '.join(COMPILE_MODES)}")
    return value


def add_compile_arg(parser, help_suffix=""):
    """--compile [MODE]: bare --compile is torch.compile's default mode; --compile none is eager."""
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=("none", *COMPILE_MODES),
                        metavar="MODE", help="torch.compile the model; MODE: " + ", ".join(COMPILE_MODES)
                        + " (default when bare; reduce-overhead adds CUDA graphs on a GPU) or none" + help_suffix)


def configure_threads(requested=None, num_params=None, small=10_000_000):
    """Set torch's CPU thread count and return a line for the log saying how many and why.

    --threads wins; else OMP_NUM_THREADS (which torch reads at start-up, and which torchrun and the job
    runners set to 1 per process) is respected; else a model under `small` parameters gets one thread
    (its matmuls are too small to split, and a second busy process on the machine makes several threads
    collapse: 0.2 vs 6-7 steps/s measured on the digits demo); else torch's default (all cores)."""
    if requested:
        torch.set_num_threads(requested)
        why = "--threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        why = "OMP_NUM_THREADS"
    elif num_params is not None and num_params < small:
        torch.set_num_threads(1)
        why = f"a model of {num_params / 1e6:.2g}M parameters runs fastest on one; --threads to change"
    else:
        why = "torch's default; --threads to change"
    return f"torch CPU threads: {torch.get_num_threads()} ({why})"


def format_duration(seconds):
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# Signals that stop training at the next step boundary with a checkpoint: SLURM and `timeout` send
# SIGTERM (to the whole process group), Ctrl-C sends SIGINT, `sbatch --signal=USR1@120` sends SIGUSR1.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))
# Exit code after such a stop (EX_TEMPFAIL in sysexits.h: "try again later"); a requeue script tests for it.
PREEMPTED_EXIT = 75


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


@contextlib.contextmanager
def log_failures(logger):
    """Write why a run stopped into its log.txt (the console shows it too): the message of a SystemExit,
    an interrupt, or an exception's type and message (its traceback still reaches the console). A stop
    by signal logs itself and exits PREEMPTED_EXIT; that and success add nothing."""
    try:
        yield
    except SystemExit as e:
        if e.code not in (None, 0, PREEMPTED_EXIT):
            logger.error(f"run stopped: {e.code}")
        raise
    except KeyboardInterrupt:
        logger.error("run stopped: interrupted")
        raise
    except Exception as e:
        logger.error(f"run failed: {type(e).__name__}: {e}")
        raise


class StopTraining(Exception):
    """Raised on a NaN/inf loss; the run stops without writing a checkpoint of the bad weights."""


class Trainer:
    """Owns the model (DDP-wrapped when distributed), its EMA, the AdamW optimizer and the loop.

    hooks: list of (every, fn) called as fn(step) after steps that are multiples of `every` (and at the
    last step); used for evaluations and sample grids. A hook must not consume the global RNG
    (use torch.random.fork_rng) so that resumed runs stay exact.
    """

    def __init__(self, model, diffusion, *, dist_info, run_dir, logger, config, lr=1e-4, weight_decay=0.0,
                 ema_decay=0.9999, grad_clip=None, precision="fp32", compile=False, lr_schedule=None):
        if precision not in PRECISIONS:
            raise SystemExit(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
        self.dist = dist_info
        self.run_dir = run_dir
        self.logger = logger
        self.config = config
        self.diffusion = diffusion
        self.ema_decay = ema_decay
        self.grad_clip = grad_clip
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
        self.stop = StopFlag()  # set by a stop signal while fit() runs
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
        """Train from self.step to max_steps on `batches` (an iterator of (x, y) on the device,
        already positioned at self.step). Checkpoints every `ckpt_every` steps and at the end."""
        with self.stop:
            return self._fit(batches, max_steps, log_every, ckpt_every, hooks, tensorboard, extra_state)

    def _fit(self, batches, max_steps, log_every, ckpt_every, hooks, tensorboard, extra_state):
        """The loop of `fit`; returns True when max_steps was reached, False after a stop signal."""
        start_step, start_time = self.step, time.time()
        last_step, last_time = self.step, start_time
        running_loss = torch.zeros((), device=self.dist.device)
        running_norm = torch.zeros((), device=self.dist.device)
        samples_per_step = None
        if self.dist.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        while self.step < max_steps:
            x, y = next(batches)
            samples_per_step = x.shape[0] * self.dist.world_size
            loss, grad_norm = self.train_step(x, y)
            running_loss += loss
            running_norm += grad_norm
            at_ckpt = bool(ckpt_every) and self.step % ckpt_every == 0
            final = self.step == max_steps
            stop = self._stop_everywhere()  # the same answer on every rank
            if self.step % log_every == 0 or at_ckpt or final or stop:
                n = self.step - last_step
                avg_loss = self._mean_over_ranks(running_loss / n)
                if not math.isfinite(avg_loss):
                    raise StopTraining(f"loss became {avg_loss} between steps {last_step} and {self.step}; "
                                       f"stopping. {self._last_good_checkpoint()}")
                self.loss_history.append([self.step, avg_loss])
                now = time.time()
                rate = n / max(now - last_time, 1e-9)
                eta = (max_steps - self.step) / max((self.step - start_step) / (now - start_time), 1e-9)
                msg = (f"step {self.step:7d}/{max_steps} | loss {avg_loss:.4g} | grad norm "
                       f"{running_norm.item() / n:.3g} | {rate:.2f} steps/s | {rate * samples_per_step:.1f} img/s | "
                       f"ETA {format_duration(eta)}")
                if self.dist.device.type == "cuda":
                    msg += f" | peak mem {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
                self.logger.info(msg)
                if tensorboard is not None:
                    tensorboard.add_scalar("train/loss", avg_loss, self.step)
                    tensorboard.add_scalar("train/grad_norm", running_norm.item() / n, self.step)
                    tensorboard.add_scalar("train/steps_per_sec", rate, self.step)
                running_loss.zero_()
                running_norm.zero_()
                last_step, last_time = self.step, now
            pause = time.time()  # time in hooks and checkpoints is left out of steps/s and ETA
            for every, fn in hooks:
                if (every and self.step % every == 0) or final:
                    fn(self.step)
            if at_ckpt or final or stop:
                self.save(extra_state() if extra_state else None)
            pause = time.time() - pause
            last_time += pause
            start_time += pause
            if stop and not final:
                signal_name = self.stop.name or "a stop signal (sent to another rank)"
                self.logger.info(f"{signal_name} received: saved a "
                                 f"checkpoint at step {self.step}; exiting with code {PREEMPTED_EXIT} (continue with "
                                 f"--resume {self.run_dir} or --resume auto)")
                return False
        return True

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


def _in_main_thread():
    import threading

    return threading.current_thread() is threading.main_thread()
