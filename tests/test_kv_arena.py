"""The quantization formats on numbers that could break the cache: the whole float32 range
(+-3.4e38, subnormals), +-inf and NaN in K/V (kv_arena.py, "Numbers that cannot break the cache").

Oracles are the rules themselves, computed here in float64 from the stored metadata:
- a row is one token's K (or V) in one KV head (int8, fp8) or one group of 32 channels of it
  (int4); a row holding a NaN reads back NaN, wholly; every other row reads back finite, with
  finite metadata;
- finite values of a NaN-free row keep the format's error bound, saturating past its range;
- +inf reads back as its row's largest read-back value, -inf as its smallest;
- changing one element changes no other row's bytes;
- in decode attention (`decode_kernels.mixed_precision_attention`), a NaN, infinite or huge token in one KV
  head leaves the other heads' outputs and probabilities bit for bit those of the clean cache; a
  NaN turns the same query heads NaN as in a full-precision cache, +-inf none.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decode_kernels import mixed_precision_attention
from kv_arena import FORMATS

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FMT_NAMES = sorted(FORMATS)
F32_MAX = torch.finfo(torch.float32).max
INF, NAN = float("inf"), float("nan")
SPECIALS = [INF, -INF, NAN, F32_MAX, -F32_MAX, 2.0**-149, -(2.0**-149), 2.0**-126, -0.0, 1e6, -1e6, -7e4, 2.0**126]
D = 64


def row_size(name: str) -> int:
    return 32 if name == "int4" else D


def unit_meta(name: str, meta: torch.Tensor) -> torch.Tensor:
    """meta [..., m] -> per row (int4: per group): [..., rows, 1] scale or [..., rows, 2] (scale, zero)."""
    return meta.unflatten(-1, (-1, 2)) if name == "int4" else meta[..., None]


def bound(name: str, x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |x - dequantize(quantize(x))| for finite x, in float64, from the stored
    metadata (rows with NaN metadata give NaN, and are not checked).

    int8: codes round(x / s) in [-127, 127] -> s / 2; where s is capped (float32-max / 128), plus
    |x| - 127 s past the top code.
    fp8 e4m3: y = x / s clamped to [-448, 448]; 3 mantissa bits for |y| >= 2^-6, step 2^-9 below
    (OCP FP8 spec) -> 2^-4 |y| s + 2^-10 s; where s is capped (float32-max / 512), plus |x| - 448 s.
    int4: x clamped to +-2^126 lies in [z, z + 15 s] -> s / 2, plus |x| - 2^126 past the clamp.
    Float slack: float32 division, multiplication and addition each round by 2^-24 relative, and to
    a multiple of 2^-149 below 2^-126: 1e-6 (|x| + |z|) and 2^-148 cover them."""
    x = x.double()
    per_row = unit_meta(name, meta).double()  # [..., rows, 1 or 2]
    s = per_row[..., 0].repeat_interleave(row_size(name), dim=-1)  # [..., D]
    if name == "int8":
        err = s / 2 + torch.where(s == F32_MAX / 128, (x.abs() - 127 * s).clamp_min(0), 0.0)
        z = torch.zeros_like(s)
    elif name == "fp8":
        saturated = torch.where(s == F32_MAX / 512, (x.abs() - 448 * s).clamp_min(0), 0.0)
        err = 2.0**-4 * x.abs().clamp(max=448 * s) + 2.0**-10 * s + saturated
        z = torch.zeros_like(s)
    else:
        z = per_row[..., 1].repeat_interleave(32, dim=-1)
        err = s / 2 + (x.abs() - 2.0**126).clamp_min(0)
    return err * (1 + 1e-5) + 1e-6 * (x.abs() + z.abs()) + 2.0**-148


