"""decode_kernels.py: the tri-state attention twins (compiled-PyTorch `mixed_precision_attention` and
the Triton `tristate_attention`, TRITON_INTERPRET=1 on the CPU, set in conftest.py) against a plain
float64 reference and against each other, and the module's name against the ecosystem's.

The cache contents are written by the real `ARKVCache` (same arena, same views, same strides), so
the kernels read exactly the bytes the decode step would hand them."""
import importlib.metadata
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import decode_kernels
from arkv import ARKVCache, ARKVConfig
from decode_kernels import mixed_precision_attention
from kv_arena import FORMATS, TILE, SlotGeometry, bytes_per_token

needs_triton = pytest.mark.skipif(not decode_kernels.available(), reason="triton is not installed")


def filled_cache(kv_quant, dtype, batch, n_kv_heads, head_dim, kv_budget, window, rho, live_original, live_quantized,
                 method="arkv", seed=0) -> ARKVCache:
    """A cache with an Original region [0, C_o) and a Quantized region [q_first, M), written with
    random K/V; `live_*` is the share of each region's slots that hold a token."""
    generator = torch.Generator().manual_seed(seed)
    config = ARKVConfig(kv_budget=kv_budget, window=window, kv_quant=kv_quant, method=method)
    fmt = FORMATS[kv_quant]
    slots = SlotGeometry(kv_budget, window, bytes_per_token(fmt, head_dim, dtype), bytes_per_token(fmt, head_dim, None))
    cache = ARKVCache(config, slots, batch, n_kv_heads, head_dim, dtype)
    c_o, c_q = slots.capacities(rho)
    q_first = slots.quantized_slots - c_q
    kv = 2 * torch.randn(batch, n_kv_heads, c_o + c_q, 2, head_dim, generator=generator)
    cache.original_bytes()[:, :, :c_o] = cache.original_slot_bytes(kv[:, :, :c_o])
    cache.o_pos[..., :c_o] = torch.where(torch.rand(batch, n_kv_heads, c_o, generator=generator) < live_original,
                                         torch.arange(c_o), -1)
    cache.o_pos[..., :window] = torch.arange(window)  # the window is always Original
    if c_q:
        targets = torch.arange(q_first, q_first + c_q).expand(batch, n_kv_heads, c_q)
        cache.write_quantized(targets, cache.quantized_slot_bytes(kv[:, :, c_o:]))
        live = torch.rand(batch, n_kv_heads, c_q, generator=generator) < live_quantized
        cache.q_pos[..., q_first:] = torch.where(live, torch.arange(c_o, c_o + c_q), -1)
    cache.o_capacity.fill_(c_o)
    cache.q_first.fill_(q_first)
    return cache


def float64_attention(q: torch.Tensor, cache: ARKVCache) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k / sqrt(D)) v in float64 over every live slot of the cache (Quantized ones as their
    stored codes times scale (+ zero) read back by the format), GQA by viewing q as [B, Hkv, G, D]:
    output [B, H, 1, D] and probabilities [B, Hkv, G, N + M] in slot order."""
    kv, pos = cache.held_tokens()  # [B, Hkv, N + M, 2, D], [B, Hkv, N + M]
    kv = kv.double()
    B, H, _, D = q.shape
    qg = q.double().view(B, kv.shape[1], H // kv.shape[1], D)  # [B, Hkv, G, D]
    scores = torch.einsum("bhgd,bhtd->bhgt", qg, kv[..., 0, :]) / math.sqrt(D)
    probs = scores.masked_fill((pos < 0)[:, :, None], -math.inf).softmax(-1)  # [B, Hkv, G, N + M]
    return torch.einsum("bhgt,bhtd->bhgd", probs, kv[..., 1, :]).reshape(B, H, 1, D), probs


@pytest.mark.parametrize("kv_quant", ["fp8", "int8", "int4"])
@pytest.mark.parametrize("attention", ["torch", pytest.param("triton", marks=needs_triton)])
def test_attention_equals_float64_reference(kv_quant, attention):
    """Both twins, on Original and Quantized slots alike (a Quantized key read as another slot's, or a
    wrong scale, zero or mask, moves the output by far more than the tolerance)."""
    cache = filled_cache(kv_quant, torch.float32, batch=2, n_kv_heads=2, head_dim=64, kv_budget=45, window=8, rho=0.4,
                         live_original=0.8, live_quantized=0.7, seed=5)
    q = torch.randn(2, 6, 1, 64, generator=torch.Generator().manual_seed(2))
    payload, meta = cache.tile_views()
    args = (q, cache.original_view(), cache.o_pos, payload, meta, cache.q_pos, kv_quant)
    if attention == "torch":
        y, probs = mixed_precision_attention(*args)
    else:
        y, probs = decode_kernels.tristate_attention(*args, cache.o_capacity, cache.q_first, split=32, block=16)
    y_ref, probs_ref = float64_attention(q, cache)
    assert (probs_ref[..., cache.slots.arena_tokens:] > 0).any()  # the Quantized slots take part
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(probs.double(), probs_ref, atol=1e-6, rtol=0)


def test_no_module_shadows_huggingface_kernels():
    """transformers >= 5.25 imports Hugging Face's `kernels` package: from the project root (where a
    program using this project starts), transformers' Llama imports and `kernels` is theirs."""
    pytest.importorskip("transformers")
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed (transformers < 5.25)")
    code = "import kernels, transformers; from transformers import LlamaForCausalLM; print(kernels.__file__)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert Path(run.stdout.strip()).resolve().parent != ROOT


