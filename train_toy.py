"""The toy identity study: can a DiT with LayerNorm learn to output exactly zero?

A DiT is trained on 2x2x2 "images" that are always zero, so the noise it must predict is its own input
rescaled, eps = x_t / sqrt(1 - alpha_bar_t). With --data-std S > 0 the images are fresh N(0, S^2) draws
instead: the ideal denoiser is still a linear gain, known exactly, and errors are also reported in
excess of it. At chosen steps the raw and EMA weights each draw samples
with the full DDPM sampler (or --sampler / --sampling-steps) from fixed noise; since the data is zero,
every sampled pixel value is an error. Besides, every evaluation and every --probe-every steps a probe
measures the denoiser without sampling (ditlab.probe): on fixed noise at a grid of timesteps, the error of
its noise, x0 and variance predictions, and outlier statistics of its token embeddings. Results go to
`<results-dir>/<index>-<model>-<normalization>/`: metrics.jsonl (rows of kind "sample" and "timestep")
and embeddings.jsonl.

    python train_toy.py                   # LayerNorm (the published DiT)
    python train_toy.py --no-layernorm    # every block/final LayerNorm replaced by identity
    torchrun --nproc_per_node=2 train_toy.py --preset paper
    python train_toy.py --data-std 0.3    # Gaussian data of std 0.3 (the bridge study's spreads)
    python train_toy.py --resume auto     # continue the newest run with these settings (requeued jobs)

Presets: "paper" (DiT-XS/1, batch 2048, lr 1e-4, 50k steps, evaluations at 10k and 50k; for a GPU) and
"cpu" (the small, fast setting `make toy` uses). Every value of a preset can be overridden by its flag.

Runs share train.py's skeleton (ditlab.run, ditlab.config): the same optimisation and run flags
(--max-steps, alias --steps; --lr-schedule, --warmup-steps; --resume PATH|auto; --ckpt-every, --log-every;
--threads; --dry-run), run directories, per-rank seeding and exact resume (Trainer). The settings resolve
into one ToyConfig, whose fields marked resumable are what a resume may change.
"""

import argparse
from dataclasses import dataclass

import torch

from diffusion import create_diffusion
from ditlab.cli import COUNT, INDEX, NON_NEGATIVE, command
from ditlab.config import RunConfig, RunSpec, interval_warnings, parse_flags, resolve, resumable, runtime
from ditlab.distributed import check_global_batch, cleanup_distributed, setup_distributed
from ditlab.errors import UsageError
from ditlab.run import (
    add_model_args, add_optimisation_args, add_run_args, build_trainer, configure_threads, log_failures, open_run,
    seed_ranks,
)
from ditlab.sampling import SAMPLER_HELP, SAMPLERS, check_solver_steps
from ditlab.toy.evals import evaluate
from ditlab.toy.task import PRESETS, TOY_IMAGE_SIZE, TOY_MODEL, toy_batches
from models import NORM_LAYERS, DiT_models, build_model_from_config

MAX_EVAL_SAMPLES = 100_000


@dataclass(frozen=True)
class ToyConfig(RunConfig):
    """A toy run's settings: the shared ones plus the preset and the evaluation. A resume may extend the run
    (--max-steps, --eval-steps) and change its intervals; its optimisation is fixed."""

    preset: str
    data_std: float
    eval_steps: list | None = resumable()
    eval_every: int | None = runtime()  # turned into eval_steps
    probe_every: int | None
    probe_samples: int
    num_eval_samples: int
    sampling_steps: int
    sampler: str


