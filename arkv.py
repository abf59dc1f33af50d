"""ARKV: a tri-state KV cache (Original / Quantized / Evicted) under a real memory budget.

Method: Lei & Ilager, "ARKV", arXiv 2603.08727 (2026). Where each of its steps lives, in file order:

1. Per-layer Original share from the prefill statistics: `window_probabilities` (attention of the
   last W queries), `layer_statistics` (entropy H, variance V, kurtosis K; kept as the sums and counts
   of `layer_moments`, which tensor-parallel ranks add up: `ARKV.reduce`), `oq_score`
   (q_l = H^(1/tau1) V^(1/tau2) K^(1/tau3)), `ARKVRule.original_shares` (rho_l = q_l / max_j q_j),
   `SlotGeometry.capacities` (rho_l as Original and Quantized slots of the layer's bytes).
2. Token importance: `token_statistics` (mean + gamma * variance over the window queries, pooled,
   GQA-averaged) ranks the prefill tokens (`ARKVRule.prefill_key`); while decoding a slot competes
   with `ARKVRule.slot_score` of the running statistics that `ARKVRule.update` keeps.
3. Tri-state tailoring and mixed-precision attention: `ARKVCache.assign` (after prefill),
   `ARKVCache.place` (each decode step: demote or evict one token), `mixed_precision_attention`
   (or `kernels.tristate_attention`). After prefill, `ARKV.compress` runs steps 1-3 on every layer.

The baselines are rules beside ARKV's (`EvictRule`, `QuantRule`, `StreamingRule`, `H2ORule`) and run
through the same cache, in the same bytes. The file reads: configuration -> quantization formats ->
prefill statistics -> the methods' rules (what to keep) -> byte budgets -> the cache of one layer
(how it is stored: arena, assignment, placement, attention) -> mixed-precision attention -> manager.

Memory layout. Each layer owns one byte arena per (batch row, KV head) of exactly `kv_budget` tokens
of full-precision K+V. The Original region grows from the front of the arena (slots of
`bytes_original`), the Quantized region occupies the back, in tiles of `TILE` slots that store
each payload byte and each metadata value of their slots side by side (`tile_layout`), so that
compiled decode attention reads `TILE` tokens per vector load. Both are views of the same bytes,
so a layer's Original:Quantized split is data (two capacity tensors), not a shape: the arena has
one static shape for every layer and every prompt, and the compiled decode
step never recompiles nor allocates cache memory. Decode attention, the demotion target search
and the score update read both views whole, the slots outside a row's capacities masked (see
`ARKVCache.attend` for why the compiled step does not skip the Quantized slots below q_first).
"""
from __future__ import annotations

import functools
import math
import operator
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import kernels
from model import ModelArgs, scores_against, weighted_sum

METHODS = ("arkv", "evict", "quant", "streaming", "h2o")
OQ_POLICIES = ("paper", "coverage")
ATTENTION = ("torch", "triton")
PAPER_TAU = (7.774, 5.407, 5.528)  # tau1 (entropy), tau2 (variance), tau3 (kurtosis), tuned in the paper
PAPER_GAMMA = 263.8


@dataclass
class ARKVConfig:
    """`kv_budget`: per layer and KV head, the bytes of this many full-precision tokens (K and V)."""
    kv_budget: int
    method: str = "arkv"
    oq_policy: str = "coverage"  # the measured winner at equal memory (README); "paper": the paper's rule
    window: int = 32
    kv_quant: str = "int4"
    gamma: float = PAPER_GAMMA
    tau: tuple[float, float, float] = PAPER_TAU
    pool_kernel: int = 5
    sinks: int = 4
    attention: str = "torch"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method}: expected one of {', '.join(METHODS)}")
        if self.oq_policy not in OQ_POLICIES:
            raise ValueError(f"--oq-policy {self.oq_policy}: expected one of {', '.join(OQ_POLICIES)}")
        if self.kv_quant not in FORMATS:
            raise ValueError(f"--kv-quant {self.kv_quant}: expected one of {', '.join(FORMATS)}")
        if self.attention not in ATTENTION:
            raise ValueError(f"--attention {self.attention}: expected one of {', '.join(ATTENTION)}")
        if self.attention == "triton" and not kernels.available():
            raise ValueError("--attention triton: Triton is not installed (pip install triton)")
        if self.window < 1:
            raise ValueError(f"--window {self.window}: expected an integer >= 1")
        if self.kv_budget < self.window:
            raise ValueError(f"--kv-budget {self.kv_budget} is smaller than the window {self.window}")
        if self.method == "streaming" and self.kv_budget < self.window + self.sinks:
            raise ValueError(f"--kv-budget {self.kv_budget}: streaming needs window + {self.sinks} sink tokens")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"--pool-kernel {self.pool_kernel}: expected an odd integer >= 1")
        if self.gamma < 0 or min(self.tau) <= 0:
            raise ValueError("--gamma must be >= 0 and every --tau > 0")


# ---------------------------------------------------------------------------------------------
# Quantization formats. A quantized token stores, for K and for V, a payload (uint8 bytes) and
# per-token (fp8, int8) or per-group (int4) float metadata, all counted in `bytes_quantized`.
#
# Numbers that cannot break the cache. Each K (or V) row of a token and KV head is quantized on its
# own (int4: each group of 32 channels of it), so nothing in one row reaches another row, head or
# token. Within a row (group), the scale and zero come from its finite values only: finite values
# keep the error bounds below whatever else the row holds. +-inf is stored as the row's extreme
# code (int8, fp8: +-max|x| of its finite values; int4: z + 15 s or z). A NaN makes the row's
# (group's) metadata NaN: the row reads back NaN, which decode attention treats as it treats a NaN
# in the Original region, where a NaN K or V already makes that KV head's output NaN for every
# query that sees the token; no other head and no other token is touched. Finite values past the
# range a format's float32 arithmetic can reach saturate: |x| > 127/128 float32-max (int8),
# 7/8 float32-max (fp8), 2^126 (int4).


def symmetric_scale(x: Tensor, levels: float) -> tuple[Tensor, Tensor]:
    """The per-row scale of a symmetric format with codes in [-levels, levels].

    s = max|x| / levels over the row's finite x, one step up where levels s (float32) falls below
    max|x| (a subnormal quotient can round far down, to 0 even), so that |x| <= levels s;
    at most float32-max / 2^ceil(log2 levels), so that levels s stays finite (larger |x| saturate);
    1 for a row without a nonzero finite value (its codes are 0); NaN for a row holding a NaN.

    x [..., D] -> (x as float32 with +-inf replaced by +-max|x|, scale [..., 1] float32)."""
    x = x.float()
    amax = torch.where(x.isfinite(), x.abs(), 0.0).amax(-1, keepdim=True)  # [..., 1]
    scale = amax / levels
    scale = torch.where(scale * levels < amax, scale.nextafter(torch.tensor(torch.inf)), scale)
    scale = torch.where(amax > 0, scale.clamp_max(torch.finfo(torch.float32).max / 2 ** math.ceil(math.log2(levels))), 1.0)
    return x.clamp(-amax, amax), scale.masked_fill(x.isnan().any(-1, keepdim=True), torch.nan)


def bfloat16_round(x: Tensor, up: bool) -> Tensor:
    """Finite float32 x rounded to a bfloat16 value toward +inf (up) or -inf, kept in float32.
    bfloat16 is float32's upper 16 bits: clearing the lower 16 rounds |x| toward zero, and adding
    2^16 to the bits where those were not all zero rounds it away from zero (a carry into the
    exponent gives the next binade's first value). Bit operations, because torch.compile computes
    bfloat16 in float32: it drops a float32 -> bfloat16 -> float32 round trip and takes
    torch.nextafter of a bfloat16 in float32, and either would undo a directed rounding."""
    bits = x.view(torch.int32)
    toward_zero = bits & -65536  # 0xFFFF0000
    away = torch.where(bits != toward_zero, toward_zero + 65536, toward_zero)  # int32 throughout
    return torch.where((x >= 0) == up, away, toward_zero).view(torch.float32)


class TokenScaled:
    """A format with one byte per channel and one float32 scale per token. Decode attention reads a
    tile's tokens as `parts` (dequantized channel blocks) against the same blocks of the query
    (`split`) and puts its output's blocks back together (`merge`): here, one block of every channel.
    `dequantize` reads tokens one per row: payload [..., P], meta [..., m] -> [..., D]."""
    meta_dtype = torch.float32

    @staticmethod
    def payload_bytes(head_dim: int) -> int:
        return head_dim

    @staticmethod
    def meta_count(head_dim: int) -> int:
        return 1

    @classmethod
    def parts(cls, payload: Tensor, meta: Tensor) -> tuple[Tensor]:
        """L tokens side by side: payload [..., D, L], meta [..., 1, L] -> ([..., D, L] float32,)."""
        return (cls.dequantize(payload, meta),)

    @staticmethod
    def split(x: Tensor) -> tuple[Tensor]:
        return (x,)

    @staticmethod
    def merge(parts: tuple[Tensor]) -> Tensor:
        return parts[0]


