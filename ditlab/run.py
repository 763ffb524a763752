"""The run skeleton shared by train.py and train_toy.py: flags and presets, run directories, logging,
resume (explicit and auto), seeding, threads and the lr schedule."""

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from glob import glob

import torch

from ditlab.checkpoints import checkpoint_file, load_checkpoint
from ditlab.cli import COUNT, DROPOUT, FRACTION, INDEX, NON_NEGATIVE, POSITIVE
from ditlab.distributed import broadcast_object
from ditlab.files import truncate_jsonl, write_json
from ditlab.preemption import PREEMPTED_EXIT
from ditlab.trainer import PRECISIONS, add_compile_arg

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
                config = upgrade_config(json.load(f))
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


def configure_threads(requested=None, num_params=None, small=10_000_000):
    """Set torch's CPU thread count and return a line for the log saying how many and why.

    --threads wins; else OMP_NUM_THREADS (which torch reads at start-up, and which torchrun and the job
    runners set to 1 per process) is respected; else a model under `small` parameters gets one thread
    (its matmuls are too small to split, and a second busy process on the machine makes several threads
    collapse: 0.2 vs 6-7 steps/s measured on the digits demo); else torch's default (all cores)."""
    if requested:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if requested > cores:
            raise SystemExit(f"--threads {requested} is more than the {cores} cores this process may use; "
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
    """Write why a run stopped into its log.txt (the console shows it too): the message of a SystemExit,
    an interrupt, or an exception's type and message (its traceback still reaches the console). A stop
    by signal logs itself and exits PREEMPTED_EXIT; that and success add nothing."""
    try:
        yield
    except SystemExit as e:
        if e.code not in (None, 0, PREEMPTED_EXIT):
            logger.error(f"run stopped: {e}")  # the message (StopTraining's too: its code is DIVERGED_EXIT)
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
        raise SystemExit(f"unknown --lr-schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
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
    """Where runs go, resuming, logging and checkpoint intervals, device and threads."""
    g.add_argument("--results-dir", default=results_dir)
    g.add_argument("--resume", default=None,
                   help="run directory (its latest checkpoint) or checkpoint file; 'auto': the newest run in "
                        "--results-dir with these settings, or a new run if there is none (for requeued jobs)")
    g.add_argument("--log-every", type=COUNT, default=log_every)
    g.add_argument("--ckpt-every", type=COUNT, default=ckpt_every)
    g.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    g.add_argument("--threads", type=COUNT, default=None,
                   help="torch CPU threads per process (default: OMP_NUM_THREADS, else 1 for models under 10M "
                        "parameters, else all cores)")


def finish_parse(args, explicit, preset=None):
    """What both trainers do after parsing: --no-layernorm -> --normalization none, then the preset's
    values for every flag not given (a resume then takes the checkpoint's config over them)."""
    if args.no_layernorm:
        args.normalization = "none"
        explicit.add("normalization")
    if preset is not None:
        apply_preset(args, preset, explicit)
    return args


@dataclass
class RunSpec:
    """What a training script tells the run skeleton: its name (recorded in config.json as "script"),
    the flags a resumed run may change, the flags that never enter the config, and the JSON-lines logs
    whose rows newer than a resumed checkpoint are dropped (they are redone identically)."""

    script: str
    resume_overrides: tuple
    runtime_only: tuple
    logs: tuple = ("metrics.jsonl",)


@dataclass
class Run:
    """An opened run: its settings (flags merged with a resumed config), directory, config as written to
    config.json, logger, and the checkpoint it resumes from (None for a new run)."""

    args: argparse.Namespace
    run_dir: str
    config: dict
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


def find_resume(args, explicit, spec):
    """(args, checkpoint, run_dir) for --resume (a run directory, a checkpoint file or 'auto'), or
    (args, None, None) for a new run. The checkpoint must come from this script and belong to its run;
    the returned flags are the checkpoint's config with the explicit flags that a resume may change."""
    if args.resume == "auto":
        args.resume = auto_resume(args, (*spec.resume_overrides, *spec.runtime_only))
    if not args.resume:
        return args, None, None
    run_dir, ckpt_path = resolve_resume(args.resume)
    try:
        ckpt = load_checkpoint(ckpt_path)
    except ValueError as e:
        raise SystemExit(f"--resume {args.resume}: {e}")
    ckpt["config"] = upgrade_config(ckpt["config"])
    script = ckpt["config"].get("script", spec.script)
    if script != spec.script:
        raise SystemExit(f"--resume {args.resume}: that run was written by {script}; resume it with "
                         f"`python {script} --resume {args.resume}`")
    check_checkpoint_belongs(run_dir, ckpt_path, ckpt["config"])
    merged = merge_resume_config(args, explicit, ckpt["config"], spec.resume_overrides)
    if merged.max_steps is not None and ckpt["step"] >= merged.max_steps:  # before anything is rewritten
        raise SystemExit(f"--resume {args.resume}: the run has reached step {ckpt['step']} and --max-steps is "
                         f"{merged.max_steps}: nothing to do; pass a larger --max-steps to continue it")
    return merged, ckpt, run_dir


def check_model_config(config):
    """Before a run directory is made: the config builds a model (on the meta device: no memory, no
    time). SystemExit with the model's own message (e.g. heads that do not divide the width) otherwise."""
    from models import build_model_from_config

    try:
        with torch.device("meta"):
            build_model_from_config(config)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def open_run(args, d, spec, new_config, ckpt=None, run_dir=None):
    """The run directory and its config.json: a new `<results-dir>/<index>-<model>-<normalization>/` with
    `new_config` (claimed on rank 0, its name broadcast), or the resumed run's, its config updated with the
    flags a resume may change (config.json rewritten to say what the run does now) and its logs cut back
    to the checkpoint's step. Returns a Run with the rank's logger."""
    if ckpt is None:
        check_model_config(new_config)
        norm = args.normalization
        if getattr(args, "final_normalization", None) not in (None, norm):
            norm += f"-final-{args.final_normalization}"
        run_dir = new_run_dir(args.results_dir, args.model, norm) if d.is_main else None
        run_dir = broadcast_object(run_dir)
        config = {**new_config, "script": spec.script}
    else:
        config = {**ckpt["config"], **{k: getattr(args, k) for k in spec.resume_overrides}}
        if d.is_main:
            truncate_jsonl([os.path.join(run_dir, name) for name in spec.logs], ckpt["step"])
    if d.is_main:
        write_json(os.path.join(run_dir, "config.json"), config)
    return Run(args=args, run_dir=run_dir, config=config, logger=create_logger(run_dir, d.is_main), ckpt=ckpt)


def run_config(args, spec):
    """The flags of a new run as its config (plain types), without those that steer only this process."""
    return {k: v for k, v in vars(args).items() if k not in spec.runtime_only}


def seed_ranks(seed, d):
    """After the model is built from `seed` (the same initial weights on every rank, for any world size),
    one training RNG stream per rank; a single process keeps its stream."""
    if d.world_size > 1:
        torch.manual_seed(seed * d.world_size + d.rank)
