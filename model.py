"""A single-file Llama 3 / Qwen3 / SmolLM2 decoder in the gpt-fast mould.

Read order: `ModelArgs` (every architectural switch, from `config.json`), `KVCache` (the cache
interface and its full-precision implementation), `Transformer`, its blocks, then the math helpers
(RMSNorm, RoPE tables). The model knows a cache only through `KVCache.forward(q, k, v, input_pos)`,
which stores the new keys/values and returns the attention output; `arkv.py` plugs in another cache
through `Transformer.setup_caches(..., cache_factory=...)` without touching anything here.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from decode_kernels import decode_attention
from quantize import Int4Linear, Int8Linear, decode_rows, matvec

SUPPORTED_ROPE_TYPES = ("default", "llama3")
WEIGHT_QUANT = ("none", "int8", "int4")


@dataclass
class ModelArgs:
    dim: int
    n_layer: int
    n_head: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    norm_eps: float = 1e-5
    qk_norm: bool = False
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    weight_quant: str = "none"  # "int8" / "int4": weight-only projections (quantize.py; convert.py --quantize)
    name: str = field(default="", compare=False)

    def __post_init__(self):
        if self.n_head % self.n_kv_heads:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_heads {self.n_kv_heads}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if self.weight_quant not in WEIGHT_QUANT:
            raise ValueError(f"unsupported weight_quant {self.weight_quant!r}; supported: {', '.join(WEIGHT_QUANT)}")

    @classmethod
    def from_hf_config(cls, config: dict, name: str = "") -> "ModelArgs":
        """Derive the arguments from a Hugging Face `config.json` (Llama or Qwen3).

        Accepts both the classic form (top-level `rope_theta` / `rope_scaling`) and the
        transformers 5.x form (`rope_parameters`)."""
        model_type = config.get("model_type")
        if model_type not in ("llama", "qwen3"):
            raise ValueError(f"unsupported model_type {model_type!r}; supported: llama, qwen3")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise ValueError("attention or MLP biases are not supported")
        layer_types = config.get("layer_types") or []
        if config.get("use_sliding_window") or "sliding_attention" in layer_types:
            raise ValueError("sliding-window attention layers are not supported")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {config['hidden_act']!r}; expected silu")
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        rope_scaling = None if rope_type == "default" else {"rope_type": rope_type, **rope}
        n_head = config["num_attention_heads"]
        return cls(
            dim=config["hidden_size"],
            n_layer=config["num_hidden_layers"],
            n_head=n_head,
            n_kv_heads=config.get("num_key_value_heads") or n_head,
            head_dim=config.get("head_dim") or config["hidden_size"] // n_head,
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            norm_eps=config.get("rms_norm_eps", 1e-6),
            qk_norm=model_type == "qwen3",
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_seq_len=config.get("max_position_embeddings", 2048),
            name=name,
        )

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache(nn.Module):
    """The cache interface, implemented with full precision: one static buffer per layer.

    `forward(q, k, v, input_pos)` writes `k, v` at their absolute positions and returns the
    attention output. Shapes: q [B, n_head, S, D]; k, v [B, n_kv_heads, S, D]; input_pos [S], or
    [B, 1] in a decode step whose rows sit at different positions (a batch of prompts of different
    lengths). A call with S > 1 is a prefill: of a new sequence when input_pos starts at 0, else a
    chunk of the prompt that also attends to the tokens before it; S == 1 is one decode step. Any
    other cache (see arkv.py) offers the same call. K/V are stored in the buffers' dtype (a 16-bit
    cache beside a float32 model: `--kv-dtype`) and attended in the query's."""

    def __init__(self, batch_size: int, n_kv_heads: int, head_dim: int, max_seq_len: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("slot_pos", torch.arange(max_seq_len), persistent=False)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor) -> Tensor:
        if input_pos.dim() == 2:  # one decode step, a position per row
            rows = torch.arange(k.shape[0], device=k.device)
            self.k_cache[rows, :, input_pos[:, 0]] = k[:, :, 0].to(self.k_cache.dtype)  # [B, Hkv, D] per row
            self.v_cache[rows, :, input_pos[:, 0]] = v[:, :, 0].to(self.v_cache.dtype)
            valid = (self.slot_pos <= input_pos)[:, None]  # [B, 1, T]: slots written so far in each row
            return decode_attention(q, self.k_cache, self.v_cache, valid)[0]
        self.k_cache.index_copy_(2, input_pos, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, input_pos, v.to(self.v_cache.dtype))
        if q.shape[2] > 1 and int(input_pos[0]) == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if q.shape[2] > 1:  # a later prompt chunk: causal over every slot written so far
            visible = self.slot_pos <= input_pos[:, None]  # [S, T]
            return F.scaled_dot_product_attention(q, self.k_cache.to(q.dtype), self.v_cache.to(q.dtype),
                                                  attn_mask=visible, enable_gqa=True)
        valid = self.slot_pos <= input_pos  # [T]: slots written so far (slot index == position)
        return decode_attention(q, self.k_cache, self.v_cache, valid)[0]

    @classmethod
    def stack(cls, rows: list["KVCache"]) -> "KVCache":
        """One cache whose row b holds rows[b] (each a one-row cache of the same length)."""
        first = rows[0].k_cache
        cache = cls(len(rows), first.shape[1], first.shape[3], first.shape[2], first.dtype).to(first.device)
        for b, row in enumerate(rows):
            cache.k_cache[b], cache.v_cache[b] = row.k_cache[0], row.v_cache[0]
        return cache

    def nbytes(self) -> int:
        """Bytes held by the K/V buffers."""
        return self.k_cache.nbytes + self.v_cache.nbytes


