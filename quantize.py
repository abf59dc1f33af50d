"""Weight-only int8 and int4 projections (as gpt-fast's quantize.py): the quantizers that
`convert.py --quantize` applies to a checkpoint's projection weights, and the layers that multiply
by the stored codes (`model.linear` picks them from `ModelArgs.weight_quant`).

    int8: per output channel (row), symmetric:     W ~ W_q s[:, None],  W_q in [-127, 127]
    int4: per group of 32 input channels, affine:  W ~ q s + z,         q in [0, 15], two per byte

Embeddings and norms stay float. A decode step reads a quarter (int8) or about an eighth (int4) of
float32's weight bytes; compiled on the CPU it streams the codes through `matvec` / `int4_matvec`,
which convert them as they are read.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

INT4_GROUP = 32  # input channels per int4 scale and zero


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output channel (row): s = max|w| / 127 (1 for a zero row),
    W_q = round(W / s) in [-127, 127], so |W - W_q s| <= s / 2 elementwise.
    weight [out, in] -> (W_q int8 [out, in], s float32 [out])."""
    w = weight.float()
    scales = w.abs().amax(dim=1) / 127
    scales = torch.where(scales > 0, scales, 1.0)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def quantize_int4(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric int4 per group of 32 input channels (`Int4Linear`, gpt-fast's int4): with lo, hi
    a group's minimum and maximum, z = lo, s = (hi - lo) / 15 (1 for a constant group), codes
    q = round((w - z) / s) in [0, 15], so |W - (q s + z)| <= s / 2 elementwise. An input size that is
    not a multiple of 32 is padded with zero columns. Byte j of a group holds channel j in its low
    nibble and channel j + 16 in its high one.
    weight [out, in] -> (codes uint8 [out, in_padded / 2], s, z float32 [out, in_padded / 32])."""
    group = INT4_GROUP
    w = F.pad(weight.float(), (0, -weight.shape[1] % group))
    groups = w.unflatten(1, (-1, group))  # [out, in / g, g]
    lo, hi = groups.amin(-1), groups.amax(-1)  # [out, in / g]
    scales = torch.where(hi > lo, (hi - lo) / 15, 1.0)
    codes = torch.round((groups - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)  # [out, in / g, g]
    return (codes[..., :group // 2] | codes[..., group // 2:] << 4).flatten(1), scales, lo


def quantize_state(state: dict[str, Tensor], names: list[str], weight_quant: str) -> dict[str, Tensor]:
    """`state` with each projection weight [out, in] named in `names` replaced by its int8 codes and
    `<prefix>.scales` ("int8"), or its packed int4 codes, `<prefix>.scales` and `<prefix>.zeros`
    ("int4"), as `Int8Linear` / `Int4Linear` load them; every other tensor as it is."""
    state = dict(state)
    for name in names:
        prefix = name.removesuffix("weight")
        if weight_quant == "int8":
            state[name], state[prefix + "scales"] = quantize_int8(state[name])
        else:
            state[name], state[prefix + "scales"], state[prefix + "zeros"] = quantize_int4(state[name])
    return state


class Int8Linear(nn.Module):
    """Weight-only int8, per output channel: W ~ W_q s[:, None] with W_q int8 [out, in] and
    s float32 [out], so y = (x W_q^T) s. Compiled on the CPU, a decode step runs `matvec`, which
    converts each int8 weight as it streams past; else the weight is cast to x's dtype first (which
    the compiler fuses on CUDA)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features))

    def forward(self, x: Tensor) -> Tensor:
        product = matvec(x, self.weight) if decode_rows(x) else F.linear(x, self.weight.to(x.dtype))
        return product * self.scales.to(x.dtype)


class Int4Linear(nn.Module):
    """Weight-only int4, asymmetric per group of 32 input channels: W ~ q s + z with codes q in
    [0, 15], two per byte (byte j of a group: channel j low, j + 16 high, as ARKV's int4 K/V are packed),
    s and z float32 [out, in / 32]; an input size that is not a multiple of 32 is padded with zero
    columns (`quantize_int4`). Compiled on the CPU, a decode step runs `int4_matvec`, which unpacks
    each byte as it streams past; else the weight is dequantized to x's dtype first."""
    group = INT4_GROUP

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        padded = -(-in_features // self.group) * self.group
        self.in_features = in_features
        self.register_buffer("weight", torch.empty(out_features, padded // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out_features, padded // self.group))
        self.register_buffer("zeros", torch.empty(out_features, padded // self.group))

    def forward(self, x: Tensor) -> Tensor:
        padding = 2 * self.weight.shape[1] - self.in_features
        if padding:
            x = F.pad(x, (0, padding))  # [..., in padded]
        if decode_rows(x):
            return int4_matvec(x, self.weight, self.scales, self.zeros)
        return F.linear(x, self.dequantized().to(x.dtype))

    def dequantized(self) -> Tensor:
        """q s + z as float32 [out, in padded]."""
        pairs = self.weight.unflatten(-1, (-1, self.group // 2))  # [out, in / g, g/2]
        codes = torch.cat([pairs & 15, pairs >> 4], dim=-1).float()  # [out, in / g, g]
        return (codes * self.scales[..., None] + self.zeros[..., None]).flatten(1)


def decode_rows(x: Tensor) -> bool:
    """A compiled CPU step over a few rows of x [..., in] (a decode step of up to 16 sequences)."""
    return torch.compiler.is_compiling() and x.device.type == "cpu" and x.shape[:-1].numel() <= 16


def matvec(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., in] . weight [out, in] -> [..., out] as a product summed over `in`: compiled, one fused
    loop that streams the weight (converted to x's dtype as it is read) at about the machine's read
    bandwidth, where the matmul library's matrix-vector product for one row falls well short of it."""
    return (x[..., None, :] * weight.to(x.dtype)).sum(-1)  # [..., out, in] summed over in


def int4_matvec(x: Tensor, weight: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """x [..., in] . (q s + z)^T -> [..., out], `Int4Linear`'s packing, as a product summed over the
    input channels (`matvec`): each byte unpacked and scaled as it is read, one fused loop.
    weight [out, in/2] uint8; scales, zeros [out, in/32]."""
    half = INT4_GROUP // 2
    xg = x.unflatten(-1, (-1, 2, half))[..., None, :, :, :]  # [..., 1, in/g, 2, g/2]: low, then high channels
    pairs = weight.unflatten(-1, (-1, half))  # [out, in/g, g/2]
    low = (pairs & 15).to(x.dtype) * scales[..., None] + zeros[..., None]  # [out, in/g, g/2]
    high = (pairs >> 4).to(x.dtype) * scales[..., None] + zeros[..., None]
    return (xg[..., 0, :] * low + xg[..., 1, :] * high).sum((-2, -1))  # [..., out, in/g, g/2] summed
