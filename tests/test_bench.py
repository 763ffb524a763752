"""Tests for benchmarks/bench.py: the analytic FLOP count against torch's FlopCounterMode and the
paper's Gflops, the peer wrapper, settings, the interleaving, the record file and a tiny end-to-end
run. No timing is asserted: speed claims live in docs/benchmarks.md."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import bench, records, timing
from models import build_model

TINY = ["--model", "DiT-S/8", "--input-size", "16", "--depth", "2", "--batch-size", "2", "--rounds", "2",
        "--warmup", "1", "--sample-steps", "2", "--sample-rounds", "1", "--toy-steps", "2", "--threads", "1",
        "--no-memory", "--device", "cpu"]


def counted_flops(model, x, t, y, backward=False):
    """FlopCounterMode's count. Attention runs on the math backend, whose two batched matmuls the counter
    sees (it has no formula for the CPU flash kernel)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(x, t, y)
        if backward:
            out.square().mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name,kwargs", [
    ("DiT-S/8", dict(input_size=16, depth=2)),
    ("DiT-S/2", dict(input_size=8, depth=1, learn_sigma=False)),
    ("DiT-XS/1", dict(input_size=2, in_channels=2, depth=2, hidden_size=64, num_heads=4, mlp_ratio=2.0)),
    ("DiT-B/4", dict(input_size=8, depth=1, hidden_size=96, num_heads=3)),
])
def test_forward_flops_equal_flop_counter(name, kwargs):
    model = build_model(name, **kwargs).eval()
    n, s, c = 3, model.input_size, model.in_channels
    x, t, y = torch.randn(n, c, s, s), torch.randint(0, 1000, (n,)), torch.randint(0, 1000, (n,))
    with torch.no_grad():
        got = counted_flops(model, x, t, y)
    assert timing.forward_flops(model.config) * n == got


def test_training_flops_are_three_forwards():
    """Backward costs two matmuls per forward matmul, except for the weight-only gradients of the first
    layers (their inputs need no gradient), so fwd + bwd sits just under 3x the forward count."""
    model = build_model("DiT-S/4", input_size=16, depth=2)
    for p in model.parameters():  # adaLN-Zero starts with zero weights; any values give the same counts
        torch.nn.init.normal_(p, std=0.02)
    x, t, y = torch.randn(2, 4, 16, 16), torch.randint(0, 1000, (2,)), torch.randint(0, 1000, (2,))
    got = counted_flops(model, x, t, y, backward=True)
    expected = timing.train_flops(model.config) * 2
    assert 0.97 * expected < got <= expected


@pytest.mark.parametrize("size,gflops", [("S", 6.1), ("B", 23.0), ("L", 80.7), ("XL", 118.6)])
def test_published_gflops(size, gflops):
    """The DiT paper's Gflops (multiply-adds, 256px, patch 2) are half of our FLOPs."""
    args = bench.parse_args(["--model", f"DiT-{size}/2", "--device", "cpu"])
    assert timing.forward_flops(bench.model_config(args)) / 2e9 == pytest.approx(gflops, rel=0.01)


def test_model_config_is_what_gets_built():
    args = bench.parse_args(["--model", "DiT-B/4", "--input-size", "16", "--hidden-size", "96", "--num-heads", "3",
                             "--device", "cpu"])
    assert bench.model_config(args) == bench.build_impl("ours", args).config


def test_peer_runs_the_same_architecture():
    args = bench.parse_args(TINY)
    ours, peer = bench.build_impl("ours", args), bench.build_impl("peer", args)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3, 900]), torch.tensor([1, 1000])
    assert peer(x, t, y).shape == ours(x, t, y).shape == (2, 8, 16, 16)
    assert len(peer.net.transformer_blocks) == len(ours.blocks) == 2
    assert peer.net.transformer_blocks[0].attn1.heads == ours.num_heads
    # Same transformer weights; the peer adds a timestep/label embedder in every block.
    blocks = sum(p.numel() for p in ours.blocks.parameters())
    peer_blocks = sum(p.numel() for b in peer.net.transformer_blocks for n, p in b.named_parameters()
                      if not n.startswith("norm1.emb"))
    assert peer_blocks == blocks
    guided = peer.forward_with_cfg(torch.cat([x[:1], x[:1]]), t, torch.tensor([1, 1000]), 4.0)
    assert torch.equal(guided[0, :4], guided[1, :4])  # guided noise; the variance channels stay per-half


def test_settings_parse_and_reject_typos():
    assert bench.parse_setting("bf16+compile+ckpt") == ("bf16", "default", True)
    assert bench.parse_setting("fp32+cudagraphs") == ("fp32", "reduce-overhead", False)
    assert bench.parse_setting("fp32") == ("fp32", None, False)
    for bad in ("fp16", "bf16+fast", ""):
        with pytest.raises(SystemExit, match="precision"):
            bench.parse_setting(bad)
    args = bench.parse_args(["--device", "cpu", "--settings", "fp32", "bf16+ckpt", "--compile", "--grad-checkpointing"])
    assert args.settings == ["fp32+compile+ckpt", "bf16+ckpt+compile"]
    args = bench.parse_args(["--device", "cpu", "--toy-compile", "reduce-overhead"])
    assert (args.toy_compile, bench.toy_setting(args)) == ("reduce-overhead", "fp32+cudagraphs")
    assert bench.toy_setting(bench.parse_args(["--device", "cpu", "--toy-compile"])) == "fp32+compile"
    with pytest.raises(SystemExit, match="multiple of 8"):
        bench.parse_args(["--device", "cpu", "--image-size", "100"])


