"""The run skeleton shared by train.py and train_toy.py: the shared flags, run directories, logging, the
newest run with given settings, seeding, threads, the lr schedule and the Trainer built from a run's settings.
The settings themselves are resolved by ditlab.config."""

import contextlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from glob import glob

import torch

from diffusion import create_diffusion
from ditlab.checkpoints import checkpoint_file
from ditlab.cli import COUNT, DROPOUT, FRACTION, INDEX, NON_NEGATIVE, POSITIVE
from ditlab.distributed import broadcast_object
from ditlab.errors import DitlabError, Preempted, UsageError
from ditlab.files import truncate_jsonl, write_json
from ditlab.trainer import PRECISIONS, Trainer, add_compile_arg
from models import build_model_from_config

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


def newest_run(results_dir, wanted):
    """The newest run directory in `results_dir` that has a checkpoint and whose config.json agrees with
    `wanted` on every key both hold, or None. `--resume auto` passes the command line's settings (so one
    job script can be requeued unchanged); the job runners find the runs their jobs made."""
    for run_dir in sorted(glob(os.path.join(results_dir, "[0-9][0-9][0-9]-*")), reverse=True):
        try:
            with open(os.path.join(run_dir, "config.json")) as f:
                config = upgrade_config(json.load(f))
        except (OSError, ValueError):
            continue
        if not os.path.isfile(checkpoint_file(run_dir)):
            continue
        if all(config[k] == v for k, v in wanted.items() if k in config):
            return run_dir
    return None


def configure_threads(requested=None, num_params=None, small=10_000_000):
    """Set torch's CPU thread count and return a line for the log saying how many and why.

    --threads wins; else OMP_NUM_THREADS (which torch reads at start-up, and which torchrun and the job
    runners set to 1 per process) is respected; else a model under `small` parameters gets one thread
    (its matmuls are too small to split, and a second busy process on the machine makes several threads
    collapse: 0.2 vs 6-7 steps/s measured on the digits demo); else torch's default (all cores)."""
    if requested:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if requested > cores:
            raise UsageError(f"--threads {requested} is more than the {cores} cores this process may use; "
                             f"oversubscribed threads run far slower (give at most {cores})")
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


@contextlib.contextmanager
def log_failures(logger):
    """Write why a run stopped into its log.txt (the console shows it too): the message of a library error
    or a SystemExit, an interrupt, or an exception's type and message (its traceback still reaches the
    console). A stop by signal (Preempted) has logged itself; that and success add nothing."""
    try:
        yield
    except Preempted:
        raise
    except DitlabError as e:
        logger.error(f"run stopped: {e}")  # a divergence's too (Diverged: exit code 3)
        raise
    except SystemExit as e:
        if e.code not in (None, 0):
            logger.error(f"run stopped: {e}")
        raise
    except KeyboardInterrupt:
        logger.error("run stopped: interrupted")
        raise
    except Exception as e:
        logger.error(f"run failed: {type(e).__name__}: {e}")
        raise


LR_SCHEDULES = ("constant", "cosine")


def lr_multiplier(schedule, warmup_steps, total_steps):
    """fn(step) -> the lr multiplier: linear warm-up over `warmup_steps`, then constant or cosine decay to
    zero at `total_steps`. None when there is nothing to schedule (constant, no warm-up), so the
    optimiser's lr is left exactly as set."""
    if schedule not in LR_SCHEDULES:
        raise UsageError(f"unknown --lr-schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    if schedule == "constant" and not warmup_steps:
        return None

    def multiplier(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(total_steps - warmup_steps, 1)))
        return 1.0

    return multiplier


#################################################################################
#                     The run skeleton of both trainers                         #
#################################################################################


def add_model_args(g, model_choices, norm_choices, model_default=None):
    """--model and the size overrides, --normalization (and its old spelling --no-layernorm)."""
    g.add_argument("--model", choices=model_choices, default=model_default)
    g.add_argument("--depth", type=COUNT, default=None, help="override the model's depth")
    g.add_argument("--hidden-size", type=COUNT, default=None, help="override the model's width")
    g.add_argument("--num-heads", type=COUNT, default=None, help="override the model's attention heads")
    g.add_argument("--normalization", choices=norm_choices, default="layer-norm")
    g.add_argument("--no-layernorm", action="store_true", help="same as --normalization none")
    g.add_argument("--final-normalization", choices=norm_choices, default=None,
                   help="the final layer's normalization (default: --normalization's)")
    g.add_argument("--dropout", type=DROPOUT, default=0.0,
                   help="dropout on the attention weights and the MLP's hidden activations (default: off)")


