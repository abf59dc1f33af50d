"""ARKV end to end, under real compression, on a tiny random model (2 layers, GQA 4:2, head_dim 64).

1. Oracle: at every step (prefill, then hundreds of decode steps that quantize and evict), ARKV's
   logits equal those of the same model whose attention is recomputed here, in float64, over a full
   cache (every position's K/V as this run computed them) masked to exactly the positions the ARKV
   cache of that layer holds for each (row, KV head), a Quantized position read as its dequantized
   bytes. Every method and every Quantized format.
2. A long run: thousands of decode steps, the cache's memory constant and every invariant of its
   stored state holding at every step.
"""
from __future__ import annotations

import gc
import math

import pytest
import torch

from arkv import ARKV, ARKVConfig
from conftest import random_model
from model import ModelArgs, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, HEAD_DIM = 128, 64
ATTENTION_STD = {"layers.0.attention.wqkv.weight": 0.1, "layers.1.attention.wqkv.weight": 0.3}


# ---------------------------------------------------------------------------------------------
# Adapter: the only place that reads ARKV's internals (per-row region bounds, the Quantized
# region's bytes, the cache's tensors). A refactor of arkv.py edits this section only.


def row_value(t: torch.Tensor, b: int) -> int:
    """A per-row bound tensor ([] or [B]) at row b."""
    t = t.reshape(-1)
    return int(t[b if t.numel() > 1 else 0])


def region_bounds(cache, b: int) -> tuple[int, int]:
    """(C_o, q_first) of batch row b: Original slots [0, C_o), Quantized slots [q_first, M)."""
    return row_value(cache.o_capacity, b), row_value(cache.q_first, b)


