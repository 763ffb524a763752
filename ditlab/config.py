"""A training run's settings as one frozen object, resolved in one place.

`resolve(spec, argv)` reads the command line, fills in the preset (the digits demo, the toy's paper and cpu
settings) for every flag not typed and, on resume, takes the checkpoint's config, which the command line may
change only where a field is marked `resumable`. Fields marked `runtime` steer only this process: they are
never saved in config.json nor compared by `--resume auto`. Nothing is created on the way (a resume only
reads its checkpoint), so `--dry-run` prints the result and stops.

Each trainer declares its settings as a subclass of RunConfig (the fields of the flags both trainers share,
from ditlab.run) and describes itself with a RunSpec: its parser, preset, checks and derived values."""

import argparse
import json
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Callable, NamedTuple

from ditlab.checkpoint_io import run_checkpoints
from ditlab.checkpoints import checkpoint_file, load_checkpoint
from ditlab.distributed import check_global_batch, world_size
from ditlab.errors import CheckpointError, UsageError
from ditlab.run import newest_run, upgrade_config

#################################################################################
#                                The settings                                   #
#################################################################################


def resumable():
    """A field a resumed run may change from the command line (to extend the run, move its data, tune the step)."""
    return field(metadata={"resumable": True})


def runtime():
    """A field that only steers this process: never saved in config.json, never compared by --resume auto."""
    return field(metadata={"runtime": True})


@dataclass(frozen=True)
class RunConfig:
    """The settings both trainers share (ditlab.run's add_model_args, add_optimisation_args, add_run_args).
    A field without a mark comes from the checkpoint on resume, and a flag that contradicts it is an error."""

    # model
    model: str
    depth: int | None
    hidden_size: int | None
    num_heads: int | None
    normalization: str
    no_layernorm: bool = runtime()  # folded into normalization
    final_normalization: str | None
    dropout: float
    # optimisation
    max_steps: int | None = resumable()
    global_batch_size: int
    global_seed: int
    lr: float
    lr_schedule: str
    warmup_steps: int
    weight_decay: float
    ema_decay: float
    grad_clip: float | None
    stop_loss_ratio: float | None = resumable()
    precision: str
    compile: str | None = resumable()
    # run
    results_dir: str
    resume: str | None = runtime()
    log_every: int = resumable()
    ckpt_every: int | None = resumable()
    device: str | None = runtime()
    threads: int | None = runtime()
    dry_run: bool = runtime()

    @classmethod
    def names(cls, mark):
        """The names of the fields with metadata `mark` ("resumable" or "runtime")."""
        return tuple(f.name for f in fields(cls) if f.metadata.get(mark))

    def saved(self):
        """The settings a run records in config.json (every field but the runtime ones), as plain types."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("runtime")}

    def resumable_values(self):
        """The fields a resume may change, with this run's values (they update the resumed config.json)."""
        return {name: getattr(self, name) for name in self.names("resumable")}

    def describe(self):
        """One `name: value` line per field, the value as JSON (so None, "none" and [1, 2] read unambiguously)."""
        return "\n".join(f"{f.name}: {json.dumps(getattr(self, f.name))}" for f in fields(self))


def no_check(args):
    """The RunSpec default: nothing to check or derive."""


def no_warnings(args, explicit):
    """The RunSpec default: no settings of its own to warn about."""
    return []


@dataclass(frozen=True)
class RunSpec:
    """What a trainer tells `resolve` and the run skeleton.

    script: its name, recorded in config.json ("script"); a resume of another script's run is refused.
    settings: its RunConfig subclass. parser: fn() -> its ArgumentParser.
    preset: fn(args, explicit) -> the preset's values (a dict) or None; it may also mark flags as given.
    check: fn(args), run on the flags with the preset and again after a resume merged its config.
    complete: fn(args), after the merge: values derived from the others (defaults that depend on data).
    warn: fn(args, explicit) -> lines, after the merge and before `complete`: settings that work but drop
    something asked for (interval_warnings); resolve prints them and the run's log.txt repeats them.
    logs: the JSON-lines logs whose rows newer than a resumed checkpoint are dropped (they are redone)."""

    script: str
    settings: type
    parser: Callable
    preset: Callable
    check: Callable = no_check
    complete: Callable = no_check
    warn: Callable = no_warnings
    logs: tuple = ("metrics.jsonl",)


