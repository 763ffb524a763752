"""Tests for models.py: the DiT against an independent float64 computation of the published equations,
the official checkpoint layout, adaLN-Zero, guidance, embedding capture and input errors."""

import math

import numpy as np
import pytest
import scipy.special
import torch

from models import (
    NO_ZERO_INIT, NORM_LAYERS, DiT, DiT_models, DynamicErf, build_model, build_model_from_config,
    get_2d_sincos_pos_embed,
)

TINY = dict(input_size=4, patch_size=2, in_channels=3, hidden_size=16, depth=2, num_heads=2, num_classes=5)


# ----------------------------------------------------------------------------------------------------
# An independent float64 numpy implementation of the DiT equations (paper + REFERENCE.md), reading the
# weights from the state_dict by their official names.
# ----------------------------------------------------------------------------------------------------

def _np(sd):
    return {k: v.detach().double().numpy() for k, v in sd.items() if k != "normalization"}


def _linear(w, prefix, x):
    return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _silu(x):
    return x / (1 + np.exp(-x))


def _norm(x, kind, w, prefix):
    """The normalization `kind` in float64, its parameters (if any) read from w under `prefix`."""
    alpha, shift = w.get(prefix + ".alpha"), w.get(prefix + ".shift")
    if kind == "none":
        return x
    if kind == "rms-norm":
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)
    if kind == "dyt":
        return np.tanh(alpha * x)
    if kind == "derf":
        return scipy.special.erf(alpha * x + shift)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    out = (x - mu) / np.sqrt(var + 1e-6)
    if kind == "layer-norm-restore":
        out = out + np.log(np.sqrt(var + 1e-6)) * w[prefix + ".scale_weight"] + mu * w[prefix + ".mean_weight"]
    return out


def _attention(w, prefix, x, heads):
    n, T, D = x.shape
    dh = D // heads
    qkv = _linear(w, prefix + ".qkv", x)
    q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
    out = np.zeros_like(x)
    for h in range(heads):
        s = slice(h * dh, (h + 1) * dh)
        logits = q[..., s] @ np.swapaxes(k[..., s], 1, 2) / math.sqrt(dh)
        logits -= logits.max(-1, keepdims=True)
        a = np.exp(logits)
        a /= a.sum(-1, keepdims=True)
        out[..., s] = a @ v[..., s]
    return _linear(w, prefix + ".proj", out)


