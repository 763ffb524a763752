"""diffusers interop: our DiT <-> diffusers' DiTTransformer2DModel, pipelines, solver schedulers.

Layer: above data (the VAE) and checkpoint_io (.bin weights are read weights_only); below checkpoints,
whose find_model loads diffusers folders through load_folder. diffusers itself is imported inside the
functions that need it: it takes seconds to import. Failures raise CheckpointError (a folder that is not
a DiT, or weights that cannot be converted), UsageError (a model diffusers cannot hold, the other set of
weights) or InputError (an export folder that cannot be used, a failed Hub download)."""

import json
import os

import torch

from diffusion import create_diffusion
from ditlab.checkpoint_io import load_checkpoint
from ditlab.constants import LATENT_SCALE
from ditlab.data import INDEX_FILE, load_vae, vae_source
from ditlab.errors import CheckpointError, InputError, UsageError
from ditlab.files import share_like_open
from models import DIT_SIZES, DiT_models, get_2d_sincos_pos_embed

TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # the Hub's DiT says Transformer2DModel
META_FILE = "dit_config.json"
ORIGINAL_NORM_EPS = 1e-6
WEIGHT_NAME = "diffusion_pytorch_model"
# Per block, the embedder copies diffusers keeps (ours: one t_embedder and one y_embedder).
EMBEDDERS = {"norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2"}
TABLE = "norm1.emb.class_embedder.embedding_table.weight"
BLOCK = {"norm1.linear": "adaLN_modulation.1", "attn1.to_out.0": "attn.proj", "ff.net.0.proj": "mlp.fc1",
         "ff.net.2": "mlp.fc2"}
TOP = {"pos_embed.proj": "x_embedder.proj", "proj_out_1": "final_layer.adaLN_modulation.1",
       "proj_out_2": "final_layer.linear"}


#################################################################################
#                                 Schedulers                                    #
#################################################################################


def solver_scheduler(sampler, betas, clip_denoised=False):
    """The diffusers multistep ODE solver for "dpm-solver++" (DPMSolverMultistepScheduler, 2M, algorithm
    dpmsolver++) or "unipc" (UniPCMultistepScheduler, order 2, bh2) on the training betas (`trained_betas`;
    diffusers keeps them in float32), epsilon prediction. clip_denoised: thresholding with sample_max_value 1,
    which clips the predicted x0 to [-1, 1]. UsageError for any other sampler."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler  # lazily: a slow import

    common = dict(num_train_timesteps=len(betas), trained_betas=[float(b) for b in betas],
                  prediction_type="epsilon", thresholding=clip_denoised, sample_max_value=1.0, solver_order=2)
    if sampler == "dpm-solver++":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_type="midpoint")
    if sampler == "unipc":
        return UniPCMultistepScheduler(**common, predict_x0=True, solver_type="bh2")
    raise UsageError(f"{sampler!r} is not a diffusers solver; those are dpm-solver++ and unipc")


#################################################################################
#                          Ours -> diffusers                                    #
#################################################################################


def transformer_config(model):
    """DiTTransformer2DModel's config for one of our models (UsageError for what diffusers cannot hold)."""
    c = model.config
    if c["normalization"] != "layer-norm":
        raise UsageError(f"this model uses normalization={c['normalization']!r}; diffusers' DiTTransformer2DModel has "
                         f"a LayerNorm in every block, so only layer-norm models can be exported")
    if c["mlp_ratio"] != 4:
        raise UsageError(f"diffusers' DiT has MLP ratio 4; this model has {c['mlp_ratio']}")
    return dict(num_attention_heads=c["num_heads"], attention_head_dim=c["hidden_size"] // c["num_heads"],
                in_channels=c["in_channels"], out_channels=model.out_channels, num_layers=c["depth"],
                sample_size=c["input_size"], patch_size=c["patch_size"], num_embeds_ada_norm=c["num_classes"],
                activation_fn="gelu-approximate", attention_bias=True, norm_type="ada_norm_zero",
                norm_elementwise_affine=False, norm_eps=ORIGINAL_NORM_EPS, dropout=0.0, upcast_attention=False)


