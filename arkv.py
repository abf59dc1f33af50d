"""ARKV (Lei & Ilager, arXiv 2603.08727, 2026): a tri-state KV cache (Original / Quantized /
Evicted) under a real memory budget. The paper's steps, in file order:

1. Per-layer Original share from the prefill statistics: `window_probabilities` (attention of the
   last W queries), `layer_moments` (entropy H, variance V, kurtosis K), `oq_score`
   (q_l = H^(1/tau1) V^(1/tau2) K^(1/tau3)), `ARKVRule.original_shares` (rho_l = q_l / max_j q_j).
2. Token importance: `token_statistics` (mean + gamma * variance over the window queries, pooled,
   GQA-averaged) ranks the prefill tokens (`ARKVRule.prefill_key`); while decoding, a slot competes
   with `ARKVRule.slot_score` of the running statistics that `ARKVRule.update` keeps.
3. Tri-state tailoring and mixed-precision attention: `ARKVCache.assign` (after prefill),
   `ARKVCache.place` (each decode step: demote or evict one token), `ARKVCache.attend`
   (`decode_kernels.mixed_precision_attention`). `ARKV.compress` runs steps 1-3 on every layer.

Baselines (`EvictRule`, `QuantRule`, `StreamingRule`, `H2ORule`) share the cache and its bytes; how
tokens are stored (formats, byte arena, capacities) is `kv_arena.py`'s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import decode_kernels
from decode_kernels import mixed_precision_attention, tristate_attention
from kv_arena import FORMATS, Arena, SlotGeometry, gather_rows
from model import ModelArgs

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
        for flag, value, choices in [("--method", self.method, METHODS), ("--oq-policy", self.oq_policy, OQ_POLICIES),
                                     ("--kv-quant", self.kv_quant, FORMATS), ("--attention", self.attention, ATTENTION)]:
            if value not in choices:
                raise ValueError(f"{flag} {value}: expected one of {', '.join(choices)}")
        for broken, message in [
            (self.attention == "triton" and not decode_kernels.available(),
             "--attention triton: Triton is not installed (pip install triton)"),
            (self.window < 1, f"--window {self.window}: expected an integer >= 1"),
            (self.kv_budget < self.window, f"--kv-budget {self.kv_budget} is smaller than the window {self.window}"),
            (self.method == "streaming" and self.kv_budget < self.window + self.sinks,
             f"--kv-budget {self.kv_budget}: streaming needs window + {self.sinks} sink tokens"),
            (self.pool_kernel < 1 or self.pool_kernel % 2 == 0, f"--pool-kernel {self.pool_kernel}: expected an odd integer >= 1"),
            (self.gamma < 0 or min(self.tau) <= 0, "--gamma must be >= 0 and every --tau > 0")]:
            if broken:
                raise ValueError(message)


# Prefill statistics from the last W queries (never the full T x T attention).


def window_probabilities(q: Tensor, keys: Tensor, query_pos: Tensor, key_pos: Tensor) -> Tensor:
    """Attention probabilities of the window queries over candidate keys, causal by position:
    q [B, H, W, D] (the last W queries) at positions query_pos [W]; keys [B, Hkv, T, D] at
    key_pos [B, Hkv, T] (-1: no token) -> [B, Hkv, G, W, T] (float32)."""
    B, H, W, D = q.shape
    n_kv_heads = keys.shape[1]
    q_win = q.reshape(B, n_kv_heads, H // n_kv_heads * W, D)  # [B, Hkv, G * W, D]
    scores = (q_win.float() @ keys.float().transpose(-1, -2)).unflatten(2, (-1, W)) * D**-0.5  # [B, Hkv, G, W, T]
    hidden = (key_pos[:, :, None, :] > query_pos[:, None]) | (key_pos[:, :, None, :] < 0)  # [B, Hkv, W, T]
    return torch.softmax(scores.masked_fill(hidden[:, :, None], -torch.inf), dim=-1)


def layer_moments(probs: Tensor, before_window: Tensor) -> tuple[float, ...]:
    """Entropy H, variance V and Pearson kurtosis K of the window's attention over the keys before it
    (`before_window` [B, Hkv, T], paper 3.1) as float64 (sum, count) pairs (sum H, rows, sum V, keys,
    sum K, live keys), which tensor-parallel ranks add up (`ARKV.reduce`); `statistic_means` makes
    them means. Kurtosis is mean(z^4), z the standardised attention (raw fourth powers underflow)."""
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
    window queries, averaged over the GQA group, average-pooled along the sequence (kernel 5).
    probs [B, Hkv, G, W, T] -> (mean, variance, pooled score), each [B, Hkv, T]."""
    mean_over_window = probs.mean(dim=-2, keepdim=True)  # [B, Hkv, G, 1, T]
    variance = (probs - mean_over_window).square().mean(dim=-2).mean(dim=2)  # [B, Hkv, T]
    mean = mean_over_window.squeeze(-2).mean(dim=2)  # [B, Hkv, T]
    score = mean + gamma * variance
    pooled = F.avg_pool1d(score.flatten(0, 1)[:, None], pool_kernel, stride=1, padding=pool_kernel // 2,
                          count_include_pad=False)  # [B * Hkv, 1, T]
    return mean, variance, pooled.view_as(score)