def build_parser():
    """The toy's flags; a preset's values replace the defaults of those not given."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["auto", *PRESETS], default="auto",
                   help="'auto' = paper on a GPU, cpu otherwise; flags below override the preset")
    add_model_args(p, list(DiT_models), sorted(NORM_LAYERS))
    p.add_argument("--data-std", type=NON_NEGATIVE, default=0.0, metavar="S",
                   help="the data's spread: 0 (default) is the all-zero task; S > 0 trains on fresh N(0, S^2) images, "
                        "whose ideal denoiser is known in closed form (ditlab/toy/task.py says why)")
    add_optimisation_args(p, compile_help=" (the paper preset compiles in the default mode; --compile none for eager)",
                          precision="fp32")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-steps", type=COUNT, nargs="+", help="steps at which to evaluate (the last step always is)")
    g.add_argument("--eval-every", type=COUNT, help="evaluate every N steps (instead of --eval-steps)")
    g.add_argument("--probe-every", type=INDEX,
                   help="per-timestep errors and embedding statistics (no sampling, cheap) every N steps and at "
                        "every evaluation; 0: at evaluations only")
    g.add_argument("--probe-samples", type=COUNT, default=256, help="noise draws per timestep of the probe")
    g.add_argument("--num-eval-samples", type=COUNT, default=100)
    g.add_argument("--sampling-steps", type=COUNT, default=1000, help="sampling steps for evaluation (1000 = full)")
    g.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help=f"evaluation sampler; {SAMPLER_HELP}")
    add_run_args(p.add_argument_group("run"), results_dir="results/toy-runs")
    return p


def toy_preset(args, explicit):
    """The values of --preset ('auto': paper on a GPU, cpu otherwise); --eval-every counts as giving
    --eval-steps, so that it replaces the preset's and a resumed run's evaluation steps."""
    if args.eval_every:
        explicit.add("eval_steps")
    if args.preset == "auto":
        args.preset = "paper" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    return PRESETS[args.preset]


def check_toy_flags(args):
    """The evaluation sampler can take its steps, and the probe and the evaluation fit one batch each (more
    would only fail to allocate, after training)."""
    check_solver_steps(args.sampler, args.sampling_steps, "--sampling-steps")
    for flag, value in (("--probe-samples", args.probe_samples), ("--num-eval-samples", args.num_eval_samples)):
        if value > MAX_EVAL_SAMPLES:
            raise UsageError(f"{flag} {value}: at most {MAX_EVAL_SAMPLES:,} (the error of 256-1,000 draws is already "
                             f"within a few percent)")


def finalize_eval_steps(args):
    """Evaluation steps within the run, sorted, always including the last step."""
    if args.eval_every:
        args.eval_steps = list(range(args.eval_every, args.max_steps + 1, args.eval_every))
    args.eval_steps = sorted({s for s in args.eval_steps if 0 < s <= args.max_steps} | {args.max_steps})


def evaluation_notes(args, explicit):
    """Typed evaluation steps after the run's last step are dropped, and a typed --eval-every or --probe-every
    longer than the run never fires: one warning each. Not an error: the last step always evaluates."""
    notes = interval_warnings(args, explicit, {"eval_every": "the run evaluates only at its last step",
                                               "probe_every": "the probe runs only at the evaluations"})
    late = [step for step in args.eval_steps or () if step > args.max_steps]
    if "eval_steps" in explicit and not args.eval_every and late:
        notes.append(f"--eval-steps {' '.join(map(str, late))}: after the run's last step (--max-steps "
                     f"{args.max_steps}), so dropped; the last step is always evaluated")
    return notes


SPEC = RunSpec(script="train_toy.py", settings=ToyConfig, parser=build_parser, preset=toy_preset,
               check=check_toy_flags, complete=finalize_eval_steps, warn=evaluation_notes,
               logs=("metrics.jsonl", "embeddings.jsonl"))


def parse_args(argv=None):
    """(args, explicit): the flags with the preset filled in, checked, and the names given on the command
    line (the first stage of resolve, before any resume)."""
    return parse_flags(SPEC, argv)


@command
def main(argv=None):
    """Train one toy run (or, with --dry-run, print its settings); returns its run directory."""
    # Setup: the settings (flags, preset, resumed config), the processes, the run directory.
    config, ckpt, run_dir, notes = resolve(SPEC, argv)
    if config.dry_run:
        print(config.describe())
        return None
    d = setup_distributed(config.device)
    try:
        local_batch = check_global_batch(config.global_batch_size, d.world_size)
        # The model description every script reads back (models.build_model_from_config).
        record = {**config.saved(), "image_size": TOY_IMAGE_SIZE, "vae": "none", **TOY_MODEL}
        run = open_run(config, d, SPEC, record, ckpt, run_dir, notes)
        with log_failures(run.logger):
            trainer = toy_trainer(run, d)
            # Training loop, with the probe and evaluations between steps. A stop signal saves and raises
            # Preempted (exit 75): a requeue script continues the run.
            sampler = create_diffusion(timestep_respacing=str(config.sampling_steps))
            hooks = [(1, lambda step: evaluate(trainer, sampler, config, step))]
            batches = toy_batches(local_batch, d.device, config.data_std, config.global_seed, d.rank, trainer.step)
            trainer.fit(batches, config.max_steps, log_every=config.log_every,
                        ckpt_every=config.ckpt_every, hooks=hooks)
            return run.run_dir
    finally:
        cleanup_distributed()


def toy_trainer(run, d):
    """The model (the same initial weights on every rank, for any world size, so every rank's EMA starts
    from the weights DDP broadcasts) and its Trainer, resumed where asked; logs what the run is."""
    config, logger = run.config, run.logger
    torch.manual_seed(config.global_seed)
    model = build_model_from_config(run.record)
    seed_ranks(config.global_seed, d)
    trainer = build_trainer(run, model, d, config.max_steps)
    if run.resumed:
        logger.info(f"resumed {run.run_dir} at step {trainer.step}")
    params = sum(p.numel() for p in model.parameters())
    logger.info(configure_threads(config.threads, params))
    logger.info(f"toy run {run.run_dir}: {config.model} depth {len(model.blocks)} width "
                f"{model.pos_embed.shape[-1]} ({params:,} params), normalization={config.normalization}, "
                f"preset={config.preset}, data {'all zero' if not config.data_std else f'N(0, {config.data_std:g}^2)'}, batch {config.global_batch_size}, lr {config.lr} "
                f"({config.lr_schedule}), {config.max_steps} steps, evaluations at {config.eval_steps}"
                + (f", compiled ({trainer.compile_mode})" if trainer.compile_mode else ""))
    return trainer


if __name__ == "__main__":
    main()
