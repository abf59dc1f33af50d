"""Decode attention: one query per sequence against a layer's cache, with grouped-query attention.

Compiled PyTorch, which torch.compile fuses into the decode step (what the CPU runs):
- `decode_attention`: the full cache (`model.KVCache`); `scores_against` and `weighted_sum` are its
  two products, shared with the tri-state attention.
- `mixed_precision_attention`: ARKV's tri-state cache, the Original slots read at full precision and
  the Quantized slots (fp8, int8, packed int4; `kv_arena.FORMATS`) dequantized inside the products.

Triton (`--attention triton`, on a GPU):
- `tristate_attention`: the twin of `mixed_precision_attention`, same arguments and results (tested
  against it and against a float64 reference, tests/test_decode_kernels.py): online softmax, split
  over the slots so that long caches fill the GPU (flash-decoding), reading only each row's usable
  slots.

The file is not called `kernels.py`: that name would shadow Hugging Face's `kernels` package, which
transformers imports, for any program started from the project root.
"""
from __future__ import annotations

import functools
import math
import operator

import torch
from torch import Tensor

from kv_arena import FORMATS, lanes_to_slots

def decode_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """One query per sequence: softmax(q k^T / sqrt(D), masked to `valid` slots) v, with GQA, in float32
    whatever K/V are stored in (`scores_against`, `weighted_sum`).

    q [B, H, 1, D]; k, v [B, Hkv, T, D]; valid [T], [B, 1, T] or [B, Hkv, T] bool. Query head h = g * G + j
    reads KV head g (G = H / Hkv), so q is viewed as [B, Hkv, G, D] and K/V are never repeated.
    The values are summed with the unnormalised weights exp(s - max s) and the [G, D] sum divided
    by their total once, not each weight inside the loop over the slots.
    Returns the output [B, H, 1, D] and the probabilities [B, Hkv, G, T] (float32)."""
    B, H, _, D = q.shape
    n_kv_heads = k.shape[1]
    qg = q.view(B, n_kv_heads, H // n_kv_heads, D).float()  # [B, Hkv, G, D]
    scores = (scores_against(qg, k) * D**-0.5).masked_fill(~valid.unsqueeze(-2), -torch.inf)  # [B, Hkv, G, T]
    exp = (scores - scores.amax(-1, keepdim=True)).exp()
    total = exp.sum(-1, keepdim=True)  # [B, Hkv, G, 1]
    y = weighted_sum(exp, v) / total  # [B, Hkv, G, D]
    return y.to(q.dtype).view(B, H, 1, D), exp / total


def scores_against(q: Tensor, keys: Tensor) -> Tensor:
    """q [B, Hkv, G, *C] . keys [B, Hkv, T, *C] -> [B, Hkv, G, T], summed over the channels C (D, or
    a quantized format's `parts`). Compiled: a product summed over the channels, which the compiler
    fuses with the keys' conversion to float32 (a 16-bit cache's cast) and streams from memory
    once, where a matmul would read a converted copy written first. One sum per query head of the
    GQA group: sums over the same loops, which the compiler runs as one loop reading each key once
    for the G heads. Eager: a matmul (the product would be G times the keys' size)."""
    if torch.compiler.is_compiling():
        keys = keys.float()
        per_head = [(q[:, :, g, None] * keys).flatten(3).sum(-1) for g in range(q.shape[2])]  # G x [B, Hkv, T]
        return torch.stack(per_head, dim=2)
    return q.flatten(3) @ keys.float().flatten(3).transpose(-1, -2)


def weighted_sum(probs: Tensor, values: Tensor) -> Tensor:
    """probs [B, Hkv, G, T] . values [B, Hkv, T, *C] -> [B, Hkv, G, *C], fused as `scores_against`.
    Compiled: one sum per query head and block of 16 channels (one AVX-512 vector of float32),
    all over the same loop, so the compiler runs one pass over the slots that reads each value row
    whole and adds it into G * C / 16 vector accumulators (a sum over all C channels at once is
    compiled as one pass per block of channels, each reading a strided 64 bytes of every row)."""
    if torch.compiler.is_compiling():
        B, n_kv_heads, G, T = probs.shape
        channels = math.prod(values.shape[3:])
        width = 16 if channels % 16 == 0 else channels
        blocks = values.float().reshape(B, n_kv_heads, T, channels // width, width)  # [B, Hkv, T, C / width, width]
        p = probs[..., None]  # [B, Hkv, G, T, 1]
        # G * C / width sums over T, each [B, Hkv, width]
        sums = [(p[:, :, g] * blocks[:, :, :, c]).sum(2) for g in range(G) for c in range(channels // width)]
        return torch.stack(sums, dim=2).view(B, n_kv_heads, G, *values.shape[3:])
    return (probs @ values.float().flatten(3)).view(*probs.shape[:3], *values.shape[3:])


def mixed_precision_attention(q: Tensor, kv_original: Tensor, original_pos: Tensor, payload: Tensor, meta: Tensor,
                              quantized_pos: Tensor, kv_quant: str) -> tuple[Tensor, Tensor]:
    """Decode attention over a tri-state cache: one softmax over the scores against the Original
    keys and against the dequantized Quantized keys, masked to live slots (position >= 0; keys
    carry RoPE, so slot order is free). The PyTorch twin of `tristate_attention`.

    q [B, H, 1, D]; kv_original [B, Hkv, N, 2, D]; payload [B, Hkv, M / L, 2, P, L], meta
    [B, Hkv, M / L, 2, m, L] (tiles of L slots, `kv_arena.tile_layout`); original_pos [B, Hkv, N],
    quantized_pos [B, Hkv, M] -> output [B, H, 1, D] and probabilities [B, Hkv, G, N + M] (float32).
    Every slot is read, dead ones masked: a range of tiles starting at a slot read at run time
    would have no size hint for the compiler, which then keeps the per-query-head sums of
    `tile_scores` apart and dequantizes every key G times. Keys and values are dequantized as the
    format's channel blocks (`parts`: int4's two nibble halves), inside the products with the
    query (`tile_scores`) and the probabilities (`tile_weighted_sum`), so that compiled, no
    dequantized copy of the Quantized region is written; both sums take the unnormalised weights
    and the output is divided by their total once (as `decode_attention`)."""
    B, H, _, D = q.shape
    n_kv_heads, lanes = kv_original.shape[1], payload.shape[-1]
    tiles, G = payload.shape[2], H // n_kv_heads
    fmt = FORMATS[kv_quant]
    k_parts, v_parts = (fmt.parts(payload[:, :, :, i], meta[:, :, :, i]) for i in (0, 1))  # each [B, Hkv, tiles, *C, L]
    live_original = original_pos >= 0  # [B, Hkv, N]
    live_quantized = quantized_pos.unflatten(-1, (tiles, lanes)) >= 0  # [B, Hkv, tiles, L]
    qg = q.view(B, n_kv_heads, G, D).float()  # [B, Hkv, G, D]
    scores = scores_against(qg, kv_original[:, :, :, 0]).mul(D**-0.5).masked_fill(~live_original[:, :, None], -torch.inf)
    tile_scores_ = tile_scores(fmt.split(qg), k_parts).mul(D**-0.5).masked_fill(~live_quantized[:, :, None], -torch.inf)
    # one softmax over both regions, the Quantized one kept as tiles [B, Hkv, G, tiles, L]
    top = scores.amax(-1, keepdim=True)  # [B, Hkv, G, 1]
    if tiles:  # a static size: 0 without a Quantized region
        top = torch.maximum(top, tile_scores_.amax((-2, -1))[..., None])
    original_exp, tile_exp = (scores - top).exp(), (tile_scores_ - top[..., None]).exp()
    total = original_exp.sum(-1, keepdim=True) + tile_exp.sum((-2, -1))[..., None]  # [B, Hkv, G, 1]
    y = weighted_sum(original_exp, torch.where(live_original[..., None], kv_original[:, :, :, 1].float(), 0.0))
    ones = [1] * (v_parts[0].dim() - 4)
    live_lanes = live_quantized.view(*live_quantized.shape[:3], *ones, lanes)  # [B, Hkv, tiles, 1..., L]
    # garbage bytes of dead slots -> 0 (0 * NaN would be NaN)
    y = y + fmt.merge([tile_weighted_sum(tile_exp, torch.where(live_lanes, v, 0.0)) for v in v_parts])  # [B, Hkv, G, D]
    y = y / total
    probs = torch.cat([original_exp / total, (tile_exp / total[..., None]).flatten(-2)], dim=-1)  # [B, Hkv, G, N + M]
    return y.to(q.dtype).view(B, H, 1, D), probs


def tile_scores(q_parts: tuple[Tensor, ...], key_parts: tuple[Tensor, ...]) -> Tensor:
    """sum_c q_c k_tc over a format's channel blocks: q parts [B, Hkv, G, *C], key parts of tiles of
    L tokens [B, Hkv, n, *C, L] -> [B, Hkv, G, n, L]. Compiled: the products summed over the
    channels, vectorised along each tile's L tokens (no horizontal sum per token), one sum per query
    head of the GQA group: sums over the same loops, which the compiler runs as one loop that
    dequantizes each key once for the G heads (one [G, ...] sum would dequantize it G times). The
    blocks' products are added pairwise, not with `sum()`, whose 0 + ... the compiler keeps as one
    more vector add per key. Eager: a matmul per block (`scores_against`)."""
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


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path needs no Triton
    triton = None

FORMAT_CODES = {"original": 0, "fp8": 1, "int8": 2, "int4": 3}
INT4_GROUP = 32


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _load_kv(base, slot_offset, half_offset, channel_stride, meta_base, meta_slot_offset, meta_half_offset,
                 meta_stride, d, in_range, head_dim, FORMAT: tl.constexpr, GROUP: tl.constexpr):
        """One K (or V) block [BLOCK_N, BLOCK_D] as float32, dequantized by FORMAT. Byte (or Original
        value) c of a slot lies at slot_offset + half_offset + c * channel_stride, its metadata value
        e at meta_slot_offset + meta_half_offset + e * meta_stride (a tile puts its slots side by
        side: `kv_arena.tile_layout`).

        fp8 e4m3: sign s, exponent e (4 bits, bias 7), mantissa m (3 bits):
        (-1)^s (1 + m/8) 2^(e-7), or m 2^-9 when e = 0 (OCP FP8 spec); times the token's scale.
        int8: byte as two's complement, times the token's scale. int4: with g = d // GROUP and
        j = d % GROUP, byte g GROUP/2 + j % (GROUP/2) holds channel d in its low (j < GROUP/2) or
        high nibble; x = q * scale_g + zero_g."""
        mask = in_range[:, None] & (d[None, :] < head_dim)
        slot = base + slot_offset[:, None] + half_offset
        if FORMAT == 0:
            return tl.load(slot + d[None, :] * channel_stride, mask=mask, other=0.0).to(tl.float32)
        meta = meta_base + meta_slot_offset[:, None] + meta_half_offset
        if FORMAT == 3:
            half = GROUP // 2
            byte_index = (d[None, :] // GROUP) * half + d[None, :] % half
            byte = tl.load(slot + byte_index * channel_stride, mask=mask, other=0).to(tl.int32)
            nibble = (byte >> ((d[None, :] % GROUP) // half * 4)) & 15
            group_meta = meta + 2 * (d[None, :] // GROUP) * meta_stride
            scale = tl.load(group_meta, mask=mask, other=0.0).to(tl.float32)
            zero = tl.load(group_meta + meta_stride, mask=mask, other=0.0).to(tl.float32)
            return nibble.to(tl.float32) * scale + zero
        byte = tl.load(slot + d[None, :] * channel_stride, mask=mask, other=0).to(tl.int32)
        if FORMAT == 1:
            exponent, mantissa = (byte >> 3) & 15, (byte & 7).to(tl.float32)
            magnitude = tl.where(exponent == 0, mantissa * 0.001953125,
                                 (1.0 + mantissa * 0.125) * tl.exp2((exponent - 7).to(tl.float32)))
            value = tl.where(byte >= 128, -magnitude, magnitude)
        else:
            value = tl.where(byte >= 128, byte - 256, byte).to(tl.float32)
        scale = tl.load(meta, mask=in_range[:, None], other=0.0).to(tl.float32)  # [BLOCK_N, 1]
        return value * scale

    @triton.jit
    def _tristate_attention_kernel(
        q_ptr, kv_ptr, meta_ptr, pos_ptr, bounds_ptr, scores_ptr, m_ptr, l_ptr, acc_ptr,
        n_kv_heads, group_size, head_dim, sm_scale, score_column, split_base,
        stride_qb, stride_qh,
        stride_kvb, stride_kvh, stride_kvtile, stride_kvlane, stride_kvhalf, stride_kvc,
        stride_mb, stride_mh, stride_mtile, stride_mlane, stride_mhalf, stride_mc,
        stride_pb, stride_ph,
        stride_sr, stride_sg,
        stride_state_r, stride_state_s, stride_acc_r, stride_acc_s,
        FORMAT: tl.constexpr, GROUP: tl.constexpr, LANES: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Program (row = b * Hkv + h, split): the G query heads of KV head h against slots
        [split * SPLIT, (split + 1) * SPLIT) that lie in batch row b's usable range [begin, end)
        of the region (`bounds_ptr` [B, 2]: outside it every slot is empty, so it is skipped, not read);
        slot n lies in tile n // LANES at lane n % LANES (LANES 1: one slot after another). Writes the raw
        scores of its slots and its partial softmax state (running max m, sum l, unnormalised
        output acc) for `combine_splits`."""
        row, split = tl.program_id(0), tl.program_id(1)
        b, h = row // n_kv_heads, row % n_kv_heads
        g, d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
        q_mask = (g[:, None] < group_size) & (d[None, :] < head_dim)
        q = tl.load(q_ptr + b * stride_qb + (h * group_size + g[:, None]) * stride_qh + d[None, :], mask=q_mask, other=0.0)
        q = q.to(tl.float32)  # [BLOCK_G, BLOCK_D]
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        kv_base, meta_base = kv_ptr + b * stride_kvb + h * stride_kvh, meta_ptr + b * stride_mb + h * stride_mh
        lo = tl.maximum(split * SPLIT, tl.load(bounds_ptr + 2 * b))
        hi = tl.minimum(split * SPLIT + SPLIT, tl.load(bounds_ptr + 2 * b + 1))
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            in_range = n < hi
            live = (tl.load(pos_ptr + b * stride_pb + h * stride_ph + n, mask=in_range, other=-1) >= 0) & in_range
            kv_slot = (n // LANES) * stride_kvtile + (n % LANES) * stride_kvlane
            meta_slot = (n // LANES) * stride_mtile + (n % LANES) * stride_mlane
            k = _load_kv(kv_base, kv_slot, 0, stride_kvc, meta_base, meta_slot, 0, stride_mc, d, in_range, head_dim,
                         FORMAT, GROUP)
            v = _load_kv(kv_base, kv_slot, stride_kvhalf, stride_kvc, meta_base, meta_slot, stride_mhalf, stride_mc, d,
                         in_range, head_dim, FORMAT, GROUP)
            v = tl.where(live[:, None], v, 0.0)  # dead slots hold other bytes (maybe NaN): 0 * NaN is NaN
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale  # [BLOCK_G, BLOCK_N]
            scores = tl.where(live[None, :], scores, float("-inf"))
            tl.store(scores_ptr + row * stride_sr + g[:, None] * stride_sg + score_column + n[None, :], scores,
                     mask=(g[:, None] < group_size) & in_range[None, :])
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all dead so far: keep exp() finite
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m_i = m_new
        state = row * stride_state_r + (split_base + split) * stride_state_s
        tl.store(m_ptr + state + g, m_i)
        tl.store(l_ptr + state + g, l_i)
        tl.store(acc_ptr + row * stride_acc_r + (split_base + split) * stride_acc_s + g[:, None] * BLOCK_D + d[None, :], acc)


def tristate_attention(q: Tensor, kv_original: Tensor, original_pos: Tensor, payload: Tensor, meta: Tensor,
                       quantized_pos: Tensor, kv_quant: str, original_slots: Tensor, quantized_first: Tensor,
                       split: int = 256, block: int = 32) -> tuple[Tensor, Tensor]:
    """Triton twin of `mixed_precision_attention` (same arguments and results, plus each batch
    row's bounds). Only the Original slots [0, original_slots) and the Quantized slots
    [quantized_first, M) are read.

    q [B, H, 1, D]; kv_original [B, Hkv, N, 2, D]; payload [B, Hkv, M / L, 2, P, L] uint8 and meta
    [B, Hkv, M / L, 2, m, L] (tiles of L slots, views of the arena, any strides); original_pos
    [B, Hkv, N] and quantized_pos [B, Hkv, M] are the slots' token positions (live where >= 0).
    original_slots and quantized_first [B] are each batch row's bounds. Returns the output
    [B, H, 1, D] (q's dtype) and the probabilities [B, Hkv, G, N + M] (float32)."""
    B, H, _, D = q.shape
    n_kv_heads, N, lanes = kv_original.shape[1], kv_original.shape[2], payload.shape[-1]
    M = payload.shape[2] * lanes
    G = H // n_kv_heads
    block_g, block_d = max(16, triton.next_power_of_2(G)), max(16, triton.next_power_of_2(D))
    splits = [triton.cdiv(N, split), triton.cdiv(M, split) if M else 0]
    rows, total_splits = B * n_kv_heads, sum(splits)
    q = q.contiguous()
    scores = torch.full((rows, G, N + M), -torch.inf, device=q.device)  # skipped slots stay -inf
    m = torch.empty(rows, total_splits, block_g, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(rows, total_splits, block_g, block_d, device=q.device, dtype=torch.float32)
    zero = torch.zeros_like(original_slots)
    # per region: (batch, head, tile, lane, K/V half, channel) strides of its values and of its metadata
    original_strides = (*kv_original.stride()[:3], 0, *kv_original.stride()[3:])
    regions = [(kv_original, kv_original, original_strides, original_strides, original_pos,
                torch.stack([zero, original_slots], dim=-1), "original", 1, 0, 0, splits[0])]
    if M:
        bounds = torch.stack([quantized_first, zero + M], dim=-1)  # [B, 2]
        tile_strides = [tuple(t.stride()[i] for i in (0, 1, 2, 5, 3, 4)) for t in (payload, meta)]
        regions.append((payload, meta, *tile_strides, quantized_pos, bounds, kv_quant, lanes, N, splits[0], splits[1]))
    for kv, region_meta, kv_strides, meta_strides, pos, bounds, fmt, region_lanes, column, split_base, n_splits in regions:
        _tristate_attention_kernel[(rows, n_splits)](
            q, kv, region_meta, pos, bounds, scores, m, l, acc,
            n_kv_heads, G, D, D**-0.5, column, split_base,
            q.stride(0), q.stride(1),
            *kv_strides,
            *meta_strides,
            pos.stride(0), pos.stride(1),
            scores.stride(0), scores.stride(1),
            m.stride(0), m.stride(1), acc.stride(0), acc.stride(1),
            FORMAT=FORMAT_CODES[fmt], GROUP=INT4_GROUP, LANES=region_lanes, SPLIT=split, BLOCK_N=block, BLOCK_G=block_g,
            BLOCK_D=block_d,
        )
    y, lse = combine_splits(m[..., :G], l[..., :G], acc[..., :G, :D])
    probs = torch.exp(scores - lse[..., None]).view(B, n_kv_heads, G, N + M)
    return y.to(q.dtype).view(B, H, 1, D), probs


def combine_splits(m: Tensor, l: Tensor, acc: Tensor) -> tuple[Tensor, Tensor]:
    """Merge per-split softmax states (flash-decoding): with M = max_s m_s and w_s = exp(m_s - M),
    y = sum_s w_s acc_s / sum_s w_s l_s and logsumexp = M + log sum_s w_s l_s.

    m, l [R, S, G]; acc [R, S, G, D] -> y [R, G, D], logsumexp [R, G]."""
    top = m.amax(dim=1, keepdim=True)  # [R, 1, G]
    weight = torch.exp(m - top.masked_fill(top == -torch.inf, 0.0))  # [R, S, G]
    total = (l * weight).sum(dim=1)  # [R, G]
    y = (acc * weight[..., None]).sum(dim=1) / total[..., None]
    return y, top[:, 0] + total.log()