def to_diffusers(state_dict, depth):
    """Our DiT state dict -> DiTTransformer2DModel's (new tensors; a label table without a null row gets a
    zero row appended, diffusers always has one)."""
    sd = state_dict
    out = {f"{theirs}.{p}": sd[f"{ours}.{p}"] for theirs, ours in TOP.items() for p in ("weight", "bias")}
    table = sd["y_embedder.embedding_table.weight"]
    for i in range(depth):
        b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        for theirs, ours in EMBEDDERS.items():
            for p in ("weight", "bias"):
                out[f"{b}{theirs}.{p}"] = sd[f"{ours}.{p}"]
        out[b + TABLE] = table
        for theirs, ours in BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{b}{theirs}.{p}"] = sd[f"{o}{ours}.{p}"]
        for p in ("weight", "bias"):
            for name, part in zip(("to_q", "to_k", "to_v"), sd[f"{o}attn.qkv.{p}"].chunk(3, dim=0)):
                out[f"{b}attn1.{name}.{p}"] = part
    return {k: v.clone() for k, v in out.items()}


def build_transformer(model):
    """A DiTTransformer2DModel holding `model`'s weights (loaded strictly: every key must map)."""
    from diffusers import DiTTransformer2DModel  # lazily: a slow import

    config = transformer_config(model)
    transformer = DiTTransformer2DModel(**config)
    sd = to_diffusers(model.state_dict(), config["num_layers"])
    rows = transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings
    for i in range(config["num_layers"]):
        key = f"transformer_blocks.{i}.{TABLE}"
        if len(sd[key]) + 1 == rows:  # no null class: diffusers' table always has one more row
            sd[key] = torch.cat([sd[key], torch.zeros_like(sd[key][:1])])
    transformer.load_state_dict(sd, strict=True)
    return transformer.eval()


def make_exact(transformer):
    """Make a loaded diffusers DiT compute the original DiT: timestep frequencies divided by half (not
    half - 1) and eps 1e-6 in the LayerNorm before the MLP. Changes the model in place and returns it."""
    set_numerics(transformer, ORIGINAL_NORM_EPS, 0)
    return transformer


# (norm_eps of the LayerNorm before the MLP, timestep frequency shift) of the three ways to run the export.
NUMERICS = {"diffusers defaults (norm_eps 1e-5, freq shift 1)": (1e-5, 1),
            "as exported (norm_eps 1e-6, freq shift 1)": (ORIGINAL_NORM_EPS, 1),
            "make_exact (norm_eps 1e-6, freq shift 0)": (ORIGINAL_NORM_EPS, 0)}


def set_numerics(transformer, norm_eps, freq_shift):
    """Set the eps of every block's LayerNorm before the MLP and the timestep frequency shift (NUMERICS)."""
    for block in transformer.transformer_blocks:
        block.norm3.eps = norm_eps
        block.norm1.emb.time_proj.downscale_freq_shift = freq_shift


@torch.no_grad()
def measure_difference(model, transformer, n=4, seed=0):
    """Output of `transformer` (the diffusers copy of `model`) against ours on the same random inputs
    (x ~ N(0, 1), t uniform in [0, 1000), random labels), for each of NUMERICS: {mode: {max_abs, rel_rms}}
    over every output channel. The transformer is left as exported."""
    g = torch.Generator().manual_seed(seed)
    c, s = model.in_channels, model.input_size
    x = torch.randn(n, c, s, s, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, model.num_classes, (n,), generator=g)
    ours = model(x, t, y)
    results = {}
    for mode, numerics in NUMERICS.items():
        set_numerics(transformer, *numerics)
        diff = transformer(x, timestep=t, class_labels=y).sample - ours
        results[mode] = dict(max_abs=diff.abs().max().item(), max_ours=ours.abs().max().item(),
                             rel_rms=(diff.square().mean().sqrt() / ours.square().mean().sqrt()).item())
    set_numerics(transformer, ORIGINAL_NORM_EPS, 1)
    return results


def class_names(config):
    """{index: name} of the training classes where the run says them (its image folder or latent index
    still present here), else None."""
    folder = config.get("data_path")
    if folder and os.path.isdir(folder) and not config.get("latents_dir"):
        names = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    else:
        index = os.path.join(config.get("latents_dir") or "", INDEX_FILE)
        if not config.get("latents_dir") or not os.path.isfile(index):
            return None
        with open(index) as f:
            names = json.load(f).get("classes")
    return {str(i): str(n) for i, n in enumerate(names)} if names else None