def test_interleaved_alternates_and_summarize():
    order = []
    times = timing.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 4, torch.device("cpu"))
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(times["a"]) == len(times["b"]) == 4
    s = timing.summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["median"] == 3.0 and s["n"] == 5
    # Quartiles at ranks (n + 1) / 4 = 1.5 and 3 (n + 1) / 4 = 4.5: 1.5 and 4 + 0.5 * 96 = 52.
    assert s["iqr"] == pytest.approx(52.0 - 1.5)


def test_record_puts_newest_first(tmp_path):
    path = str(tmp_path / "b.md")
    records.record(path, "## first\n")
    records.record(path, "## second\n")
    text = open(path).read()
    assert text.startswith("# Benchmarks")
    assert text.index(records.MARKER) < text.index("## second") < text.index("## first")
    # A blank line separates the sections, even when a section ends with a single newline.
    assert "## second\n\n## first\n" in text


def test_end_to_end_tiny(tmp_path):
    out = tmp_path / "bench.md"
    rows = bench.main([*TINY, "--record", str(out), "--json", str(tmp_path / "rows.json")])
    train = rows["training"]
    assert [r["impl"] for r in train] == ["ours", "peer"]
    assert train[0]["ratio"] > 0 and "ratio" not in train[1]
    for r in train:
        assert r["step_ms"] > 0 and r["n"] == 2
        assert r["images_per_s"] == pytest.approx(2 / (r["step_ms"] / 1e3))
        flops = timing.train_flops(bench.model_config(bench.parse_args(TINY)))
        assert r["tflops"] == pytest.approx(r["images_per_s"] * flops / 1e12)
    assert [(r["impl"], r["guidance"]) for r in rows["sampling"]] == [
        ("ours", "none"), ("peer", "none"), ("ours", "cfg 4.0"), ("peer", "cfg 4.0")]
    assert {r["normalization"] for r in rows["toy"]} == {"layer-norm", "none"}
    text = out.read_text()
    assert "| ours | fp32 |" in text and "| peer | fp32 |" in text and "Toy study" in text
    assert json.loads((tmp_path / "rows.json").read_text())["header"]["gflops"] > 0
    fwd = timing.forward_flops(bench.model_config(bench.parse_args(TINY)))
    for r in rows["sampling"]:  # model FLOPs per image: steps x forward, doubled by guidance's doubled batch
        per_image = 2 * fwd * (2 if r["guidance"] != "none" else 1)
        assert r["tflops"] == pytest.approx(r["images_per_s"] * per_image / 1e12)


def test_our_model_only_guided_sampling_one_toy_variant(tmp_path):
    """The gpu-check's narrow runs: no peer, guided sampling only, one toy variant per process; the JSON
    holds the rows and the measured matmul peak."""
    rows = bench.main([*TINY, "--record", "", "--no-peer", "--sample-guidance", "cfg", "--toy-variants", "none",
                       "--json", str(tmp_path / "rows.json")])
    assert [r["impl"] for r in rows["training"]] == ["ours"] and "ratio" not in rows["training"][0]
    assert [(r["impl"], r["guidance"]) for r in rows["sampling"]] == [("ours", "cfg 4.0")]
    assert [r["normalization"] for r in rows["toy"]] == ["none"]
    saved = json.loads((tmp_path / "rows.json").read_text())
    assert saved["toy"] == rows["toy"] and saved["header"]["peak_tflops"]["fp32"] > 0


def test_cpu_memory_probe_reports_growth():
    args = bench.parse_args(TINY + ["--batch-size", "64"])
    mib = bench.peak_memory_probe(args, "ours", "fp32")
    assert mib is not None and mib > 1  # 64 x 4 x 16 x 16 activations and AdamW state: several MiB


@pytest.mark.gpu
def test_cuda_tables_benchmark_runs():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    rows = bench.main(TINY[:-2] + ["--device", "cuda", "--record", "", "--settings", "bf16"])
    assert rows["training"][0]["peak_mib"] > 0


@pytest.mark.gpu
def test_cuda_training_step_makes_no_host_syncs():
    """After the first step (which copies the schedule tables to the GPU), a training step never waits
    for the GPU: loss and grad norm stay on the device until the loop logs them."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    args = bench.parse_args(TINY[:-2] + ["--device", "cuda"])
    device = torch.device("cuda")
    trainer = bench.make_trainer(bench.build_impl("ours", args), "bf16", False, False, device)
    x, y = bench.random_batch(args, device)
    trainer.train_step(x, y)
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_paired_ratio_cancels_machine_drift():
    """Round 2 ran on a machine twice as slow for both models: the per-round ratios are all 0.8."""
    times = {"ours": [0.8, 1.6, 0.8], "peer": [1.0, 2.0, 1.0]}
    assert timing.paired_ratio(times) == {"ratio": pytest.approx(0.8), "ratio_iqr": pytest.approx(0.0)}


def test_peak_is_the_faster_of_the_setting_and_fp32(monkeypatch):
    rates = {"fp32": 5.0, "tf32": 9.0, "bf16": 1.0}  # a CPU without bf16 units; a GPU's TF32 cores
    monkeypatch.setattr(timing, "matmul_tflops", lambda precision, device: rates[precision])
    cpu = torch.device("cpu")
    assert [timing.peak_tflops(p, cpu) for p in ("fp32", "tf32", "bf16")] == [5.0, 9.0, 5.0]


def test_precision_mode_sets_and_restores():
    cpu, a = torch.device("cpu"), torch.randn(4, 4)
    before = torch.backends.cuda.matmul.allow_tf32
    with timing.precision_mode("bf16", cpu):
        assert (a @ a).dtype == torch.bfloat16
    with timing.precision_mode("tf32", cpu):
        assert torch.backends.cuda.matmul.allow_tf32 and (a @ a).dtype == torch.float32
    assert torch.backends.cuda.matmul.allow_tf32 == before and (a @ a).dtype == torch.float32
