"""Models from checkpoints: builds a model from the official pretrained files by name, our checkpoints, run
directories, diffusers folders and the Hub. The files themselves are read and written by checkpoint_io
(safely, weights_only), whose names this module also exports.

    from ditlab.checkpoints import find_model, load_model

    state_dict, config = find_model("DiT-XL-2-256x256.pt")         # downloads once into pretrained_models/
    model, config = load_model("results/000-DiT-S-2-none/checkpoints/latest.pt")   # EMA weights
    model, config = load_model("results/000-DiT-S-2-none", weights="raw")           # a run dir: its latest.pt
    model, config = load_model("hf:facebook/DiT-XL-2-256")                          # the Hub's diffusers copy

`find_model(name_or_path, weights="ema") -> (state_dict, config_or_None)`
    name_or_path: an official file name (PRETRAINED_MODELS), a checkpoint file, a run directory
    (its checkpoints/latest.pt), a diffusers DiT folder (an export_diffusers.py export or the Hub
    layout, converted by diffusers_interop.load_folder), or "hf:<repo>" (e.g. hf:facebook/DiT-XL-2-256,
    fetched with huggingface_hub.snapshot_download, then loaded as a folder). weights: "ema" (default)
    or "raw" (the "model" entry of a training checkpoint; a diffusers folder holds the one set it was
    exported with). config: the dict that models.build_model_from_config understands, plus image_size, vae
    and latent_scale; for our own checkpoints it is the run's config (with "ckpt_step", the training
    step, added when the checkpoint records it); for the official files and for checkpoints of the
    reference DiT train.py (which pickle an argparse.Namespace under "args") it is derived; for a bare
    state dict of unknown origin it is None.

`load_model(name_or_path, weights="ema", must_match=(), bare_model=None, **overrides) -> (model, config)`
    find_model, then build the DiT the config describes (keyword overrides win, e.g. normalization=...;
    a bare state dict is described by them: model=... / image_size=... / vae=...), load the weights
    strictly and return the model in eval mode on the CPU with the config it was built from. Keys in
    must_match are checked against a file's own config instead of overriding it.

Everything is loaded with torch.load(weights_only=True) (ditlab.checkpoint_io; safetensors for diffusers
folders): a file that pickles anything beyond tensors and plain Python types (argparse.Namespace allowed)
is refused, never executed. Every failure says what was expected: CheckpointError for a missing, corrupt,
truncated or unsafe file and for weights that do not fit the model; UsageError for arguments that cannot
work (weights="raw" of a bare state dict, a flag that contradicts the checkpoint); InputError for a failed
download.

Layer: above diffusers_interop (which converts diffusers folders) and checkpoint_io (which reads the files);
below sampling, analysis and the commands.
"""

import argparse
import os
import sys
import urllib.request

import torch
from tqdm import tqdm

from ditlab import diffusers_interop
from ditlab.checkpoint_io import CHECKPOINT_HINT, checkpoint_file, load_checkpoint, missing_checkpoint
# Moved to ditlab.checkpoint_io, still importable from here: link_latest, save_checkpoint.
from ditlab.checkpoint_io import link_latest, save_checkpoint  # noqa: F401
from ditlab.constants import LATENT_SCALE
from ditlab.errors import CheckpointError, InputError, UsageError
from ditlab.files import atomic_write
from models import build_model_from_config, stored_final_normalization, stored_normalization

# The two official DiT-XL/2 files (raw EMA state dicts), by name -> image size.
PRETRAINED_MODELS = {"DiT-XL-2-256x256.pt": 256, "DiT-XL-2-512x512.pt": 512}
PRETRAINED_URL = "https://dl.fbaipublicfiles.com/DiT/models/"  # + file name
PRETRAINED_DIR = "pretrained_models"  # relative to the working directory, like the reference repo
HUB_PREFIX = "hf:"  # hf:facebook/DiT-XL-2-256: a diffusers DiT pipeline on the Hugging Face Hub

WEIGHTS = ("ema", "raw")