def export_vae(config, out):
    """Write the run's VAE into out/vae with scaling_factor = the run's latent scale; returns what was done.
    A Hub VAE that cannot be loaded here (offline) is named instead, for from_pretrained(..., vae=...).
    UsageError for a pixel-space model, which DiTPipeline cannot run."""
    name = config.get("vae", "mse")
    if name == "none":
        raise UsageError("this is a pixel-space model (vae none): DiTPipeline always decodes with a VAE, so it "
                         "cannot run it; sample it with this repo's sample.py")
    try:
        vae = load_vae(name, "cpu")
    except InputError:  # offline and not cached: name it
        source = vae_source(name)
        return (f"not copied ({source} could not be loaded here): load the pipeline with DiTPipeline.from_pretrained("
                f"DIR, vae=AutoencoderKL.from_pretrained({source!r}))")
    vae.register_to_config(scaling_factor=float(config.get("latent_scale", LATENT_SCALE)))
    vae.save_pretrained(os.path.join(out, "vae"))
    return "copied"


def export_pipeline(model, config, out, weights="ema", source=None):
    """Write `model` (with the run `config`) as a DiTPipeline folder at `out`: transformer/, scheduler/
    (DPM-Solver++ 2M on the training betas), vae/ (a copy, with the latent scale as scaling_factor),
    model_index.json (with id2label where the class names are known) and dit_config.json. Returns a dict
    saying what was written."""
    from diffusers import DiTPipeline, __version__  # lazily: a slow import

    transformer = build_transformer(model)
    os.makedirs(out, exist_ok=True)
    vae_note = export_vae(config, out)
    transformer.save_pretrained(os.path.join(out, "transformer"))
    betas = create_diffusion("").original_betas
    scheduler = solver_scheduler("dpm-solver++", betas)
    scheduler.save_pretrained(os.path.join(out, "scheduler"))
    index = {"_class_name": DiTPipeline.__name__, "_diffusers_version": __version__,
             "transformer": ["diffusers", type(transformer).__name__],
             "scheduler": ["diffusers", type(scheduler).__name__], "vae": ["diffusers", "AutoencoderKL"]}
    labels = class_names(config)
    if labels:
        index["id2label"] = labels
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    meta = dict(config=config, weights=weights, source=source, null_row_added=model.config["class_dropout_prob"] == 0)
    with open(os.path.join(out, META_FILE), "w") as f:
        json.dump(meta, f, indent=2, default=str)
    share_like_open(out)  # safetensors leaves its files at 0600
    return dict(vae=vae_note, id2label=bool(labels), transformer=transformer)


