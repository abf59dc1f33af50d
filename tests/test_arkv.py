"""arkv.py against independent oracles: exact arithmetic for the quantization formats, the stored
cache state read back after every step (bytes, positions, states), the full-precision `model.KVCache`
and a plain float64 softmax attention.

Every test runs on the CPU with tiny random models (2 layers) built here; hypothesis draws the
configurations. Oracles never reuse the cache's own earlier output: positions and bytes are
recomputed from the configuration, K/V from a full-cache run of the same model on the same tokens.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import arkv
import kv_arena
from arkv import ARKV, ARKVConfig, METHODS, OQ_POLICIES
from kv_arena import FORMATS, TILE
from conftest import random_model
from model import ModelArgs, Transformer, full_cache

# The arena holds bytes of several types; tests 2 and 6 check that writing one region never alters
# the other's bytes (a CPU scatter through a float16/bfloat16 view would NaN-normalise them all).


pytestmark = pytest.mark.usefixtures("one_thread")


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FMT_NAMES = sorted(FORMATS)
HEADS = [(4, 2), (4, 1), (2, 2)]


# ---------------------------------------------------------------------------------------------
# Independent facts about the formats.


def expected_quantized_bytes(name: str, head_dim: int) -> int:
    """K and V of one token in the format, computed from the format's definition, not from arkv."""
    if name in ("fp8", "int8"):
        return 2 * (head_dim * 1 + 1 * 4)  # one byte per value, one float32 scale per token
    groups = head_dim // 32
    return 2 * (head_dim // 2 + groups * 2 * 2)  # two values per byte, bfloat16 (scale, zero) per group


def split_int4_meta(meta: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """meta [..., D/32 * 2] as (scale, zero) pairs per group -> per-element scale and zero [..., D]."""
    pairs = meta.float().unflatten(-1, (-1, 2))  # [..., D/32, 2]
    scale, zero = pairs[..., 0], pairs[..., 1]
    return scale.repeat_interleave(32, dim=-1), zero.repeat_interleave(32, dim=-1)


def error_bound(name: str, x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |x - dequantize(quantize(x))| in float64, from the stored metadata.

    Float slack: quantize divides and dequantize multiplies/adds in float32 (relative error
    2^-24 each), which can move x / s by ~D * 2^-24 before rounding and the result by 2^-24 |x|;
    the 1e-5 relative on the step and 1e-6 |x| terms cover that with a wide margin.

    int8: s = meta, round to nearest -> |err| <= s / 2.
    int4: s, z per group of 32 (bfloat16); x lies in [z, z + 15 s] -> |err| <= s / 2.
    fp8 e4m3: y = x / s in [-448, 448]; normal y (|y| >= 2^-6) has 3 mantissa bits, so the
    half-ulp is <= 2^-4 |y|; subnormal y has a fixed step 2^-9, half-step 2^-10. Hence
    |err| <= 2^-4 |x| + 2^-10 s (tighter than 2^-9 s: round-to-nearest gives half the step)."""
    x = x.double()
    if name == "int8":
        s = meta.double()
        return s / 2 * (1 + 1e-5) + 1e-6 * x.abs()
    if name == "int4":
        s, z = split_int4_meta(meta, x.shape[-1])
        return s.double() / 2 * (1 + 1e-5) + 1e-6 * (x.abs() + z.double().abs())
    s = meta.double()
    return (2.0**-4 * x.abs() + 2.0**-10 * s) * (1 + 1e-5) + 1e-6 * x.abs()


def same_original(before: torch.Tensor, after: torch.Tensor) -> bool:
    """Original K/V bytes unchanged."""
    return before.dtype == after.dtype and torch.equal(before.contiguous().view(torch.uint8), after.contiguous().view(torch.uint8))


@st.composite
def adversarial_tensors(draw) -> torch.Tensor:
    """[rows, 2, 64] tensors: normal at scales 1e-8..1e4, mixed per-element scales, and the
    adversarial shapes (zeros, constant rows, one 1e4 outlier, ~1e-6 values, negative-only)."""
    kind = draw(st.sampled_from(["normal", "mixed", "zeros", "constant", "outlier", "tiny", "negative", "sparse"]))
    rows = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    log_scale = draw(st.floats(-8, 4))
    g = torch.Generator().manual_seed(seed)
    shape = (rows, 2, 64)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "normal":
        x = base * 10**log_scale
    elif kind == "mixed":
        x = base * 10 ** (torch.rand(shape, generator=g, dtype=torch.float64) * 10 - 6)  # 1e-6 .. 1e4 per element
    elif kind == "zeros":
        x = torch.zeros(shape, dtype=torch.float64)
    elif kind == "constant":
        # any sign, |c| in 1e-12 .. 1e4 (float32 subnormals are out of scope: the scale would underflow)
        c = draw(st.sampled_from([-1.0, 1.0])) * 10 ** draw(st.floats(-12, 4)) if draw(st.booleans()) else 0.0
        x = torch.full(shape, c, dtype=torch.float64)
    elif kind == "outlier":
        x = base * 10 ** min(log_scale, 0.0)
        flat = x.view(-1, 64)
        idx = torch.randint(0, 64, (flat.shape[0],), generator=g)
        sign = draw(st.sampled_from([-1.0, 1.0]))
        flat[torch.arange(flat.shape[0]), idx] = sign * 1e4
    elif kind == "tiny":
        x = base * 1e-6
    elif kind == "negative":
        x = -base.abs() * 10**log_scale
    else:  # mostly zeros, a few values
        x = base * 10**log_scale * (torch.rand(shape, generator=g, dtype=torch.float64) < 0.1)
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16]))
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------
# 1. Quantization formats.


@pytest.mark.parametrize("name", FMT_NAMES)
@settings(max_examples=60, **SETTINGS)
@given(x=adversarial_tensors())
def test_quantization_error_bound(name, x):
    fmt = FORMATS[name]
    original = x.clone()
    payload, meta = fmt.quantize(x)
    assert torch.equal(x, original), "quantize must not modify its input"
    D = x.shape[-1]
    assert payload.dtype == torch.uint8 and payload.shape == (*x.shape[:-1], fmt.payload_bytes(D))
    assert meta.dtype == fmt.meta_dtype and meta.shape == (*x.shape[:-1], fmt.meta_count(D))
    assert torch.isfinite(meta.float()).all()
    deq = fmt.dequantize(payload, meta)
    assert deq.shape == x.shape and deq.dtype == torch.float32
    assert torch.isfinite(deq).all(), "dequantized values must be finite"
    err = (x.double() - deq.double()).abs()
    bound = error_bound(name, x, meta)
    worst = (err - bound).max()
    assert worst <= 0, f"{name}: error exceeds bound by {worst.item():.3e} (max err {err.max().item():.3e})"
    if name in ("int8", "fp8"):  # the per-token scale is max|x| / (127 or 448): nothing above clamps away
        amax = x.float().abs().amax(-1, keepdim=True)
        limit = 127.0 if name == "int8" else 448.0
        expected = torch.where(amax > 0, amax / limit, torch.ones_like(amax))
        torch.testing.assert_close(meta, expected, rtol=1e-6, atol=0)
    if name == "int4":  # x lies in [z, z + 15 s] per group (the stated invariant), s >= 0
        s, z = split_int4_meta(meta, D)
        xf = x.double()
        assert (s >= 0).all()
        assert (xf >= z.double() - 1e-6 * xf.abs()).all() and (xf <= (z + 15 * s).double() + 1e-6 * xf.abs() + 1e-12).all()
    if (x == 0).all():
        assert (deq == 0).all()


@pytest.mark.parametrize("name", FMT_NAMES)
def test_quantized_bytes_accounting(name):
    fmt = FORMATS[name]
    D = 64
    payload, meta = fmt.quantize(torch.randn(3, 2, D))
    per_token = 2 * payload.shape[-1] * payload.element_size() + 2 * meta.shape[-1] * meta.element_size()
    assert kv_arena.bytes_per_token(fmt, D, None) == per_token == expected_quantized_bytes(name, D)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert kv_arena.bytes_per_token(fmt, D, dtype) == 2 * D * dtype.itemsize


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_int4_round_trip_exact_on_representable_values(data):
    """x = q s + z exactly (s, z bfloat16, q in [0, 15], each group hitting 0 and 15): quantize must
    recover s and z exactly, and dequantize(quantize(x)) == x bit for bit. Scales span bfloat16's
    normal range up to where |x| stays within the 2^126 clamp."""
    rows, D = data.draw(st.integers(1, 3)), 64
    n_groups = rows * D // 32
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    exp_s = data.draw(st.integers(-126, 110))
    s = torch.randint(128, 256, (n_groups,), generator=g).double() * 2.0 ** (exp_s - 7)  # normal bfloat16
    zero_exp = data.draw(st.integers(exp_s - 2, exp_s + 6))
    z = torch.randint(-255, 256, (n_groups,), generator=g).double() * 2.0 ** (zero_exp - 7)
    assert torch.equal(s.bfloat16().double(), s)
    assume(torch.equal(z.bfloat16().double(), z))  # tiny zeros can fall below bfloat16's subnormal step
    q = torch.randint(0, 16, (n_groups, 32), generator=g)
    perm = torch.randperm(32, generator=g)
    q[:, perm[0]], q[:, perm[1]] = 0, 15  # each group's min and max hit the ends of the code range
    x64 = q.double() * s[:, None] + z[:, None]  # [groups, 32]
    x = x64.float()
    assume(torch.equal(x.double(), x64))  # exactly representable in float32
    x = x.view(rows, D)
    payload, meta = kv_arena.Int4.quantize(x)
    assert payload.dtype == torch.uint8 and payload.shape == (rows, D // 2)
    scale, zero = meta.float().view(n_groups, 2).unbind(-1)
    assert torch.equal(scale.double(), s) and torch.equal(zero.double(), z), "meta must be (scale, zero) per group"
    assert torch.equal(kv_arena.Int4.dequantize(payload, meta), x)
    # packing: byte j of a group holds its element j in the low nibble, j + 16 in the high one
    codes = q.view(rows, D // 32, 32)
    assert torch.equal(payload, (codes[..., :16] | (codes[..., 16:] << 4)).flatten(1).to(torch.uint8))


# ---------------------------------------------------------------------------------------------
# Tiny models and a driver.


@functools.lru_cache(maxsize=None)
def tiny_model(n_head: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Transformer:
    args = ModelArgs(dim=64, n_layer=2, n_head=n_head, n_kv_heads=n_kv_heads, head_dim=head_dim,
                     intermediate_size=96, vocab_size=128, max_seq_len=512)
    return random_model(args, seed=seed).to(dtype)


def run_full(model: Transformer, prompt: torch.Tensor, new_tokens: torch.Tensor) -> tuple[list[torch.Tensor], Transformer]:
    B, T = prompt.shape
    model.setup_caches(B, T + new_tokens.shape[1], full_cache)
    with torch.no_grad():
        logits = [model(prompt, torch.arange(T))]
        for i in range(new_tokens.shape[1]):
            logits.append(model(new_tokens[:, i:i + 1], torch.tensor([T + i])))
    return logits, model


def run_arkv(model: Transformer, config: ARKVConfig, prompt: torch.Tensor, new_tokens: torch.Tensor,
             dtype: torch.dtype, on_state=None) -> tuple[list[torch.Tensor], ARKV]:
    """Prefill, compress, decode `new_tokens`; on_state(manager, seen) after compress and each step."""
    B, T = prompt.shape
    manager = ARKV(config, model.args, dtype)
    model.setup_caches(B, T + new_tokens.shape[1], manager.cache_factory)
    with torch.no_grad():
        logits = [model(prompt, torch.arange(T))]
        manager.compress()
        if on_state:
            on_state(manager, T)
        for i in range(new_tokens.shape[1]):
            logits.append(model(new_tokens[:, i:i + 1], torch.tensor([T + i])))
            if on_state:
                on_state(manager, T + i + 1)
    return logits, manager


# ---------------------------------------------------------------------------------------------
# 2. Invariants of the stored state at every step.


class Snapshot:
    """One layer cache's state, copied: per (batch, KV head) position -> slot for O and Q."""

    def __init__(self, cache):
        B, Hkv = cache.o_pos.shape[:2]
        self.o = [[{int(p): s for s, p in enumerate(cache.o_pos[b, h].tolist()) if p >= 0} for h in range(Hkv)] for b in range(B)]
        self.q = [[{int(p): s for s, p in enumerate(cache.q_pos[b, h].tolist()) if p >= 0} for h in range(Hkv)] for b in range(B)]
        self.o_list = [[[p for p in cache.o_pos[b, h].tolist() if p >= 0] for h in range(Hkv)] for b in range(B)]
        self.q_list = [[[p for p in cache.q_pos[b, h].tolist() if p >= 0] for h in range(Hkv)] for b in range(B)]
        self.original = cache.original_view().clone()
        payload, meta = cache.quantized_views()
        self.payload = payload.clone()
        self.meta_bytes = meta.contiguous().view(torch.uint8).clone()
        self.meta = meta.clone()
        assert len(set(cache.o_capacity.tolist())) == len(set(cache.q_first.tolist())) == 1, "rows of one prompt batch share capacities"
        self.o_capacity, self.q_first = int(cache.o_capacity[0]), int(cache.q_first[0])


def check_state(cache, config: ARKVConfig, seen: int, prompt_len: int, dtype: torch.dtype, head_dim: int,
                prev: Snapshot | None, exact_fill: bool = True) -> Snapshot:
    """Invariants of one layer cache after `seen` positions (0..seen-1) went in. Without
    `exact_fill` (chunked prefill: a token held Quantized cannot take a free Original slot) slots
    may stay free while tokens are evicted."""
    now = Snapshot(cache)
    slots = cache.slots
    N, W = config.kv_budget, config.window
    bo, bq = 2 * head_dim * dtype.itemsize, expected_quantized_bytes(config.kv_quant, head_dim)
    assert (slots.bytes_original, slots.bytes_quantized, slots.arena_tokens) == (bo, bq, N)
    M = N * bo // (TILE * bq) * TILE  # whole tiles of TILE slots
    assert slots.quantized_slots == M
    assert cache.o_pos.shape[-1] == N and cache.q_pos.shape[-1] == M
    assert cache.arena.dtype == torch.uint8 and cache.arena.shape[-1] == N * bo, "the arena is exactly the budget"
    c_o, q_first = now.o_capacity, now.q_first
    assert 0 < c_o <= N and W <= c_o and 0 <= q_first <= M
    tiles_offset = N * bo - M * bq  # the tiles end with the arena
    assert q_first == M or c_o * bo <= tiles_offset + q_first * bq, "Original and Quantized regions overlap in bytes"
    assert c_o * bo + (M - q_first) * bq <= N * bo
    assert (cache.o_pos[..., c_o:] == -1).all(), "Original slot beyond o_capacity is in use"
    assert (cache.q_pos[..., :q_first] == -1).all(), "Quantized slot before q_first is in use"
    assert (cache.o_pos >= -1).all() and (cache.q_pos >= -1).all()
    assert (cache.o_pos < seen).all() and (cache.q_pos < seen).all()
    if config.method in ("evict", "streaming", "h2o"):
        assert (cache.q_pos == -1).all(), f"{config.method} must not hold Quantized tokens"
    if prev is not None:
        assert (c_o, q_first) == (prev.o_capacity, prev.q_first), "capacities change during decoding"
    window = set(range(max(0, seen - W), seen))
    new = seen - 1 if prev is not None else None
    for b, rows in enumerate(now.o):
        for h, o in enumerate(rows):
            q = now.q[b][h]
            assert len(o) == len(now.o_list[b][h]) and len(q) == len(now.q_list[b][h]), "duplicate position"
            assert not (o.keys() & q.keys()), "a position is both Original and Quantized"
            n_o, n_q = len(o), len(q)
            assert n_o * bo + n_q * bq <= N * bo, "bytes held exceed the budget"
            assert window <= o.keys(), f"window positions missing from Original: {sorted(window - o.keys())}"
            # nothing is dropped while a slot is free: held = min(seen, C_o + C_q)
            if exact_fill:
                assert n_o + n_q == min(seen, c_o + (M - q_first)), (n_o, n_q, seen, c_o, M - q_first)
            else:
                assert n_o + n_q <= min(seen, c_o + (M - q_first)), (n_o, n_q, seen, c_o, M - q_first)
            if config.method == "streaming":
                keep = set(range(seen)) if seen <= N else set(range(config.sinks)) | set(range(seen - (N - config.sinks), seen))
                assert o.keys() == keep, "streaming holds the sinks and the most recent tokens"
            if prev is None:
                continue
            po, pq = prev.o[b][h], prev.q[b][h]
            held, held_before = o.keys() | q.keys(), po.keys() | pq.keys()
            assert held <= held_before | {new}, f"evicted positions returned: {sorted(held - held_before - {new})}"
            assert new in o, "the new token is not in Original at its absolute position"
            for p, slot in q.items():
                if p in pq:  # stayed Quantized: same slot, byte-identical payload and metadata
                    assert pq[p] == slot
                    assert torch.equal(now.payload[b, h, slot], prev.payload[b, h, slot]), f"position {p} re-quantized"
                    assert torch.equal(now.meta_bytes[b, h, slot], prev.meta_bytes[b, h, slot]), f"position {p} re-quantized"
                else:  # demoted this step from Original: stored value is that token, quantized
                    assert p in po, f"position {p} entered Quantized from nowhere"
                    true = prev.original[b, h, po[p]].float()  # [2, D]
                    deq = cache.fmt.dequantize(now.payload[b, h, slot], now.meta[b, h, slot])
                    bound = error_bound(config.kv_quant, true, now.meta[b, h, slot])
                    assert ((true.double() - deq.double()).abs() <= bound).all(), f"position {p} stored wrongly"
            for p in pq.keys() & o.keys():
                raise AssertionError(f"Quantized position {p} was promoted to Original")
            for p, slot in o.items():
                if p in po:  # Original values are never modified
                    assert same_original(prev.original[b, h, po[p]], now.original[b, h, slot]), f"position {p} changed"
    return now


@st.composite
def scenarios(draw):
    method = draw(st.sampled_from(METHODS))
    kv_quant = draw(st.sampled_from(FMT_NAMES))
    head_dim = 64 if kv_quant == "int4" else draw(st.sampled_from([16, 64]))
    window = draw(st.integers(1, 12))
    sinks = 4 if method == "streaming" else 0
    kv_budget = window + sinks + draw(st.integers(0, 28))
    oq_policy = draw(st.sampled_from(OQ_POLICIES))
    short = draw(st.integers(0, 3)) == 0  # about a quarter of the prompts fit in the budget
    prompt_len = draw(st.integers(2, max(2, kv_budget)) if short else st.integers(kv_budget + 1, kv_budget + 60))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16]))
    return dict(
        config=ARKVConfig(kv_budget=kv_budget, method=method, oq_policy=oq_policy,
                          window=window, kv_quant=kv_quant),
        heads=draw(st.sampled_from(HEADS)), head_dim=head_dim, prompt_len=prompt_len,
        batch=draw(st.integers(1, 2)), dtype=dtype,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=30, **SETTINGS)