#################################################################################
#                                Download                                       #
#################################################################################


def _copy_url(url, f, chunk_size=1 << 20):
    """Stream `url` into the open file `f`; raise if fewer bytes arrive than the server announced."""
    with urllib.request.urlopen(url, timeout=60) as response:
        expected = response.headers.get("Content-Length")
        expected = int(expected) if expected is not None else None
        received = 0
        with tqdm(total=expected, unit="B", unit_scale=True, desc=os.path.basename(url), file=sys.stderr) as bar:
            while True:
                chunk = response.read(chunk_size)
                if not chunk:
                    break
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if expected is not None and received != expected:
        raise OSError(f"download truncated: got {received} of {expected} bytes")


def download_model(model_name):
    """Path of the official file `model_name` in PRETRAINED_DIR, downloading it first if needed.

    The download goes to a temporary file that is renamed only when complete, so an interrupted
    download never leaves a partial file under the final name (the next call starts over). UsageError
    for a name that is not official, InputError when the download fails.
    """
    if model_name not in PRETRAINED_MODELS:
        raise UsageError(f"{model_name!r} is not an official DiT file; choose one of {list(PRETRAINED_MODELS)}")
    path = os.path.join(PRETRAINED_DIR, model_name)
    if os.path.isfile(path):
        return path
    os.makedirs(PRETRAINED_DIR, exist_ok=True)
    url = PRETRAINED_URL + model_name
    print(f"downloading {url} -> {path}", file=sys.stderr)
    try:
        atomic_write(path, lambda f: _copy_url(url, f))
    except KeyboardInterrupt:
        raise
    except Exception as e:
        raise InputError(
            f"could not download {url} ({e}); nothing was written to {path}. Without internet access, "
            f"copy the file there by hand, or pass --ckpt with a local checkpoint; the Hub's copy of the "
            f"official weights is --ckpt hf:facebook/DiT-XL-2-{PRETRAINED_MODELS[model_name]}"
        ) from e
    return path


#################################################################################
#                                Loading                                        #
#################################################################################


def official_config(image_size):
    """The config of the official DiT-XL/2 files: 1000 ImageNet classes, learned sigma, LayerNorm,
    latents of the sd-vae-ft VAE (8x downsampling, 4 channels)."""
    return dict(model="DiT-XL/2", image_size=image_size, input_size=image_size // 8, in_channels=4,
                num_classes=1000, class_dropout_prob=0.1, learn_sigma=True, normalization="layer-norm",
                vae="mse", latent_scale=LATENT_SCALE)


def config_from_reference_args(args):
    """Config of a checkpoint written by the reference DiT train.py, from its argparse.Namespace."""
    a = vars(args)
    config = official_config(int(a.get("image_size", 256)))
    config.update(model=a.get("model", "DiT-XL/2"), num_classes=int(a.get("num_classes", 1000)),
                  vae=a.get("vae", "ema"))
    return config


def _is_state_dict(obj):
    """Whether `obj` is a bare state dict: a non-empty dict of tensors."""
    return isinstance(obj, dict) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def split_checkpoint(ckpt, weights="ema", source="checkpoint"):
    """(state_dict, config_or_None) from a loaded file: a training checkpoint (ours or the reference's)
    or a bare state dict (only valid for weights="ema": the official files are EMA weights).
    CheckpointError when it is neither; UsageError when the asked-for weights are not in it."""
    if weights not in WEIGHTS:
        raise UsageError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if _is_state_dict(ckpt):
        if weights == "raw":
            raise UsageError(f"{source} is a bare state dict (EMA weights only); it has no raw weights: use "
                             f"weights='ema'")
        name = os.path.basename(str(source))
        return ckpt, (official_config(PRETRAINED_MODELS[name]) if name in PRETRAINED_MODELS else None)
    if not isinstance(ckpt, dict) or not ("ema" in ckpt or "model" in ckpt):
        keys = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{source} is not a DiT checkpoint: expected a state dict or a dict with 'ema'/'model' "
                              f"entries (a training checkpoint), got {keys}")
    key = "ema" if weights == "ema" else "model"
    if key not in ckpt:
        raise UsageError(f"{source} has no {key!r} entry (it has {sorted(ckpt)}); try weights="
                         f"{'raw' if key == 'ema' else 'ema'!r}")
    state_dict = ckpt[key]
    if isinstance(ckpt.get("config"), dict):
        config = dict(ckpt["config"])
        config.setdefault("latent_scale", LATENT_SCALE)
        if isinstance(ckpt.get("step"), int):
            config["ckpt_step"] = ckpt["step"]
    elif isinstance(ckpt.get("args"), argparse.Namespace):
        config = config_from_reference_args(ckpt["args"])
    else:
        config = None
    return state_dict, config