def check_export_folder(out):
    """Before any work: `out` must be a new or empty folder, or an earlier export (model_index.json or
    META_FILE in it), never a file or an unrelated folder whose files would be mixed with the export's
    (InputError)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out} is a file; give a folder for the export (it is created if missing)")
    if os.path.isdir(out) and os.listdir(out) and not any(
            os.path.isfile(os.path.join(out, name)) for name in ("model_index.json", META_FILE)):
        raise InputError(f"--out {out} is not empty and not an export (no model_index.json); give a new or "
                         "empty folder")


#################################################################################
#                          diffusers -> ours                                    #
#################################################################################


def transformer_dir(path):
    """The folder holding a DiT transformer's config.json inside `path` (a pipeline folder or a bare
    transformer folder); None when `path` is no diffusers folder at all; CheckpointError when it is one
    of something other than a DiT."""
    index = os.path.join(path, "model_index.json")
    if os.path.isfile(index):
        spec = read_json(index)
        kind = (spec.get("transformer") or [None, None])[1]
        if kind not in TRANSFORMER_CLASSES:
            raise CheckpointError(f"{path} is a diffusers {spec.get('_class_name')} folder, not a DiT: expected a "
                                  f"DiTPipeline with a transformer of class {' or '.join(TRANSFORMER_CLASSES)}")
        path = os.path.join(path, "transformer")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        if os.path.isfile(index):
            raise CheckpointError(f"{path} has no config.json: an incomplete DiT pipeline folder")
        return None
    config = read_json(config_path)
    name = config.get("_class_name")
    if name not in TRANSFORMER_CLASSES or config.get("norm_type", "ada_norm_zero") != "ada_norm_zero" \
            or not config.get("patch_size"):
        raise CheckpointError(f"{path} holds a diffusers {name} (norm_type {config.get('norm_type')}), not a DiT: "
                              f"expected a DiTTransformer2DModel (or a Transformer2DModel with norm_type ada_norm_zero)")
    return path


def read_json(path):
    """The JSON object in `path`, a diffusers config or index; CheckpointError when it is not one."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_weights(folder):
    """The state dict in a diffusers model folder: safetensors (never unpickles) or .bin through the
    repo's weights_only loader; sharded files through their index. CheckpointError when there are none."""
    from safetensors.torch import load_file  # lazily: only diffusers folders are safetensors

    for ext, load in ((".safetensors", load_file), (".bin", load_checkpoint)):
        single = os.path.join(folder, WEIGHT_NAME + ext)
        if os.path.isfile(single):
            return load(single)
        sharded = single + ".index.json"
        if os.path.isfile(sharded):
            files = sorted(set(read_json(sharded).get("weight_map", {}).values()))
            state_dict = {}
            for name in files:
                state_dict.update(load(os.path.join(folder, name)))
            return state_dict
    raise CheckpointError(f"{folder} has no {WEIGHT_NAME}.safetensors or .bin (nor a sharded index)")


def shared_embedders(sd, depth):
    """Our one t_embedder / y_embedder from diffusers' per-block copies, which must all be equal."""
    out = {}
    for theirs, ours in {**EMBEDDERS, TABLE[: -len(".weight")]: "y_embedder.embedding_table"}.items():
        for p in ("weight", "bias") if ours != "y_embedder.embedding_table" else ("weight",):
            copies = [sd[f"transformer_blocks.{i}.{theirs}.{p}"] for i in range(depth)]
            if any(not torch.equal(c, copies[0]) for c in copies[1:]):
                raise CheckpointError(f"the blocks of this diffusers DiT hold different {theirs}.{p}; this repo's DiT "
                                      f"(like the original) shares one timestep and label embedding, so it cannot be "
                                      f"converted")
            out[f"{ours}.{p}"] = copies[0]
    return out


def from_diffusers(sd, depth, hidden_size, grid, drop_null_row=False):
    """DiTTransformer2DModel's state dict -> ours (pos_embed recomputed as our model initialises it)."""
    out = {f"{ours}.{p}": sd[f"{theirs}.{p}"] for theirs, ours in TOP.items() for p in ("weight", "bias")}
    out.update(shared_embedders(sd, depth))
    if drop_null_row:
        out["y_embedder.embedding_table.weight"] = out["y_embedder.embedding_table.weight"][:-1]
    for i in range(depth):
        b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        for theirs, ours in BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{o}{ours}.{p}"] = sd[f"{b}{theirs}.{p}"]
        for p in ("weight", "bias"):
            out[f"{o}attn.qkv.{p}"] = torch.cat([sd[f"{b}attn1.{n}.{p}"] for n in ("to_q", "to_k", "to_v")])
    out["pos_embed"] = torch.from_numpy(get_2d_sincos_pos_embed(hidden_size, grid)).float()[None]
    return {k: v.contiguous() for k, v in out.items()}


def model_name(depth, hidden_size, num_heads, patch_size):
    """Our registry name for a DiT shape: the published size if it matches, else any entry with this
    patch size (the config then carries depth / width / heads as overrides)."""
    for size, shape in DIT_SIZES.items():
        if shape == (depth, hidden_size, num_heads) and f"DiT-{size}/{patch_size}" in DiT_models:
            return f"DiT-{size}/{patch_size}"
    for name in DiT_models:
        if name.endswith(f"/{patch_size}"):
            return name
    raise CheckpointError(f"no DiT of patch size {patch_size} in this repo ({', '.join(DiT_models)})")


