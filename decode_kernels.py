"""Triton kernels for ARKV's decode step. Each has a plain-PyTorch twin that it must equal
(tests/test_kernels.py): the twin is what the CPU (and `--attention torch`) runs, compiled.

- `tristate_attention`: one decode query per sequence against a layer's tri-state cache, the
  Original slots read at full precision and the Quantized slots (fp8, int8, packed int4)
  dequantized in registers; GQA without repeating K/V; dead slots masked; online softmax, split
  over the slots so that long caches fill the GPU (flash-decoding). Twin:
  `arkv.mixed_precision_attention`.

The prefill statistics and quantize-on-demote stay in compiled PyTorch (arkv.py): the statistics
read one [W, T] probability block per head, and quantization is a handful of elementwise ops that
the compiler fuses into the decode step.
"""
from __future__ import annotations

import torch
from torch import Tensor

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
        side: `arkv.tile_layout`).

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
    """Triton twin of `arkv.mixed_precision_attention` (same arguments and results). Only the
    Original slots [0, original_slots) and the Quantized slots [quantized_first, M) are read.

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