class Fp8(TokenScaled):
    """FP8 e4m3 with one float32 scale per token (`symmetric_scale`, levels 448):
    x ~ e4m3(x / s) s, x / s in [-448, 448]. e4m3 keeps 3 mantissa bits for |x / s| >= 2^-6 and a
    fixed step 2^-9 below (OCP FP8 spec), so the error is <= 2^-4 |x| + 2^-10 s for |x| <= 448 s."""

    @staticmethod
    def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
        """The clamp saturates past 448 s: e4m3fn has no infinity, and torch before the saturating
        cast of c10's Float8_e4m3fn turned |x / s| >= 480 into NaN."""
        x, scale = symmetric_scale(x, 448.0)
        payload = (x / scale).clamp(-448, 448).nan_to_num(0.0).to(torch.float8_e4m3fn).view(torch.uint8)
        return payload, scale

    @staticmethod
    def dequantize(payload: Tensor, meta: Tensor) -> Tensor:
        return payload.view(torch.float8_e4m3fn).float() * meta


class Int8(TokenScaled):
    """Symmetric int8 with one float32 scale per token (`symmetric_scale`, levels 127):
    q = round(x / s) in [-127, 127], x ~ q s. Elementwise error <= s / 2 for |x| <= 127 s."""

    @staticmethod
    def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
        x, scale = symmetric_scale(x, 127.0)
        q = torch.round(x / scale).clamp(-127, 127).nan_to_num(0.0)  # a NaN row: codes 0, scale NaN
        return q.to(torch.int8).view(torch.uint8), scale

    @staticmethod
    def dequantize(payload: Tensor, meta: Tensor) -> Tensor:
        return payload.view(torch.int8).float() * meta