def find_model(name_or_path, weights="ema"):
    """Load DiT weights: `(state_dict, config_or_None)`; see the module docstring.

    An official name (DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt) is downloaded into PRETRAINED_DIR
    the first time; anything else is a local checkpoint file or run directory.
    """
    if name_or_path in PRETRAINED_MODELS:
        if weights != "ema":
            raise UsageError(f"{name_or_path} holds EMA weights only; use weights='ema'")
        path = download_model(name_or_path)
    elif str(name_or_path).startswith(HUB_PREFIX):
        path = diffusers_interop.snapshot(str(name_or_path)[len(HUB_PREFIX):])
    else:
        path = str(name_or_path)
    if os.path.isdir(path) and not os.path.isfile(checkpoint_file(path)):
        if diffusers_interop.transformer_dir(path) is None:  # (a diffusers folder of something else raises here)
            raise CheckpointError(f"{path!r} is neither a run directory (no checkpoints/latest.pt) nor a diffusers "
                                  f"DiT folder (no model_index.json or transformer config.json)")
        return diffusers_interop.load_folder(path, weights)
    if not os.path.isfile(checkpoint_file(path)):
        raise missing_checkpoint(path, f"{CHECKPOINT_HINT} (or an official name: {', '.join(PRETRAINED_MODELS)})")
    return split_checkpoint(load_checkpoint(path, mmap=True), weights, source=path)


def _describe(config):
    """The model a config describes, with the sizes that decide whether weights fit it."""
    keys = ("input_size", "in_channels", "num_classes", "class_dropout_prob", "learn_sigma", "normalization",
            "depth", "hidden_size", "num_heads")
    parts = [f"{k}={config[k]}" for k in keys if config.get(k) is not None]
    return f"{config.get('model')} ({', '.join(parts)})"


def build_and_load(state_dict, config, source="checkpoint"):
    """Build the DiT `config` describes and load `state_dict` strictly into it; a mismatch (other
    architecture, image size, class count or normalization) raises a CheckpointError naming both sides."""
    try:
        model = build_model_from_config(config)
    except (ValueError, TypeError, KeyError) as e:
        hint = describe_flags(state_dict)
        raise CheckpointError(f"cannot build the model for {source} from config {_describe(config)}: {e}"
                              f"{'; ' + hint if hint else ''}") from e
    try:
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, ValueError) as e:
        lines = str(e).splitlines()
        detail = "\n".join(lines[:6]) + ("\n..." if len(lines) > 6 else "")
        hint = describe_flags(state_dict)
        raise CheckpointError(f"{source} does not fit the expected model {_describe(config)}"
                              f"{'; ' + hint if hint else ''}:\n{detail}") from None
    return model.eval()