def reference_dit(sd, cfg, x, t, y, norm, final_norm=None):
    w = _np(sd)
    x = x.double().numpy()
    n, C, H, W = x.shape
    p, D = cfg["patch_size"], cfg["hidden_size"]
    g = H // p
    # Patch embedding: each p x p patch (channel-major) through the conv weight viewed as a matrix.
    patches = np.stack([x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(n, -1) for i in range(g) for j in range(g)], 1)
    tok = patches @ w["x_embedder.proj.weight"].reshape(D, -1).T + w["x_embedder.proj.bias"]
    tok = tok + w["pos_embed"]
    # Timestep: [cos, sin] at 128 frequencies exp(-ln(10000) k / 128), then Linear-SiLU-Linear.
    freqs = np.exp(-math.log(10000) * np.arange(128) / 128)
    args = t.double().numpy()[:, None] * freqs[None]
    temb = np.concatenate([np.cos(args), np.sin(args)], 1)
    temb = _linear(w, "t_embedder.mlp.2", _silu(_linear(w, "t_embedder.mlp.0", temb)))
    c = temb + w["y_embedder.embedding_table.weight"][y.numpy()]
    for b in range(cfg["depth"]):
        pre = f"blocks.{b}"
        mod = _linear(w, pre + ".adaLN_modulation.1", _silu(c))
        sh1, sc1, g1, sh2, sc2, g2 = [mod[:, k * D:(k + 1) * D][:, None] for k in range(6)]
        tok = tok + g1 * _attention(w, pre + ".attn", _norm(tok, norm, w, pre + ".norm1") * (1 + sc1) + sh1,
                                    cfg["num_heads"])
        h = _norm(tok, norm, w, pre + ".norm2") * (1 + sc2) + sh2
        tok = tok + g2 * _linear(w, pre + ".mlp.fc2", _gelu_tanh(_linear(w, pre + ".mlp.fc1", h)))
    mod = _linear(w, "final_layer.adaLN_modulation.1", _silu(c))
    shift, scale = mod[:, None, :D], mod[:, None, D:]
    normed = _norm(tok, final_norm or norm, w, "final_layer.norm_final")
    out = _linear(w, "final_layer.linear", normed * (1 + scale) + shift)
    # Unpatchify: token (i, j) holds a p x p x C_out block in (row, col, channel) order.
    co = out.shape[-1] // (p * p)
    img = np.zeros((n, co, H, W))
    for i in range(g):
        for j in range(g):
            img[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = out[:, i * g + j].reshape(n, p, p, co).transpose(0, 3, 1, 2)
    return img


def randomized(model, std=0.3, seed=0):
    """Give every trainable parameter (including the zero-initialised ones) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model


@pytest.mark.parametrize("norm", ["layer-norm", "none", "rms-norm", "dyt", "derf", "layer-norm-restore"])
@pytest.mark.parametrize("patch_size,input_size", [(2, 4), (1, 3)])
def test_forward_matches_float64_reference(norm, patch_size, input_size):
    cfg = dict(TINY, patch_size=patch_size, input_size=input_size)
    torch.manual_seed(0)
    model = randomized(DiT(**cfg, normalization=norm)).double().eval()
    x = torch.randn(3, 3, input_size, input_size, dtype=torch.float64)
    t = torch.tensor([0, 17, 999])
    y = torch.tensor([0, 4, 2])
    out = model(x, t, y).detach().numpy()
    ref = reference_dit(model.state_dict(), dict(cfg, depth=2), x, t, y, norm)
    assert out.shape == (3, 6, input_size, input_size)
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("norm,final", [("layer-norm", "none"), ("none", "layer-norm"), ("dyt", "rms-norm")])
def test_separate_final_normalization_matches_float64_reference(norm, final):
    """The blocks' normalization and the final layer's chosen apart: the forward pass is the reference
    with each in its place."""
    torch.manual_seed(0)
    model = randomized(DiT(**TINY, normalization=norm, final_normalization=final)).double().eval()
    x, t, y = torch.randn(3, 3, 4, 4, dtype=torch.float64), torch.tensor([0, 17, 999]), torch.tensor([0, 4, 2])
    ref = reference_dit(model.state_dict(), dict(TINY, depth=2), x, t, y, norm, final)
    np.testing.assert_allclose(model(x, t, y).detach().numpy(), ref, rtol=1e-9, atol=1e-9)


def test_final_normalization_round_trips_and_keeps_the_official_layout():
    """Plain LayerNorm (final_normalization None or "layer-norm") writes exactly the official keys and
    config; a different final norm adds one key, its state dict loads only into the same choice, and
    the config records it for build_model_from_config."""
    plain = DiT(**TINY)
    same = DiT(**TINY, final_normalization="layer-norm")
    assert list(same.state_dict()) == list(plain.state_dict()) and same.config == plain.config
    assert "final_normalization" not in plain.config and "dropout" not in plain.config
    mixed = randomized(DiT(**TINY, final_normalization="none"))
    sd = mixed.state_dict()
    assert set(sd) - set(plain.state_dict()) == {"final_normalization"} and bytes(sd["final_normalization"].tolist()) == b"none"
    with pytest.raises(ValueError, match="final_normalization='none'.*built with final_normalization='layer-norm'"):
        DiT(**TINY).load_state_dict(sd)
    with pytest.raises(ValueError, match="final_normalization='layer-norm'.*built with final_normalization='none'"):
        DiT(**TINY, final_normalization="none").load_state_dict(plain.state_dict())
    rebuilt = build_model_from_config(dict(mixed.config, model="DiT-S/2"))
    rebuilt.load_state_dict(sd)
    x, t, y = torch.randn(2, 3, 4, 4), torch.tensor([3, 900]), torch.tensor([1, 2])
    assert torch.equal(rebuilt.eval()(x, t, y), mixed.eval()(x, t, y))


def test_restoring_layernorm_starts_exactly_as_layernorm_and_can_learn():
    """layer-norm-restore with its two vectors at zero computes bitwise what LayerNorm computes with the
    same weights (and building it draws no extra random numbers); the vectors get gradients."""
    torch.manual_seed(0)
    ln = DiT(**TINY)
    torch.manual_seed(0)
    restore = DiT(**TINY, normalization="layer-norm-restore")
    extra = {k for k in restore.state_dict() if k.endswith(("scale_weight", "mean_weight"))}
    assert len(extra) == 2 * (2 * 2 + 1)
    for k, v in ln.state_dict().items():
        assert torch.equal(restore.state_dict()[k], v), k  # same init draws
    randomized(ln)
    restore.load_state_dict({**ln.state_dict(), **{k: restore.state_dict()[k] for k in extra},
                             "normalization": restore.state_dict()["normalization"]})
    x, t, y = torch.randn(2, 3, 4, 4), torch.tensor([3, 900]), torch.tensor([1, 2])
    out = restore.eval()(x, t, y)
    assert torch.equal(out, ln.eval()(x, t, y))
    out.square().sum().backward()
    assert all(restore.get_parameter(k).grad.abs().sum() > 0 for k in extra)


def test_dropout_off_changes_nothing_and_on_acts_only_while_training():
    """dropout=0 (the default): the same keys, config, outputs and random stream as a model built without
    it, in training mode too. dropout=0.1: training outputs change from draw to draw, eval ones do not,
    and eval equals the model without dropout."""
    torch.manual_seed(0)
    base = randomized(DiT(**TINY, class_dropout_prob=0.0)).train()
    off = DiT(**TINY, class_dropout_prob=0.0, dropout=0.0).train()
    on = DiT(**TINY, class_dropout_prob=0.0, dropout=0.1).train()
    off.load_state_dict(base.state_dict())
    on.load_state_dict(base.state_dict())
    assert list(on.state_dict()) == list(base.state_dict()) and off.config == base.config and on.config["dropout"] == 0.1
    x, t, y = torch.randn(4, 3, 4, 4), torch.tensor([3, 900, 10, 500]), torch.tensor([1, 2, 3, 4])
    torch.manual_seed(1)
    a = base(x, t, y)
    state = torch.get_rng_state()
    torch.manual_seed(1)
    b = off(x, t, y)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(on(x, t, y), on(x, t, y))
    on.eval()
    base.eval()
    assert torch.equal(on(x, t, y), base(x, t, y))
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\)"):
        DiT(**TINY, dropout=1.0)


def test_layernorm_and_none_differ():
    """The two variants really compute different functions with the same weights."""
    torch.manual_seed(0)
    a = randomized(DiT(**TINY)).eval()
    b = DiT(**TINY, normalization="none").eval()
    b.load_state_dict({**a.state_dict(), "normalization": torch.tensor(list(b"none"), dtype=torch.uint8)})
    x, t, y = torch.randn(2, 3, 4, 4), torch.tensor([5, 6]), torch.tensor([1, 2])
    assert not torch.allclose(a(x, t, y), b(x, t, y))


def test_pos_embed_closed_form():
    D, g = 8, 3
    pe = get_2d_sincos_pos_embed(D, g)
    for i in range(g):
        for j in range(g):
            omega = 1.0 / 10000 ** (np.arange(2) / 2)
            col = np.concatenate([np.sin(j * omega), np.cos(j * omega)])
            row = np.concatenate([np.sin(i * omega), np.cos(i * omega)])
            np.testing.assert_allclose(pe[i * g + j], np.concatenate([col, row]), atol=1e-12)
    model = DiT(**dict(TINY, hidden_size=8, num_heads=2, input_size=6))
    np.testing.assert_allclose(model.pos_embed[0].numpy(), pe, atol=1e-6)
    assert not model.pos_embed.requires_grad


def _official_layout(depth, D, C, p, num_classes, learn_sigma=True, input_size=32):
    """The official checkpoint's keys and shapes, written out from the published architecture."""
    co = 2 * C if learn_sigma else C
    shapes = {
        "pos_embed": (1, (input_size // p) ** 2, D),
        "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (num_classes + 1, D),
        "final_layer.linear.weight": (p * p * co, D), "final_layer.linear.bias": (p * p * co,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
        })
    return shapes


def test_xl2_state_dict_matches_official_layout():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"]()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _official_layout(28, 1152, 4, 2, 1000)


def test_official_layout_loads_strict_and_roundtrips(tmp_path):
    """A file with exactly the official keys (as the pretrained .pt files) loads with strict=True."""
    layout = _official_layout(2, 16, 3, 2, 5, input_size=4)
    gen = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(s, generator=gen) for k, s in layout.items()}
    torch.save(sd, tmp_path / "official.pt")
    model = DiT(**TINY)
    model.load_state_dict(torch.load(tmp_path / "official.pt", weights_only=True), strict=True)
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)


@pytest.mark.parametrize("name,depth,hidden,heads,patch,mparams", [
    ("DiT-S/2", 12, 384, 6, 2, 33), ("DiT-B/2", 12, 768, 12, 2, 130),
    ("DiT-L/2", 24, 1024, 16, 2, 458), ("DiT-XL/2", 28, 1152, 16, 2, 675),
])
def test_published_sizes(name, depth, hidden, heads, patch, mparams):
    with torch.device("meta"):
        model = DiT_models[name]()
    assert (len(model.blocks), model.pos_embed.shape[-1], model.num_heads, model.patch_size) == (depth, hidden, heads, patch)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - mparams) < 1


