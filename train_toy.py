"""The toy identity study: can a DiT with LayerNorm learn to output exactly zero?

A DiT is trained on 2x2x2 "images" that are always zero, so the noise it must predict is its own input
rescaled, eps = x_t / sqrt(1 - alpha_bar_t). At chosen steps the raw and EMA weights each draw samples
with the full DDPM sampler (or --sampler / --sampling-steps) from fixed noise; since the data is zero,
every sampled pixel value is an error. Besides, every evaluation and every --probe-every steps a probe
measures the denoiser without sampling (toy.probe): on fixed noise at a grid of timesteps, the error of
its noise, x0 and variance predictions, and outlier statistics of its token embeddings. Results go to
`<results-dir>/<index>-<model>-<normalization>/`: metrics.jsonl (rows of kind "sample" and "timestep")
and embeddings.jsonl.

    python train_toy.py                   # LayerNorm (the published DiT)
    python train_toy.py --no-layernorm    # every block/final LayerNorm replaced by identity
    torchrun --nproc_per_node=2 train_toy.py --preset paper

Presets: "paper" (DiT-XS/1, batch 2048, lr 1e-4, 50k steps, evaluations at 10k and 50k; for a GPU) and
"cpu" (the small, fast setting `make toy` uses). Every value of a preset can be overridden by its flag.
"""

import argparse
import json
import os
import time

import torch

