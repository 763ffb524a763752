"""Diffusion Transformer (DiT) with adaLN-Zero blocks and swappable normalization.

This is the model of Peebles & Xie, "Scalable Diffusion Models with Transformers" (2023), written so
that the official pretrained checkpoints load unchanged (same parameter names and shapes), plus two
things this repository studies:

* ``normalization``: the LayerNorm in every block (and in the final layer) can be swapped for another
  layer from ``NORM_LAYERS`` ("none" = identity; "dyt" and "derf" are point-wise functions;
  "layer-norm-restore" is LayerNorm plus what it removes, learnt back). ``final_normalization`` sets the
  final layer's apart from the blocks' (default: the same). Everything else stays the same.
* ``dropout``: off by default (no parameters, so the key layout is the official one either way); when set,
  dropout on the attention weights and on the MLP's hidden activations while training.
* ``capture``: ``forward(..., capture=fn)`` calls ``fn(name, tokens)`` with the token embeddings after
  the patch embedding ("embed"), after every block ("block.0" ... "block.<depth-1>") and after the final
  layer ("final"), so that embedding outliers can be measured without editing the model. When
  ``capture`` is None nothing extra runs.

Read top to bottom: embedders, normalization registry, attention/MLP, block, final layer, DiT,
position embedding, and the registry ``DiT_models`` of published configurations.
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def modulate(x, shift, scale):
    """adaLN modulation: scale and shift every token by the per-sample conditioning vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                      Embedding layers for timesteps and labels                #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequencies of the (scalar) timestep followed by a two-layer SiLU MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000, dtype=torch.float32):
        """[cos, sin] features of t at `dim // 2` geometric frequencies from 1 down to 1/max_period.

        t may be fractional. Computed in float32 (float64 for a float64 model). An odd `dim` gets one
        zero column so the output is always (N, dim).
        """
        half = dim // 2
        exponent = -math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half
        args = t[:, None].to(dtype) * torch.exp(exponent)[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        dtype = torch.float64 if self.mlp[0].weight.dtype == torch.float64 else torch.float32
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size, dtype=dtype))


class LabelEmbedder(nn.Module):
    """Class-label table. With dropout > 0 it has one extra "null" row (index num_classes) that
    classifier-free guidance uses as the unconditional label; training replaces labels by it with
    probability `dropout_prob`."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Swap labels for the null class: at random while training, or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """Split a (N, C, H, W) image into p x p patches and project each to a token: (N, T, D)."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        # contiguous(): the transposed view would otherwise set the memory layout of every token tensor
        # downstream (elementwise ops keep their first input's layout), so each LayerNorm and Linear
        # would copy its input first.
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


#################################################################################
#                           Normalization variants                              #
#################################################################################

class DynamicTanh(nn.Module):
    """Dynamic Tanh (Zhu et al., CVPR 2025): tanh(alpha * x) with one learnable scalar alpha, a
    normalization-free stand-in for LayerNorm. No affine weight/bias, like DiT's LayerNorms."""

    def __init__(self, dim, alpha_init=0.5):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))

    def forward(self, x):
        return torch.tanh(self.alpha * x)


class DynamicErf(nn.Module):
    """Dynamic erf, Derf (Chen et al. 2025, "Stronger Normalization-Free Transformers"): erf(alpha * x + s)
    with two learnable scalars, alpha (init 0.5) and the shift s (init 0). The paper's per-channel outer
    gamma/beta are left out as DiT's norms have no affine; the adaLN modulation scales and shifts after it."""

    def __init__(self, dim, alpha_init=0.5, shift_init=0.0):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))
        self.shift = nn.Parameter(torch.full((1,), float(shift_init)))

    def forward(self, x):
        return torch.erf(self.alpha * x + self.shift)