def test_registry_has_all_configs_and_overrides():
    expected = {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)} | {"DiT-XS/1"}
    assert set(DiT_models) == expected
    xs = DiT_models["DiT-XS/1"](input_size=2, in_channels=2, num_classes=1, class_dropout_prob=0.0,
                                learn_sigma=False, normalization="none")
    assert (len(xs.blocks), xs.pos_embed.shape[-1], xs.num_heads, xs.patch_size) == (6, 256, 4, 1)
    assert xs.out_channels == 2 and xs.y_embedder.embedding_table.num_embeddings == 1
    assert xs.config["normalization"] == "none"
    with pytest.raises(ValueError, match="DiT-XL/2"):
        build_model("DiT-XXL/2")


@pytest.mark.parametrize("norm", sorted(set(NORM_LAYERS) - NO_ZERO_INIT))
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_new_model_is_exactly_zero(norm, learn_sigma):
    torch.manual_seed(0)
    model = DiT(**TINY, normalization=norm, learn_sigma=learn_sigma)
    out = model(torch.randn(4, 3, 4, 4) * 10, torch.randint(0, 1000, (4,)), torch.randint(0, 5, (4,)))
    assert out.shape == (4, 6 if learn_sigma else 3, 4, 4)
    assert torch.count_nonzero(out) == 0