def quantized_region(cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The Quantized slots from the lowest row's q_first on (checked: none below is in use): their
    positions [B, Hkv, n] and the values their bytes stand for [B, Hkv, n, 2, D] (float64)."""
    first = int(cache.q_first.min())
    assert (cache.q_pos[..., :first] < 0).all(), "a Quantized token before q_first"
    payload, meta = cache.quantized_views()
    return cache.q_pos[..., first:], cache.fmt.dequantize(payload[:, :, first:], meta[:, :, first:]).double()


def cache_tensor_bytes(cache) -> int:
    """Bytes of every tensor the cache keeps: its buffers and any tensor attribute (or dict of them)."""
    tensors = {id(t): t for t in cache.buffers()}
    for value in vars(cache).values():
        for t in (value.values() if isinstance(value, dict) else [value]):
            if isinstance(t, torch.Tensor):
                tensors[id(t)] = t
    return sum(t.nbytes for t in tensors.values())


# ---------------------------------------------------------------------------------------------
# The model and the oracle's cache.


def tiny_model(max_seq_len: int) -> Transformer:
    """2 layers, 4 query heads on 2 KV heads, head_dim 64; weights std 0.2, the attention projections
    std 0.1 in layer 0 (diffuse) and 0.3 in layer 1 (peaked), so the paper's Original shares differ
    (about 0.5 and 1: layer 0 holds Original and Quantized tokens)."""
    args = ModelArgs(dim=64, n_layer=2, n_head=4, n_kv_heads=2, head_dim=HEAD_DIM, intermediate_size=96,
                     vocab_size=VOCAB, max_seq_len=max_seq_len)
    return random_model(args, ATTENTION_STD)


def quantization_error_bound(kv_quant: str, x: torch.Tensor) -> torch.Tensor:
    """Per element of x [..., D] (float64), the most a format's round trip may move it: int8 half a
    step of max|x| / 127; fp8 e4m3 2^-4 |x| plus half a subnormal step of max|x| / 448; int4 half a
    step of (max - min) / 15 per group of 32; plus float slack (float16 scale and zero, float32)."""
    amax = x.abs().amax(-1, keepdim=True)
    if kv_quant == "int8":
        return amax / 254 + 1e-4 * amax
    if kv_quant == "fp8":
        return 2.0**-4 * x.abs() + 2.0**-10 * amax / 448 + 1e-4 * amax
    groups = x.unflatten(-1, (-1, 32))
    span = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)).expand_as(groups).flatten(-2)
    return span / 30 + 2e-3 * amax


class MaskedFullCache(torch.nn.Module):
    """The oracle's cache for one layer: the K/V of every position as this model computed them,
    attended in float64 with GQA (query head h reads KV head h // G). A prompt attends causally; a
    decode query only the positions that the ARKV cache of the same layer holds for its (row, KV
    head) after that step, each Quantized one with its dequantized value (checked to be within the
    format's error of the true K/V)."""

    def __init__(self, manager: ARKV, layer: int, batch_size: int, n_kv_heads: int, max_seq_len: int):
        super().__init__()
        self.manager, self.layer, self.kv_quant = manager, layer, manager.config.kv_quant
        self.k = torch.zeros(batch_size, n_kv_heads, max_seq_len, HEAD_DIM, dtype=torch.float64)
        self.v = torch.zeros_like(self.k)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        B, H, S, D = q.shape
        n_kv_heads = k.shape[1]
        self.k[:, :, input_pos], self.v[:, :, input_pos] = k.double(), v.double()
        seen = int(input_pos[-1]) + 1
        spare = torch.zeros(B, n_kv_heads, 1, D, dtype=torch.float64)  # position `seen`: where unheld slots go
        keys, values = torch.cat([self.k[:, :, :seen], spare], dim=2), torch.cat([self.v[:, :, :seen], spare], dim=2)
        positions = torch.arange(seen + 1)
        if S > 1:
            visible = (positions <= input_pos[:, None]).expand(B, n_kv_heads, S, seen + 1)
        else:
            cache = self.manager.caches[self.layer]
            quantized_pos, kv_q = quantized_region(cache)  # [B, Hkv, n], [B, Hkv, n, 2, D]
            o_pos = torch.where(cache.o_pos >= 0, cache.o_pos, seen)  # [B, Hkv, N]
            q_pos = torch.where(quantized_pos >= 0, quantized_pos, seen)
            held = torch.zeros(B, n_kv_heads, seen + 1, dtype=torch.bool)
            held.scatter_(2, torch.cat([o_pos, q_pos], dim=-1), True)
            live = (quantized_pos >= 0)[..., None, None]
            kv_q = torch.where(live, kv_q, 0.0)  # empty slots' bytes are garbage
            index = q_pos[..., None].expand(-1, -1, -1, D)
            true = torch.stack([keys.gather(2, index), values.gather(2, index)], dim=3)
            error = torch.where(live, (kv_q - true).abs() - quantization_error_bound(self.kv_quant, true), 0.0)
            assert (error <= 0).all(), f"layer {self.layer}: a Quantized slot does not hold its position's K/V"
            keys.scatter_(2, index, kv_q[:, :, :, 0])
            values.scatter_(2, index, kv_q[:, :, :, 1])
            visible = (held & (positions < seen))[:, :, None]  # [B, Hkv, 1, seen + 1]
        qg = q.double().view(B, n_kv_heads, H // n_kv_heads, S, D)
        scores = qg @ keys[:, :, None].transpose(-1, -2) / math.sqrt(D)  # [B, Hkv, G, S, seen + 1]
        probs = torch.softmax(scores.masked_fill(~visible[:, :, None], -math.inf), dim=-1)
        return (probs @ values[:, :, None]).view(B, H, S, D).to(q.dtype)


def arkv_model(config: ARKVConfig, batch: int, max_seq_len: int) -> tuple[Transformer, ARKV]:
    model = tiny_model(max_seq_len)
    manager = ARKV(config, model.args, torch.float32)
    model.setup_caches(batch, max_seq_len, manager.cache_factory)
    return model, manager


def schedule(batch: int, prompt_len: int, steps: int):
    """(step, tokens, input_pos): the random prompt (step -1), then one random token per decode step."""
    tokens = torch.randint(0, VOCAB, (batch, prompt_len + steps), generator=torch.Generator().manual_seed(1))
    yield -1, tokens[:, :prompt_len], torch.arange(prompt_len)
    for step in range(steps):
        pos = prompt_len + step
        yield step, tokens[:, pos:pos + 1], torch.tensor([pos])


# ---------------------------------------------------------------------------------------------
# 1. Logits equal the masked full cache's.


FORMATS = ("fp8", "int8", "int4")
CASES = [(m, p, f) for m, p in [("arkv", "paper"), ("arkv", "coverage"), ("quant", "paper")] for f in FORMATS]
CASES += [(m, "paper", "int4") for m in ("evict", "streaming", "h2o")]  # Original only: no format


@pytest.mark.parametrize("method, policy, kv_quant", CASES)
def test_logits_equal_masked_full_cache(method, policy, kv_quant):
    """A 48-token prompt, then 256 decode steps; budget 40 tokens of bytes, window 8, 2 rows. At
    every step the logits equal the oracle's (attention over exactly what ARKV holds) while tokens
    are demoted into the Quantized region and evicted."""
    B, T, steps = 2, 48, 256
    config = ARKVConfig(kv_budget=40, window=8, method=method, oq_policy=policy, kv_quant=kv_quant)
    model, manager = arkv_model(config, B, T + steps)
    oracle = tiny_model(T + steps)
    oracle.setup_caches(B, T + steps, lambda layer, args, batch_size, max_seq_len, dtype:
                        MaskedFullCache(manager, layer, batch_size, args.n_kv_heads, max_seq_len))
    demotions = 0
    with torch.no_grad():
        for step, tokens, input_pos in schedule(B, T, steps):
            logits = model(tokens, input_pos)
            if step < 0:
                manager.compress()
            else:
                demotions += sum(int((cache.q_pos != before).any()) for cache, before in zip(manager.caches, held_q))
            held_q = [cache.q_pos.clone() for cache in manager.caches]
            expected = oracle(tokens, input_pos)
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step}: {m}")
    for cache in manager.caches:
        assert ((cache.o_pos >= 0).sum(-1) + (cache.q_pos >= 0).sum(-1) < T + steps).all(), "tokens were evicted"
    if method in ("arkv", "quant"):
        assert demotions > 0, "tokens were demoted into the Quantized region while decoding"


# ---------------------------------------------------------------------------------------------
# 2. A long run.


def check_invariants(cache, seen: int, config: ARKVConfig, bytes_original: int, bytes_quantized: int):
    """The stored state after positions 0..seen-1 went in, for every row and KV head."""
    o_pos, q_pos = cache.o_pos, cache.q_pos
    held = torch.cat([o_pos, q_pos], dim=-1)
    assert ((held >= -1) & (held < seen)).all(), "a position out of range"
    ordered = held.sort(dim=-1).values
    assert not ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any(), "a position held twice"
    # distinct positions < seen: all W window positions are Original iff W of them are >= seen - W
    assert ((o_pos >= seen - config.window).sum(-1) == min(config.window, seen)).all(), "a window token is not Original"
    n_o, n_q = (o_pos >= 0).sum(-1), (q_pos >= 0).sum(-1)  # [B, Hkv]
    N, M = o_pos.shape[-1], q_pos.shape[-1]
    arena_bytes = config.kv_budget * bytes_original
    assert (n_o * bytes_original + n_q * bytes_quantized <= arena_bytes).all(), "held bytes exceed the arena"
    for b in range(o_pos.shape[0]):
        c_o, q_first = region_bounds(cache, b)
        assert config.window <= c_o <= N and 0 <= q_first <= M
        assert c_o * bytes_original + (M - q_first) * bytes_quantized <= arena_bytes
        assert (o_pos[b, :, c_o:] == -1).all(), "an Original token beyond o_capacity"
        assert (q_pos[b, :, :q_first] == -1).all(), "a Quantized token before q_first"
        assert (n_o[b] + n_q[b] == min(seen, c_o + M - q_first)).all(), "a slot free while a token was evicted"
    if config.method not in ("arkv", "quant"):
        assert (n_q == 0).all()


def live_tensors() -> int:
    """Tensors alive in the process (type(), not isinstance: that touches deprecated lazy objects)."""
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


@pytest.mark.parametrize("method, kv_quant", [("arkv", "int4"), ("quant", "fp8")])
def test_long_run_constant_memory_and_invariants(method, kv_quant):
    """2000 decode steps after a 40-token prompt (budget 32, window 8, 2 rows): the caches' tensors
    never grow nor move, no tensor leaks across steps, every invariant holds at every step, logits
    stay finite."""
    B, T, steps = 2, 40, 2000
    config = ARKVConfig(kv_budget=32, window=8, method=method, kv_quant=kv_quant)
    model, manager = arkv_model(config, B, T + steps)
    bytes_original = 2 * HEAD_DIM * 4  # float32 K and V
    # int4: half a byte per value and a 2-byte scale and zero per 32 channels; else a byte and a float32 scale
    bytes_quantized = 2 * (HEAD_DIM // 2 + HEAD_DIM // 32 * 4) if kv_quant == "int4" else 2 * (HEAD_DIM + 4)
    with torch.no_grad():
        for step, tokens, input_pos in schedule(B, T, steps):
            logits = model(tokens, input_pos)
            assert torch.isfinite(logits).all(), f"step {step}"
            if step < 0:
                manager.compress()
                memory = [(cache_tensor_bytes(cache), cache.arena.data_ptr()) for cache in manager.caches]
            for cache, allocated in zip(manager.caches, memory):
                now = (cache_tensor_bytes(cache), cache.arena.data_ptr())
                assert now == allocated, f"step {step}: cache memory changed"
                check_invariants(cache, int(input_pos[-1]) + 1, config, bytes_original, bytes_quantized)
            if step == 100:
                tensors = live_tensors()
    assert live_tensors() <= tensors, "tensors accumulate across decode steps"
