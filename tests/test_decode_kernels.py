"""Each Triton kernel equals its PyTorch twin (TRITON_INTERPRET=1 on the CPU, set in conftest.py).

The cache contents are written by the real `ARKVCache` (same arena, same views, same strides), so
the kernel reads exactly the bytes the decode step would hand it."""
import pytest
import torch

import decode_kernels as kernels
from arkv import ARKVCache, ARKVConfig
from decode_kernels import mixed_precision_attention
from kv_arena import FORMATS, TILE, SlotGeometry, bytes_per_token

pytestmark = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")


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


def compare(cache: ARKVCache, n_head: int, dtype, atol: float, split: int = 64, block: int = 16, quantized=True):
    q = torch.randn(cache.arena.shape[0], n_head, 1, cache.head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    payload, meta = cache.tile_views(empty=not quantized)
    args = (q, cache.original_view(), cache.o_pos, payload, meta, cache.q_pos[..., :payload.shape[2] * TILE], cache.config.kv_quant)
    y_twin, probs_twin = mixed_precision_attention(*args)
    y, probs = kernels.tristate_attention(*args, cache.o_capacity, cache.q_first, split=split, block=block)
    assert y.dtype == y_twin.dtype and probs.shape == probs_twin.shape
    torch.testing.assert_close(y.float(), y_twin.float(), atol=atol, rtol=0)
    torch.testing.assert_close(probs, probs_twin, atol=atol, rtol=0)


@pytest.mark.parametrize("kv_quant", ["fp8", "int8", "int4"])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [64, 128, "odd"])
def test_tristate_attention_matches_twin_fp32(kv_quant, group, head_dim):
    head_dim = (96 if kv_quant == "int4" else 80) if head_dim == "odd" else head_dim  # int4 needs 32-channel groups
    cache = filled_cache(kv_quant, torch.float32, batch=2, n_kv_heads=2, head_dim=head_dim, kv_budget=45, window=8,
                         rho=0.5, live_original=0.8, live_quantized=0.7, seed=group)
    compare(cache, n_head=2 * group, dtype=torch.float32, atol=1e-5)


@pytest.mark.parametrize("kv_quant", ["fp8", "int8", "int4"])
def test_tristate_attention_matches_twin_bf16(kv_quant):
    cache = filled_cache(kv_quant, torch.bfloat16, batch=1, n_kv_heads=2, head_dim=64, kv_budget=37, window=4,
                         rho=0.3, live_original=0.9, live_quantized=0.9)
    compare(cache, n_head=6, dtype=torch.bfloat16, atol=1e-2)


def test_tristate_attention_empty_quantized_region():
    """evict-style caches: no Quantized view at all."""
    cache = filled_cache("int4", torch.float32, batch=1, n_kv_heads=2, head_dim=64, kv_budget=50, window=8, rho=1.0,
                         live_original=0.6, live_quantized=0.0, method="evict")
    compare(cache, n_head=8, dtype=torch.float32, atol=1e-5, quantized=False)


@pytest.mark.parametrize("kv_quant", ["int8", "int4"])
def test_tristate_attention_all_evicted_but_window(kv_quant):
    """Only the window is live: every split but the first holds no live slot (softmax state -inf)."""
    cache = filled_cache(kv_quant, torch.float32, batch=1, n_kv_heads=1, head_dim=64, kv_budget=70, window=5, rho=0.2,
                         live_original=0.0, live_quantized=0.0)
    compare(cache, n_head=3, dtype=torch.float32, atol=1e-5, split=32)


def test_triton_decode_path_equals_torch_path():
    """A whole generation through ARKVCache with attention="triton" (the kernel, and the demotion
    search and score update over the whole Quantized view, masked, as on CUDA) gives the tokens and
    token states of the PyTorch path (which reads only the usable slots)."""
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