def test_zero_init_but_trainable():
    """adaLN-Zero: the zero init still lets gradients reach the zeroed layers."""
    torch.manual_seed(0)
    model = DiT(**TINY)
    out = model(torch.randn(2, 3, 4, 4), torch.tensor([3, 4]), torch.tensor([0, 1]))
    (out - 1).pow(2).mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("channels", [None, 3, 1])
def test_forward_with_cfg_algebra(channels):
    torch.manual_seed(0)
    model = randomized(DiT(**TINY, class_dropout_prob=0.1)).eval()
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([10, 10])
    y = torch.tensor([1, 3])
    null = torch.tensor([5, 5])
    scale = 4.0
    xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])
    # The second half of the input is ignored: forward_with_cfg duplicates the first half.
    guided = model.forward_with_cfg(torch.cat([x, torch.randn_like(x)]), tt, yy, scale, guidance_channels=channels)
    cond, uncond = model(x, t, y), model(x, t, null)
    k = 3 if channels is None else channels
    expect_eps = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
    torch.testing.assert_close(guided[:2, :k], expect_eps)
    torch.testing.assert_close(guided[2:, :k], expect_eps)
    torch.testing.assert_close(guided[:2, k:], cond[:, k:])
    torch.testing.assert_close(guided[2:, k:], uncond[:, k:])
    # scale 1 is plain conditional sampling
    torch.testing.assert_close(model.forward_with_cfg(xx, tt, yy, 1.0)[:2], cond)