def check_metadata(name: str, x: torch.Tensor, meta: torch.Tensor):
    """The metadata of every NaN-free row against its finite values alone (+-inf and NaN must
    not move it), in float64.

    int8, fp8 (levels L = 127, 448): s = max|x| / L, one float32 rounding plus at most one step up
    (where L s in float32 falls below max|x|): within (1 - 2^-23) below and (1 + 2^-22), 2^-148
    above; capped at float32-max / 2^ceil(log2 L) (128, 512); 1 without a nonzero finite value.
    int4: lo, hi the finite extremes clamped to +-2^126 (0 without any): z <= lo, at most one
    bfloat16 step below (2^-7 relative, 2^-133 among subnormals); z + 15 s >= hi up to float32
    slack (1e-6 relative), s at most two bfloat16 steps above (hi - z) / 15 (2^-6 relative)."""
    rows = x.double().unflatten(-1, (-1, row_size(name)))  # [..., rows, 32 or 64]
    per_row = unit_meta(name, meta).double()
    clean = ~rows.isnan().any(-1)
    finite = rows.isfinite()
    if name in ("int8", "fp8"):
        levels, cap = (127, F32_MAX / 128) if name == "int8" else (448, F32_MAX / 512)
        amax = torch.where(finite, rows.abs(), 0.0).amax(-1)
        expected = torch.where(amax > 0, (amax / levels).clamp(max=cap), 1.0)
        s = per_row[..., 0]
        ok = (s >= expected * (1 - 2.0**-23)) & (s <= expected * (1 + 2.0**-22) + 2.0**-148)
        assert ok[clean].all(), "scale from the finite values"
        return
    lo = torch.where(finite, rows, INF).amin(-1)
    hi = torch.where(finite, rows, -INF).amax(-1)
    lo, hi = torch.where(lo > hi, 0.0, lo).clamp(-(2.0**126), 2.0**126), torch.where(lo > hi, 0.0, hi).clamp(-(2.0**126), 2.0**126)
    s, z = per_row[..., 0], per_row[..., 1]
    ok = (z <= lo) & (z >= lo - 2.0**-7 * lo.abs() - 2.0**-133) & (z + 15 * s >= hi - 1e-6 * (hi.abs() + z.abs()))
    ok &= s <= (hi - z) / 15 * (1 + 2.0**-6) + 2.0**-133
    assert ok[clean].all(), "zero and scale from the finite values"


@st.composite
def float32_tensors(draw, specials: bool = True) -> torch.Tensor:
    """[rows, 2, 64] values from the whole float32 range, as float32, bfloat16 or float16 (whose
    casts overflow to inf): hypothesis' own float32s (boundaries, subnormals, specials), or normal
    values at one power of two in [2^-149, 2^127] per tensor or per element, with a few entries
    of SPECIALS (+-inf, NaN, +-max, subnormals, float16's old failure -7e4) written over them."""
    rows = draw(st.integers(1, 3))
    shape, size = (rows, 2, D), rows * 2 * D
    kind = draw(st.sampled_from(["elements", "one_scale", "mixed_scales"]))
    if kind == "elements":
        values = draw(st.lists(st.floats(width=32, allow_nan=specials, allow_infinity=specials), min_size=size, max_size=size))
        x = torch.tensor(values, dtype=torch.float64).view(shape)
    else:
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        if kind == "one_scale":  # the ends of the range as often as the middle
            ranges = st.integers(-149, -126) | st.integers(-125, 100) | st.integers(101, 127)
            exponent = torch.tensor(float(draw(ranges)), dtype=torch.float64)
        else:
            exponent = torch.randint(-149, 128, shape, generator=g).double()
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2.0**exponent).clamp(-F32_MAX, F32_MAX)
        if specials:
            for _ in range(draw(st.integers(0, 4))):
                x.view(-1)[draw(st.integers(0, size - 1))] = draw(st.sampled_from(SPECIALS))
    return x.to(draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16])))


@pytest.mark.parametrize("name", FMT_NAMES)
@settings(max_examples=300, **SETTINGS)
@given(x=float32_tensors())
def test_round_trip_over_float32_range(name, x):
    fmt = FORMATS[name]
    original = x.clone()
    payload, meta = fmt.quantize(x)
    assert torch.equal(x.view(torch.uint8), original.view(torch.uint8)), "quantize must not modify its input"
    assert payload.dtype == torch.uint8 and payload.shape == (*x.shape[:-1], fmt.payload_bytes(D))
    assert meta.dtype == fmt.meta_dtype and meta.shape == (*x.shape[:-1], fmt.meta_count(D))
    deq = fmt.dequantize(payload, meta)
    assert deq.shape == x.shape and deq.dtype == torch.float32
    rows = x.float().unflatten(-1, (-1, row_size(name)))  # [..., rows, 32 or 64]
    nan_rows = rows.isnan().any(-1)  # [..., rows]
    per_row = unit_meta(name, meta).float()
    assert torch.equal(per_row.isnan().all(-1), nan_rows) and per_row[~nan_rows].isfinite().all(), \
        "metadata: NaN exactly for the rows holding a NaN, finite elsewhere"
    nan_elements = nan_rows.repeat_interleave(row_size(name), dim=-1)
    assert torch.equal(deq.isnan(), nan_elements) and deq[~nan_elements].isfinite().all(), \
        "a row holding a NaN reads back NaN, every other row finite"
    check_metadata(name, x, meta)
    finite = x.isfinite() & ~nan_elements
    err = (x.double() - deq.double()).abs()
    excess = (err - bound(name, x, meta))[finite]
    assert excess.numel() == 0 or excess.max() <= 0, f"{name}: error exceeds the bound by {excess.max().item():.3e}"
    deq_rows = deq.unflatten(-1, (-1, row_size(name)))
    top, bottom = deq_rows.amax(-1, keepdim=True).expand_as(deq_rows), deq_rows.amin(-1, keepdim=True).expand_as(deq_rows)
    pos_inf, neg_inf = (rows == INF) & ~nan_rows[..., None], (rows == -INF) & ~nan_rows[..., None]
    assert torch.equal(deq_rows[pos_inf], top[pos_inf]) and torch.equal(deq_rows[neg_inf], bottom[neg_inf]), \
        "+inf reads back as its row's largest value, -inf as its smallest"