class Int4:
    """Asymmetric 4-bit per group of 32 channels (KIVI-style), two values packed per byte (channels
    j and j + 16 of a group: `parts`), bfloat16 scale and zero point per group: with lo, hi the group's finite minimum and maximum clamped to
    +-2^126, z = lo rounded down and s = (hi - z) / 15 rounded up to bfloat16 (`bfloat16_round`),
    q = round((x - z) / s) in [0, 15], x ~ q s + z. Every x in [lo, hi] lies in [z, z + 15 s], so
    the elementwise error is <= s / 2 (plus |x| - 2^126 past the clamp).

    bfloat16 has float32's exponent range, so z and s hold any group (float16 overflowed past
    65504). Measured on SmolLM2-135M's K/V after a 500-token prefill (relative MSE, all layers):
    bfloat16 +1.0% against float16 (+0.6% with a bfloat16 model), float32 -0.1% but 96 bytes per
    token at head_dim 64 instead of 80. The clamp at 2^126 keeps float32 arithmetic finite:
    hi - z <= 2^127, so 15 s (s at most 2 bfloat16 steps above (hi - z) / 15) and z + q s stay
    far below float32's overflow at 2^128."""
    meta_dtype = torch.bfloat16
    group = 32
    limit = 2.0**126

    @staticmethod
    def payload_bytes(head_dim: int) -> int:
        return head_dim // 2

    @classmethod
    def meta_count(cls, head_dim: int) -> int:
        return 2 * (head_dim // cls.group)

    @classmethod
    def quantize(cls, x: Tensor) -> tuple[Tensor, Tensor]:
        groups = x.float().unflatten(-1, (-1, cls.group))  # [..., D/g, g]
        finite = groups.isfinite()
        lo = torch.where(finite, groups, torch.inf).amin(-1, keepdim=True)  # [..., D/g, 1]
        hi = torch.where(finite, groups, -torch.inf).amax(-1, keepdim=True)
        empty = lo > hi  # no finite value: +-inf read back as 0
        lo = torch.where(empty, 0.0, lo).clamp(-cls.limit, cls.limit)
        hi = torch.where(empty, 0.0, hi).clamp(-cls.limit, cls.limit)
        zero = bfloat16_round(lo, up=False)
        scale = bfloat16_round((hi - zero) / 15, up=True)  # then one step more where float32's quotient fell short
        scale = torch.where(zero + 15 * scale < hi, bfloat16_round(scale.nextafter(torch.tensor(torch.inf)), up=True), scale)
        safe_scale = torch.where(scale > 0, scale, 1.0)
        q = torch.round((groups - zero) / safe_scale).clamp(0, 15).nan_to_num(0.0)  # +-inf -> 15 or 0
        q = q.to(torch.uint8)  # [..., D/g, g]
        payload = (q[..., : cls.group // 2] | (q[..., cls.group // 2:] << 4)).flatten(-2)  # [..., D/2]
        meta = torch.cat([scale, zero], dim=-1).bfloat16().masked_fill(groups.isnan().any(-1, keepdim=True), torch.nan)
        return payload, meta.flatten(-2)  # meta [..., D/g * 2]

    @classmethod
    def dequantize(cls, payload: Tensor, meta: Tensor) -> Tensor:
        """One token per row: payload [..., D/2], meta [..., D/g * 2] -> [..., D]."""
        return cls.merge([part[..., 0] for part in cls.parts(payload[..., None], meta[..., None])])

    @classmethod
    def parts(cls, payload: Tensor, meta: Tensor) -> tuple[Tensor, Tensor]:
        """Byte j of group g holds channel 32 g + j in its low nibble and 32 g + 16 + j in its high
        one, so each half of a group unpacks to contiguous channels (no interleave). L tokens side
        by side: payload [..., D/2, L], meta [..., D/g * 2, L] -> (low, high) [..., D/g, g/2, L] float32."""
        scale, zero = meta.float().unflatten(-2, (-1, 2)).unbind(-2)  # [..., D/g, L] each
        pairs = payload.unflatten(-2, (-1, cls.group // 2))  # [..., D/g, g/2, L]
        return ((pairs & 15).float() * scale[..., None, :] + zero[..., None, :],
                (pairs >> 4).float() * scale[..., None, :] + zero[..., None, :])

    @classmethod
    def split(cls, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [..., D] as the channels of `parts`: (low, high) [..., D/g, g/2]."""
        return x.unflatten(-1, (-1, 2, cls.group // 2)).unbind(-2)

    @classmethod
    def merge(cls, parts: tuple[Tensor, Tensor]) -> Tensor:
        """The inverse of `split`: (low, high) [..., D/g, g/2] -> [..., D]."""
        return torch.stack(parts, dim=-2).flatten(-3)


FORMATS = {"fp8": Fp8, "int8": Int8, "int4": Int4}


def bytes_per_token(fmt, head_dim: int, dtype: torch.dtype | None) -> int:
    """Bytes of one token's K and V: full precision when `dtype` is given, else in format `fmt`."""
    if dtype is not None:
        return 2 * head_dim * dtype.itemsize
    return 2 * fmt.payload_bytes(head_dim) + 2 * fmt.meta_count(head_dim) * fmt.meta_dtype.itemsize


TILE = 32  # Quantized slots per tile


@functools.cache
def tile_layout(fmt, head_dim: int, device: torch.device) -> Tensor:
    """Where each byte of a Quantized slot lies in its tile: [TILE, bytes_quantized], row l for the
    tile's slot l, column k for the slot's byte k as `ARKVCache.quantized_slot_bytes` lays them out
    (payload of K, of V, then their metadata). A tile holds [2, P, TILE] payload bytes, then
    [2, m, TILE] metadata values: byte p of K of its 32 slots side by side, and so on, so that
    compiled decode attention reads 32 tokens per vector load and sums over channels without
    horizontal sums (one SmolLM2 layer on the CPU: 1.5-2x faster than one slot's bytes after
    another's). One table per format, head_dim and device, which every layer's cache shares."""
    P, m, size = fmt.payload_bytes(head_dim), fmt.meta_count(head_dim), fmt.meta_dtype.itemsize
    lane = torch.arange(TILE)[:, None]  # [TILE, 1]
    payload = torch.arange(2 * P) * TILE + lane  # [TILE, 2P]
    meta_byte = torch.arange(2 * m * size)
    meta = 2 * P * TILE + (meta_byte // size * TILE + lane) * size + meta_byte % size  # [TILE, 2 m size]
    return torch.cat([payload, meta], dim=-1).to(device)


def lanes_to_slots(x: Tensor) -> Tensor:
    """Tiles [B, Hkv, n, *F, TILE] -> one slot per row [B, Hkv, n * TILE, *F] (a copy)."""
    return x.movedim(-1, 3).flatten(2, 3)


# ---------------------------------------------------------------------------------------------
# Prefill statistics from the last W queries (never the full T x T attention).


def window_probabilities(q: Tensor, keys: Tensor, query_pos: Tensor, key_pos: Tensor) -> Tensor:
    """Attention probabilities of the window queries over candidate keys, causal by position.

    q [B, H, W, D] (the last W queries) at positions query_pos [W]; keys [B, Hkv, T, D] at
    key_pos [B, Hkv, T] (-1: no token) -> [B, Hkv, G, W, T] (float32)."""
    B, H, W, D = q.shape
    n_kv_heads = keys.shape[1]
    q_win = q.reshape(B, n_kv_heads, H // n_kv_heads * W, D)  # [B, Hkv, G * W, D]
    scores = (q_win.float() @ keys.float().transpose(-1, -2)).unflatten(2, (-1, W)) * D**-0.5  # [B, Hkv, G, W, T]
    hidden = (key_pos[:, :, None, :] > query_pos[:, None]) | (key_pos[:, :, None, :] < 0)  # [B, Hkv, W, T]
    return torch.softmax(scores.masked_fill(hidden[:, :, None], -torch.inf), dim=-1)


def layer_statistics(probs: Tensor, before_window: Tensor) -> tuple[float, float, float]:
    """Entropy H, variance V and Pearson kurtosis K of the window's attention over the keys before
    the window (`before_window` [B, Hkv, T], paper section 3.1). Means replace sums: that rescales
    every layer alike. Kurtosis is mean(z^4) with z the key's standardised attention, which stays
    within float32 range where fourth powers of raw probabilities would not."""
    return statistic_means(layer_moments(probs, before_window))


def layer_moments(probs: Tensor, before_window: Tensor) -> tuple[float, ...]:
    """What `layer_statistics` averages, as (sum, count) pairs: (sum H, rows, sum V, keys, sum K,
    live keys). Sums over batch rows and KV heads add up across processes that hold different
    heads (tensor parallelism, `ARKV.reduce`), where means would not; float64, so that the order
    of the additions does not show."""
    prefix = probs * before_window[:, :, None, None]  # [B, Hkv, G, W, T], other keys 0
    rows = prefix / prefix.sum(-1, keepdim=True).clamp_min(1e-30)
    entropy = -(rows * rows.clamp_min(1e-30).log()).sum(-1)  # [B, Hkv, G, W]
    centered = prefix - prefix.mean(dim=-2, keepdim=True)  # [B, Hkv, G, W, T]
    variance = centered.square().mean(dim=-2)  # [B, Hkv, G, T]: across the window queries, per key
    live = variance > 0  # keys no window query attends to have no kurtosis
    z = centered / variance.sqrt().clamp_min(1e-30)[..., None, :]
    kurtosis = torch.where(live, (z**4).mean(dim=-2), 0.0)  # [B, Hkv, G, T]
    keys = before_window[:, :, None].expand_as(variance)
    return (entropy.sum(dtype=torch.float64).item(), entropy.numel(), variance.sum(dtype=torch.float64).item(),
            int(keys.sum()), kurtosis.sum(dtype=torch.float64).item(), int(live.sum()))


def statistic_means(moments) -> tuple[float, float, float]:
    """(sum, count) pairs of `layer_moments` -> means (H, V, K); a count of 0 reads as 1."""
    return tuple(total / max(count, 1) for total, count in zip(moments[0::2], moments[1::2]))


def oq_score(stats: tuple[float, float, float], tau: tuple[float, float, float]) -> float:
    """q_l = H^(1/tau1) * V^(1/tau2) * K^(1/tau3); a higher score keeps more tokens Original."""
    return math.prod(max(s, 1e-30) ** (1 / t) for s, t in zip(stats, tau))


def token_statistics(probs: Tensor, gamma: float, pool_kernel: int) -> tuple[Tensor, Tensor, Tensor]:
    """Heavy-hitter score per key and KV head: mean + gamma * variance of its attention over the
    window queries, average-pooled along the sequence (kernel 5), averaged over the GQA group.

    probs [B, Hkv, G, W, T] -> (mean, variance, pooled score), each [B, Hkv, T]."""
    mean_over_window = probs.mean(dim=-2, keepdim=True)  # [B, Hkv, G, 1, T]
    variance = (probs - mean_over_window).square().mean(dim=-2).mean(dim=2)  # [B, Hkv, T] (2x faster than var)
    mean = mean_over_window.squeeze(-2).mean(dim=2)  # [B, Hkv, T]
    score = mean + gamma * variance
    pooled = F.avg_pool1d(score.flatten(0, 1)[:, None], pool_kernel, stride=1, padding=pool_kernel // 2,
                          count_include_pad=False)  # [B * Hkv, 1, T]
    return mean, variance, pooled.view_as(score)


def window_pending(config: ARKVConfig, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, keys: Tensor,
                   key_pos: Tensor, order: Tensor | None = None) -> dict:
    """What a layer holds after a prefill (or prefill chunk) until compression: the chunk's K/V
    (k, v [B, Hkv, S, D]), the candidates' positions key_pos [B, Hkv, T] (keys [B, Hkv, T, D],
    sorted by position; `order` maps them to held slots + chunk, None when they are the chunk)
    and the window statistics of the last W = min(window, S) queries of q [B, H, S, D]: token
    scores and the layer's entropy, variance, kurtosis over the keys before the window (as sums
    and counts, `layer_moments`); `memo` keeps the chunk's slot bytes per cache dtype and format
    once computed (`ARKVCache.chunk_bytes`)."""
    S, window = q.shape[2], config.window
    W, seq_len = min(window, S), int(input_pos[-1]) + 1
    probs = window_probabilities(q[:, :, S - W:], keys, input_pos[S - W:], key_pos)  # [B, Hkv, G, W, T]
    mean, variance, score = token_statistics(probs, config.gamma, config.pool_kernel)
    before_window = (key_pos >= 0) & (key_pos < seq_len - window)
    stats = layer_moments(probs, before_window) if seq_len > window else (1.0, 1, 1.0, 1, 1.0, 1)
    return dict(k=k, v=v, pos=key_pos, order=order, seq_len=seq_len, mean=mean, variance=variance, score=score,
                count=W, stats=stats, memo={})


# ---------------------------------------------------------------------------------------------
# What to keep: one rule per method, side by side, ARKV's first. A rule gives a layer's Original
# share, ranks the prefill candidates, seeds each kept token's statistics (mean, variance, count),
# scores a slot from them and updates them with each decode query's attention. The cache
# (`ARKVCache`) stores and moves tokens, and asks its rule whatever differs between methods.


class ARKVRule:
    """ARKV (Lei & Ilager 2026, arXiv 2603.08727, section 3): tri-state, with each layer's Original
    share from its prefill statistics and tokens ranked by heavy-hitter score (mean + gamma *
    variance of their attention). Original, Quantized and Evicted tokens all compete by that score.
    `decodes_as`: the rules whose decode steps are the same computation share it (evict and quant
    differ from ARKV only in their Original shares), so their rows can decode in one batch."""
    quantizes = True
    decodes_as = "arkv"

    def original_shares(self, layer_scores: list[float], config: ARKVConfig, seq_len: int,
                        slots: SlotGeometry) -> list[float]:
        """rho_l in [0, 1]: the share of the non-window budget layer l keeps at full precision.

        paper: rho_l = q_l / max_j q_j. coverage (ours): first keep as many tokens as the bytes
        allow (all, where they can: window Original, the rest Quantized); the Original upgrades that
        the bytes left over still allow go to the layers in proportion to q_l / max_j q_j."""
        relative = [s / max(layer_scores) for s in layer_scores]
        if config.oq_policy == "paper":
            return relative
        if config.kv_budget == config.window:
            return [0.0] * len(layer_scores)  # nothing beyond the window to share
        spare = slots.max_original_upgrades(seq_len)
        return [r * spare / (config.kv_budget - config.window) for r in relative]

    def prefill_key(self, pending: dict, config: ARKVConfig) -> Tensor:
        """Candidates rank by s_t = avgpool_5(mean_w a_wt + gamma var_w a_wt) over the window queries
        w, averaged over the GQA group (`token_statistics`): [B, Hkv, T]."""
        return pending["score"]

    def initial_stats(self, pending: dict, config: ARKVConfig) -> Tensor:
        """A kept token's decode statistics start from its unpooled window attention:
        (mean_w a_wt, var_w a_wt, W) [B, Hkv, T, 3]."""
        mean = pending["mean"]
        return torch.stack([mean, pending["variance"], torch.full_like(mean, pending["count"])], dim=-1)

    def fresh_stats(self, input_pos: Tensor, config: ARKVConfig) -> Tensor:
        """A new token has seen no query: (0, 0, 0). input_pos [B or 1, 1, 1] -> [B or 1, 1, 1, 3]."""
        return torch.zeros(*input_pos.shape, 3, device=input_pos.device)

    def slot_score(self, stats: Tensor, config: ARKVConfig) -> Tensor:
        """mean + gamma * variance: stats [B, Hkv, S, 3] -> [B, Hkv, S]."""
        return stats[..., 0] + config.gamma * stats[..., 1]

    def update(self, stats: Tensor, attention: Tensor, config: ARKVConfig) -> Tensor:
        """Running mean and variance over about the last W decode queries: with a the query's
        attention (GQA-averaged), d = a - mean and w = max(1 / (n + 1), 1 / W),
        mean += w d, variance = (1 - w)(variance + w d^2), n += 1 (Welford's update while
        n < W, then an exponential moving average). stats [B, Hkv, S, 3], attention [B, Hkv, S]."""
        mean, variance, count = stats.unbind(-1)
        weight = (1.0 / (count + 1)).clamp_min(1.0 / config.window)
        delta = attention - mean
        return torch.stack([mean + weight * delta, (1 - weight) * (variance + weight * delta**2), count + 1], dim=-1)


class EvictRule(ARKVRule):
    """Eviction only, SnapKV-style (Li et al. 2024; the paper's "Origin"): ARKV's scores, every kept
    token Original (rho 1), no Quantized region."""
    quantizes = False

    def original_shares(self, layer_scores: list[float], config: ARKVConfig, seq_len: int,
                        slots: SlotGeometry) -> list[float]:
        return [1.0] * len(layer_scores)


class QuantRule(ARKVRule):
    """Uniform quantization with a full-precision residual window (KIVI-like, Liu et al. 2024): every
    kept token but the window Quantized (rho 0); ARKV's scores choose whom to evict when not all fit."""

    def original_shares(self, layer_scores: list[float], config: ARKVConfig, seq_len: int,
                        slots: SlotGeometry) -> list[float]:
        return [0.0] * len(layer_scores)


class StreamingRule(EvictRule):
    """StreamingLLM (Xiao et al. 2023): the first `sinks` tokens (attention sinks) and the most
    recent ones, Original only. The score is the position, +inf for a sink; attention is never read."""
    decodes_as = "streaming"

    def recency(self, positions: Tensor, config: ARKVConfig) -> Tensor:
        """The position as a float score, +inf below `sinks`: same shape as positions."""
        return positions.float().masked_fill(positions < config.sinks, torch.inf)

    def prefill_key(self, pending: dict, config: ARKVConfig) -> Tensor:
        return self.recency(pending["pos"], config)

    def initial_stats(self, pending: dict, config: ARKVConfig) -> Tensor:
        recency = self.recency(pending["pos"], config)  # [B, Hkv, T]
        return torch.stack([recency, torch.zeros_like(recency), torch.full_like(recency, pending["count"])], dim=-1)

    def fresh_stats(self, input_pos: Tensor, config: ARKVConfig) -> Tensor:
        recency = self.recency(input_pos, config)  # [B or 1, 1, 1]
        return torch.stack([recency, torch.zeros_like(recency), torch.zeros_like(recency)], dim=-1)

    def slot_score(self, stats: Tensor, config: ARKVConfig) -> Tensor:
        return stats[..., 0]

    def update(self, stats: Tensor, attention: Tensor, config: ARKVConfig) -> Tensor:
        return stats


class H2ORule(EvictRule):
    """H2O (Zhang et al. 2023): heavy hitters by accumulated attention, Original only. A token's
    score is the sum of the attention it has received (GQA-averaged): at prefill from the W window
    queries, sum_w a_wt = W mean_w a_wt (no pooling, no variance), then from every decode query."""
    decodes_as = "h2o"

    def prefill_key(self, pending: dict, config: ARKVConfig) -> Tensor:
        return pending["mean"] * pending["count"]  # [B, Hkv, T]

    def initial_stats(self, pending: dict, config: ARKVConfig) -> Tensor:
        accumulated = self.prefill_key(pending, config)  # [B, Hkv, T]
        return torch.stack([accumulated, torch.zeros_like(accumulated),
                            torch.full_like(accumulated, pending["count"])], dim=-1)

    def slot_score(self, stats: Tensor, config: ARKVConfig) -> Tensor:
        return stats[..., 0]

    def update(self, stats: Tensor, attention: Tensor, config: ARKVConfig) -> Tensor:
        """sum += a, n += 1."""
        accumulated, variance, count = stats.unbind(-1)
        return torch.stack([accumulated + attention, variance, count + 1], dim=-1)


RULES = {"arkv": ARKVRule(), "evict": EvictRule(), "quant": QuantRule(), "streaming": StreamingRule(),
         "h2o": H2ORule()}


def decode_family(config: ARKVConfig) -> tuple:
    """What a decode step depends on besides the cache state: rows with equal families can share
    one batch (`ARKV.stack`) and one compiled step."""
    return (RULES[config.method].decodes_as, config.kv_quant, config.window, config.gamma, config.sinks,
            config.attention)


def original_shares(scores: list[float], config: ARKVConfig, seq_len: int, slots: SlotGeometry) -> list[float]:
    """rho_l of every layer under `config.method`: ARKV's from the layer scores q_l, 1 (evict,
    streaming, h2o) or 0 (quant)."""
    return RULES[config.method].original_shares(scores, config, seq_len, slots)


# ---------------------------------------------------------------------------------------------
# Byte budgets: a layer's Original share as slots of one arena.


@dataclass
class SlotGeometry:
    """One arena of `kv_budget` full-precision tokens, read as Original slots from the front and as
    `quantized_slots` Quantized slots; a layer's split between them comes from its Original share."""
    kv_budget: int
    window: int
    bytes_original: int
    bytes_quantized: int

    @property
    def arena_bytes(self) -> int:
        return self.kv_budget * self.bytes_original

    @property
    def tile_bytes(self) -> int:
        return TILE * self.bytes_quantized

    @property
    def quantized_slots(self) -> int:
        """M: the slots of the whole tiles the arena holds."""
        return self.arena_bytes // self.tile_bytes * TILE

    @property
    def tiles_offset(self) -> int:
        """Where the first tile begins: the tiles end with the arena, and the bytes left over before
        them can be Original."""
        return self.arena_bytes - self.quantized_slots // TILE * self.tile_bytes

    def capacities(self, rho: float) -> tuple[int, int]:
        """C_o = W + round(rho (N - W)); C_q = the slots of the tiles wholly behind the Original
        region, so C_o * bytes_original + C_q * bytes_quantized <= N * bytes_original."""
        c_o = self.window + round(rho * (self.kv_budget - self.window))
        overlap = max(c_o * self.bytes_original - self.tiles_offset, 0)  # bytes of the tiles Original slots reach into
        c_q = self.quantized_slots - math.ceil(overlap / self.tile_bytes) * TILE
        return c_o, c_q

    def max_original_upgrades(self, seq_len: int) -> int:
        """The most tokens beyond the window that can be Original while the arena holds as many of
        the seq_len tokens as it can (all, where it can). Every count is tried: Original slots that
        end inside the bytes before the first tile, or an arena too small for a tile, hold more
        tokens with more Original slots."""
        span = self.kv_budget - self.window
        held = [min(sum(self.capacities(extra / span)), seq_len) for extra in range(span + 1)]
        return max(extra for extra, tokens in enumerate(held) if tokens == max(held))


# ---------------------------------------------------------------------------------------------
# The cache of one layer.


class ARKVCache(nn.Module):
    """One layer's tri-state cache; `forward(q, k, v, input_pos)` is the interface of model.KVCache.

    Per slot it keeps the token's absolute position (-1: empty) and its score statistics
    (mean, variance, count), which only its method's rule (`self.rule`, see `ARKVRule`) reads and
    writes: what to keep is the rule's, where and how it is stored is this class's."""

    def __init__(self, config: ARKVConfig, slots: SlotGeometry, batch_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype):
        super().__init__()
        self.config, self.slots, self.fmt = config, slots, FORMATS[config.kv_quant]
        self.rule = RULES[config.method]
        self.head_dim, self.dtype = head_dim, dtype
        B, N, M = batch_size, self.slots.kv_budget, self.slots.quantized_slots
        self.register_buffer("arena", torch.zeros(B, n_kv_heads, self.slots.arena_bytes, dtype=torch.uint8), persistent=False)
        self.register_buffer("o_pos", torch.full((B, n_kv_heads, N), -1), persistent=False)
        self.register_buffer("q_pos", torch.full((B, n_kv_heads, M), -1), persistent=False)
        self.register_buffer("o_stats", torch.zeros(B, n_kv_heads, N, 3), persistent=False)
        self.register_buffer("q_stats", torch.zeros(B, n_kv_heads, M, 3), persistent=False)
        self.register_buffer("o_capacity", torch.full((B,), N), persistent=False)  # per row: Original slots usable
        self.register_buffer("q_first", torch.full((B,), M), persistent=False)  # per row: first Quantized slot
        self.register_buffer("tile_index", tile_layout(self.fmt, head_dim, self.q_first.device), persistent=False)
        self.pending: dict | None = None

    @property
    def has_quantized(self) -> bool:
        return self.slots.quantized_slots > 0 and self.rule.quantizes

    # Views of the arena. Reads go through typed views: [B, Hkv, N, 2, D] Original K/V, and per
    # tile of quantized slots its payload [B, Hkv, M / TILE, 2, P, TILE] and float metadata
    # [B, Hkv, M / TILE, 2, m, TILE]. Writes go through the flat bytes (`byte_index`): a CPU scatter
    # through a float16 or bfloat16 view rewrites (and NaN-normalises) the whole tensor, which would
    # corrupt the bytes that the other region reads as a different type.
    def original_bytes(self) -> Tensor:
        B, Hkv, _ = self.arena.shape
        return self.arena.view(B, Hkv, self.slots.kv_budget, self.slots.bytes_original)

    def original_view(self) -> Tensor:
        return self.original_bytes().view(self.dtype).unflatten(-1, (2, self.head_dim))

    def tile_views(self, empty: bool = False) -> tuple[Tensor, Tensor]:
        """Payload [B, Hkv, M / TILE, 2, P, TILE] and metadata [B, Hkv, M / TILE, 2, m, TILE]
        (`tile_layout`); no tiles when `empty`."""
        B, Hkv, _ = self.arena.shape
        P, m = self.fmt.payload_bytes(self.head_dim), self.fmt.meta_count(self.head_dim)
        tiles, start, size = 0 if empty else self.slots.quantized_slots // TILE, self.slots.tiles_offset, self.slots.tile_bytes
        tile_bytes = self.arena[..., start:start + tiles * size].view(B, Hkv, tiles, size)
        payload = tile_bytes[..., : 2 * P * TILE].unflatten(-1, (2, P, TILE))  # [B, Hkv, tiles, 2, P, TILE]
        # the whole arena as metadata values, then the tiles' metadata: compiled, a reinterpretation of
        # the arena, where a typed view of a slice of it is a copy (tile starts and sizes are whole values)
        item = self.fmt.meta_dtype.itemsize
        values = self.arena.view(self.fmt.meta_dtype)  # [B, Hkv, arena_bytes / itemsize]
        tile_values = values[..., start // item:(start + tiles * size) // item].view(B, Hkv, tiles, size // item)
        meta = tile_values[..., 2 * P * TILE // item:].unflatten(-1, (2, m, TILE))  # [B, Hkv, tiles, 2, m, TILE]
        return payload, meta

    def quantized_views(self, empty: bool = False) -> tuple[Tensor, Tensor]:
        """Copies, one slot per row: payload [B, Hkv, M, 2, P] and metadata [B, Hkv, M, 2, m]."""
        return tuple(lanes_to_slots(view) for view in self.tile_views(empty))

    def quantized_bytes(self) -> Tensor:
        """A copy of every Quantized slot's bytes, one slot per row: [B, Hkv, M, bytes_quantized]."""
        B, Hkv, _ = self.arena.shape
        slots = torch.arange(self.slots.quantized_slots, device=self.arena.device).expand(B, Hkv, -1)
        return self.arena.view(-1)[self.byte_index(slots, quantized=True)]

    def write_quantized(self, slots: Tensor, slot_bytes: Tensor):
        """Quantized slots [B, Hkv, n] <- their bytes [B, Hkv, n, bytes_quantized]."""
        self.arena.view(-1)[self.byte_index(slots, quantized=True).flatten()] = slot_bytes.flatten()

    def byte_index(self, slots: Tensor, quantized: bool) -> Tensor:
        """Indices into the flat arena of the bytes of slots [B, Hkv, n]: [B, Hkv, n, slot bytes].
        An Original slot's bytes are contiguous; a Quantized slot's are spread over its tile."""
        B, Hkv, arena_bytes = self.arena.shape
        row = torch.arange(B * Hkv, device=slots.device).view(B, Hkv, 1, 1) * arena_bytes  # [B, Hkv, 1, 1]
        if quantized:
            tile = self.slots.tiles_offset + slots // TILE * self.slots.tile_bytes  # [B, Hkv, n]
            return row + tile[..., None] + self.tile_index[slots % TILE]
        size = self.slots.bytes_original
        return row + (slots * size)[..., None] + torch.arange(size, device=slots.device)

    def original_slot_bytes(self, kv: Tensor) -> Tensor:
        """kv [B, Hkv, n, 2, D] -> its bytes in the cache dtype [B, Hkv, n, bytes_original]."""
        return as_bytes(kv.to(self.dtype)).flatten(-2)

    def quantized_slot_bytes(self, kv: Tensor) -> Tensor:
        """kv [B, Hkv, n, 2, D] -> quantized once: payload then metadata bytes [B, Hkv, n, bytes_quantized]."""
        payload, meta = self.fmt.quantize(kv)
        return cat_bytes([payload.flatten(-2), as_bytes(meta).flatten(-2)])

    def forward(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor) -> Tensor:
        if q.shape[2] > 1:
            return self.prefill(q, k, v, input_pos)
        return self.decode(q, k, v, input_pos)

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor) -> Tensor:
        """Causal attention over the prompt (or a chunk of it, after the tokens the cache holds);
        keep the chunk's K/V and the window statistics of every candidate token until the manager,
        having seen every layer, assigns the three states (`ARKV.compress`).

        Candidates are the held tokens and the chunk's, sorted by position (a row holding fewer
        than another ends with empty ones), so that pooling runs along the sequence."""
        B, H, S, D = q.shape
        n_kv_heads, window = k.shape[1], self.config.window
        chunk_pos = input_pos.expand(B, n_kv_heads, S)
        if int(input_pos[0]) == 0:  # a new sequence: nothing held
            keys, key_pos, order = k, chunk_pos, None
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            held_kv, held_pos = self.held_tokens()  # [B, Hkv, N + M, 2, D], [B, Hkv, N + M]
            unsorted_pos = torch.cat([held_pos, chunk_pos], dim=-1)  # [B, Hkv, N + M + S]
            order = unsorted_pos.masked_fill(unsorted_pos < 0, torch.iinfo(unsorted_pos.dtype).max).argsort(dim=-1)
            order = order[..., :int((unsorted_pos >= 0).sum(-1).max())]  # [B, Hkv, T]: live ones, by position
            key_pos = unsorted_pos.gather(2, order)
            kv = gather_rows(torch.cat([held_kv, torch.stack([k, v], dim=3).float()], dim=2), order)  # [B, Hkv, T, 2, D]
            keys, values = kv.unbind(3)
            visible = (key_pos[:, :, None] <= input_pos[:, None]) & (key_pos[:, :, None] >= 0)  # [B, Hkv, S, T]
            mask = visible.repeat_interleave(H // n_kv_heads, dim=1)  # [B, H, S, T]
            y = F.scaled_dot_product_attention(q.float(), keys, values, attn_mask=mask, enable_gqa=True).to(q.dtype)
        # contiguous copies: k and v are views of larger projection outputs that must not stay alive
        self.pending = window_pending(self.config, q, k.contiguous(), v.contiguous(), input_pos, keys, key_pos, order)
        return y

    def held_tokens(self) -> tuple[Tensor, Tensor]:
        """Every slot's K/V in float32 (Quantized ones dequantized, empty ones 0) and position
        (-1: empty): [B, Hkv, N + M, 2, D] and [B, Hkv, N + M]; M = 0 without a Quantized region."""
        payload, meta = self.quantized_views(empty=not self.has_quantized)
        kv = torch.cat([self.original_view().float(), self.fmt.dequantize(payload, meta)], dim=2)
        pos = torch.cat([self.o_pos, self.q_pos[..., :payload.shape[2]]], dim=-1)
        return torch.where(pos[..., None, None] >= 0, kv, 0.0), pos

    def candidate_bytes(self, pending: dict) -> tuple[Tensor, Tensor | None, Tensor]:
        """For each candidate (in `pending` order): its bytes as an Original slot and as a
        Quantized slot (None without a Quantized region), and whether it is held Quantized already
        (it then keeps its bytes and can never become Original again).
        [B, Hkv, T, bytes_original], [B, Hkv, T, bytes_quantized], [B, Hkv, T]."""
        as_original, as_quantized = self.chunk_bytes(pending)
        order = pending["order"]
        if order is None:  # one-shot prefill: the candidates are the chunk, in order
            return as_original, as_quantized, torch.zeros_like(pending["pos"], dtype=torch.bool)
        held_original = self.original_bytes()  # [B, Hkv, N, bytes_original]
        B, Hkv, N, _ = held_original.shape
        M = self.slots.quantized_slots if self.has_quantized else 0
        as_original = torch.cat([held_original, held_original.new_zeros(B, Hkv, M, held_original.shape[-1]), as_original], dim=2)
        if as_quantized is not None:  # slots past every row's Original capacity hold no token: not quantized
            usable = int(self.o_capacity.max())
            from_original = self.quantized_slot_bytes(self.original_view()[:, :, :usable])  # [B, Hkv, usable, bytes_quantized]
            unused = from_original.new_zeros(B, Hkv, N - usable, from_original.shape[-1])
            as_quantized = gather_rows(torch.cat([from_original, unused, self.quantized_bytes(), as_quantized], dim=2), order)
        return gather_rows(as_original, order), as_quantized, (order >= N) & (order < N + M)

    def chunk_bytes(self, pending: dict) -> tuple[Tensor, Tensor | None]:
        """The pending chunk's K/V as Original slot bytes and as Quantized slot bytes (None without a
        Quantized region). Kept in the pending state per (dtype, format): one recorded prefill is
        compressed by many caches (eval.py), and its tokens' bytes are the same for all of them."""
        key = (self.dtype, self.config.kv_quant if self.has_quantized else None)
        if key not in pending["memo"]:
            chunk_kv = torch.stack([pending["k"], pending["v"]], dim=3)  # [B, Hkv, S, 2, D]
            as_quantized = self.quantized_slot_bytes(chunk_kv) if self.has_quantized else None
            pending["memo"][key] = self.original_slot_bytes(chunk_kv), as_quantized
        return pending["memo"][key]

    # -- tri-state assignment after prefill --------------------------------------------------
    @torch.no_grad()
    def assign(self, c_o: int, c_q: int):
        """Window -> Original; best `rule.prefill_key` -> Original up to C_o; next -> Quantized up to
        C_q; the rest evicted. A token held Quantized stays Quantized or is evicted. Selections are
        written in position order; a capacity larger than the candidates leaves slots empty (-1)."""
        p = self.pending
        pos = p["pos"]  # [B, Hkv, T] candidate positions, ascending, -1 (none) last
        T = pos.shape[-1]
        as_original, as_quantized, was_quantized = self.candidate_bytes(p)
        in_window = pos >= p["seq_len"] - self.config.window  # always kept; a missing candidate (-1) never
        key = self.rule.prefill_key(p, self.config).masked_fill(in_window, torch.inf).masked_fill(pos < 0, -torch.inf)
        initial = self.rule.initial_stats(p, self.config)  # [B, Hkv, T, 3]
        o_key = key.masked_fill(was_quantized, -torch.inf)
        o_sel = o_key.argsort(dim=-1, descending=True, stable=True)[..., :min(c_o, T)].sort(dim=-1).values  # [B, Hkv, n_o]
        o_live = o_key.gather(2, o_sel) > -torch.inf
        chosen = torch.zeros_like(was_quantized).scatter_(2, o_sel, o_live)
        q_key = key.masked_fill(chosen, -torch.inf)
        q_sel = q_key.argsort(dim=-1, descending=True, stable=True)[..., :min(c_q, T)].sort(dim=-1).values  # [B, Hkv, n_q]
        q_live = q_key.gather(2, q_sel) > -torch.inf
        self.o_pos.fill_(-1)
        self.q_pos.fill_(-1)
        self.o_stats.zero_()
        self.q_stats.zero_()
        n_o, n_q = o_sel.shape[-1], q_sel.shape[-1]
        self.original_bytes()[:, :, :n_o] = gather_rows(as_original, o_sel)
        self.o_pos[..., :n_o] = pos.gather(2, o_sel).masked_fill(~o_live, -1)
        self.o_stats[:, :, :n_o] = gather_rows(initial, o_sel)
        q_first = self.slots.quantized_slots - c_q
        if n_q and as_quantized is not None:
            targets = torch.arange(q_first, q_first + n_q, device=q_sel.device).expand_as(q_sel)  # [B, Hkv, n_q]
            self.write_quantized(targets, gather_rows(as_quantized, q_sel))
            self.q_pos[..., q_first:q_first + n_q] = pos.gather(2, q_sel).masked_fill(~q_live, -1)
            self.q_stats[:, :, q_first:q_first + n_q] = gather_rows(initial, q_sel)
        self.o_capacity.fill_(c_o)
        self.q_first.fill_(q_first)
        self.pending = None

    # -- decode -----------------------------------------------------------------------------
    def decode(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor) -> Tensor:
        """Place the new token (demoting or evicting one), then attend over the tri-state cache
        and update the slot scores with this step's attention. input_pos [1] or [B, 1]."""
        self.place(torch.stack([k, v], dim=3), input_pos.view(-1, 1, 1))  # kv [B, Hkv, 1, 2, D]
        y, probs = self.attend(q)
        self.update_stats(probs)
        return y

    def place(self, new_kv: Tensor, input_pos: Tensor):
        """The new token takes a free Original slot; with none free, the weakest Original token
        outside the window (the token leaving the window included) is demoted: quantized once
        into a free Quantized slot, or over the weakest Quantized token if that one scores lower
        (which is evicted), else evicted itself. Weakest: lowest `rule.slot_score`.
        new_kv [B, Hkv, 1, 2, D]; input_pos [B or 1, 1, 1]."""
        window, inf = self.config.window, torch.inf
        o_slot = torch.arange(self.o_pos.shape[-1], device=input_pos.device)
        o_score = self.rule.slot_score(self.o_stats, self.config)
        o_key = torch.where(self.o_pos > input_pos - window, inf, o_score)  # window tokens stay
        o_key = torch.where(self.o_pos < 0, -inf, o_key).masked_fill(o_slot >= self.o_capacity[:, None, None], inf)
        victim = o_key.argmin(dim=-1, keepdim=True)  # [B, Hkv, 1]
        victim_pos = self.o_pos.gather(2, victim)  # [B, Hkv, 1]
        o_index = self.byte_index(victim, quantized=False).flatten(2)  # [B, Hkv, bytes_original]
        o_bytes = self.original_slot_bytes(new_kv).flatten(2)  # [B, Hkv, bytes_original]
        index, value = [o_index], [o_bytes]
        if self.has_quantized:
            victim_stats = gather_rows(self.o_stats, victim)  # [B, Hkv, 1, 3]
            victim_kv = gather_rows(self.original_view(), victim)  # [B, Hkv, 1, 2, D]
            # a slot below q_first (behind the row's Original capacity) is never a target
            q_slot = torch.arange(self.q_pos.shape[-1], device=input_pos.device)
            q_score = self.rule.slot_score(self.q_stats, self.config)  # [B, Hkv, M]
            q_key = torch.where(self.q_pos < 0, -inf, q_score)
            q_key = q_key.masked_fill(q_slot < self.q_first[:, None, None], inf)  # [B, Hkv, M]
            target = q_key.argmin(dim=-1, keepdim=True)  # [B, Hkv, 1]
            victim_score = self.rule.slot_score(victim_stats, self.config)  # [B, Hkv, 1]
            demote = (victim_pos >= 0) & (q_key.gather(2, target) < victim_score)  # [B, Hkv, 1]
            # Without a demotion the Quantized write repeats the first bytes of the Original one
            # (same places, same values): the target may lie in the Original region (no Quantized
            # region), and an index_put with conflicting duplicates has no defined order.
            size = self.slots.bytes_quantized
            index.append(torch.where(demote, self.byte_index(target, quantized=True).flatten(2), o_index[..., :size]))
            value.append(torch.where(demote, self.quantized_slot_bytes(victim_kv).flatten(2), o_bytes[..., :size]))
            scatter_slots(self.q_pos, target, torch.where(demote, victim_pos, self.q_pos.gather(2, target)))
            old_stats = gather_rows(self.q_stats, target)
            scatter_slots(self.q_stats, target, torch.where(demote[..., None], victim_stats, old_stats))
        # one index_put on the flat bytes: compiled, it touches only those bytes, where a scatter_,
        # or a second index_put on the same buffer, makes the compiler copy the whole arena
        self.arena.view(-1)[torch.cat(index, dim=-1).flatten()] = cat_bytes(value).flatten()
        scatter_slots(self.o_pos, victim, input_pos.expand_as(victim))
        fresh = self.rule.fresh_stats(input_pos, self.config).expand_as(self.o_stats[:, :, :1])  # [B, Hkv, 1, 3]
        scatter_slots(self.o_stats, victim, fresh)

    def attend(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """q [B, H, 1, D] -> output [B, H, 1, D], probabilities [B, Hkv, G, N + M]. The Triton kernel
        reads each row's Quantized slots from its q_first on; the PyTorch path reads every tile (dead
        slots masked). Compiled, a range of tiles that starts at a slot read at run time has no size
        hint (torch 2.13: a hint set on the value does not survive the re-trace of the layer's
        functionalized graph), so the compiler keeps the per-query-head sums of `tile_scores` apart
        and dequantizes every key G times. Measured on SmolLM2 at --kv-budget 512, one step: after
        8k tokens (94% of the tiles usable) 41.2 -> 32.4 ms reading every tile; after 2k (64%) 34.1
        and 34.2 ms."""
        payload, meta = self.tile_views(empty=not self.has_quantized)
        triton = self.config.attention == "triton"
        attention = kernels.tristate_attention if triton else mixed_precision_attention
        quantized_first = self.q_first if triton else None
        return attention(q, self.original_view(), self.o_pos, payload, meta, self.q_pos[..., :payload.shape[2] * TILE],
                         self.config.kv_quant, self.o_capacity, quantized_first)

    def update_stats(self, probs: Tensor):
        """The live slots' statistics after this step's attention probs [B, Hkv, G, N + M], averaged
        over the GQA group (`rule.update`)."""
        attention = probs.mean(dim=2)  # [B, Hkv, N + M]
        N = self.o_stats.shape[2]
        regions = [(self.o_stats, self.o_pos, attention[..., :N])]
        if self.has_quantized:
            regions.append((self.q_stats, self.q_pos, attention[..., N:]))
        for stats, pos, a in regions:
            stats.copy_(torch.where((pos >= 0)[..., None], self.rule.update(stats, a, self.config), stats))

    def counts(self, row: int) -> tuple[int, int]:
        """(Original, Quantized) tokens held by one batch row, counted from the stored positions."""
        return int((self.o_pos[row] >= 0).sum()), int((self.q_pos[row] >= 0).sum())

    def nbytes(self) -> int:
        """Bytes of K/V storage allocated (the arena)."""
        return self.arena.nbytes

    @classmethod
    def stack(cls, rows: list["ARKVCache"], config: ARKVConfig) -> "ARKVCache":
        """One batched cache under `config` whose row b holds rows[b]: one-row caches compressed
        with budgets up to `config.kv_budget`. Every row's decisions stay what they were alone:
        Original slots keep their indices, the Quantized region keeps its order at the end of the
        larger arena (slot j -> j + M - M_b), and each row keeps its capacities (o_capacity, q_first)."""
        base = rows[0]
        slots = SlotGeometry(config.kv_budget, base.slots.window, base.slots.bytes_original, base.slots.bytes_quantized)
        cache = cls(config, slots, len(rows), base.arena.shape[1], base.head_dim, base.dtype).to(base.arena.device)
        M, size_o, size_q = slots.quantized_slots, slots.bytes_original, slots.bytes_quantized
        for b, row in enumerate(rows):
            shift = M - row.slots.quantized_slots
            n_o, q_first = int(row.o_capacity[0]), int(row.q_first[0])
            cache.arena[b, :, :n_o * size_o] = row.arena[0, :, :n_o * size_o]  # the live bytes of both regions
            held = (row.slots.quantized_slots - q_first) * size_q  # bytes of its usable tiles, at the arena's end
            cache.arena[b, :, slots.arena_bytes - held:] = row.arena[0, :, row.slots.arena_bytes - held:]
            cache.o_pos[b, :, :row.o_pos.shape[-1]], cache.o_stats[b, :, :row.o_pos.shape[-1]] = row.o_pos[0], row.o_stats[0]
            cache.q_pos[b, :, shift:], cache.q_stats[b, :, shift:] = row.q_pos[0], row.q_stats[0]
            cache.o_capacity[b], cache.q_first[b] = n_o, q_first + shift
        return cache


INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def as_bytes(x: Tensor) -> Tensor:
    """x [..., n] -> its bytes in memory order [..., n * itemsize] uint8: `x.view(torch.uint8)`, and
    compiled the same bytes from a same-size integer view and shifts, which the compiler fuses into
    the step's kernels (a view that changes the item size is an extern call and a kernel boundary:
    two fewer kernels per layer in ARKV's decode step)."""
    if not torch.compiler.is_compiling():
        return x.contiguous().view(torch.uint8)
    bits = x.view(INT_OF_SIZE[x.dtype.itemsize]).int()  # [..., n]
    shifts = torch.arange(0, 8 * x.dtype.itemsize, 8, device=x.device, dtype=torch.int32)  # least significant first
    if sys.byteorder == "big":
        shifts = shifts.flip(0)
    return ((bits[..., None] >> shifts) & 255).to(torch.uint8).flatten(-2)  # [..., n, itemsize] -> [..., n * itemsize]


def cat_bytes(parts: list[Tensor]) -> Tensor:
    """uint8 tensors [..., n_i] -> [..., sum n_i], concatenated along the last dim. Compiled, through
    int16: the compiler's CPU cat of uint8 tensors is an extern call between kernels, of wider ones
    each part written into its slice by the kernel that computes it (ARKV's decode block: 6 kernels
    per layer instead of 8)."""
    if not torch.compiler.is_compiling():
        return torch.cat(parts, dim=-1)
    return torch.cat([part.to(torch.int16) for part in parts], dim=-1).to(torch.uint8)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x [B, Hkv, T, ...] at index [B, Hkv, n] along dim 2 -> [B, Hkv, n, ...]. Whole rows taken by
    one index into x's rows, a copy of each (`Tensor.gather` with an expanded index computes every
    element's address: 10x slower for slot bytes on the CPU)."""
    B, Hkv, T = x.shape[:3]
    rows = x.reshape(B * Hkv * T, -1)  # [B * Hkv * T, ...flattened]
    row = index + T * torch.arange(B * Hkv, device=index.device).view(B, Hkv, 1)  # [B, Hkv, n]
    return rows[row.flatten()].view(*index.shape, *x.shape[3:])


def scatter_slots(x: Tensor, slot: Tensor, value: Tensor):
    """Write value [B, Hkv, 1, ...] into x [B, Hkv, S, ...] at slot [B, Hkv, 1], in place. An
    index_put on x's rows: compiled, it writes those rows only, where `scatter_` copies x whole
    twice (20x slower for a 768 KiB arena on the CPU)."""
    B, Hkv, S = x.shape[:3]
    rows = x.view(B * Hkv * S, -1)  # [B * Hkv * S, ...flattened]
    row = slot + S * torch.arange(B * Hkv, device=slot.device).view(B, Hkv, 1)  # [B, Hkv, 1]
    rows[row.flatten()] = value.reshape(B * Hkv, -1).to(x.dtype)


def mixed_precision_attention(q: Tensor, kv_original: Tensor, original_pos: Tensor, payload: Tensor, meta: Tensor,
                              quantized_pos: Tensor, kv_quant: str, original_slots: Tensor | None = None,
                              quantized_first: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Decode attention over a tri-state cache: one softmax over the scores against the Original
    keys and against the dequantized Quantized keys, masked to live slots (position >= 0; keys
    carry RoPE, so slot order is free). The PyTorch twin of `kernels.tristate_attention`.

    q [B, H, 1, D]; kv_original [B, Hkv, N, 2, D]; payload [B, Hkv, M / L, 2, P, L], meta
    [B, Hkv, M / L, 2, m, L] (tiles of L slots, `tile_layout`); original_pos [B, Hkv, N],
    quantized_pos [B, Hkv, M] -> output [B, H, 1, D] and probabilities [B, Hkv, G, N + M] (float32);
    original_slots and quantized_first [B] per row. Given quantized_first, of the Quantized tiles it
    reads only those that can be live in some row, from the one holding min q_first on, so its cost
    follows the budget's bytes, not the arena's M slots; the others get probability 0. q_first is
    read from its tensor as a size that the compiler keeps symbolic: one graph serves every split
    (`ARKVCache.attend` says why its compiled decode step passes none). Keys and values are
    dequantized as the format's channel blocks (`parts`: int4's two nibble halves), inside the
    products with the query (`tile_scores`) and the probabilities (`tile_weighted_sum`), so that
    compiled, no dequantized copy of the Quantized region is written; both sums take the
    unnormalised weights and the output is divided by their total once (as `model.decode_attention`;
    int4, 102 tiles: 267 -> 243 us per layer). The Original view is
    read whole (N slots, dead ones masked); `original_slots` is there for the kernel's signature."""
    B, H, _, D = q.shape
    n_kv_heads, N, lanes = kv_original.shape[1], kv_original.shape[2], payload.shape[-1]
    tiles, G = payload.shape[2], H // n_kv_heads
    first = 0  # the first tile read
    if quantized_first is not None and tiles >= 2:
        first = torch.sym_min(slot_bound(quantized_first.min(), tiles * lanes - 1) // lanes, tiles - 2)
    fmt = FORMATS[kv_quant]
    # each [B, Hkv, tiles - first, *C, L]
    k_parts, v_parts = (fmt.parts(payload[:, :, first:, i], meta[:, :, first:, i]) for i in (0, 1))
    live_original = original_pos >= 0  # [B, Hkv, N]
    live_quantized = quantized_pos.unflatten(-1, (tiles, lanes))[:, :, first:] >= 0  # [B, Hkv, tiles - first, L]
    qg = q.view(B, n_kv_heads, G, D).float()  # [B, Hkv, G, D]
    scores = scores_against(qg, kv_original[:, :, :, 0]).mul(D**-0.5).masked_fill(~live_original[:, :, None], -torch.inf)
    tile_scores_ = tile_scores(fmt.split(qg), k_parts).mul(D**-0.5).masked_fill(~live_quantized[:, :, None], -torch.inf)
    # one softmax over both regions, the Quantized one kept as tiles [B, Hkv, G, tiles - first, L]
    top = scores.amax(-1, keepdim=True)  # [B, Hkv, G, 1]
    if tiles:  # a static size: 0 without a Quantized region
        top = torch.maximum(top, tile_scores_.amax((-2, -1))[..., None])
    original_exp, tile_exp = (scores - top).exp(), (tile_scores_ - top[..., None]).exp()
    total = original_exp.sum(-1, keepdim=True) + tile_exp.sum((-2, -1))[..., None]  # [B, Hkv, G, 1]
    y = weighted_sum(original_exp, torch.where(live_original[..., None], kv_original[:, :, :, 1].float(), 0.0))
    ones = [1] * (v_parts[0].dim() - 4)
    live_lanes = live_quantized.view(*live_quantized.shape[:3], *ones, lanes)  # [B, Hkv, tiles - first, 1..., L]
    # garbage bytes of dead slots -> 0 (0 * NaN would be NaN)
    y = y + fmt.merge([tile_weighted_sum(tile_exp, torch.where(live_lanes, v, 0.0)) for v in v_parts])  # [B, Hkv, G, D]
    y = y / total
    original_probs, tile_probs = original_exp / total, tile_exp / total[..., None]
    probs = torch.cat([original_probs, original_probs.new_zeros(B, n_kv_heads, G, first * lanes), tile_probs.flatten(-2)],
                      dim=-1)  # [B, Hkv, G, N + M]
    return y.to(q.dtype).view(B, H, 1, D), probs


def tile_scores(q_parts: tuple[Tensor, ...], key_parts: tuple[Tensor, ...]) -> Tensor:
    """sum_c q_c k_tc over a format's channel blocks: q parts [B, Hkv, G, *C], key parts of tiles of
    L tokens [B, Hkv, n, *C, L] -> [B, Hkv, G, n, L]. Compiled: the products summed over the
    channels, vectorised along each tile's L tokens (no horizontal sum per token), one sum per query
    head of the GQA group: sums over the same loops, which the compiler runs as one loop that
    dequantizes each key once for the G heads (one [G, ...] sum dequantized it G times: the int4
    attention of one SmolLM2 layer, 102 tiles, 468 -> 292 us). The blocks' products are added
    pairwise, not with `sum()`, whose 0 + ... the compiler keeps as one more vector add per key
    (528 -> 501 us per layer, 3,264 int4 slots); eager: a matmul per block
    (`scores_against`)."""
    if torch.compiler.is_compiling():
        per_head = []
        for g in range(q_parts[0].shape[2]):
            products = (q_part[:, :, g, None, ..., None] * key_part for q_part, key_part in zip(q_parts, key_parts))
            product = functools.reduce(operator.add, products)  # [B, Hkv, n, *C, L]
            per_head.append(product.sum(tuple(range(3, product.dim() - 1))))  # [B, Hkv, n, L]
        return torch.stack(per_head, dim=2)
    lanes = key_parts[0].shape[-1]
    scores = sum(scores_against(q_part, lanes_to_slots(key_part)) for q_part, key_part in zip(q_parts, key_parts))
    return scores.unflatten(-1, (-1, lanes))  # [B, Hkv, G, n, L]


def tile_weighted_sum(probs: Tensor, values: Tensor) -> Tensor:
    """sum_t p_t v_tc for one channel block: probs [B, Hkv, G, n, L], values of tiles of L tokens
    [B, Hkv, n, *C, L] -> [B, Hkv, G, *C]; compiled and eager as `tile_scores` (a sum per query head)."""
    if torch.compiler.is_compiling():
        p = probs.view(*probs.shape[:4], *[1] * (values.dim() - 4), probs.shape[-1])  # [B, Hkv, G, n, 1..., L]
        return torch.stack([(p[:, :, g] * values).sum((2, -1)) for g in range(probs.shape[2])], dim=2)
    return weighted_sum(probs.flatten(-2), lanes_to_slots(values))


def slot_bound(bound: Tensor, high: int) -> int:
    """A slot bound stored in a tensor, clamped to [0, high], as a Python int. Under
    torch.compile it is an unbacked symbolic size (read at run time, never guarded on), since
    `capture_scalar_outputs` is on: the decode step compiles once for every value."""
    value = int(bound.clamp(0, high))
    torch._check(value >= 0)
    torch._check(value <= high)
    return value


torch._dynamo.config.capture_scalar_outputs = True


# ---------------------------------------------------------------------------------------------
# The manager: builds every layer's cache, and after prefill turns the statistics into budgets.


class ARKV:
    """`setup_caches(..., cache_factory=arkv.cache_factory)`, prefill, then `compress()`."""

    def __init__(self, config: ARKVConfig, args: ModelArgs, dtype: torch.dtype,
                 reduce: Callable[[Tensor], Tensor] | None = None):
        """`dtype`: the dtype Original K/V are stored in (the model's, or `--kv-dtype`). `reduce`: the
        layers' statistic sums and counts [L, 6] (`layer_moments`) summed over the processes that hold
        the other KV heads (tensor parallelism: `tp.all_reduce_sum`); by default this one holds them all."""
        self.config, self.args, self.dtype = config, args, dtype
        self.reduce = reduce or (lambda moments: moments)
        fmt = FORMATS[config.kv_quant]
        if args.head_dim % (2 * Int4.group if config.kv_quant == "int4" else 2):
            raise ValueError(f"--kv-quant {config.kv_quant}: head_dim {args.head_dim} is not supported")
        self.slots = SlotGeometry(config.kv_budget, config.window, bytes_per_token(fmt, args.head_dim, dtype),
                                  bytes_per_token(fmt, args.head_dim, None))
        self.caches: list[ARKVCache] = []
        self.shares: list[float] = []
        self.max_seq_len = 0
        self.row_bytes: list[int] | None = None  # per batch row, when rows were stacked from separate caches

    def cache_factory(self, layer: int, args: ModelArgs, batch_size: int, max_seq_len: int, dtype: torch.dtype) -> ARKVCache:
        if layer == 0:
            self.caches = []
        self.max_seq_len = max_seq_len
        cache = ARKVCache(self.config, self.slots, batch_size, args.n_kv_heads, args.head_dim, dtype)
        self.caches.append(cache)
        return cache

    @torch.no_grad()
    def compress(self):
        """Per-layer Original share from the prefill statistics, then the tri-state assignment.
        A budget that holds the whole sequence keeps everything Original (output equals `full`)."""
        moments = self.reduce(torch.tensor([cache.pending["stats"] for cache in self.caches], dtype=torch.float64))  # [L, 6]
        scores = [oq_score(statistic_means(m), self.config.tau) for m in moments.tolist()]
        if self.config.kv_budget >= self.max_seq_len:
            self.shares = [1.0] * len(scores)
        else:
            self.shares = original_shares(scores, self.config, self.max_seq_len, self.slots)
        for cache, rho in zip(self.caches, self.shares):
            cache.assign(*self.slots.capacities(rho))

    def report(self, seq_len: int, row: int = 0) -> dict:
        """Measured from the stored state of one batch row holding a sequence of `seq_len` tokens:
        tokens per state, bytes held and allocated for that row, and a full cache's bytes."""
        original = quantized = 0
        for cache in self.caches:
            o, q = cache.counts(row)
            original, quantized = original + o, quantized + q
        B, Hkv = self.caches[0].o_pos.shape[:2]
        total = seq_len * Hkv * len(self.caches)
        full_bytes = total * self.slots.bytes_original
        held = original * self.slots.bytes_original + quantized * self.slots.bytes_quantized
        allocated = self.row_bytes[row] if self.row_bytes else sum(cache.nbytes() for cache in self.caches) // B
        return dict(original=original, quantized=quantized, evicted=total - original - quantized,
                    held_bytes=held, allocated_bytes=allocated, full_bytes=full_bytes, shares=list(self.shares))

    @classmethod
    def stack(cls, managers: list["ARKV"], kv_budget: int) -> "ARKV":
        """One manager whose caches hold the compressed one-row caches of `managers` (methods that
        decode alike, `decode_family`; budgets up to `kv_budget`) as batch rows (`ARKVCache.stack`),
        for decoding them together. Each row reports the bytes its own caches allocated. Rows of
        different methods decode with the family's rule: an eviction-only row is one whose
        Quantized region is empty (q_first = M), so no token is ever demoted into it."""
        base = managers[0]
        families = {decode_family(m.config) for m in managers}
        if len(families) > 1:
            raise ValueError(f"rows of methods that decode differently cannot share a batch: {sorted(families)}")
        methods = {m.config.method for m in managers}
        method = methods.pop() if len(methods) == 1 else RULES[base.config.method].decodes_as
        config = ARKVConfig(**{**vars(base.config), "kv_budget": kv_budget, "method": method})
        stacked = cls(config, base.args, base.dtype)
        stacked.caches = [ARKVCache.stack(list(layer), config) for layer in zip(*(m.caches for m in managers))]
        stacked.row_bytes = [sum(cache.nbytes() for cache in m.caches) for m in managers]
        stacked.max_seq_len = max(m.max_seq_len for m in managers)
        return stacked