def add_optimisation_args(g, **defaults):
    """The flags of the optimisation, the same in train.py and train_toy.py (defaults differ: the toy's
    come from its presets). --steps is the toy study's old name of --max-steps."""
    g.add_argument("--max-steps", "--steps", dest="max_steps", type=COUNT, default=defaults.get("max_steps"),
                   help="stop after this many steps")
    g.add_argument("--global-batch-size", type=COUNT, default=defaults.get("global_batch_size"))
    g.add_argument("--global-seed", type=INDEX, default=0)
    g.add_argument("--lr", type=POSITIVE, default=defaults.get("lr"))
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=defaults.get("lr_schedule"),
                   help="after the warm-up: constant (the DiT recipe) or cosine decay to zero at --max-steps")
    g.add_argument("--warmup-steps", type=INDEX, default=defaults.get("warmup_steps"), help="linear lr warm-up")
    g.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.0, help="AdamW weight decay")
    g.add_argument("--ema-decay", type=FRACTION, default=defaults.get("ema_decay"))
    g.add_argument("--grad-clip", type=POSITIVE, default=None, help="clip the global grad norm (default: off)")
    g.add_argument("--stop-loss-ratio", type=POSITIVE, default=None, metavar="R",
                   help="stop as diverged (exit 3, as for a NaN loss) when a logged mean loss (every --log-every "
                        "steps) exceeds R times the lowest logged so far (default: off)")
    g.add_argument("--precision", choices=PRECISIONS, default=defaults.get("precision"),
                   help="tf32: fp32 with TF32 matmuls on GPU")
    add_compile_arg(g, defaults.get("compile_help", ""))


def add_run_args(g, results_dir, log_every=None, ckpt_every=None):
    """Where runs go, resuming, logging and checkpoint intervals, device, threads and --dry-run."""
    g.add_argument("--results-dir", default=results_dir)
    g.add_argument("--resume", default=None,
                   help="run directory (its newest checkpoint that loads) or checkpoint file; 'auto': the newest "
                        "run in --results-dir with these settings, or a new run if there is none (for requeued jobs)")
    g.add_argument("--log-every", type=COUNT, default=log_every)
    g.add_argument("--ckpt-every", type=COUNT, default=ckpt_every)
    g.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    g.add_argument("--threads", type=COUNT, default=None,
                   help="torch CPU threads per process (default: OMP_NUM_THREADS, else 1 for models under 10M "
                        "parameters, else all cores)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the resolved settings (flags, preset, resumed config) and exit, creating nothing")


@dataclass
class Run:
    """An opened run: its settings, directory, record (config.json's contents: the saved settings, the model's
    input and the script's name; what checkpoints store as "config"), logger, and the checkpoint it resumes
    from (None for a new run)."""

    config: object
    run_dir: str
    record: dict
    logger: logging.Logger
    ckpt: dict = None

    @property
    def resumed(self):
        return self.ckpt is not None


def upgrade_config(config):
    """Configs written before the trainers shared their flags: the toy's "steps" is now "max_steps"."""
    if "steps" in config and "max_steps" not in config and config.get("script") == "train_toy.py":
        config = {**config, "max_steps": config["steps"]}
        del config["steps"]
    return config


def check_model_config(record):
    """Before a run directory is made: the record builds a model (on the meta device: no memory, no
    time). UsageError with the model's own message (e.g. heads that do not divide the width) otherwise."""
    try:
        with torch.device("meta"):
            build_model_from_config(record)
    except ValueError as e:
        raise UsageError(str(e)) from None


def open_run(config, d, spec, record, ckpt=None, run_dir=None, notes=()):
    """The run directory and its config.json: a new `<results-dir>/<index>-<model>-<normalization>/` with
    `record` (claimed on rank 0, its name broadcast), or the resumed run's, its record updated with the
    settings a resume may change (config.json rewritten to say what the run does now) and its logs cut back
    to the checkpoint's step. The warnings of the resolution (`notes`) open the log, so log.txt keeps them.
    Returns a Run with the rank's logger."""
    if ckpt is None:
        check_model_config(record)
        norm = config.normalization
        if config.final_normalization not in (None, norm):
            norm += f"-final-{config.final_normalization}"
        run_dir = new_run_dir(config.results_dir, config.model, norm) if d.is_main else None
        run_dir = broadcast_object(run_dir)
        record = {**record, "script": spec.script}
    else:
        record = {**ckpt["config"], **config.resumable_values()}
        if d.is_main:
            truncate_jsonl([os.path.join(run_dir, name) for name in spec.logs], ckpt["step"])
    if d.is_main:
        write_json(os.path.join(run_dir, "config.json"), record)
    logger = create_logger(run_dir, d.is_main)
    for note in notes:
        logger.warning(f"warning: {note}")
    return Run(config=config, run_dir=run_dir, record=record, logger=logger, ckpt=ckpt)


def build_trainer(run, model, d, max_steps):
    """The Trainer of a run, from its settings (one place for both trainers): AdamW, EMA, precision,
    compiling, the lr schedule to `max_steps`. A resumed run's trainer continues from its checkpoint, with
    the lr and weight decay of its settings (a resume may change them)."""
    config = run.config
    trainer = Trainer(model, create_diffusion(timestep_respacing=""), dist_info=d, run_dir=run.run_dir,
                      logger=run.logger, config=run.record, lr=config.lr, weight_decay=config.weight_decay,
                      ema_decay=config.ema_decay, grad_clip=config.grad_clip, precision=config.precision,
                      compile=config.compile, stop_loss_ratio=config.stop_loss_ratio,
                      lr_schedule=lr_multiplier(config.lr_schedule, config.warmup_steps, max_steps))
    if run.resumed:
        trainer.load(run.ckpt)
        for group in trainer.opt.param_groups:
            group["lr"], group["weight_decay"] = config.lr, config.weight_decay
    return trainer


def seed_ranks(seed, d):
    """After the model is built from `seed` (the same initial weights on every rank, for any world size),
    one training RNG stream per rank; a single process keeps its stream."""
    if d.world_size > 1:
        torch.manual_seed(seed * d.world_size + d.rank)
