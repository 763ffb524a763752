"""What a toy run does between steps: the probe and sampled evaluations of the raw and EMA weights."""

import json
import os
import time

import torch

from ditlab.distributed import barrier
from ditlab.files import append_jsonl
from ditlab.sampling import denoise
from ditlab.probe import probe, toy_data
from ditlab.toy.task import TOY_CHANNELS, TOY_IMAGE_SIZE, sample_error


@torch.no_grad()
def draw_samples(model, diffusion, num, seed, device, sampler="ddpm", clip=True):
    """`num` samples from fixed noise and a fixed sampler RNG, without touching the global RNG. `clip` keeps
    each step's x0 in [-1, 1] (the all-zero task's range); Gaussian data (train_toy.py --data-std) go past it."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        noise = torch.randn(num, TOY_CHANNELS, TOY_IMAGE_SIZE, TOY_IMAGE_SIZE, device=device)
        y = torch.zeros(num, dtype=torch.long, device=device)
        return denoise(model, diffusion, noise, y, sampler, clip_denoised=clip)


def run_probe(trainer, config, step):
    """The per-timestep probe (ditlab.probe) of the raw and the EMA weights: rows {"kind": "timestep", ...}
    appended to metrics.jsonl, embedding statistics to embeddings.jsonl."""
    t0, errors = time.time(), {}
    for weights, model in (("raw", trainer.raw), ("ema", trainer.ema)):
        data = toy_data(config.probe_samples, data_std=config.data_std)
        per_t, embeddings = probe(model, trainer.diffusion, data=data)
        tag = dict(step=step, weights=weights)
        append_jsonl(os.path.join(trainer.run_dir, "metrics.jsonl"),
                     [dict(kind="timestep", **tag, normalization=config.normalization, seed=config.global_seed,
                           num_samples=config.probe_samples, data_std=config.data_std, **row) for row in per_t])
        append_jsonl(os.path.join(trainer.run_dir, "embeddings.jsonl"), [{**tag, **row} for row in embeddings])
        errors[weights] = {row["t"]: row["eps_rel_error"] for row in per_t}
    shown = " ".join(f"t={t}: {errors['ema'][t]:.2e}" for t in (0, 10, 100, 999) if t in errors["ema"])
    trainer.logger.info(f"probe step {step}: EMA eps_rel_error {shown} ({time.time() - t0:.2f}s)")


def evaluate(trainer, sampler_diffusion, config, step):
    """Probe (run_probe) at every evaluation and every --probe-every steps; at --eval-steps also sample with
    the raw and the EMA weights, append metrics.jsonl and save samples_<step>.pt."""
    if trainer.dist.is_main and (step in config.eval_steps or (config.probe_every and step % config.probe_every == 0)):
        run_probe(trainer, config, step)
    if step not in config.eval_steps:
        return
    if trainer.dist.is_main:
        saved, t0 = {}, time.time()
        for weights, model in (("raw", trainer.raw), ("ema", trainer.ema)):
            was_training = model.training
            model.eval()
            samples = draw_samples(model, sampler_diffusion, config.num_eval_samples, config.global_seed + 12345,
                                   trainer.dist.device, config.sampler, clip=not config.data_std).cpu()
            model.train(was_training)
            saved[weights] = samples
            row = dict(step=step, weights=weights, normalization=config.normalization, num_samples=len(samples),
                       sampling_steps=sampler_diffusion.num_timesteps, sampler=config.sampler, seed=config.global_seed,
                       model=config.model,
                       **sample_error(samples, config.data_std))
            with open(os.path.join(trainer.run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"kind": "sample", **row}) + "\n")
            if config.data_std:  # the samples are not errors: how far is their spread from the data's?
                trainer.logger.info(f"eval step {step} {weights}: sample std {row['std']:.4f} (data "
                                    f"{config.data_std:g}), variance ratio {row['var_ratio']:.4f}")
            else:
                trainer.logger.info(f"eval step {step} {weights}: rms {row['rms']:.3e} mean|x| {row['mean_abs']:.3e} "
                                    f"max|x| {row['max_abs']:.3e} ({row['max_abs_8bit']:.3f} 8-bit levels)")
        torch.save(saved, os.path.join(trainer.run_dir, f"samples_{step}.pt"))
        trainer.logger.info(f"evaluation took {time.time() - t0:.1f}s")
    barrier()