def window_pending(config: ARKVConfig, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, keys: Tensor,
                   key_pos: Tensor, order: Tensor | None = None) -> dict:
    """What a layer holds from a prefill (chunk) until compression: the chunk's K/V k, v [B, Hkv, S, D],
    the candidates (keys [B, Hkv, T, D] at key_pos, by position; `order`: `Arena.held_and_chunk`'s),
    the token and layer statistics of the last W = min(window, S) queries of q [B, H, S, D], and a
    `memo` for the chunk's slot bytes (`Arena.chunk_bytes`)."""
    S, window = q.shape[2], config.window
    W, seq_len = min(window, S), int(input_pos[-1]) + 1
    probs = window_probabilities(q[:, :, S - W:], keys, input_pos[S - W:], key_pos)  # [B, Hkv, G, W, T]
    mean, variance, score = token_statistics(probs, config.gamma, config.pool_kernel)
    before_window = (key_pos >= 0) & (key_pos < seq_len - window)
    stats = layer_moments(probs, before_window) if seq_len > window else (1.0, 1, 1.0, 1, 1.0, 1)
    return dict(k=k, v=v, pos=key_pos, order=order, seq_len=seq_len, mean=mean, variance=variance, score=score,
                count=W, stats=stats, memo={})


# What to keep: one rule per method, ARKV's first. A rule gives a layer's Original share, ranks the
# prefill candidates, seeds each kept token's statistics (mean, variance, count), scores a slot from
# them and updates them with each decode query's attention; `ARKVCache` asks it what differs.


class ARKVRule:
    """ARKV (paper section 3): each layer's Original share from its prefill statistics; every token,
    Original, Quantized or Evicted, ranked by heavy-hitter score (mean + gamma * variance of its
    attention). `decodes_as`: rules whose decode steps are the same computation (evict and quant
    differ from ARKV only in their Original shares) can decode their rows in one batch."""
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
        """s_t = avgpool_5(mean_w a_wt + gamma var_w a_wt), GQA-averaged (`token_statistics`): [B, Hkv, T]."""
        return pending["score"]

    def initial_stats(self, pending: dict, config: ARKVConfig) -> Tensor:
        """A kept token's decode statistics: (mean_w a_wt, var_w a_wt, W) [B, Hkv, T, 3], unpooled."""
        mean = pending["mean"]
        return torch.stack([mean, pending["variance"], torch.full_like(mean, pending["count"])], dim=-1)

    def fresh_stats(self, input_pos: Tensor, config: ARKVConfig) -> Tensor:
        """A new token has seen no query: (0, 0, 0). input_pos [B or 1, 1, 1] -> [B or 1, 1, 1, 3]."""
        return torch.zeros(*input_pos.shape, 3, device=input_pos.device)

    def slot_score(self, stats: Tensor, config: ARKVConfig) -> Tensor:
        """mean + gamma * variance: stats [B, Hkv, S, 3] -> [B, Hkv, S]."""
        return stats[..., 0] + config.gamma * stats[..., 1]

    def update(self, stats: Tensor, attention: Tensor, config: ARKVConfig) -> Tensor:
        """Running mean and variance over about the last W decode queries: with a the query's attention
        [B, Hkv, S] (GQA-averaged), d = a - mean, w = max(1 / (n + 1), 1 / W): mean += w d, variance =
        (1 - w)(variance + w d^2), n += 1 (Welford's update while n < W, then a moving average)."""
        mean, variance, count = stats.unbind(-1)
        weight = (1.0 / (count + 1)).clamp_min(1.0 / config.window)
        delta = attention - mean
        return torch.stack([mean + weight * delta, (1 - weight) * (variance + weight * delta**2), count + 1], dim=-1)