def bare_config(state_dict, overrides, source, bare_model=None):
    """The config of a bare state dict, from the overrides (which must name the model, unless
    `bare_model` gives a default) on top of the reference's defaults: 256 px, 1000 classes, the mse VAE
    (vae="none": a pixel-space model with 3 channels); the normalizations are read from the state dict.
    UsageError when nothing names the model."""
    overrides = {"model": bare_model, **overrides} if bare_model else overrides
    if "model" not in overrides:
        raise UsageError(f"{source} is a bare state dict with no config: say which model it is, e.g. "
                         f"load_model(path, model='DiT-XL/2', image_size=256) (sample.py: --model and --image-size)")
    size = overrides.get("image_size", 256)
    config = official_config(size)
    config.update(model=overrides["model"], normalization=stored_normalization(state_dict),
                  final_normalization=stored_final_normalization(state_dict))
    if overrides.get("vae") == "none":
        config.update(input_size=size, in_channels=3)
    shapes = state_dict_shapes(state_dict)  # depth and width are in the weights: a non-standard size loads too
    config.update({k: shapes[k] for k in ("depth", "hidden_size") if k in shapes})
    return config


def state_dict_shapes(state_dict):
    """What a DiT state dict's shapes say about its model: depth, hidden_size, patch_size, in_channels,
    num_classes (the label table has one more row, the null class, when trained with label dropout) and
    input_size; {} for what is missing. The number of heads is not in the shapes."""
    out = {}
    proj = state_dict.get("x_embedder.proj.weight")
    if proj is not None and proj.ndim == 4:
        out.update(hidden_size=proj.shape[0], in_channels=proj.shape[1], patch_size=proj.shape[-1])
        pos = state_dict.get("pos_embed")
        if pos is not None and pos.ndim == 3:
            out["input_size"] = round(pos.shape[1] ** 0.5) * proj.shape[-1]
    blocks = {k.split(".")[1] for k in state_dict if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if blocks:
        out["depth"] = len(blocks)
    table = state_dict.get("y_embedder.embedding_table.weight")
    if table is not None:
        out["label_rows"] = table.shape[0]
    return out


def describe_flags(state_dict):
    """The sample.py flags that describe a bare state dict, as far as its shapes tell (mismatch messages)."""
    shapes = state_dict_shapes(state_dict)
    if "hidden_size" not in shapes:
        return ""
    heads = [h for h in (16, 12, 8, 6, 4, 2) if shapes["hidden_size"] % h == 0][:1] or [1]
    flags = (f"--depth {shapes.get('depth')} --hidden-size {shapes['hidden_size']} --num-heads N (a divisor of "
             f"{shapes['hidden_size']}, e.g. {heads[0]}; the shapes do not say) and a --model with patch size "
             f"{shapes['patch_size']}")
    if "label_rows" in shapes:
        flags += f", --num-classes {shapes['label_rows'] - 1} (or {shapes['label_rows']} without label dropout)"
    if shapes["in_channels"] == 3 and "input_size" in shapes:
        flags += f", --vae none --image-size {shapes['input_size']}"
    elif "input_size" in shapes:
        flags += f", --image-size {shapes['input_size'] * 8}"
    return f"its shapes say: pass {flags}"


def load_model(name_or_path, weights="ema", must_match=(), bare_model=None, **overrides):
    """`(model, config)`: find_model, then build and load the DiT (see the module docstring).

    overrides (None values ignored) update the config before the model is built: e.g. normalization or
    vae, or for a bare state dict (see bare_config) model="DiT-S/2", image_size=64, num_classes=10.
    For a file that has its own config, the keys named in `must_match` are checked against it instead
    (a conflict is a UsageError): a flag cannot turn a checkpoint into another model. `bare_model` is
    the model a bare state dict is taken to be when no model= is given (sample.py: DiT-XL/2).
    """
    state_dict, config = find_model(name_or_path, weights)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if config is None:  # the overrides describe it
        config = {**bare_config(state_dict, overrides, name_or_path, bare_model), **overrides}
    else:
        config.setdefault("image_size", config.get("input_size", 32) * (1 if config.get("vae") == "none" else 8))
        for key in must_match:
            if key in overrides and overrides[key] != config.get(key):
                raise UsageError(f"--{key.replace('_', '-')} {overrides[key]} conflicts with the checkpoint "
                                 f"({key}={config.get(key)!r}); drop the flag, the checkpoint says what it is")
        config = {**config, **{k: v for k, v in overrides.items() if k not in must_match}}
    return build_and_load(state_dict, config, source=str(name_or_path)), config