def compare(cache: ARKVCache, n_head: int, dtype, atol: float, split: int = 64, block: int = 16, quantized=True):
    q = torch.randn(cache.arena.shape[0], n_head, 1, cache.head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    payload, meta = cache.tile_views(empty=not quantized)
    args = (q, cache.original_view(), cache.o_pos, payload, meta, cache.q_pos[..., :payload.shape[2] * TILE], cache.config.kv_quant)
    y_twin, probs_twin = mixed_precision_attention(*args)
    y, probs = decode_kernels.tristate_attention(*args, cache.o_capacity, cache.q_first, split=split, block=block)
    assert y.dtype == y_twin.dtype and probs.shape == probs_twin.shape
    torch.testing.assert_close(y.float(), y_twin.float(), atol=atol, rtol=0)
    torch.testing.assert_close(probs, probs_twin, atol=atol, rtol=0)


@needs_triton
@pytest.mark.parametrize("kv_quant", ["fp8", "int8", "int4"])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [64, 128, "odd"])
def test_tristate_attention_matches_twin_fp32(kv_quant, group, head_dim):
    head_dim = (96 if kv_quant == "int4" else 80) if head_dim == "odd" else head_dim  # int4 needs 32-channel groups
    cache = filled_cache(kv_quant, torch.float32, batch=2, n_kv_heads=2, head_dim=head_dim, kv_budget=45, window=8,
                         rho=0.5, live_original=0.8, live_quantized=0.7, seed=group)
    compare(cache, n_head=2 * group, dtype=torch.float32, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("kv_quant", ["fp8", "int8", "int4"])
def test_tristate_attention_matches_twin_bf16(kv_quant):
    cache = filled_cache(kv_quant, torch.bfloat16, batch=1, n_kv_heads=2, head_dim=64, kv_budget=37, window=4,
                         rho=0.3, live_original=0.9, live_quantized=0.9)
    compare(cache, n_head=6, dtype=torch.bfloat16, atol=1e-2)


@needs_triton
def test_tristate_attention_empty_quantized_region():
    """evict-style caches: no Quantized view at all."""
    cache = filled_cache("int4", torch.float32, batch=1, n_kv_heads=2, head_dim=64, kv_budget=50, window=8, rho=1.0,
                         live_original=0.6, live_quantized=0.0, method="evict")
    compare(cache, n_head=8, dtype=torch.float32, atol=1e-5, quantized=False)


@needs_triton
@pytest.mark.parametrize("kv_quant", ["int8", "int4"])
def test_tristate_attention_all_evicted_but_window(kv_quant):
    """Only the window is live: every split but the first holds no live slot (softmax state -inf)."""
    cache = filled_cache(kv_quant, torch.float32, batch=1, n_kv_heads=1, head_dim=64, kv_budget=70, window=5, rho=0.2,
                         live_original=0.0, live_quantized=0.0)
    compare(cache, n_head=3, dtype=torch.float32, atol=1e-5, split=32)


@needs_triton
def test_triton_decode_path_equals_torch_path():
    """A whole generation through ARKVCache with attention="triton" (the kernel, and the demotion
    search and score update over the whole Quantized view, masked) gives the tokens and token states
    of the PyTorch path (which reads every slot, dead ones masked)."""
    from generate import generate
    from model import ModelArgs, Transformer
    from arkv import ARKV

    args = ModelArgs(dim=128, n_layer=2, n_head=4, n_kv_heads=2, head_dim=64, intermediate_size=192, vocab_size=256,
                     max_seq_len=256)
    torch.manual_seed(0)
    model = Transformer(args).eval()
    prompt = torch.randint(0, args.vocab_size, (1, 200), generator=torch.Generator().manual_seed(3))
    runs = []
    for attention in ("torch", "triton"):
        manager = ARKV(ARKVConfig(kv_budget=24, window=8, oq_policy="coverage", attention=attention), args, torch.float32)
        model.setup_caches(1, 200 + 13, manager.cache_factory)
        tokens, _ = generate(model, prompt, 13, after_prefill=manager.compress)
        report = manager.report(200 + 12)
        runs.append((tokens, report["original"], report["quantized"], report["evicted"]))
    assert runs[0] == runs[1] and runs[0][2] > 0 and runs[0][3] > 0