from cli import COUNT, FRACTION, INDEX, NON_NEGATIVE, POSITIVE
from diffusion import create_diffusion
from models import DiT_models, NORM_LAYERS, build_model_from_config
from sampling import SAMPLER_HELP, SAMPLERS, check_solver_steps, denoise
from toy import PRESETS, TOY_CHANNELS, TOY_IMAGE_SIZE, TOY_MODEL, append_jsonl, probe, sample_error, zero_batches
from train_utils import (
    PRECISIONS, PREEMPTED_EXIT, StopTraining, Trainer, add_compile_arg, apply_preset, auto_resume, barrier,
    broadcast_object, check_checkpoint_belongs, check_global_batch, cleanup_distributed, configure_threads,
    create_logger, load_checkpoint, log_failures, merge_resume_config, new_run_dir, parse_with_explicit,
    resolve_resume, setup_distributed, truncate_jsonl, write_json,
)

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["auto", *PRESETS], default="auto",
                   help="'auto' = paper on a GPU, cpu otherwise; flags below override the preset")
    p.add_argument("--model", choices=list(DiT_models))
    p.add_argument("--depth", type=COUNT, help="override the model's depth (the cpu preset uses a smaller DiT-XS)")
    p.add_argument("--hidden-size", type=COUNT)
    p.add_argument("--num-heads", type=COUNT)
    p.add_argument("--normalization", choices=sorted(NORM_LAYERS), default="layer-norm")
    p.add_argument("--no-layernorm", action="store_true", help="same as --normalization none")
    p.add_argument("--steps", type=COUNT, help="training steps")
    p.add_argument("--global-batch-size", type=COUNT)
    p.add_argument("--lr", type=POSITIVE)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"])
    p.add_argument("--warmup-steps", type=INDEX)
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.0)
    p.add_argument("--ema-decay", type=FRACTION)
    p.add_argument("--grad-clip", type=POSITIVE, default=None)
    p.add_argument("--global-seed", type=INDEX, default=0)
    p.add_argument("--eval-steps", type=COUNT, nargs="+", help="steps at which to evaluate (the last step always is)")
    p.add_argument("--eval-every", type=COUNT, help="evaluate every N steps (instead of --eval-steps)")
    p.add_argument("--probe-every", type=INDEX,
                   help="per-timestep errors and embedding statistics (no sampling, cheap) every N steps and at "
                        "every evaluation; 0: at evaluations only")
    p.add_argument("--probe-samples", type=COUNT, default=256, help="noise draws per timestep of the probe")
    p.add_argument("--num-eval-samples", type=COUNT, default=100)
    p.add_argument("--sampling-steps", type=COUNT, default=1000, help="sampling steps for evaluation (1000 = full)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help=f"evaluation sampler; {SAMPLER_HELP}")
    p.add_argument("--ckpt-every", type=COUNT)
    p.add_argument("--log-every", type=COUNT)
    p.add_argument("--results-dir", default="results/toy-runs")
    p.add_argument("--resume", default=None,
                   help="run directory (or checkpoint file) to continue; 'auto': the newest run in --results-dir "
                        "with these settings, or a new run if there is none (for requeued jobs)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    add_compile_arg(p, " (the paper preset compiles in the default mode; --compile none for eager)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--debug-save-rank-weights", action="store_true",
                   help="at the end, every rank saves its initial, final and EMA weights to <run>/rank<r>-weights.pt")
    p.add_argument("--threads", type=COUNT, default=None, help="CPU threads for this process (torch.set_num_threads)")
    args, explicit = parse_with_explicit(p, argv)
    if args.no_layernorm:
        args.normalization = "none"
        explicit.add("normalization")
    if args.eval_every:
        explicit.add("eval_steps")
    if args.preset == "auto":
        args.preset = "paper" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    apply_preset(args, PRESETS[args.preset], explicit)
    check_solver_steps(args.sampler, args.sampling_steps, "--sampling-steps")
    args.explicit = explicit
    return finalize_eval_steps(args)


def finalize_eval_steps(args):
    """Evaluation steps within the run, sorted, always including the last step."""
    if args.eval_every:
        args.eval_steps = list(range(args.eval_every, args.steps + 1, args.eval_every))
    args.eval_steps = sorted({s for s in args.eval_steps if 0 < s <= args.steps} | {args.steps})
    return args


# What a resumed run takes from the command line (to extend it); everything else comes from its config.
RESUME_OVERRIDES = ("steps", "eval_steps", "ckpt_every", "log_every", "compile")
# Flags that only steer this process; never saved in the config.
RUNTIME_ONLY = ("resume", "threads", "device", "explicit", "debug_save_rank_weights")



def lr_multiplier(config):
    """Linear warm-up, then constant or cosine decay to zero over the run."""
    import math

    warmup, total = config["warmup_steps"], config["steps"]

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        if config["lr_schedule"] == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
        return 1.0

    return schedule


@torch.no_grad()
def draw_samples(model, diffusion, num, seed, device, sampler="ddpm"):
    """`num` samples from fixed noise and a fixed sampler RNG, without touching the global RNG."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        noise = torch.randn(num, TOY_CHANNELS, TOY_IMAGE_SIZE, TOY_IMAGE_SIZE, device=device)
        y = torch.zeros(num, dtype=torch.long, device=device)
        return denoise(model, diffusion, noise, y, sampler, clip_denoised=True)


def run_probe(trainer, args, step):
    """The per-timestep probe (toy.probe) of the raw and the EMA weights: rows {"kind": "timestep", ...}
    appended to metrics.jsonl, embedding statistics to embeddings.jsonl."""
    t0, errors = time.time(), {}
    for weights, model in (("raw", trainer.raw), ("ema", trainer.ema)):
        per_t, embeddings = probe(model, trainer.diffusion, args.probe_samples)
        tag = dict(step=step, weights=weights)
        append_jsonl(os.path.join(trainer.run_dir, "metrics.jsonl"),
                     [dict(kind="timestep", **tag, normalization=args.normalization, seed=args.global_seed,
                           num_samples=args.probe_samples, **row) for row in per_t])
        append_jsonl(os.path.join(trainer.run_dir, "embeddings.jsonl"), [{**tag, **row} for row in embeddings])
        errors[weights] = {row["t"]: row["eps_rel_error"] for row in per_t}
    shown = " ".join(f"t={t}: {errors['ema'][t]:.2e}" for t in (0, 10, 100, 999) if t in errors["ema"])
    trainer.logger.info(f"probe step {step}: EMA eps_rel_error {shown} ({time.time() - t0:.2f}s)")


def evaluate(trainer, sampler_diffusion, args, step):
    """Probe (run_probe) at every evaluation and every --probe-every steps; at --eval-steps also sample with
    the raw and the EMA weights, append metrics.jsonl and save samples_<step>.pt."""
    if trainer.dist.is_main and (step in args.eval_steps or (args.probe_every and step % args.probe_every == 0)):
        run_probe(trainer, args, step)
    if step not in args.eval_steps:
        return
    if trainer.dist.is_main:
        saved, t0 = {}, time.time()
        for weights, model in (("raw", trainer.raw), ("ema", trainer.ema)):
            was_training = model.training
            model.eval()
            samples = draw_samples(model, sampler_diffusion, args.num_eval_samples, args.global_seed + 12345,
                                   trainer.dist.device, args.sampler).cpu()
            model.train(was_training)
            saved[weights] = samples
            row = dict(step=step, weights=weights, normalization=args.normalization, num_samples=len(samples),
                       sampling_steps=sampler_diffusion.num_timesteps, sampler=args.sampler, seed=args.global_seed,
                       model=args.model,
                       **sample_error(samples))
            with open(os.path.join(trainer.run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"kind": "sample", **row}) + "\n")
            trainer.logger.info(f"eval step {step} {weights}: rms {row['rms']:.3e} mean|x| {row['mean_abs']:.3e} "
                                f"max|x| {row['max_abs']:.3e} ({row['max_abs_8bit']:.3f} 8-bit levels)")
        torch.save(saved, os.path.join(trainer.run_dir, f"samples_{step}.pt"))
        trainer.logger.info(f"evaluation took {time.time() - t0:.1f}s")
    barrier()


def open_run(args, d):
    """(args, run_dir, config, checkpoint or None): the resumed run (its config, with the flags a resumed
    run may change; config.json rewritten) or a new run directory with its config.json."""
    ckpt = None
    if args.resume == "auto":
        args.resume = auto_resume(args, (*RUNTIME_ONLY, *RESUME_OVERRIDES, "eval_every"))
    if args.resume:
        run_dir, ckpt_path = resolve_resume(args.resume)
        ckpt = load_checkpoint(ckpt_path)
        check_checkpoint_belongs(run_dir, ckpt_path, ckpt["config"])
        args = finalize_eval_steps(merge_resume_config(args, args.explicit, ckpt["config"], RESUME_OVERRIDES))
        check_solver_steps(args.sampler, args.sampling_steps, "--sampling-steps")  # the merged flags
        config = {**ckpt["config"], **{key: getattr(args, key) for key in RESUME_OVERRIDES}}
        if d.is_main:  # config.json says what the run does now (e.g. extended --steps)
            write_json(os.path.join(run_dir, "config.json"), config)
    else:
        run_dir = new_run_dir(args.results_dir, args.model, args.normalization) if d.is_main else None
        run_dir = broadcast_object(run_dir)
        config = {k: v for k, v in vars(args).items() if k not in RUNTIME_ONLY}
        # The model description every script reads back (models.build_model_from_config).
        config.update(image_size=TOY_IMAGE_SIZE, vae="none", script="train_toy.py", **TOY_MODEL)
        if d.is_main:
            write_json(os.path.join(run_dir, "config.json"), config)
    return args, run_dir, config, ckpt


def main(argv=None):
    args = parse_args(argv)
    d = setup_distributed(args.device)
    check_global_batch(args.global_batch_size, d.world_size)  # before any work (re-checked on resume)
    args, run_dir, config, ckpt = open_run(args, d)
    local_batch = check_global_batch(args.global_batch_size, d.world_size)
    logger = create_logger(run_dir, d.is_main)
    with log_failures(logger):
        torch.manual_seed(args.global_seed)  # the same initial weights on every rank, for any world size,
        model = build_model_from_config(config)  # so every rank's EMA starts from the weights DDP broadcasts
        initial = {k: v.clone() for k, v in model.state_dict().items()} if args.debug_save_rank_weights else None
        if d.world_size > 1:  # then one training RNG stream per rank (one process keeps its stream as before)
            torch.manual_seed(args.global_seed * d.world_size + d.rank)
        trainer = Trainer(model, create_diffusion(timestep_respacing=""), dist_info=d, run_dir=run_dir, logger=logger,
                          config=config, lr=args.lr, weight_decay=args.weight_decay, ema_decay=args.ema_decay,
                          grad_clip=args.grad_clip, precision=args.precision, compile=args.compile,
                          lr_schedule=lr_multiplier(config))
        if ckpt is not None:
            trainer.load(ckpt)
            if d.is_main:
                # evaluations and probes newer than the checkpoint are redone identically
                truncate_jsonl([os.path.join(run_dir, n) for n in ("metrics.jsonl", "embeddings.jsonl")], trainer.step)
            logger.info(f"resumed {run_dir} at step {trainer.step}")
        params = sum(p.numel() for p in model.parameters())
        logger.info(configure_threads(args.threads, params))
        logger.info(f"toy run {run_dir}: {args.model} depth {len(model.blocks)} width {model.pos_embed.shape[-1]} "
                    f"({params:,} params), normalization={args.normalization}, preset={args.preset}, "
                    f"batch {args.global_batch_size}, lr {args.lr} ({args.lr_schedule}), {args.steps} steps, "
                    f"evaluations at {args.eval_steps}"
                    + (f", compiled ({trainer.compile_mode})" if trainer.compile_mode else ""))
        sampler = create_diffusion(timestep_respacing=str(args.sampling_steps))
        hooks = [(1, lambda step: evaluate(trainer, sampler, args, step))]
        try:
            finished = trainer.fit(zero_batches(local_batch, d.device), args.steps, log_every=args.log_every,
                                   ckpt_every=args.ckpt_every, hooks=hooks)
        except StopTraining as e:
            raise SystemExit(f"error: {e}")
        finally:
            cleanup_distributed()
        if args.debug_save_rank_weights:
            torch.save({"initial": initial, "model": trainer.raw.state_dict(), "ema": trainer.ema.state_dict()},
                       os.path.join(run_dir, f"rank{d.rank}-weights.pt"))
        if not finished:
            raise SystemExit(PREEMPTED_EXIT)  # stopped by a signal after saving: a requeue script continues it
        return run_dir


if __name__ == "__main__":
    main()