@pytest.mark.parametrize("name", FMT_NAMES)
@settings(max_examples=60, **SETTINGS)
@given(x=float32_tensors(specials=False), value=st.sampled_from(SPECIALS), index=st.integers(0, 3 * 2 * D - 1))
def test_one_value_changes_no_other_row(name, x, value, index):
    """Writing a special value into one element leaves every other row's payload and metadata
    bytes as they were (int4: every other group of 32, the same token's included)."""
    fmt = FORMATS[name]
    changed = x.clone()
    changed.view(-1)[index % x.numel()] = value
    row = index % x.numel() // row_size(name)
    per_row_bytes = []
    for tensor in (x, changed):
        payload, meta = fmt.quantize(tensor)
        payload_rows = payload.reshape(-1, fmt.payload_bytes(row_size(name)))
        meta_rows = unit_meta(name, meta).contiguous().view(torch.uint8).reshape(payload_rows.shape[0], -1)
        per_row_bytes.append(torch.cat([payload_rows, meta_rows], dim=-1))
    clean, dirty = per_row_bytes
    others = torch.arange(clean.shape[0]) != row
    assert torch.equal(clean[others], dirty[others])


@pytest.mark.parametrize("value", [1e6, -1e6, 7e4, -7e4, 1e20, -1e30, 2.0**126, -(2.0**126)])
def test_int4_large_values_stay_finite(value):
    """float16 metadata turned a group whose minimum is below -65504 into a -inf zero and an
    infinite scale (NaN attention); the metadata now holds float32's range up to the 2^126 clamp."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, D, generator=g)
    x[..., 5] = value
    x[..., 40] = -value / 3
    payload, meta = FORMATS["int4"].quantize(x)
    deq = FORMATS["int4"].dequantize(payload, meta)
    assert meta.float().isfinite().all() and deq.isfinite().all()
    assert ((x.double() - deq.double()).abs() <= bound("int4", x, meta)).all()


@pytest.mark.parametrize("name, top", [("int8", 127 / 128 * F32_MAX), ("fp8", 448 / 512 * F32_MAX), ("int4", 2.0**126)])
def test_saturation_points(name, top):
    """float32's largest values read back as the documented saturation points: int8 127 s and fp8
    448 s, s capped at float32-max / 128 and / 512 (within float32's rounding of the product);
    int4 at -2^126 (z exact) and z + 15 s at most 2^-6 above 2^126 (s rounded up)."""
    x = torch.ones(1, D)
    x[0, 0], x[0, 1] = F32_MAX, -F32_MAX
    fmt = FORMATS[name]
    deq = fmt.dequantize(*fmt.quantize(x)).double()
    if name == "int4":
        assert deq[0, 1] == -top and top <= deq[0, 0] <= top * (1 + 2.0**-6)
    else:
        assert abs(deq[0, 0] / top - 1) <= 2.0**-23 and deq[0, 1] == -deq[0, 0]


@pytest.mark.parametrize("name", FMT_NAMES)
@pytest.mark.parametrize("exponent", [-149, -140, -130, -126])
def test_subnormal_rows_keep_the_bound(name, exponent):
    """A row of subnormals: max|x| / levels underflows (to 0 for int8 and fp8 at 2^-149); the
    scale is rounded up instead, so the bound holds and nothing reads back NaN."""
    g = torch.Generator().manual_seed(exponent)
    x = (torch.randn(3, D, generator=g, dtype=torch.float64) * 2.0**exponent).float()
    x[:, 0] = 2.0**exponent
    payload, meta = FORMATS[name].quantize(x)
    deq = FORMATS[name].dequantize(payload, meta)
    assert deq.isfinite().all() and ((x.double() - deq.double()).abs() <= bound(name, x, meta)).all()


def one_tile(payload: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot-major payload [B, Hkv, M, 2, P] and meta [B, Hkv, M, 2, m] as one tile of M slots
    side by side, the layout decode attention reads: [B, Hkv, 1, 2, P, M], [B, Hkv, 1, 2, m, M]
    (no tile when M = 0)."""
    return tuple(x.movedim(2, -1)[:, :, None] if x.shape[2] else x[..., None] for x in (payload, meta))


def attention_inputs(seed: int) -> tuple:
    """One decode query against a cache of 3 KV heads (2 query heads each, head_dim 64): 6
    Original slots, 10 Quantized ones (2 of each region dead), K/V ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 6, 1, D, generator=g)
    kv_o, kv_q = torch.randn(1, 3, 6, 2, D, generator=g), torch.randn(1, 3, 10, 2, D, generator=g)
    o_pos, q_pos = torch.arange(6).expand(1, 3, 6).clone(), torch.arange(6, 16).expand(1, 3, 10).clone()
    o_pos[..., 4], q_pos[..., 7] = -1, -1
    return q, kv_o, o_pos, kv_q, q_pos


@pytest.mark.parametrize("name", FMT_NAMES)
@settings(max_examples=50, **SETTINGS)
@given(seed=st.integers(0, 2**16), head=st.integers(0, 2), slot=st.integers(0, 9), half=st.integers(0, 1),
       channel=st.integers(0, D - 1), value=st.sampled_from([NAN, INF, -INF, F32_MAX, -F32_MAX, 1e38, -1e30, 1e6]))
def test_bad_token_stays_in_its_head(name, seed, head, slot, half, channel, value):
    """A Quantized token of KV head `head` with `value` in one K (half 0) or V (half 1) channel:
    the other heads' outputs and probabilities equal the clean cache's bit for bit. Its own head:
    a live NaN turns exactly the query heads NaN that a full-precision cache holding the same
    token (every slot Original) turns non-finite; +-inf saturate and moderate values stay finite.
    (A huge finite row is not compared: its quantization error can tip a float32 score past
    float32-max either way.)"""
    fmt = FORMATS[name]
    q, kv_o, o_pos, kv_q, q_pos = attention_inputs(seed)
    bad = kv_q.clone()
    bad[0, head, slot, half, channel] = value
    runs = [mixed_precision_attention(q, kv_o, o_pos, *one_tile(*fmt.quantize(kv)), q_pos, name) for kv in (kv_q, bad)]
    (y_clean, p_clean), (y_bad, p_bad) = runs
    queries = torch.arange(6) // 2 != head  # query heads of the other KV heads
    others = torch.arange(3) != head
    assert torch.equal(y_bad[:, queries], y_clean[:, queries]) and torch.equal(p_bad[:, others], p_clean[:, others])
    if value in (INF, -INF, 1e6, -1e30):
        assert y_bad.isfinite().all()
    if value != value:
        empty = torch.zeros(1, 3, 0, 2, D)
        y_full, _ = mixed_precision_attention(q, torch.cat([kv_o, bad], dim=2), torch.cat([o_pos, q_pos], dim=-1),
                                              *one_tile(*fmt.quantize(empty)), q_pos[..., :0], name)
        broken = ~y_bad.isfinite().all(-1)  # [1, 6, 1]: per query head
        assert torch.equal(broken, ~y_full.isfinite().all(-1))
        assert torch.equal(broken[0, :, 0], ~queries & bool(q_pos[0, head, slot] >= 0))


@pytest.mark.parametrize("name", FMT_NAMES)
def test_compiled_quantize_equals_eager(name):
    """The decode step quantizes compiled (a demotion inside torch.compile): the compiled format
    stores the same bytes as eager on rows that take every branch (zero rounded down, scale
    rounded up, subnormal and capped scales, +-inf, NaN). torch.compile computes bfloat16 and
    float16 arithmetic in float32, where a rounding step in the small type could vanish."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, D, generator=g) * 2.0 ** torch.randint(-140, 120, (8, 2, 1), generator=g)
    x[0, 0, 3], x[1, 1, 40], x[2, 0, 7], x[3, 1, 0] = INF, -INF, NAN, F32_MAX
    x[4] = torch.randn(2, D, generator=g) * 2.0**-149
    fmt = FORMATS[name]
    torch._dynamo.reset()
    for eager, compiled in zip(fmt.quantize(x), torch.compile(fmt.quantize, fullgraph=True)(x)):
        if eager.is_floating_point():  # metadata: NaN in the same places, the same bits elsewhere
            assert torch.equal(eager.isnan(), compiled.isnan())
            eager, compiled = eager.nan_to_num(), compiled.nan_to_num()
        assert torch.equal(eager.view(torch.uint8), compiled.view(torch.uint8))