def test_label_dropout_uses_null_row():
    model = DiT(**TINY, class_dropout_prob=1.0)
    dropped = model.y_embedder(torch.tensor([0, 1, 2]), train=True)
    null_row = model.y_embedder.embedding_table.weight[5]
    assert torch.equal(dropped, null_row.expand(3, -1))
    kept = model.y_embedder(torch.tensor([0, 1]), train=False)
    assert torch.equal(kept, model.y_embedder.embedding_table.weight[:2])


def test_capture_returns_live_embeddings_at_every_depth():
    torch.manual_seed(0)
    model = randomized(DiT(**TINY)).eval()
    x, t, y = torch.randn(2, 3, 4, 4), torch.tensor([1, 500]), torch.tensor([0, 4])
    seen = {}
    out = model(x, t, y, capture=lambda name, tok: seen.__setitem__(name, tok.clone()))
    assert list(seen) == model.embedding_names() == ["embed", "block.0", "block.1", "final"]
    # Each captured tensor equals an independent recomputation of that stage.
    torch.testing.assert_close(seen["embed"], model.x_embedder(x) + model.pos_embed)
    c = model.t_embedder(t) + model.y_embedder(y, False)
    torch.testing.assert_close(seen["block.0"], model.blocks[0](seen["embed"], c))
    torch.testing.assert_close(seen["block.1"], model.blocks[1](seen["block.0"], c))
    torch.testing.assert_close(model.unpatchify(seen["final"]), out)
    assert torch.equal(model(x, t, y), out)


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = randomized(DiT(**TINY, class_dropout_prob=0.0))  # no random label dropout between runs
    x, t, y = torch.randn(2, 3, 4, 4), torch.tensor([1, 2]), torch.tensor([0, 1])
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.grad_checkpointing = ckpt
        model(x, t, y).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_normalization_recorded_and_mismatch_refused():
    ln, none = DiT(**TINY), DiT(**TINY, normalization="none")
    assert "normalization" not in ln.state_dict()
    assert bytes(none.state_dict()["normalization"].tolist()) == b"none"
    DiT(**TINY, normalization="none").load_state_dict(none.state_dict())  # same variant loads
    with pytest.raises(ValueError, match="normalization='none'.*built with normalization='layer-norm'"):
        ln.load_state_dict(none.state_dict())
    with pytest.raises(ValueError, match="normalization='layer-norm'.*built with normalization='none'"):
        none.load_state_dict(ln.state_dict(), strict=False)


def test_dyt_follows_the_dyt_recipe_without_zero_init():
    """DyT: alpha starts at 0.5 in every norm, and, as in the DyT authors' DiT recipe, none of the four
    adaLN-Zero initialisations is applied: the blocks' and the final layer's adaLN modulation and the final
    linear keep Xavier-uniform weights (|w| <= sqrt(6 / (fan_in + fan_out)), std = that bound / sqrt(3))
    with zero biases, so a new DyT model does not output zero (a LayerNorm one does)."""
    torch.manual_seed(0)
    model = DiT(**TINY, normalization="dyt")
    alphas = [p for n, p in model.named_parameters() if n.endswith(".alpha")]
    assert len(alphas) == 2 * 2 + 1 and all(float(a.detach()) == 0.5 for a in alphas)
    for linear in (model.blocks[0].adaLN_modulation[-1], model.final_layer.adaLN_modulation[-1],
                   model.final_layer.linear):
        fan_out, fan_in = linear.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = linear.weight.detach()
        assert w.abs().max() <= bound and abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.2
        assert torch.equal(linear.bias.detach(), torch.zeros_like(linear.bias))
    x, t, y = torch.randn(2, 3, 4, 4), torch.tensor([10, 500]), torch.tensor([1, 2])
    assert model(x, t, y).abs().min() > 0
    assert DiT(**TINY)(x, t, y).abs().max() == 0
    assert DiT(**TINY).final_layer.linear.weight.abs().sum() == 0
    sd = model.state_dict()
    assert bytes(sd["normalization"].tolist()) == b"dyt" and "blocks.0.norm1.alpha" in sd


