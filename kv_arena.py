"""Where ARKV's tokens live: quantization formats, slot geometry and the byte arena of one layer.

The method (`arkv.py`) decides which token is Original, Quantized or Evicted; this file stores them.

Memory layout. Each layer owns one byte arena per (batch row, KV head) of exactly `arena_tokens`
tokens of full-precision K+V. The Original region grows from the front of the arena (slots of
`bytes_original`), the Quantized region occupies the back, in tiles of `TILE` slots that store each
payload byte and each metadata value of their slots side by side (`tile_layout`), so that compiled
decode attention reads `TILE` tokens per vector load. Both are views of the same bytes, so a layer's
Original:Quantized split is data (two capacity tensors per batch row), not a shape: the arena has one
static shape for every layer and every prompt, and the compiled decode step never recompiles nor
allocates cache memory. Per slot the arena also keeps the token's absolute position (-1: empty) and
three float32 statistics that only the method reads.

File order: quantization formats -> bytes per token -> tiles -> slot geometry -> `Arena` -> byte
helpers (what makes the compiled step write only the bytes it changes).
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor


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
    tile's slot l, column k for the slot's byte k as `Arena.quantized_slot_bytes` lays them out
    (payload of K, of V, then their metadata). A tile holds [2, P, TILE] payload bytes, then
    [2, m, TILE] metadata values: byte p of K of its 32 slots side by side, and so on, so that
    compiled decode attention reads 32 tokens per vector load and sums over channels without
    horizontal sums. One table per format, head_dim and device, which every layer's arena shares."""
    P, m, size = fmt.payload_bytes(head_dim), fmt.meta_count(head_dim), fmt.meta_dtype.itemsize
    lane = torch.arange(TILE)[:, None]  # [TILE, 1]
    payload = torch.arange(2 * P) * TILE + lane  # [TILE, 2P]
    meta_byte = torch.arange(2 * m * size)
    meta = 2 * P * TILE + (meta_byte // size * TILE + lane) * size + meta_byte % size  # [TILE, 2 m size]
    return torch.cat([payload, meta], dim=-1).to(device)


def lanes_to_slots(x: Tensor) -> Tensor:
    """Tiles [B, Hkv, n, *F, TILE] -> one slot per row [B, Hkv, n * TILE, *F] (a copy)."""
    return x.movedim(-1, 3).flatten(2, 3)


@dataclass
class SlotGeometry:
    """One arena of `arena_tokens` full-precision tokens, read as Original slots from the front and
    as `quantized_slots` Quantized slots; a layer's split between them comes from its Original share."""
    arena_tokens: int
    window: int
    bytes_original: int
    bytes_quantized: int

    @classmethod
    def for_format(cls, arena_tokens: int, window: int, kv_quant: str, head_dim: int, dtype: torch.dtype) -> SlotGeometry:
        """The geometry of an arena holding Original K/V in `dtype` and Quantized K/V in `kv_quant`."""
        fmt = FORMATS[kv_quant]
        if head_dim % (2 * Int4.group if fmt is Int4 else 2):
            raise ValueError(f"--kv-quant {kv_quant}: head_dim {head_dim} is not supported")
        return cls(arena_tokens, window, bytes_per_token(fmt, head_dim, dtype), bytes_per_token(fmt, head_dim, None))

    @property
    def arena_bytes(self) -> int:
        return self.arena_tokens * self.bytes_original

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

    @property
    def allocated_bytes(self) -> int:
        """Bytes an `Arena` allocates per batch row and KV head: the arena, plus an int64 position
        and three float32 statistics per Original and per Quantized slot."""
        return self.arena_bytes + (self.arena_tokens + self.quantized_slots) * (8 + 3 * 4)

    def capacities(self, rho: float) -> tuple[int, int]:
        """C_o = W + round(rho (N - W)); C_q = the slots of the tiles wholly behind the Original
        region, so C_o * bytes_original + C_q * bytes_quantized <= N * bytes_original."""
        c_o = self.window + round(rho * (self.arena_tokens - self.window))
        overlap = max(c_o * self.bytes_original - self.tiles_offset, 0)  # bytes of the tiles Original slots reach into
        c_q = self.quantized_slots - math.ceil(overlap / self.tile_bytes) * TILE
        return c_o, c_q

    def max_original_upgrades(self, seq_len: int) -> int:
        """The most tokens beyond the window that can be Original while the arena holds as many of
        the seq_len tokens as it can (all, where it can). Every count is tried: Original slots that
        end inside the bytes before the first tile, or an arena too small for a tile, hold more
        tokens with more Original slots."""
        span = self.arena_tokens - self.window
        held = [min(sum(self.capacities(extra / span)), seq_len) for extra in range(span + 1)]
        return max(extra for extra, tokens in enumerate(held) if tokens == max(held))


class Arena(nn.Module):
    """One layer's storage of Original and Quantized tokens in `geometry.arena_bytes` bytes per
    (batch row, KV head), with per slot the token's position (-1: empty) and three float32
    statistics (`o_stats`, `q_stats`), which the method alone reads. Each batch row has its own
    split: Original slots [0, o_capacity), Quantized slots [q_first, M).

    Reads go through typed views: [B, Hkv, N, 2, D] Original K/V, and per tile of Quantized slots
    its payload [B, Hkv, M / TILE, 2, P, TILE] and float metadata [B, Hkv, M / TILE, 2, m, TILE].
    Writes go through the flat bytes (`byte_index`): a CPU scatter through a float16 or bfloat16
    view rewrites (and NaN-normalises) the whole tensor, which would corrupt the bytes that the
    other region reads as a different type."""

    def __init__(self, geometry: SlotGeometry, fmt, quantizes: bool, batch_size: int, n_kv_heads: int,
                 head_dim: int, dtype: torch.dtype):
        """`fmt`: the Quantized format (`FORMATS`); `quantizes`: False for a method that never holds
        Quantized tokens (its arena is all Original slots); `dtype`: the Original K/V dtype."""
        super().__init__()
        self.slots, self.fmt, self.quantizes = geometry, fmt, quantizes
        self.head_dim, self.dtype = head_dim, dtype
        B, N, M = batch_size, geometry.arena_tokens, geometry.quantized_slots
        self.register_buffer("arena", torch.zeros(B, n_kv_heads, geometry.arena_bytes, dtype=torch.uint8), persistent=False)
        self.register_buffer("o_pos", torch.full((B, n_kv_heads, N), -1), persistent=False)
        self.register_buffer("q_pos", torch.full((B, n_kv_heads, M), -1), persistent=False)
        self.register_buffer("o_stats", torch.zeros(B, n_kv_heads, N, 3), persistent=False)
        self.register_buffer("q_stats", torch.zeros(B, n_kv_heads, M, 3), persistent=False)
        self.register_buffer("o_capacity", torch.full((B,), N), persistent=False)  # per row: Original slots usable
        self.register_buffer("q_first", torch.full((B,), M), persistent=False)  # per row: first Quantized slot
        self.register_buffer("tile_index", tile_layout(fmt, head_dim, self.q_first.device), persistent=False)

    @property
    def has_quantized(self) -> bool:
        return self.slots.quantized_slots > 0 and self.quantizes

    # -- views --------------------------------------------------------------------------------
    def original_bytes(self) -> Tensor:
        B, Hkv, _ = self.arena.shape
        return self.arena.view(B, Hkv, self.slots.arena_tokens, self.slots.bytes_original)

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

    def attention_views(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """What decode attention reads: Original K/V [B, Hkv, N, 2, D] and positions [B, Hkv, N],
        the tiles' payload and metadata (`tile_views`) and the positions of their slots."""
        payload, meta = self.tile_views(empty=not self.has_quantized)
        return self.original_view(), self.o_pos, payload, meta, self.q_pos[..., :payload.shape[2] * TILE]

    def quantized_views(self, empty: bool = False) -> tuple[Tensor, Tensor]:
        """Copies, one slot per row: payload [B, Hkv, M, 2, P] and metadata [B, Hkv, M, 2, m]."""
        return tuple(lanes_to_slots(view) for view in self.tile_views(empty))

    def quantized_bytes(self) -> Tensor:
        """A copy of every Quantized slot's bytes, one slot per row: [B, Hkv, M, bytes_quantized]."""
        B, Hkv, _ = self.arena.shape
        slots = torch.arange(self.slots.quantized_slots, device=self.arena.device).expand(B, Hkv, -1)
        return self.arena.view(-1)[self.byte_index(slots, quantized=True)]

    def held_tokens(self) -> tuple[Tensor, Tensor]:
        """Every slot's K/V in float32 (Quantized ones dequantized, empty ones 0) and position
        (-1: empty): [B, Hkv, N + M, 2, D] and [B, Hkv, N + M]; M = 0 without a Quantized region."""
        payload, meta = self.quantized_views(empty=not self.has_quantized)
        kv = torch.cat([self.original_view().float(), self.fmt.dequantize(payload, meta)], dim=2)
        pos = torch.cat([self.o_pos, self.q_pos[..., :payload.shape[2]]], dim=-1)
        return torch.where(pos[..., None, None] >= 0, kv, 0.0), pos

    def held_and_chunk(self, k: Tensor, v: Tensor, chunk_pos: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The held tokens and a prefill chunk k, v [B, Hkv, S, D] at chunk_pos [B, Hkv, S], sorted by
        position (a row holding fewer than another ends with empty ones, -1): keys and values
        [B, Hkv, T, D] float32, positions [B, Hkv, T], and `order` [B, Hkv, T], their indices into
        the held slots followed by the chunk."""
        held_kv, held_pos = self.held_tokens()  # [B, Hkv, N + M, 2, D], [B, Hkv, N + M]
        unsorted_pos = torch.cat([held_pos, chunk_pos], dim=-1)  # [B, Hkv, N + M + S]
        order = unsorted_pos.masked_fill(unsorted_pos < 0, torch.iinfo(unsorted_pos.dtype).max).argsort(dim=-1)
        order = order[..., :int((unsorted_pos >= 0).sum(-1).max())]  # [B, Hkv, T]: live ones, by position
        kv = gather_rows(torch.cat([held_kv, torch.stack([k, v], dim=3).float()], dim=2), order)  # [B, Hkv, T, 2, D]
        keys, values = kv.unbind(3)
        return keys, values, unsorted_pos.gather(2, order), order

    def counts(self, row: int) -> tuple[int, int]:
        """(Original, Quantized) tokens held by one batch row, counted from the stored positions."""
        return int((self.o_pos[row] >= 0).sum()), int((self.q_pos[row] >= 0).sum())

    def nbytes(self) -> int:
        """Bytes of K/V storage allocated (the arena)."""
        return self.arena.nbytes

    # -- bytes of slots -------------------------------------------------------------------------
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

    def write_quantized(self, slots: Tensor, slot_bytes: Tensor):
        """Quantized slots [B, Hkv, n] <- their bytes [B, Hkv, n, bytes_quantized]."""
        self.arena.view(-1)[self.byte_index(slots, quantized=True).flatten()] = slot_bytes.flatten()

    def original_slot_bytes(self, kv: Tensor) -> Tensor:
        """kv [B, Hkv, n, 2, D] -> its bytes in the cache dtype [B, Hkv, n, bytes_original]."""
        return as_bytes(kv.to(self.dtype)).flatten(-2)

    def quantized_slot_bytes(self, kv: Tensor) -> Tensor:
        """kv [B, Hkv, n, 2, D] -> quantized once: payload then metadata bytes [B, Hkv, n, bytes_quantized]."""
        payload, meta = self.fmt.quantize(kv)
        return cat_bytes([payload.flatten(-2), as_bytes(meta).flatten(-2)])

    def candidate_bytes(self, k: Tensor, v: Tensor, order: Tensor | None, memo: dict) -> tuple[Tensor, Tensor | None, Tensor]:
        """The bytes of every candidate of an assignment, as an Original slot and as a Quantized slot
        (None without a Quantized region), and whether it is held Quantized already (it then keeps
        its bytes and can never become Original again). The candidates are the held slots and a
        prefill chunk k, v [B, Hkv, S, D], in `order` [B, Hkv, T] of their concatenation (None: the
        chunk alone, in order). -> [B, Hkv, T, bytes_original], [B, Hkv, T, bytes_quantized], [B, Hkv, T]."""
        as_original, as_quantized = self.chunk_bytes(k, v, memo)
        if order is None:
            return as_original, as_quantized, torch.zeros(k.shape[:3], dtype=torch.bool, device=k.device)
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

    def chunk_bytes(self, k: Tensor, v: Tensor, memo: dict) -> tuple[Tensor, Tensor | None]:
        """A prefill chunk's K/V as Original slot bytes and as Quantized slot bytes (None without a
        Quantized region). Kept in `memo` per (dtype, format): one recorded prefill is compressed
        by many caches (eval.py), and its tokens' bytes are the same for all of them."""
        key = (self.dtype, self.fmt if self.has_quantized else None)
        if key not in memo:
            chunk_kv = torch.stack([k, v], dim=3)  # [B, Hkv, S, 2, D]
            as_quantized = self.quantized_slot_bytes(chunk_kv) if self.has_quantized else None
            memo[key] = self.original_slot_bytes(chunk_kv), as_quantized
        return memo[key]

    # -- writes ---------------------------------------------------------------------------------
    def fill(self, pos: Tensor, stats: Tensor, original: tuple[Tensor, Tensor, Tensor],
             quantized: tuple[Tensor, Tensor, Tensor | None], c_o: int, c_q: int):
        """Hold a selection of candidates (positions pos [B, Hkv, T], statistics [B, Hkv, T, 3]) and
        nothing else: `original` = (chosen [B, Hkv, n_o] indices in position order, live [B, Hkv, n_o],
        candidate bytes [B, Hkv, T, bytes_original]) into Original slots [0, n_o); `quantized` the same
        into the Quantized slots from q_first = M - c_q on. A selection entry that is not live is an
        empty slot (-1). Every row's capacities become (c_o, c_q)."""
        (o_sel, o_live, as_original), (q_sel, q_live, as_quantized) = original, quantized
        self.o_pos.fill_(-1)
        self.q_pos.fill_(-1)
        self.o_stats.zero_()
        self.q_stats.zero_()
        n_o, n_q = o_sel.shape[-1], q_sel.shape[-1]
        self.original_bytes()[:, :, :n_o] = gather_rows(as_original, o_sel)
        self.o_pos[..., :n_o] = pos.gather(2, o_sel).masked_fill(~o_live, -1)
        self.o_stats[:, :, :n_o] = gather_rows(stats, o_sel)
        q_first = self.slots.quantized_slots - c_q
        if n_q and as_quantized is not None:
            targets = torch.arange(q_first, q_first + n_q, device=q_sel.device).expand_as(q_sel)  # [B, Hkv, n_q]
            self.write_quantized(targets, gather_rows(as_quantized, q_sel))
            self.q_pos[..., q_first:q_first + n_q] = pos.gather(2, q_sel).masked_fill(~q_live, -1)
            self.q_stats[:, :, q_first:q_first + n_q] = gather_rows(stats, q_sel)
        self.o_capacity.fill_(c_o)
        self.q_first.fill_(q_first)

    def replace(self, victim: Tensor, new_kv: Tensor, input_pos: Tensor, fresh_stats: Tensor,
                target: Tensor | None = None, demote: Tensor | None = None):
        """One decode step's write: the new token (new_kv [B, Hkv, 1, 2, D] at input_pos [B or 1, 1, 1],
        statistics fresh_stats [B, Hkv, 1, 3]) takes Original slot `victim` [B, Hkv, 1]. Where
        `demote` [B, Hkv, 1] and the victim slot held a token, that token is quantized into
        Quantized slot `target` [B, Hkv, 1] with its statistics, over whatever was there."""
        victim_pos = self.o_pos.gather(2, victim)  # [B, Hkv, 1]
        o_index = self.byte_index(victim, quantized=False).flatten(2)  # [B, Hkv, bytes_original]
        o_bytes = self.original_slot_bytes(new_kv).flatten(2)  # [B, Hkv, bytes_original]
        index, value = [o_index], [o_bytes]
        if target is not None:
            demote = demote & (victim_pos >= 0)
            victim_stats = gather_rows(self.o_stats, victim)  # [B, Hkv, 1, 3]
            victim_kv = gather_rows(self.original_view(), victim)  # [B, Hkv, 1, 2, D]
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
        scatter_slots(self.o_stats, victim, fresh_stats)

    def load_rows(self, rows: list["Arena"]):
        """Row b of this (larger or equal) arena <- the one-row arena rows[b]. Every row keeps its
        decisions: Original slots keep their indices, the Quantized region keeps its order at the
        end of the larger arena (slot j -> j + M - M_b), and each row keeps its capacities."""
        M, size_o, size_q = self.slots.quantized_slots, self.slots.bytes_original, self.slots.bytes_quantized
        for b, row in enumerate(rows):
            shift = M - row.slots.quantized_slots
            n_o, q_first = int(row.o_capacity[0]), int(row.q_first[0])
            self.arena[b, :, :n_o * size_o] = row.arena[0, :, :n_o * size_o]  # the live bytes of both regions
            held = (row.slots.quantized_slots - q_first) * size_q  # bytes of its usable tiles, at the arena's end
            self.arena[b, :, self.slots.arena_bytes - held:] = row.arena[0, :, row.slots.arena_bytes - held:]
            self.o_pos[b, :, :row.o_pos.shape[-1]], self.o_stats[b, :, :row.o_pos.shape[-1]] = row.o_pos[0], row.o_stats[0]
            self.q_pos[b, :, shift:], self.q_stats[b, :, shift:] = row.q_pos[0], row.q_stats[0]
            self.o_capacity[b], self.q_first[b] = n_o, q_first + shift


# Byte helpers: what lets the compiled decode step write only the bytes it changes, inside the
# kernels that compute them.
INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def as_bytes(x: Tensor) -> Tensor:
    """x [..., n] -> its bytes in memory order [..., n * itemsize] uint8: `x.view(torch.uint8)`, and
    compiled the same bytes from a same-size integer view and shifts, which the compiler fuses into
    the step's kernels (a view that changes the item size is an extern call and a kernel boundary)."""
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
    each part written into its slice by the kernel that computes it."""
    if not torch.compiler.is_compiling():
        return torch.cat(parts, dim=-1)
    return torch.cat([part.to(torch.int16) for part in parts], dim=-1).to(torch.uint8)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x [B, Hkv, T, ...] at index [B, Hkv, n] along dim 2 -> [B, Hkv, n, ...]. Whole rows taken by
    one index into x's rows, a copy of each (`Tensor.gather` with an expanded index would compute
    every element's address)."""
    B, Hkv, T = x.shape[:3]
    rows = x.reshape(B * Hkv * T, -1)  # [B * Hkv * T, ...flattened]
    row = index + T * torch.arange(B * Hkv, device=index.device).view(B, Hkv, 1)  # [B, Hkv, n]
    return rows[row.flatten()].view(*index.shape, *x.shape[3:])


def scatter_slots(x: Tensor, slot: Tensor, value: Tensor):
    """Write value [B, Hkv, 1, ...] into x [B, Hkv, S, ...] at slot [B, Hkv, 1], in place. An
    index_put on x's rows: compiled, it writes those rows only, where `scatter_` copies x whole
    twice."""
    B, Hkv, S = x.shape[:3]
    rows = x.view(B * Hkv * S, -1)  # [B * Hkv * S, ...flattened]
    row = slot + S * torch.arange(B * Hkv, device=slot.device).view(B, Hkv, 1)  # [B, Hkv, 1]
    rows[row.flatten()] = value.reshape(B * Hkv, -1).to(x.dtype)