@given(scenario=scenarios())
def test_budget_invariants_every_step(scenario):
    config, dtype, head_dim = scenario["config"], scenario["dtype"], scenario["head_dim"]
    model = tiny_model(*scenario["heads"], head_dim, dtype)
    g = torch.Generator().manual_seed(scenario["seed"])
    B, T, steps = scenario["batch"], scenario["prompt_len"], 20
    prompt = torch.randint(0, 128, (B, T), generator=g)
    new_tokens = torch.randint(0, 128, (B, steps), generator=g)
    prev: dict[int, Snapshot] = {}

    def on_state(manager, seen):
        assert len(manager.caches) == model.args.n_layer
        for layer, cache in enumerate(manager.caches):
            prev[layer] = check_state(cache, config, seen, T, dtype, head_dim, prev.get(layer))

    logits, _ = run_arkv(model, config, prompt, new_tokens, dtype, on_state)
    assert all(torch.isfinite(x).all() for x in logits)


def test_coverage_policy_budget_equal_to_window():
    config = ARKVConfig(kv_budget=8, window=8, oq_policy="coverage", kv_quant="int8")
    model = tiny_model(4, 2, 16)
    prompt = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    new_tokens = torch.randint(0, 128, (1, 3), generator=torch.Generator().manual_seed(1))
    prev: dict[int, Snapshot] = {}

    def on_state(manager, seen):
        for layer, cache in enumerate(manager.caches):
            prev[layer] = check_state(cache, config, seen, 20, torch.float32, 16, prev.get(layer))

    run_arkv(model, config, prompt, new_tokens, torch.float32, on_state)