class EvictRule(ARKVRule):
    """Eviction only, SnapKV-style (Li et al. 2024; the paper's "Origin"): ARKV's scores, every kept
    token Original (rho 1), no Quantized region."""
    quantizes = False

    def original_shares(self, layer_scores: list[float], *_) -> list[float]:
        return [1.0] * len(layer_scores)


class QuantRule(ARKVRule):
    """Uniform quantization with a full-precision residual window (KIVI-like, Liu et al. 2024): every
    kept token but the window Quantized (rho 0); ARKV's scores choose whom to evict when not all fit."""

    def original_shares(self, layer_scores: list[float], *_) -> list[float]:
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
        return score_stats(self.recency(pending["pos"], config), pending["count"])  # [B, Hkv, T, 3]

    def fresh_stats(self, input_pos: Tensor, config: ARKVConfig) -> Tensor:
        return score_stats(self.recency(input_pos, config), 0)  # [B or 1, 1, 1, 3]

    def slot_score(self, stats: Tensor, config: ARKVConfig) -> Tensor:
        return stats[..., 0]

    def update(self, stats: Tensor, attention: Tensor, config: ARKVConfig) -> Tensor:
        return stats


class H2ORule(EvictRule):
    """H2O (Zhang et al. 2023), Original only: a token's score is the attention it has received
    (GQA-averaged), at prefill sum_w a_wt = W mean_w a_wt (no pooling), then from every decode query."""
    decodes_as = "h2o"

    def prefill_key(self, pending: dict, config: ARKVConfig) -> Tensor:
        return pending["mean"] * pending["count"]  # [B, Hkv, T]

    def initial_stats(self, pending: dict, config: ARKVConfig) -> Tensor:
        return score_stats(self.prefill_key(pending, config), pending["count"])  # [B, Hkv, T, 3]

    def slot_score(self, stats: Tensor, config: ARKVConfig) -> Tensor:
        return stats[..., 0]

    def update(self, stats: Tensor, attention: Tensor, config: ARKVConfig) -> Tensor:
        """sum += a, n += 1."""
        accumulated, variance, count = stats.unbind(-1)
        return torch.stack([accumulated + attention, variance, count + 1], dim=-1)


def score_stats(score: Tensor, count: int) -> Tensor:
    """Statistics (score, 0, count) [..., 3] of a rule whose slot score is stored whole."""
    return torch.stack([score, torch.zeros_like(score), torch.full_like(score, count)], dim=-1)


RULES = {"arkv": ARKVRule(), "evict": EvictRule(), "quant": QuantRule(), "streaming": StreamingRule(),
         "h2o": H2ORule()}


def decode_family(config: ARKVConfig) -> tuple:
    """What a decode step depends on besides the cache state: equal families share a batch and a graph."""
    return (RULES[config.method].decodes_as, config.kv_quant, config.window, config.gamma, config.sinks,
            config.attention)


# The cache of one layer, as the method sees it: prefill -> assign; decode -> place, attend, update.