class RestoringLayerNorm(nn.Module):
    """LayerNorm that hands back what it removes: LN(x) + log(sigma(x)) * a + mu(x) * b, with mu and sigma
    the token's mean and standard deviation (those LN divides out) and a, b learnable per-channel vectors
    that start at zero, so a new layer computes exactly LayerNorm. The log makes the token's scale an
    additive feature whose range stays moderate however large the outlier channels make sigma; the mean
    is signed, so it is passed as it is. If LayerNorm costs a denoiser precision because it discards each
    token's scale, this variant can learn it back; if it still loses precision, the cost lies elsewhere."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.scale_weight = nn.Parameter(torch.zeros(dim))  # a: zeros, not a Linear, so no init draws
        self.mean_weight = nn.Parameter(torch.zeros(dim))  # b

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        out = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return out + 0.5 * torch.log(var + self.eps) * self.scale_weight + mean * self.mean_weight


# Each entry builds the normalization used before attention, before the MLP and in the final layer.
# To add a variant, add one line here (and a parameter-free variant needs nothing else).
NORM_LAYERS = {
    "layer-norm": lambda dim: nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6),
    "none": lambda dim: nn.Identity(),
    "rms-norm": lambda dim: nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False),
    "dyt": lambda dim: DynamicTanh(dim, alpha_init=0.5),
    "derf": lambda dim: DynamicErf(dim, alpha_init=0.5, shift_init=0.0),
    "layer-norm-restore": lambda dim: RestoringLayerNorm(dim, eps=1e-6),
}

# Variants without adaLN-Zero: the DyT authors' DiT recipe removes all four zero-initialisations (the
# blocks' adaLN modulation, the final layer's adaLN modulation, the final linear's weight and bias), which
# keep their default Xavier / zero-bias init, so a new DyT model does not output zero. The Derf authors
# use the same recipe for every point-wise function.
NO_ZERO_INIT = {"dyt", "derf"}


def make_norm(name, dim):
    """Build the normalization layer `name` for `dim` channels (ValueError naming the choices)."""
    if name not in NORM_LAYERS:
        raise ValueError(f"unknown normalization {name!r}; choose one of {sorted(NORM_LAYERS)}")
    return NORM_LAYERS[name](dim)


#################################################################################
#                               Core DiT model                                  #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, through scaled_dot_product_attention
    (flash / memory-efficient kernels on GPU)."""

    def __init__(self, dim, num_heads, dropout=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} must be divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout  # on the attention weights, while training
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        p = self.dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # unbind: one backward op instead of three zero-filled
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """Linear - GELU (tanh approximation) - [dropout] - Linear."""

    def __init__(self, dim, hidden_dim, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)
        self.dropout = dropout  # on the hidden activations, while training; 0: never called

    def forward(self, x):
        h = self.act(self.fc1(x))
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout, training=True)
        return self.fc2(h)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: the conditioning vector c produces a shift,
    scale and gate for the attention branch and for the MLP branch."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, normalization="layer-norm", dropout=0.0):
        super().__init__()
        self.norm1 = make_norm(normalization, hidden_size)
        self.attn = Attention(hidden_size, num_heads, dropout)
        self.norm2 = make_norm(normalization, hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + normalization + linear projection of every token to p*p*out_channels."""

    def __init__(self, hidden_size, patch_size, out_channels, normalization="layer-norm"):
        super().__init__()
        self.norm_final = make_norm(normalization, hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# State-dict keys that record a non-default normalization (and a final layer's normalization that differs
# from the blocks'). The default ("layer-norm" everywhere) writes neither, so its state_dict is exactly the
# official layout.
NORM_KEY = "normalization"
FINAL_NORM_KEY = "final_normalization"


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone.

    forward(x, t, y) maps noisy inputs x (N, C, H, W), timesteps t (N,) and class labels y (N,) to
    (N, 2C, H, W) when learn_sigma (noise prediction, then the variance interpolation v), else (N, C, H, W).
    """

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        normalization="layer-norm",
        final_normalization=None,
        dropout=0.0,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(
                f"input_size {input_size} is not divisible by patch size {patch_size}; "
                f"use an input size that is a multiple of {patch_size}"
            )
        final_normalization = final_normalization or normalization  # None: the blocks' normalization
        make_norm(normalization, 1)  # fail early, with the list of choices, on an unknown name
        make_norm(final_normalization, 1)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.config = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            num_classes=num_classes, learn_sigma=learn_sigma, normalization=normalization,
        )
        # Only where they differ from the reference model, so its config stays the reference's.
        if final_normalization != normalization:
            self.config["final_normalization"] = final_normalization
        if dropout:
            self.config["dropout"] = dropout
        self.input_size = input_size
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.normalization = normalization
        self.final_normalization = final_normalization
        self.grad_checkpointing = False  # recompute block activations in backward to save memory
        self.check_labels = True  # label range check (one host sync per call on GPU; scripts may turn off)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        # Fixed sin-cos position embedding, stored as a frozen parameter (it is in the official files).
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio, normalization, dropout) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, final_normalization)
        self.initialize_weights()
        self._register_state_dict_hook(_save_normalization)
        self._register_load_state_dict_pre_hook(_check_normalization, with_module=True)

    def initialize_weights(self):
        """Xavier-uniform linears with zero bias, N(0, 0.02) embeddings, fixed sin-cos positions, and
        zero adaLN modulation and output projection, so a new model computes exactly zero (except the
        NO_ZERO_INIT variants, which keep the Xavier init there)."""

        def basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        grid = self.input_size // self.patch_size
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.normalization in NO_ZERO_INIT:
            return
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x):
        """(N, T, p*p*C) tokens back to (N, C, H, W) images."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embedding_names(self):
        """Names passed to `capture`, in forward order: "embed", "block.0" ... , "final"."""
        return ["embed"] + [f"block.{i}" for i in range(len(self.blocks))] + ["final"]

    def _check_inputs(self, x, t, y):
        """Raise a ValueError naming the expected shapes/values instead of failing deep inside torch."""
        C, S = self.in_channels, self.input_size
        if x.ndim != 4 or x.shape[1] != C or x.shape[2] != S or x.shape[3] != S:
            raise ValueError(
                f"DiT expects x of shape (N, {C}, {S}, {S}) (in_channels={C}, input_size={S}, "
                f"a multiple of patch size {self.patch_size}); got {tuple(x.shape)}"
            )
        n = x.shape[0]
        if t.shape != (n,):
            raise ValueError(f"t must have shape ({n},), one timestep per sample; got {tuple(t.shape)}")
        if y.shape != (n,) or y.is_floating_point():
            raise ValueError(f"y must be integer class labels of shape ({n},); got {y.dtype} {tuple(y.shape)}")
        if self.check_labels and not torch.compiler.is_compiling():
            top = self.y_embedder.embedding_table.num_embeddings - 1
            if bool(((y < 0) | (y > top)).any()):
                raise ValueError(
                    f"class labels must lie in [0, {self.num_classes - 1}]"
                    + (f" (or {self.num_classes} for the null class)" if top == self.num_classes else "")
                    + f"; got values from {int(y.min())} to {int(y.max())}"
                )

    def forward(self, x, t, y, capture=None):
        """Predict noise (and variance interpolation) for x at timesteps t with labels y.

        capture: optional callable `capture(name, tokens)` called with the (N, T, D) token embeddings
        after the patch embedding + position ("embed"), after each block ("block.i"), and with the
        (N, T, p*p*out_channels) output of the final layer ("final"). It sees the live tensors: clone
        them to keep them, or reduce them on the spot to keep memory flat.
        """
        self._check_inputs(x, t, y)
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        if capture is not None:
            capture("embed", x)
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
            if capture is not None:
                capture(f"block.{i}", x)
        x = self.final_layer(x, c)
        if capture is not None:
            capture("final", x)
        return self.unpatchify(x)

    def forward_with_cfg(self, x, t, y, cfg_scale, guidance_channels=None):
        """Classifier-free guidance. x holds the same inputs twice: the first half with class labels,
        the second with the null label. Returns guided predictions for both halves (identical).

        guidance_channels: how many leading output channels are guided. None (default) guides every
        noise channel (the standard form); 3 reproduces the reference code exactly, which guides only
        the first three of the four latent channels (as the published FID numbers were computed).
        """
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch (conditional + unconditional halves); got {x.shape[0]}")
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        k = self.in_channels if guidance_channels is None else guidance_channels
        eps, rest = model_out[:, :k], model_out[:, k:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


def _save_normalization(module, state_dict, prefix, local_metadata):
    """State-dict hook: record a non-default normalization as a uint8 tensor of its name's bytes, and the
    final layer's where it differs from the blocks'."""
    if module.normalization != "layer-norm":
        state_dict[prefix + NORM_KEY] = torch.tensor(list(module.normalization.encode()), dtype=torch.uint8)
    if module.final_normalization != module.normalization:
        state_dict[prefix + FINAL_NORM_KEY] = torch.tensor(list(module.final_normalization.encode()), dtype=torch.uint8)


def stored_normalization(state_dict, prefix=""):
    """The normalization a DiT state dict was saved with (the only place its key is decoded): the bytes
    of its name under NORM_KEY, or "layer-norm" when the key is absent (the official files)."""
    stored = state_dict.get(prefix + NORM_KEY)
    return "layer-norm" if stored is None else bytes(stored.tolist()).decode()


def stored_final_normalization(state_dict, prefix=""):
    """The final layer's normalization of a DiT state dict: its FINAL_NORM_KEY, else the blocks' one."""
    stored = state_dict.get(prefix + FINAL_NORM_KEY)
    return stored_normalization(state_dict, prefix) if stored is None else bytes(stored.tolist()).decode()


def _check_normalization(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """Load pre-hook: refuse a checkpoint of another normalization variant with a clear message.
    A state_dict without the key (e.g. the official files) is a LayerNorm model."""
    name, final = stored_normalization(state_dict, prefix), stored_final_normalization(state_dict, prefix)
    state_dict.pop(prefix + NORM_KEY, None)
    state_dict.pop(prefix + FINAL_NORM_KEY, None)
    if name != module.normalization:
        raise ValueError(
            f"this checkpoint was trained with normalization={name!r} but the model was built with "
            f"normalization={module.normalization!r}; build the model with normalization={name!r}"
        )
    if final != module.final_normalization:
        raise ValueError(
            f"this checkpoint's final layer was trained with final_normalization={final!r} but the model was "
            f"built with final_normalization={module.final_normalization!r}; build it with "
            f"final_normalization={final!r}"
        )


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """[sin, cos] of positions `pos` at embed_dim // 2 frequencies 1 / 10000^(2i / embed_dim)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos position embedding needs an even dimension, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size**2, embed_dim) MAE-style 2-D embedding, tokens in row-major order: the first half of
    the channels encodes the column, the second half the row."""
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64), indexing="ij")
    return np.concatenate(
        [get_1d_sincos_pos_embed_from_grid(embed_dim // 2, cols), get_1d_sincos_pos_embed_from_grid(embed_dim // 2, rows)],
        axis=1,
    )


#################################################################################
#                                   DiT Configs                                  #
#################################################################################

# (depth, hidden size, heads) of each published size; the toy XS is from the LayerNorm study.
DIT_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6), "XS": (6, 256, 4)}


def _config(size, patch_size):
    depth, hidden_size, num_heads = DIT_SIZES[size]

    def build(**kwargs):  # keyword overrides win (the toy study shrinks depth/width on a CPU)
        return DiT(**{**dict(depth=depth, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads), **kwargs})

    build.__name__ = f"DiT_{size}_{patch_size}"
    build.__doc__ = f"DiT-{size}/{patch_size}: depth {depth}, hidden {hidden_size}, {num_heads} heads, patch {patch_size}."
    return build


DiT_XL_2, DiT_XL_4, DiT_XL_8 = _config("XL", 2), _config("XL", 4), _config("XL", 8)
DiT_L_2, DiT_L_4, DiT_L_8 = _config("L", 2), _config("L", 4), _config("L", 8)
DiT_B_2, DiT_B_4, DiT_B_8 = _config("B", 2), _config("B", 4), _config("B", 8)
DiT_S_2, DiT_S_4, DiT_S_8 = _config("S", 2), _config("S", 4), _config("S", 8)
DiT_XS_1 = _config("XS", 1)

DiT_models = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
    "DiT-XS/1": DiT_XS_1,
}


def build_model(name, **kwargs):
    """DiT_models[name](**kwargs) with a clear error for an unknown name."""
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; choose one of {list(DiT_models)}")
    return DiT_models[name](**kwargs)


# Keys of a run's config (saved in every checkpoint of train.py / train_toy.py) that describe the model.
MODEL_CONFIG_KEYS = ("input_size", "in_channels", "num_classes", "class_dropout_prob", "learn_sigma",
                     "normalization", "final_normalization", "dropout", "depth", "hidden_size", "num_heads")


def build_model_from_config(config):
    """Rebuild the DiT a training run used from its config dict: `config["model"]` names the registry
    entry, the MODEL_CONFIG_KEYS present (and not None) override its defaults."""
    overrides = {k: config[k] for k in MODEL_CONFIG_KEYS if config.get(k) is not None}
    return build_model(config["model"], **overrides)