def test_derf_layer_is_erf_of_a_scaled_shifted_input():
    """Derf against scipy's erf in float64: at init (alpha 0.5, shift 0) and after both scalars change,
    with gradients reaching both."""
    layer = DynamicErf(8).double()
    x = torch.randn(4, 5, 8, dtype=torch.float64) * 3
    assert (layer.alpha.item(), layer.shift.item()) == (0.5, 0.0)
    np.testing.assert_allclose(layer(x).detach().numpy(), scipy.special.erf(0.5 * x.numpy()), rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        layer.alpha.fill_(1.7)
        layer.shift.fill_(-0.3)
    out = layer(x)
    np.testing.assert_allclose(out.detach().numpy(), scipy.special.erf(1.7 * x.numpy() - 0.3), rtol=1e-12, atol=1e-14)
    out.sum().backward()
    assert layer.alpha.grad.abs() > 0 and layer.shift.grad.abs() > 0


def test_derf_follows_the_point_wise_recipe():
    """A new Derf DiT has alpha 0.5 and shift 0 in every norm (scalars), no adaLN-Zero (it outputs non-zero),
    records its variant, and a checkpoint of another variant is refused (and the other way round)."""
    torch.manual_seed(0)
    model = DiT(**TINY, normalization="derf")
    alphas = [p for n, p in model.named_parameters() if n.endswith(".alpha")]
    shifts = [p for n, p in model.named_parameters() if n.endswith(".shift")]
    assert len(alphas) == len(shifts) == 2 * 2 + 1
    assert all(a.shape == (1,) and a.item() == 0.5 for a in alphas) and all(s.item() == 0.0 for s in shifts)
    x, t, y = torch.randn(2, 3, 4, 4), torch.tensor([10, 500]), torch.tensor([1, 2])
    assert model(x, t, y).abs().min() > 0
    sd = model.state_dict()
    assert bytes(sd["normalization"].tolist()) == b"derf"
    with pytest.raises(ValueError, match="normalization='derf'.*built with normalization='dyt'"):
        DiT(**TINY, normalization="dyt").load_state_dict(sd)
    with pytest.raises(ValueError, match="normalization='layer-norm'.*built with normalization='derf'"):
        DiT(**TINY, normalization="derf").load_state_dict(DiT(**TINY).state_dict(), strict=False)


def test_unknown_normalization_lists_choices():
    with pytest.raises(ValueError, match="derf.*dyt.*layer-norm.*none.*rms-norm"):
        DiT(**TINY, normalization="batch-norm")


def test_bad_inputs_raise_clear_errors():
    model = DiT(**TINY)
    t, y = torch.tensor([1, 2]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"\(N, 3, 4, 4\).*got \(2, 3, 6, 6\)"):
        model(torch.randn(2, 3, 6, 6), t, y)
    with pytest.raises(ValueError, match=r"\(N, 3, 4, 4\).*got \(2, 4, 4, 4\)"):
        model(torch.randn(2, 4, 4, 4), t, y)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 4\].*got values from 0 to 7"):
        model(torch.randn(2, 3, 4, 4), t, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        model(torch.randn(2, 3, 4, 4), torch.tensor([1]), y)
    with pytest.raises(ValueError, match="not divisible by patch size 2"):
        DiT(**dict(TINY, input_size=5))
    with pytest.raises(ValueError, match="even batch"):
        model.forward_with_cfg(torch.randn(3, 3, 4, 4), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]), 4.0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiles_without_graph_breaks(checkpointing):
    """torch.compile sees the whole training forward as one graph (no host syncs or Python fallbacks in
    the hot path), with the label check left on and with gradient checkpointing."""
    torch._dynamo.reset()
    model = build_model("DiT-S/8", input_size=16, depth=2).train()
    model.grad_checkpointing = checkpointing
    x, t, y = torch.randn(2, 4, 16, 16), torch.randint(0, 1000, (2,)), torch.randint(0, 1000, (2,))
    explained = torch._dynamo.explain(model)(x, t, y)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