def test_streaming_keeps_sinks_that_arrive_while_decoding():
    config = ARKVConfig(kv_budget=5, window=1, method="streaming", kv_quant="int8")
    model = tiny_model(4, 2, 16)
    prompt = torch.tensor([[3, 7]])  # positions 2 and 3 (sinks) come from decoding
    _, manager = run_arkv(model, config, prompt, torch.tensor([[1, 2, 3, 4, 5, 6]]), torch.float32)
    for cache in manager.caches:
        held = set(cache.o_pos[0, 0][cache.o_pos[0, 0] >= 0].tolist())
        assert {0, 1, 2, 3} <= held, f"sinks evicted: held {sorted(held)}"


# ---------------------------------------------------------------------------------------------
# 3. A budget that holds the whole sequence: ARKV is the full cache.


@settings(max_examples=15, **SETTINGS)
@given(method=st.sampled_from(METHODS), kv_quant=st.sampled_from(FMT_NAMES), heads=st.sampled_from(HEADS),
       prompt_len=st.integers(2, 40), slack=st.integers(0, 16), window=st.integers(1, 32),
       batch=st.integers(1, 2), seed=st.integers(0, 2**31 - 1))
def test_budget_covering_sequence_equals_full_cache(method, kv_quant, heads, prompt_len, slack, window, batch, seed):
    steps = 32
    kv_budget = prompt_len + steps + slack
    assume(kv_budget >= window + (4 if method == "streaming" else 0))
    model = tiny_model(*heads, 64)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 128, (batch, prompt_len), generator=g)
    new_tokens = torch.randint(0, 128, (batch, steps), generator=g)
    full, _ = run_full(model, prompt, new_tokens)
    full_kv = [(layer.attention.kv_cache.k_cache, layer.attention.kv_cache.v_cache) for layer in model.layers]
    config = ARKVConfig(kv_budget=kv_budget, method=method, window=window, kv_quant=kv_quant)
    ours, manager = run_arkv(model, config, prompt, new_tokens, torch.float32)
    assert len(ours) == len(full) == steps + 1
    # Not bit-identical: ARKV's softmax runs over kv_budget (+ quantized) slots, the full cache's over
    # max_seq_len slots, so float32 reductions associate differently (observed up to 3.1e-6 on
    # logits of magnitude ~7, i.e. a few ulp). Everything stored is bit-identical (below).
    assert torch.equal(ours[0], full[0]), "prefill logits must be identical"
    for i, (a, b) in enumerate(zip(ours, full)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {i}: {m}")
    for row in range(batch):
        report = manager.report(prompt_len + steps, row)
        assert report["evicted"] == 0 and report["quantized"] == 0
        assert report["original"] == (prompt_len + steps) * heads[1] * model.args.n_layer
    # every position is held Original, bit-identical to the full cache's K/V (layer 0 sees the same
    # inputs at every step; deeper layers' decode K/V depend on the attention outputs above)
    for layer, (cache, (k_full, v_full)) in enumerate(zip(manager.caches, full_kv)):
        o_pos = cache.o_pos
        kv = cache.original_view()
        for b in range(batch):
            for h in range(heads[1]):
                live = o_pos[b, h] >= 0
                assert sorted(o_pos[b, h][live].tolist()) == list(range(prompt_len + steps))
                pos = o_pos[b, h][live]
                limit = prompt_len + steps if layer == 0 else prompt_len
                keep = pos < limit
                assert torch.equal(kv[b, h, live, 0][keep], k_full[b, h, pos[keep]])
                assert torch.equal(kv[b, h, live, 1][keep], v_full[b, h, pos[keep]])


def test_original_bytes_survive_decode_int4_float32():
    """A float32 Original token whose bytes at a quantized slot's metadata offset read as a float16
    signalling NaN (value bits 0x3F807C01 = 1.00378..., an ordinary number) must not change while it
    stays Original."""
    model = tiny_model(4, 2, 64)
    manager = ARKV(ARKVConfig(kv_budget=16, window=4, kv_quant="int4"), model.args, torch.float32)
    T = 30
    model.setup_caches(1, T + 2, manager.cache_factory)
    with torch.no_grad():
        model(torch.arange(T)[None], torch.arange(T))
        manager.compress()
        cache = manager.caches[0]
        bo = cache.slots.bytes_original
        slot = int((cache.o_pos[0, 0] == T - 1).nonzero())  # the newest token: in the window, stays Original
        every_slot = torch.arange(cache.slots.quantized_slots).view(1, 1, -1)
        index = cache.byte_index(every_slot, quantized=True)[0, 0]  # [M, bytes_quantized] in row (0, 0) of the arena
        offsets = index[:, 2 * cache.fmt.payload_bytes(cache.head_dim)::2].flatten().tolist()  # bfloat16 metadata values
        offset = next(o for o in offsets if slot * bo <= o < (slot + 1) * bo and o % 4 == 0)
        element = (offset - slot * bo) // 4  # float32 element of the slot's [2, D] K/V whose low half is that metadata
        cache.original_view()[0, 0, slot].view(-1)[element] = torch.tensor([0x3F807C01], dtype=torch.int32).view(torch.float32)
        before = cache.original_view()[0, 0, slot].clone()
        model(torch.tensor([[5]]), torch.tensor([T]))
        assert int(cache.o_pos[0, 0, slot]) == T - 1
        after = cache.original_view()[0, 0, slot]
        assert torch.equal(after.view(torch.int32), before.view(torch.int32)), (
            f"live Original bytes changed: {hex(int(before.view(-1)[element].view(torch.int32)))} -> "
            f"{hex(int(after.reshape(-1)[element].view(torch.int32)))}")


@pytest.mark.parametrize("kv_quant", ["int4", "int8"])
def test_quantized_bytes_survive_decode_bfloat16(kv_quant):
    """A Quantized token's payload bytes 0x85 0x7F (int4 codes 5, 8, 15, 7; or int8 values -123, 127:
    ordinary data that reads as a bfloat16 NaN) must not change while the token stays Quantized."""
    model = tiny_model(4, 2, 64, torch.bfloat16)
    manager = ARKV(ARKVConfig(kv_budget=40, window=4, method="quant", kv_quant=kv_quant), model.args, torch.bfloat16)
    T = 50  # more than the budget, and fits: Original window + free Quantized slots, so nothing is evicted next step
    model.setup_caches(1, T + 2, manager.cache_factory)
    with torch.no_grad():
        model(torch.arange(T)[None], torch.arange(T))
        manager.compress()
        cache = manager.caches[0]
        slot = int(cache.q_first[0])
        pos = int(cache.q_pos[0, 0, slot])
        assert pos >= 0
        index = cache.byte_index(torch.tensor([[[slot]]]), quantized=True)[0, 0, 0]  # the slot's bytes in row (0, 0)
        cache.arena.view(-1)[index[:2]] = torch.tensor([0x85, 0x7F], dtype=torch.uint8)  # its first K payload bytes
        before = cache.arena.view(-1)[index]
        model(torch.tensor([[5]]), torch.tensor([T]))
        assert int(cache.q_pos[0, 0, slot]) == pos, "the probe token must stay Quantized for this check"
        assert torch.equal(cache.arena.view(-1)[index], before)


# ---------------------------------------------------------------------------------------------
# 4. Quantized tokens are stored and attended.


def dense_attention(cache, q: torch.Tensor) -> tuple[torch.Tensor, list]:
    """float64 softmax attention over the live Original and (dequantized) Quantized K/V, per
    (batch, KV head), the GQA group by repeat_interleave. Returns y [B, H, 1, D] and per (b, g) the
    probabilities laid out as (O slots, Q slots)."""
    B, H, _, D = q.shape
    kv_o = cache.original_view().double()  # [B, Hkv, N, 2, D]
    kv_q = cache.fmt.dequantize(*cache.quantized_views()).double()  # [B, Hkv, M, 2, D]
    Hkv = kv_o.shape[1]
    G = H // Hkv
    y = torch.zeros(B, H, 1, D, dtype=torch.float64)
    probs = {}
    for b in range(B):
        o_live = (cache.o_pos[b] >= 0)
        q_live = (cache.q_pos[b] >= 0)
        keys, values = [], []
        for g in range(Hkv):
            keys.append(torch.cat([kv_o[b, g, o_live[g], 0], kv_q[b, g, q_live[g], 0]]))
            values.append(torch.cat([kv_o[b, g, o_live[g], 1], kv_q[b, g, q_live[g], 1]]))
        for h in range(H):
            g = h // G  # repeat_interleave(G) over KV heads
            scores = keys[g] @ q[b, h, 0].double() / math.sqrt(D)
            p = torch.softmax(scores, dim=0)
            y[b, h, 0] = p @ values[g]
            probs[b, h] = (p, int(o_live[g].sum()))
    return y, probs


@settings(max_examples=12, **SETTINGS)
@given(policy=st.sampled_from([("quant", "paper"), ("arkv", "coverage"), ("arkv", "paper")]),
       kv_quant=st.sampled_from(FMT_NAMES), heads=st.sampled_from(HEADS), batch=st.integers(1, 2),
       seed=st.integers(0, 2**31 - 1))
def test_quantized_tokens_are_stored_and_attended(policy, kv_quant, heads, batch, seed):
    method, oq_policy = policy
    model = tiny_model(*heads, 64)
    g = torch.Generator().manual_seed(seed)
    T, steps = 160, 6
    prompt = torch.randint(0, 128, (batch, T), generator=g)
    new_tokens = torch.randint(0, 128, (batch, steps), generator=g)
    _, full_model = run_full(model, prompt, new_tokens)
    true_kv = [(layer.attention.kv_cache.k_cache.clone(), layer.attention.kv_cache.v_cache.clone()) for layer in full_model.layers]
    config = ARKVConfig(kv_budget=24, window=4, method=method, oq_policy=oq_policy, kv_quant=kv_quant)
    _, manager = run_arkv(model, config, prompt, new_tokens, torch.float32)
    seen = T + steps
    layers_with_q_and_e = 0
    for layer, cache in enumerate(manager.caches):
        n_o, n_q = (sum(n) for n in zip(*(cache.counts(b) for b in range(batch))))
        B, Hkv = cache.o_pos.shape[:2]
        if n_q > 0 and n_o + n_q < seen * B * Hkv:
            layers_with_q_and_e += 1
        # attention over the tri-state cache == dense float64 attention over what it holds
        qv = torch.randn(batch, heads[0], 1, 64, generator=g) * 2
        y, probs = cache.attend(qv)
        y_ref, probs_ref = dense_attention(cache, qv)
        torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
        G = heads[0] // heads[1]
        for (b, h), (p_ref, _) in probs_ref.items():
            kvh, j = h // G, h % G
            p = probs[b, kvh, j]
            N = cache.o_pos.shape[-1]
            live = torch.cat([cache.o_pos[b, kvh] >= 0, cache.q_pos[b, kvh] >= 0])
            assert (p[~live] == 0).all()
            torch.testing.assert_close(p[live].double(), p_ref, atol=1e-6, rtol=1e-5)
            if (cache.q_pos[b, kvh] >= 0).any():
                assert (p[N:][cache.q_pos[b, kvh] >= 0] > 0).all(), "a Quantized token got no attention"
        # stored values are the true K/V of their positions (prefill positions in every layer;
        # decode positions in layer 0, whose K/V do not depend on earlier attention)
        k_true, v_true = true_kv[layer]
        payload, meta = cache.quantized_views()
        checked = 0
        for b in range(B):
            for h in range(Hkv):
                for slot, p in enumerate(cache.o_pos[b, h].tolist()):
                    if p >= 0 and (p < T or layer == 0):
                        true = torch.stack([k_true[b, h, p], v_true[b, h, p]])
                        assert same_original(true, cache.original_view()[b, h, slot]), f"layer {layer} position {p}"
                for slot, p in enumerate(cache.q_pos[b, h].tolist()):
                    if p >= 0 and (p < T or layer == 0):
                        true = torch.stack([k_true[b, h, p], v_true[b, h, p]])  # [2, D]
                        deq = cache.fmt.dequantize(payload[b, h, slot], meta[b, h, slot])
                        bound = error_bound(kv_quant, true, meta[b, h, slot])
                        assert ((true.double() - deq.double()).abs() <= bound).all(), f"layer {layer} position {p}"
                        checked += 1
        if layer == 0:
            assert checked == n_q
    if policy != ("arkv", "paper"):  # paper shares may keep every layer (nearly) all Original: no Q then
        assert layers_with_q_and_e == model.args.n_layer, "quant / coverage with a long prompt hold Q and E tokens"


# ---------------------------------------------------------------------------------------------
# 5. Bad configuration.


def test_budget_smaller_than_window():
    with pytest.raises(ValueError, match="window"):
        ARKVConfig(kv_budget=8, window=32)


@pytest.mark.parametrize("field, value, flag", [
    ("method", "snapkv", "--method"),
    ("method", "full", "--method"),  # `full` is the generate.py switch, not a cache method
    ("kv_quant", "int2", "--kv-quant"),
    ("oq_policy", "uniform", "--oq-policy"),
    ("gamma", -1.0, "--gamma"),
    ("tau", (1.0, 0.0, 1.0), "--tau"),
    ("window", 0, "--window"),
])
def test_bad_config_names_the_flag(field, value, flag):
    with pytest.raises(ValueError, match=flag):
        ARKVConfig(kv_budget=64, **{field: value})


def test_streaming_needs_room_for_sinks():
    with pytest.raises(ValueError, match="sink"):
        ARKVConfig(kv_budget=33, window=32, method="streaming")


@pytest.mark.parametrize("kv_quant, head_dim", [("int4", 32), ("int4", 96), ("int8", 15), ("fp8", 15)])
def test_unsupported_head_dim(kv_quant, head_dim):
    args = ModelArgs(dim=64, n_layer=1, n_head=2, n_kv_heads=1, head_dim=head_dim, intermediate_size=32, vocab_size=16)
    with pytest.raises(ValueError, match="head_dim"):
        ARKV(ARKVConfig(kv_budget=8, window=4, kv_quant=kv_quant), args, torch.float32)


# ---------------------------------------------------------------------------------------------
# 8. Layer statistics against the paper's formulas computed in plain Python (float64).


@settings(max_examples=20, **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), window=st.integers(2, 5), extra=st.integers(1, 6), sharp=st.floats(0.5, 8.0))
def test_layer_statistics_match_plain_python(seed, window, extra, sharp):
    B, Hkv, G, T = 1, 2, 2, window + extra
    g = torch.Generator().manual_seed(seed)
    logits = sharp * torch.randn(B, Hkv, G, window, T, generator=g)
    probs = torch.softmax(logits, dim=-1)  # [B, Hkv, G, W, T]
    before = torch.arange(T) < T - window
    p = probs.double().tolist()
    entropies, variances, kurtoses = [], [], []
    for b in range(B):
        for h in range(Hkv):
            for j in range(G):
                for w in range(window):
                    row = [p[b][h][j][w][t] for t in range(T - window)]
                    total = sum(row)
                    entropies.append(-sum(x / total * math.log(x / total) for x in row if x > 0))
                for t in range(T - window):
                    column = [p[b][h][j][w][t] for w in range(window)]
                    mean = sum(column) / window
                    var = sum((x - mean) ** 2 for x in column) / window
                    variances.append(var)
                    if var > 0:
                        kurtoses.append(sum((x - mean) ** 4 for x in column) / window / var**2)
    expected = (sum(entropies) / len(entropies), sum(variances) / len(variances), sum(kurtoses) / len(kurtoses))
    got = arkv.statistic_means(arkv.layer_moments(probs, before.expand(B, Hkv, T)))
    for name, a, e in zip(("entropy", "variance", "kurtosis"), got, expected):
        assert math.isclose(a, e, rel_tol=1e-4, abs_tol=1e-12), f"{name}: {a} vs {e}"
