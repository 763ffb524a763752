"""The toy identity study: can a DiT with LayerNorm learn to output exactly zero?

A DiT is trained on 2x2x2 "images" that are always zero, so the noise it must predict is its own input
rescaled, eps = x_t / sqrt(1 - alpha_bar_t). At chosen steps the raw and EMA weights each draw samples
with the full DDPM sampler (or --sampler / --sampling-steps) from fixed noise; since the data is zero,
every sampled pixel value is an error. Besides, every evaluation and every --probe-every steps a probe
measures the denoiser without sampling (ditlab.toy.probe): on fixed noise at a grid of timesteps, the error of
its noise, x0 and variance predictions, and outlier statistics of its token embeddings. Results go to
`<results-dir>/<index>-<model>-<normalization>/`: metrics.jsonl (rows of kind "sample" and "timestep")
and embeddings.jsonl.

    python train_toy.py                   # LayerNorm (the published DiT)
    python train_toy.py --no-layernorm    # every block/final LayerNorm replaced by identity
    torchrun --nproc_per_node=2 train_toy.py --preset paper
    python train_toy.py --resume auto     # continue the newest run with these settings (requeued jobs)

Presets: "paper" (DiT-XS/1, batch 2048, lr 1e-4, 50k steps, evaluations at 10k and 50k; for a GPU) and
"cpu" (the small, fast setting `make toy` uses). Every value of a preset can be overridden by its flag.

Runs share train.py's skeleton (ditlab.run): the same optimisation and run flags (--max-steps, alias
--steps; --lr-schedule, --warmup-steps; --resume PATH|auto; --ckpt-every, --log-every; --threads), run
directories, what a resume may change (TOY_RESUME_OVERRIDES), per-rank seeding and exact resume (Trainer).
"""


import argparse

import torch

from diffusion import create_diffusion
from ditlab.cli import COUNT, INDEX
from ditlab.distributed import check_global_batch, cleanup_distributed, setup_distributed
from ditlab.preemption import PREEMPTED_EXIT
from ditlab.run import (
    RunSpec, add_model_args, add_optimisation_args, add_run_args, configure_threads, finish_parse, find_resume,
    log_failures, lr_multiplier, open_run, parse_with_explicit, run_config, seed_ranks,
)
from ditlab.sampling import SAMPLER_HELP, SAMPLERS, check_solver_steps
from ditlab.toy.evals import evaluate
from ditlab.toy.task import PRESETS, TOY_IMAGE_SIZE, TOY_MODEL, zero_batches
from ditlab.trainer import Trainer
from models import NORM_LAYERS, DiT_models, build_model_from_config

SPEC = RunSpec(
    script="train_toy.py",
    # What a resumed run takes from the command line (to extend it); everything else comes from its config.
    resume_overrides=("max_steps", "eval_steps", "ckpt_every", "log_every", "compile", "stop_loss_ratio"),
    # Flags that only steer this process; never saved in the config.
    runtime_only=("resume", "threads", "device", "no_layernorm", "eval_every"),
    logs=("metrics.jsonl", "embeddings.jsonl"),
)


def parse_args(argv=None):
    """(args, explicit): the flags with the preset filled in, and the names given on the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["auto", *PRESETS], default="auto",
                   help="'auto' = paper on a GPU, cpu otherwise; flags below override the preset")
    add_model_args(p, list(DiT_models), sorted(NORM_LAYERS))
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
    args, explicit = parse_with_explicit(p, argv)
    if args.eval_every:
        explicit.add("eval_steps")
    if args.preset == "auto":
        args.preset = "paper" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    finish_parse(args, explicit, PRESETS[args.preset])
    check_solver_steps(args.sampler, args.sampling_steps, "--sampling-steps")
    for flag, value in (("--probe-samples", args.probe_samples), ("--num-eval-samples", args.num_eval_samples)):
        if value > MAX_EVAL_SAMPLES:  # one batch each: more would only fail to allocate, after training
            p.error(f"{flag} {value}: at most {MAX_EVAL_SAMPLES:,} (the error of 256-1,000 draws is already "
                    f"within a few percent)")
    return args, explicit


MAX_EVAL_SAMPLES = 100_000


def finalize_eval_steps(args):
    """Evaluation steps within the run, sorted, always including the last step."""
    if args.eval_every:
        args.eval_steps = list(range(args.eval_every, args.max_steps + 1, args.eval_every))
    args.eval_steps = sorted({s for s in args.eval_steps if 0 < s <= args.max_steps} | {args.max_steps})
    return args


def main(argv=None):
    args, explicit = parse_args(argv)
    d = setup_distributed(args.device)
    check_global_batch(args.global_batch_size, d.world_size)  # before any work (re-checked on resume)
    args, ckpt, run_dir = find_resume(args, explicit, SPEC)
    args = finalize_eval_steps(args)
    check_solver_steps(args.sampler, args.sampling_steps, "--sampling-steps")  # the merged flags
    local_batch = check_global_batch(args.global_batch_size, d.world_size)
    # The model description every script reads back (models.build_model_from_config).
    new_config = {**run_config(args, SPEC), "image_size": TOY_IMAGE_SIZE, "vae": "none", **TOY_MODEL}
    run = open_run(args, d, SPEC, new_config, ckpt, run_dir)
    logger = run.logger
    with log_failures(logger):
        torch.manual_seed(args.global_seed)  # the same initial weights on every rank, for any world size,
        model = build_model_from_config(run.config)  # so every rank's EMA starts from the weights DDP broadcasts
        seed_ranks(args.global_seed, d)
        trainer = Trainer(model, create_diffusion(timestep_respacing=""), dist_info=d, run_dir=run.run_dir,
                          logger=logger, config=run.config, lr=args.lr, weight_decay=args.weight_decay,
                          ema_decay=args.ema_decay, grad_clip=args.grad_clip, precision=args.precision,
                          compile=args.compile, stop_loss_ratio=args.stop_loss_ratio,
                          lr_schedule=lr_multiplier(args.lr_schedule, args.warmup_steps, args.max_steps))
        if run.resumed:
            trainer.load(ckpt)
            logger.info(f"resumed {run.run_dir} at step {trainer.step}")
        params = sum(p.numel() for p in model.parameters())
        logger.info(configure_threads(args.threads, params))
        logger.info(f"toy run {run.run_dir}: {args.model} depth {len(model.blocks)} width {model.pos_embed.shape[-1]} "
                    f"({params:,} params), normalization={args.normalization}, preset={args.preset}, "
                    f"batch {args.global_batch_size}, lr {args.lr} ({args.lr_schedule}), {args.max_steps} steps, "
                    f"evaluations at {args.eval_steps}"
                    + (f", compiled ({trainer.compile_mode})" if trainer.compile_mode else ""))
        sampler = create_diffusion(timestep_respacing=str(args.sampling_steps))
        hooks = [(1, lambda step: evaluate(trainer, sampler, args, step))]
        try:
            finished = trainer.fit(zero_batches(local_batch, d.device), args.max_steps, log_every=args.log_every,
                                   ckpt_every=args.ckpt_every, hooks=hooks)
        finally:
            cleanup_distributed()
        if not finished:
            raise SystemExit(PREEMPTED_EXIT)  # stopped by a signal after saving: a requeue script continues it
        return run.run_dir


if __name__ == "__main__":
    main()