CacheFactory = Callable[[int, ModelArgs, int, int, torch.dtype], nn.Module]


def full_cache(layer: int, args: ModelArgs, batch_size: int, max_seq_len: int, dtype: torch.dtype) -> KVCache:
    return KVCache(batch_size, args.n_kv_heads, args.head_dim, max_seq_len, dtype)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = linear(args.dim, args.vocab_size, args)
        if args.tie_embeddings and args.weight_quant == "none":  # quantized, the output keeps its own int8 copy
            self.output.weight = self.tok_embeddings.weight
        self.max_seq_len = -1

    def setup_caches(self, batch_size: int, max_seq_len: int, cache_factory: CacheFactory = full_cache,
                     kv_dtype: torch.dtype | None = None):
        """Allocate every layer's cache for sequences of up to `max_seq_len` tokens, K/V stored in
        `kv_dtype` (default: the model's dtype), and the RoPE table for the whole model context (one
        shape for every prompt, so nothing recompiles)."""
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model context {self.args.max_seq_len}")
        weight = self.tok_embeddings.weight  # the model's device and dtype (never quantized)
        with torch.device(weight.device):
            for i, layer in enumerate(self.layers):
                layer.attention.kv_cache = cache_factory(i, self.args, batch_size, max_seq_len, kv_dtype or weight.dtype)
            cos, sin = rope_table(self.args, self.args.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.max_seq_len = max_seq_len

    def forward(self, idx: Tensor, input_pos: Tensor, last_only: bool = False) -> Tensor:
        """idx [B, S] token ids at absolute positions input_pos [S] (or [B, 1]: a decode step with a
        position per row) -> logits [B, S or 1, vocab]."""
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # [S, D/2] or [B, 1, D/2]
        x = self.tok_embeddings(idx)  # [B, S, dim]
        for layer in self.layers:
            x = layer(x, input_pos, cos, sin)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x)).float()

    def cache_nbytes(self) -> int:
        return sum(layer.attention.kv_cache.nbytes() for layer in self.layers)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attention(RMSNorm(x)), then h + SwiGLU(RMSNorm(h))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    @torch.compiler.nested_compile_region
    def forward(self, x: Tensor, input_pos: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), input_pos, cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Attention(nn.Module):
    """Grouped-query attention; query head h reads KV head h // (n_head // n_kv_heads)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv_heads, self.head_dim = args.n_head, args.n_kv_heads, args.head_dim
        self.wqkv = linear(args.dim, (args.n_head + 2 * args.n_kv_heads) * args.head_dim, args)
        self.wo = linear(args.n_head * args.head_dim, args.dim, args)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else None
        self.kv_cache: nn.Module | None = None

    def forward(self, x: Tensor, input_pos: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, S, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, S, self.n_head, self.head_dim)  # [B, S, H, D]
        k = k.view(B, S, self.n_kv_heads, self.head_dim)  # [B, S, Hkv, D]
        v = v.view(B, S, self.n_kv_heads, self.head_dim)  # [B, S, Hkv, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, S, D]
        y = self.kv_cache(q, k, v, input_pos)  # [B, H, S, D]
        y = y.transpose(1, 2).reshape(B, S, q_size)  # [B, S, H * D]
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = linear(args.dim, args.intermediate_size, args)
        self.w3 = linear(args.dim, args.intermediate_size, args)
        self.w2 = linear(args.intermediate_size, args.dim, args)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def linear(in_features: int, out_features: int, args: ModelArgs) -> nn.Module:
    """A bias-free projection: `Linear`, or `Int8Linear` / `Int4Linear` in a quantized checkpoint."""
    if args.weight_quant == "int8":
        return Int8Linear(in_features, out_features)
    if args.weight_quant == "int4":
        return Int4Linear(in_features, out_features)
    return Linear(in_features, out_features)


class Linear(nn.Linear):
    """nn.Linear without bias; in a compiled CPU decode step, `matvec`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return matvec(x, self.weight) if decode_rows(x) else F.linear(x, self.weight)


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 (as in transformers' LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_frequencies(args: ModelArgs) -> Tensor:
    """Inverse frequencies theta^(-2i/D), with the "llama3" rescaling when configured.

    llama3 (Meta's Llama 3.1 reference, transformers `_compute_llama3_parameters`): wavelengths
    shorter than old_context / high_freq_factor keep their frequency, longer than
    old_context / low_freq_factor are divided by `factor`, and those in between interpolate with
    s = (old_context / wavelength - low) / (high - low): f = (1 - s) f / factor + s f."""
    inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.int64).float() / args.head_dim)
    if not args.rope_scaling:
        return inv_freq
    scaling = args.rope_scaling
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
    return torch.where(medium, smoothed, scaled)


def rope_table(args: ModelArgs, max_seq_len: int) -> tuple[Tensor, Tensor]:
    """cos and sin of position * frequency, each [max_seq_len, head_dim / 2], in float32."""
    angles = torch.outer(torch.arange(max_seq_len).float(), rope_frequencies(args))  # [T, D/2]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (the layout of Hugging Face checkpoints) on x [B, S, heads, D], with cos
    and sin [S, D/2] (shared positions) or [B, S, D/2] (a position per row).

    With x = (x1, x2) halves: (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # [B, S, heads, D/2] each
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [(B,) S, 1, D/2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