class Resolved(NamedTuple):
    """The result of `resolve`: the frozen settings, the checkpoint resumed from and its run directory (both
    None for a new run), and the warnings resolve printed (open_run writes them into the run's log.txt)."""

    config: RunConfig
    ckpt: dict | None
    run_dir: str | None
    notes: tuple = ()


#################################################################################
#                                 Resolution                                    #
#################################################################################


def resolve(spec, argv=None):
    """The run's settings: the flags with the preset, checked; on resume merged with the checkpoint's config
    (merge_resume_config) and checked again; warned about (printed, so --dry-run shows them too); completed;
    the global batch checked against the world size; frozen into spec.settings. Creates nothing."""
    args, explicit = parse_flags(spec, argv)
    args, ckpt, run_dir, resumed_from = find_resume(args, explicit, spec)
    spec.check(args)
    notes = [*resumed_from, *interval_warnings(args, explicit, SHARED_INTERVALS), *spec.warn(args, explicit)]
    print_warnings(notes)
    spec.complete(args)
    check_global_batch(args.global_batch_size, world_size())
    return Resolved(spec.settings(**vars(args)), ckpt, run_dir, tuple(notes))


def parse_flags(spec, argv=None):
    """(args, explicit): the command line with --no-layernorm folded into --normalization and the preset's
    values for every flag not given, checked; `explicit` names the flags given."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, explicit = parse_with_explicit(spec.parser(), argv)
    fold_no_layernorm(args, explicit)
    for key, value in (spec.preset(args, explicit) or {}).items():
        if key not in explicit:
            setattr(args, key, value)
    spec.check(args)
    return args, explicit


def fold_no_layernorm(args, explicit):
    """--no-layernorm is --normalization none. Given with an explicit --normalization other than none, one of
    the two would be ignored, so the pair is refused rather than one of them dropped in silence."""
    if not args.no_layernorm:
        return
    if "normalization" in explicit and args.normalization != "none":
        raise UsageError(f"--no-layernorm contradicts --normalization {args.normalization} (--no-layernorm means "
                         f"--normalization none); give only one of them")
    args.normalization = "none"
    explicit.add("normalization")


# What an interval flag longer than the run still gives: every interval also fires at the run's last step.
SHARED_INTERVALS = {"ckpt_every": "a checkpoint is written only at its last step"}


def interval_warnings(args, explicit, intervals):
    """One line for each interval flag typed longer than the run (`intervals`: field -> what still happens).
    A warning, not an error: the last step always checkpoints, evaluates and samples, so the run keeps one.
    Flags left to a preset or default are not warned about; the run length must be known (--max-steps)."""
    if args.max_steps is None:
        return []
    return [f"--{name.replace('_', '-')} {getattr(args, name)} is longer than the run (--max-steps "
            f"{args.max_steps}): {what}"
            for name, what in intervals.items() if name in explicit and (getattr(args, name) or 0) > args.max_steps]


def print_warnings(notes):
    """Each line as `warning: <line>` on stderr, from the first process only (every rank resolves)."""
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            print(f"warning: {note}", file=sys.stderr, flush=True)


def parse_with_explicit(parser, argv):
    """(args, explicit): the parsed flags, and the names of those given on the command line (a second
    parse with every default suppressed). The parser is spent afterwards."""
    args = parser.parse_args(argv)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return args, set(vars(parser.parse_args(argv)))


def merge_resume_config(args, explicit, config, resumable):
    """A resumed run takes its settings from its checkpoint's config; explicit flags may change only the
    `resumable` ones; any other explicit flag that contradicts the config is an error. Returns the merged flags."""
    merged = argparse.Namespace(**vars(args))
    for key, value in config.items():
        if not hasattr(merged, key):
            continue
        if key in explicit and getattr(args, key) != value:
            if key not in resumable:
                raise UsageError(f"--{key.replace('_', '-')} {getattr(args, key)} contradicts the run being resumed "
                                 f"({key}={value!r}); drop the flag (a resumed run keeps its settings)")
            continue
        setattr(merged, key, value)
    return merged


def find_resume(args, explicit, spec):
    """(args, checkpoint, run_dir, notes) for --resume (a run directory, a checkpoint file or 'auto'), or
    (args, None, None, []) for a new run. The checkpoint must come from this script and belong to its run;
    the returned flags are the checkpoint's config with the explicit flags that a resume may change; `notes`
    says which damaged checkpoints of a run directory were skipped (load_newest)."""
    resumable = spec.settings.names("resumable")
    if args.resume == "auto":
        args.resume = auto_resume(args, (*resumable, *spec.settings.names("runtime")))
    if not args.resume:
        return args, None, None, []
    run_dir, candidates = resolve_resume(args.resume)
    ckpt, ckpt_path, notes = load_newest(args.resume, candidates)
    ckpt["config"] = upgrade_config(ckpt["config"])
    script = ckpt["config"].get("script", spec.script)
    if script != spec.script:
        raise UsageError(f"--resume {args.resume}: that run was written by {script}; resume it with "
                         f"`python {script} --resume {args.resume}`")
    check_checkpoint_belongs(run_dir, ckpt_path, ckpt["config"])
    merged = merge_resume_config(args, explicit, ckpt["config"], resumable)
    if merged.max_steps is not None and ckpt["step"] >= merged.max_steps:  # before anything is rewritten
        raise UsageError(f"--resume {args.resume}: the run has reached step {ckpt['step']} and --max-steps is "
                         f"{merged.max_steps}: nothing to do; pass a larger --max-steps to continue it")
    return merged, ckpt, run_dir, notes


def auto_resume(args, exclude):
    """`--resume auto`: the newest run in --results-dir whose config agrees with the flags (those in
    `exclude`, which a resumed run may change or which steer only this process, aside), or None for a
    new run; says which."""
    wanted = {k: v for k, v in vars(args).items() if v is not None and k not in exclude}
    run_dir = newest_run(args.results_dir, wanted)
    print(f"--resume auto: continuing {run_dir}" if run_dir else
          f"--resume auto: no run with these settings in {args.results_dir}: starting a new one", flush=True)
    return run_dir


def resolve_resume(path):
    """`--resume` takes a run directory or a checkpoint file; returns (run_dir, candidates): the run's
    checkpoints newest first (latest.pt, then by step: run_checkpoints), or the file alone."""
    if os.path.isdir(path):
        candidates = run_checkpoints(path)
    else:
        candidates = [path] if os.path.isfile(path) else []
    if not candidates:
        raise CheckpointError(f"--resume {path}: no checkpoint found at {checkpoint_file(path)}")
    run_dir = path if os.path.isdir(path) else os.path.dirname(os.path.dirname(os.path.abspath(path)))
    return run_dir, candidates


def load_newest(resume, candidates):
    """(checkpoint, its path, notes): the first of `candidates` that loads. A cluster job killed mid-write or
    a damaged disk can leave latest.pt unreadable while an earlier checkpoint is good, so those that fail are
    skipped and `notes` names them and why (one line). An error when none loads; a checkpoint file the user
    named is the only candidate (it is theirs: never replaced by another)."""
    skipped = []
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
        except (ValueError, CheckpointError) as e:
            skipped.append(str(e))
            continue
        notes = [f"--resume {resume}: resuming from {path} (step {ckpt.get('step')}), the newest checkpoint that "
                 f"loads; skipped: {'; '.join(skipped)}"] if skipped else []
        return ckpt, path, notes
    if not os.path.isdir(resume):
        raise CheckpointError(f"--resume {resume}: {skipped[0]}")
    raise CheckpointError(f"--resume {resume}: none of the run's {len(candidates)} checkpoints loads: "
                          f"{'; '.join(skipped)}")


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
        raise CheckpointError(f"{ckpt_path} does not belong to the run {run_dir}: it has {detail}. Resume from the "
                              f"checkpoint's own run directory, or remove it from this one")