class ARKVCache(Arena):
    """One layer's tri-state cache; `forward(q, k, v, input_pos)` is the interface of model.KVCache.
    The slots and their bytes are the `Arena`'s; what to keep is the method's rule (`self.rule`)."""

    def __init__(self, config: ARKVConfig, slots: SlotGeometry, batch_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype):
        super().__init__(slots, FORMATS[config.kv_quant], RULES[config.method].quantizes, batch_size, n_kv_heads,
                         head_dim, dtype)
        self.config, self.rule, self.pending = config, RULES[config.method], None  # pending: `prefill` -> `assign`

    def forward(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor) -> Tensor:
        """A prefill (S > 1), or a decode step: place the new token, attend, update the slot scores."""
        if q.shape[2] > 1:
            return self.prefill(q, k, v, input_pos)
        self.place(torch.stack([k, v], dim=3), input_pos.view(-1, 1, 1))  # kv [B, Hkv, 1, 2, D]
        y, probs = self.attend(q)
        self.update_stats(probs)
        return y

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor) -> Tensor:
        """Causal attention over the prompt (or a chunk of it, after the tokens the cache holds);
        keep the chunk's K/V and the window statistics of every candidate token (held and new, by
        position, so that pooling runs along the sequence) until the manager, having seen every
        layer, assigns the three states (`ARKV.compress`)."""
        (B, H, S, _), n_kv_heads = q.shape, k.shape[1]
        chunk_pos = input_pos.expand(B, n_kv_heads, S)
        if int(input_pos[0]) == 0:  # a new sequence: nothing held
            keys, key_pos, order = k, chunk_pos, None
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            keys, values, key_pos, order = self.held_and_chunk(k, v, chunk_pos)  # keys [B, Hkv, T, D] by position
            visible = (key_pos[:, :, None] <= input_pos[:, None]) & (key_pos[:, :, None] >= 0)  # [B, Hkv, S, T]
            mask = visible.repeat_interleave(H // n_kv_heads, dim=1)  # [B, H, S, T]
            y = F.scaled_dot_product_attention(q.float(), keys, values, attn_mask=mask, enable_gqa=True).to(q.dtype)
        # contiguous copies: k and v are views of larger projection outputs that must not stay alive
        self.pending = window_pending(self.config, q, k.contiguous(), v.contiguous(), input_pos, keys, key_pos, order)
        return y

    @torch.no_grad()
    def assign(self, c_o: int, c_q: int):
        """Window -> Original; best `rule.prefill_key` -> Original up to C_o; next -> Quantized up to
        C_q; the rest evicted. A token held Quantized stays Quantized or is evicted. Selections are
        written in position order; a capacity larger than the candidates leaves slots empty (-1)."""
        p = self.pending
        pos = p["pos"]  # [B, Hkv, T] candidate positions, ascending, -1 (none) last
        as_original, as_quantized, was_quantized = self.candidate_bytes(p["k"], p["v"], p["order"], p["memo"])
        in_window = pos >= p["seq_len"] - self.config.window  # always kept; a missing candidate (-1) never
        key = self.rule.prefill_key(p, self.config).masked_fill(in_window, torch.inf).masked_fill(pos < 0, -torch.inf)
        o_key = key.masked_fill(was_quantized, -torch.inf)
        o_sel, o_live = best(o_key, c_o)  # [B, Hkv, n_o]
        q_sel, q_live = best(key.masked_fill(torch.zeros_like(was_quantized).scatter_(2, o_sel, o_live), -torch.inf), c_q)
        self.fill(pos, self.rule.initial_stats(p, self.config), (o_sel, o_live, as_original), (q_sel, q_live, as_quantized),
                  c_o, c_q)
        self.pending = None

    def place(self, new_kv: Tensor, input_pos: Tensor):
        """The new token new_kv [B, Hkv, 1, 2, D] at input_pos [B or 1, 1, 1] takes a free Original slot;
        with none free, the weakest (lowest `rule.slot_score`) Original token outside the window is
        demoted: quantized once into a free Quantized slot, or over the weakest Quantized token if
        that one scores lower (which is evicted), else evicted itself."""
        inf, o_slot = torch.inf, torch.arange(self.o_pos.shape[-1], device=input_pos.device)
        o_score = self.rule.slot_score(self.o_stats, self.config)
        o_key = torch.where(self.o_pos > input_pos - self.config.window, inf, o_score)  # window tokens stay
        o_key = torch.where(self.o_pos < 0, -inf, o_key).masked_fill(o_slot >= self.o_capacity[:, None, None], inf)
        victim = o_key.argmin(dim=-1, keepdim=True)  # [B, Hkv, 1]
        fresh = self.rule.fresh_stats(input_pos, self.config).expand_as(self.o_stats[:, :, :1])  # [B, Hkv, 1, 3]
        if not self.has_quantized:
            return self.replace(victim, new_kv, input_pos, fresh)
        # a slot below q_first (behind the row's Original capacity) is never a target
        q_slot = torch.arange(self.q_pos.shape[-1], device=input_pos.device)
        q_key = torch.where(self.q_pos < 0, -inf, self.rule.slot_score(self.q_stats, self.config))
        q_key = q_key.masked_fill(q_slot < self.q_first[:, None, None], inf)  # [B, Hkv, M]
        target = q_key.argmin(dim=-1, keepdim=True)  # [B, Hkv, 1]
        victim_score = self.rule.slot_score(gather_rows(self.o_stats, victim), self.config)  # [B, Hkv, 1]
        self.replace(victim, new_kv, input_pos, fresh, target, demote=q_key.gather(2, target) < victim_score)

    def attend(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """q [B, H, 1, D] -> output [B, H, 1, D], probabilities [B, Hkv, G, N + M]: one softmax over
        the Original and the dequantized Quantized keys (`decode_kernels`)."""
        views = self.attention_views()
        if self.config.attention == "triton":
            return tristate_attention(q, *views, self.config.kv_quant, self.o_capacity, self.q_first)
        return mixed_precision_attention(q, *views, self.config.kv_quant)

    def update_stats(self, probs: Tensor):
        """The live slots' statistics after this step's attention probs [B, Hkv, G, N + M], averaged
        over the GQA group (`rule.update`)."""
        attention = probs.mean(dim=2)  # [B, Hkv, N + M]
        N = self.o_stats.shape[2]
        regions = [(self.o_stats, self.o_pos, attention[..., :N]), (self.q_stats, self.q_pos, attention[..., N:])]
        for stats, pos, a in regions[:2 if self.has_quantized else 1]:
            stats.copy_(torch.where((pos >= 0)[..., None], self.rule.update(stats, a, self.config), stats))


def best(key: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """The `capacity` highest keys [B, Hkv, T] (ties: the earlier position), as indices in position
    order [B, Hkv, n] and whether each is a candidate at all (key > -inf)."""
    chosen = key.argsort(dim=-1, descending=True, stable=True)[..., :min(capacity, key.shape[-1])].sort(dim=-1).values
    return chosen, key.gather(2, chosen) > -torch.inf


# The manager: builds every layer's cache, and after prefill turns the statistics into budgets.


class ARKV:
    """`setup_caches(..., cache_factory=arkv.cache_factory)`, prefill, then `compress()`."""

    def __init__(self, config: ARKVConfig, args: ModelArgs, dtype: torch.dtype,
                 reduce: Callable[[Tensor], Tensor] | None = None):
        """`dtype`: Original K/V's (the model's, or `--kv-dtype`). `reduce`: sums the layers' [L, 6]
        `layer_moments` over the processes holding the other KV heads (`tp.all_reduce_sum`)."""
        self.config, self.args, self.dtype = config, args, dtype
        self.reduce = reduce or (lambda moments: moments)
        self.slots = SlotGeometry.for_format(config.kv_budget, config.window, config.kv_quant, args.head_dim, dtype)
        self.caches: list[ARKVCache] = []
        self.shares: list[float] = []  # rho_l per layer, after `compress`
        self.max_seq_len = 0
        self.row_bytes: list[int] | None = None  # per batch row, when rows were stacked from separate caches

    def cache_factory(self, layer: int, args: ModelArgs, batch_size: int, max_seq_len: int, dtype: torch.dtype) -> ARKVCache:
        self.caches, self.max_seq_len = self.caches if layer else [], max_seq_len
        self.caches.append(ARKVCache(self.config, self.slots, batch_size, args.n_kv_heads, args.head_dim, dtype))
        return self.caches[-1]

    def cache_bytes(self, batch_size: int, prefill_tokens: int, prefill_dtype: torch.dtype) -> int:
        """Bytes the caches will allocate (`SlotGeometry.allocated_bytes` per layer, batch row and KV
        head) and the prefill K/V (`prefill_tokens` in `prefill_dtype`) each holds until compression."""
        pending = prefill_tokens * 2 * self.args.head_dim * prefill_dtype.itemsize
        return self.args.n_layer * batch_size * self.args.n_kv_heads * (self.slots.allocated_bytes + pending)

    @torch.no_grad()
    def compress(self):
        """Per-layer Original shares from the prefill statistics, then every layer's tri-state assignment."""
        moments = self.reduce(torch.tensor([cache.pending["stats"] for cache in self.caches], dtype=torch.float64))  # [L, 6]
        scores = [oq_score(statistic_means(m), self.config.tau) for m in moments.tolist()]
        if self.config.kv_budget >= self.max_seq_len:  # the whole sequence fits: every token Original
            self.shares = [1.0] * len(scores)
        else:
            self.shares = RULES[self.config.method].original_shares(scores, self.config, self.max_seq_len, self.slots)
        for cache, rho in zip(self.caches, self.shares):
            cache.assign(*self.slots.capacities(rho))

    def report(self, seq_len: int, row: int = 0) -> dict:
        """Measured from the stored state of one batch row holding a sequence of `seq_len` tokens:
        tokens per state, bytes held and allocated for that row, and a full cache's bytes."""
        original, quantized = (sum(counts) for counts in zip(*(cache.counts(row) for cache in self.caches)))
        B, Hkv = self.caches[0].o_pos.shape[:2]
        total = seq_len * Hkv * len(self.caches)
        held = original * self.slots.bytes_original + quantized * self.slots.bytes_quantized
        allocated = self.row_bytes[row] if self.row_bytes else sum(cache.nbytes() for cache in self.caches) // B
        return dict(original=original, quantized=quantized, evicted=total - original - quantized, held_bytes=held,
                    allocated_bytes=allocated, full_bytes=total * self.slots.bytes_original, shares=list(self.shares))

    @classmethod
    def stack(cls, managers: list["ARKV"], kv_budget: int) -> "ARKV":
        """One manager whose caches hold the compressed one-row caches of `managers` (methods that
        decode alike, `decode_family`; budgets up to `kv_budget`) as batch rows, decoded together;
        each row reports the bytes its own caches allocated. An eviction-only row has an empty
        Quantized region (q_first = M), so no token is ever demoted into it."""
        base = managers[0]
        families = {decode_family(m.config) for m in managers}
        if len(families) > 1:
            raise ValueError(f"rows of methods that decode differently cannot share a batch: {sorted(families)}")
        alike = all(m.config.method == base.config.method for m in managers)
        method = base.config.method if alike else RULES[base.config.method].decodes_as
        config = ARKVConfig(**{**vars(base.config), "kv_budget": kv_budget, "method": method})
        stacked = cls(config, base.args, base.dtype)
        for rows in zip(*(m.caches for m in managers)):
            cache = ARKVCache(config, stacked.slots, len(rows), rows[0].arena.shape[1], rows[0].head_dim, rows[0].dtype)
            cache.to(rows[0].arena.device).load_rows(list(rows))
            stacked.caches.append(cache)
        stacked.row_bytes = [sum(cache.nbytes() for cache in m.caches) for m in managers]
        stacked.max_seq_len = max(m.max_seq_len for m in managers)
        return stacked