def folder_config(tc, folder):
    """Our config for a diffusers DiT without dit_config.json (the Hub layout): class dropout 0.1 (its
    table has the null row), LayerNorm, the VAE of the folder's vae/ (its scaling_factor) if present."""
    heads, depth, patch = tc["num_attention_heads"], tc["num_layers"], tc["patch_size"]
    hidden = heads * tc["attention_head_dim"]
    in_channels = tc.get("in_channels", 4)
    out_channels = tc.get("out_channels") or in_channels
    config = dict(model=model_name(depth, hidden, heads, patch), input_size=tc["sample_size"], in_channels=in_channels,
                  num_classes=tc["num_embeds_ada_norm"], class_dropout_prob=0.1,
                  learn_sigma=out_channels == 2 * in_channels, normalization="layer-norm", depth=depth,
                  hidden_size=hidden, num_heads=heads, vae="mse", latent_scale=LATENT_SCALE)
    vae_config = os.path.join(os.path.dirname(os.path.abspath(folder)), "vae", "config.json")
    factor = 8
    if os.path.isfile(vae_config):
        vc = read_json(vae_config)
        config.update(vae=os.path.dirname(vae_config), latent_scale=vc.get("scaling_factor", LATENT_SCALE))
        factor = 2 ** (len(vc.get("block_out_channels", [0] * 4)) - 1)
    config["image_size"] = tc["sample_size"] * factor
    return config


def load_folder(path, weights="ema"):
    """(state_dict, config) of a diffusers DiT folder (ours or the Hub's), in this repo's layout; see the
    ditlab.checkpoints docstring. weights: the folder holds one set; asking for the other is a UsageError."""
    folder = transformer_dir(path)
    if folder is None:
        raise CheckpointError(f"{path} is not a diffusers folder (no model_index.json or config.json)")
    tc = read_json(os.path.join(folder, "config.json"))
    meta_path = os.path.join(path, META_FILE)
    meta = read_json(meta_path) if os.path.isfile(meta_path) else None
    stored = meta["weights"] if meta else "ema"
    if weights != stored:
        raise UsageError(f"{path} holds the {stored} weights only (a diffusers folder keeps one set); use weights="
                         f"{stored!r} (--weights {stored})")
    if meta:
        config = dict(meta["config"])
        if os.path.isfile(os.path.join(path, "vae", "config.json")):
            config["vae"] = os.path.abspath(os.path.join(path, "vae"))
    else:
        config = folder_config(tc, folder)
    hidden = tc["num_attention_heads"] * tc["attention_head_dim"]
    sd = from_diffusers(read_weights(folder), tc["num_layers"], hidden, tc["sample_size"] // tc["patch_size"],
                        drop_null_row=bool(meta and meta.get("null_row_added")))
    return sd, config


def _has_weights(folder):
    """Whether a downloaded model folder holds any weights file."""
    return os.path.isdir(folder) and any(name.startswith(WEIGHT_NAME) for name in os.listdir(folder))


def _weight_patterns(sub, ext):
    """The full-precision weights of a diffusers model folder, single or sharded (not the .fp16 variants)."""
    return [f"{sub}/{WEIGHT_NAME}{ext}", f"{sub}/{WEIGHT_NAME}{ext}.index.json", f"{sub}/{WEIGHT_NAME}-*{ext}"]


def snapshot(repo_id):
    """A local copy of a Hub DiT pipeline (huggingface_hub.snapshot_download: cached after the first call),
    safetensors weights where the repository has them, else .bin (loaded weights_only). InputError when
    the download fails."""
    from huggingface_hub import snapshot_download  # lazily: only the Hub needs it

    patterns = ["model_index.json", "transformer/config.json", "vae/config.json", "scheduler/*",
                *_weight_patterns("transformer", ".safetensors"), *_weight_patterns("vae", ".safetensors")]
    try:
        path = snapshot_download(repo_id, allow_patterns=patterns)
        missing = [p for sub in ("transformer", "vae")
                   if os.path.isdir(os.path.join(path, sub)) and not _has_weights(os.path.join(path, sub))
                   for p in _weight_patterns(sub, ".bin")]
        if missing:  # an older repository: .bin only (loaded weights_only)
            path = snapshot_download(repo_id, allow_patterns=patterns + missing)
    except Exception as e:
        raise InputError(f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). Offline? "
                         f"Set HF_HUB_OFFLINE=1 to use a cached copy, or pass the downloaded folder itself") from e
    return path
