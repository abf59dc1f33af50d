"""Every choice ARKV makes, against a reference written from the method's formulas
(../shared/REFERENCE.md section 1, arkv.py docstrings), in float64 plain loops that never call
arkv's selection code:

- token score: mean + gamma * variance of a key's attention over the last W queries, averaged
  over the query heads of its GQA group, average-pooled along the sequence (kernel 5, edges
  averaged over the tokens that exist);
- layer score q_l = H^(1/tau1) V^(1/tau2) K^(1/tau3) (entropy of the window rows renormalised to
  the keys before the window; variance across the window queries per key; Pearson kurtosis
  mean(z^4)), Original share rho_l = q_l / max q (`paper`) or the coverage share;
- capacities from bytes, the tri-state assignment, the decode-time placement and score updates.

The caches are driven through their model-facing call `cache(q, k, v, input_pos)` with random or
planted attention patterns, and read back from their stored positions (o_pos, q_pos). Paper
constants (gamma, tau, kernel, sinks) are written here, not read from arkv, so a changed default
is caught too.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import arkv
import kv_arena
from arkv import ARKV, RULES, ARKVConfig
from kv_arena import TILE, SlotGeometry
from model import ModelArgs

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
GAMMA, TAU, POOL_KERNEL, SINKS = 263.8, (7.774, 5.407, 5.528), 5, 4  # REFERENCE.md section 1; StreamingLLM sinks
QUANTIZING = ("arkv", "quant")  # methods that hold Quantized tokens
HEADS = [(4, 2), (4, 1), (2, 2), (1, 1)]
INF = math.inf
GAP = 2e-5  # relative gap between two ranked scores that float32 cannot swap (its error: < 4e-6)


# ---------------------------------------------------------------------------------------------
# Adapter: the only place that reads ARKV's internals (per-row capacities, the manager's shares,
# the quantization formats). A refactor of arkv.py edits this section only.


def row_value(t: torch.Tensor, b: int) -> int:
    """A per-row capacity tensor ([] or [B]) at row b."""
    t = t.reshape(-1)
    return int(t[b if t.numel() > 1 else 0])


def capacities(cache, b: int) -> tuple[int, int]:
    """(C_o, C_q) of batch row b, from the stored region bounds."""
    return row_value(cache.o_capacity, b), cache.q_pos.shape[-1] - row_value(cache.q_first, b)


def layer_share(manager: ARKV, layer: int) -> float:
    return manager.shares[layer]


def quantize_round_trip(kv_quant: str, kv: torch.Tensor) -> torch.Tensor:
    """kv [..., D] float32 -> its value after storage in the format (float64)."""
    fmt = kv_arena.FORMATS[kv_quant]
    return fmt.dequantize(*fmt.quantize(kv)).double()


# ---------------------------------------------------------------------------------------------
# The reference (float64, loops).


def quantized_token_bytes(kv_quant: str, D: int) -> int:
    """K and V of one token: a byte per value and a float32 scale (fp8, int8); half a byte per value
    and a 2-byte scale and zero per 32 channels (int4)."""
    return 2 * (D // 2 + D // 32 * 4) if kv_quant == "int4" else 2 * (D + 4)


def ref_window_probabilities(q: torch.Tensor, k: torch.Tensor, window: int) -> torch.Tensor:
    """p[b, h, w, t] = softmax_t(q_w . k_t / sqrt(D)) over t <= position of w, for the last
    W = min(window, S) queries of each query head h, which reads KV head h // G. [B, H, W, S]."""
    B, H, S, D = q.shape
    G, W = H // k.shape[1], min(window, S)
    probs = torch.zeros(B, H, W, S, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for w in range(W):
                s = S - W + w
                logits = (k[b, h // G, : s + 1].double() @ q[b, h, s].double() / math.sqrt(D)).tolist()
                top = max(logits)
                e = [math.exp(x - top) for x in logits]
                probs[b, h, w, : s + 1] = torch.tensor([x / sum(e) for x in e], dtype=torch.float64)
    return probs


def ref_token_statistics(probs: torch.Tensor, G: int, gamma: float, kernel: int) -> tuple[list, list, list]:
    """Per (b, KV head g) lists over keys t: mean and variance (population) over the window queries,
    each averaged over the G query heads of group g; pooled score: the mean of mean + gamma * var
    over the keys t - kernel//2 .. t + kernel//2 that exist."""
    B, H, W, T = probs.shape
    p = probs.tolist()
    means, variances, pooled = [], [], []
    for b in range(B):
        mean_b, var_b, pooled_b = [], [], []
        for g in range(H // G):
            mean_g, var_g = [], []
            for t in range(T):
                head_means, head_vars = [], []
                for h in range(g * G, (g + 1) * G):
                    column = [p[b][h][w][t] for w in range(W)]
                    m = sum(column) / W
                    head_means.append(m)
                    head_vars.append(sum((x - m) ** 2 for x in column) / W)
                mean_g.append(sum(head_means) / G)
                var_g.append(sum(head_vars) / G)
            score = [m + gamma * v for m, v in zip(mean_g, var_g)]
            r = kernel // 2
            pooled_g = [sum(score[max(0, t - r): t + r + 1]) / len(score[max(0, t - r): t + r + 1]) for t in range(T)]
            mean_b.append(mean_g)
            var_b.append(var_g)
            pooled_b.append(pooled_g)
        means.append(mean_b)
        variances.append(var_b)
        pooled.append(pooled_b)
    return means, variances, pooled


def ref_layer_statistics(probs: torch.Tensor, seq_len: int, window: int) -> tuple[float, float, float]:
    """(H, V, K) over the keys before the window (positions < seq_len - window), averaged over every
    batch row, query head and window query (H) or key (V, K); (1, 1, 1) without such keys."""
    if seq_len <= window:
        return 1.0, 1.0, 1.0
    B, H, W, _ = probs.shape
    prefix = range(seq_len - window)
    p = probs.tolist()
    entropies, variances, kurtoses = [], [], []
    for b in range(B):
        for h in range(H):
            for w in range(W):
                row = [p[b][h][w][t] for t in prefix]
                total = sum(row)
                entropies.append(-sum(x / total * math.log(x / total) for x in row if x > 0))
            for t in prefix:
                column = [p[b][h][w][t] for w in range(W)]
                m = sum(column) / W
                var = sum((x - m) ** 2 for x in column) / W
                variances.append(var)
                if var > 0:
                    kurtoses.append(sum((x - m) ** 4 for x in column) / W / var**2)
    return sum(entropies) / len(entropies), sum(variances) / len(variances), sum(kurtoses) / max(len(kurtoses), 1)


def ref_layer_score(stats: tuple[float, float, float]) -> float:
    """q_l = H^(1/tau1) * V^(1/tau2) * K^(1/tau3)."""
    (H, V, K), (t1, t2, t3) = stats, TAU
    return H ** (1 / t1) * V ** (1 / t2) * K ** (1 / t3)


def ref_capacities(rho: float, N: int, W: int, bo: int, bq: int) -> tuple[int, int]:
    """C_o = W + round(rho (N - W)) Original slots from the front of an arena of N * bo bytes; C_q =
    the slots of the tiles (TILE slots of bq bytes each, packed against the arena's end) that begin
    at or behind the Original slots' end."""
    c_o = W + round(rho * (N - W))
    tile = TILE * bq
    starts = [N * bo - k * tile for k in range(1, N * bo // tile + 1)]  # each tile's first byte
    return c_o, TILE * sum(start >= c_o * bo for start in starts)


def ref_shares(layer_scores: list[float], method: str, policy: str, N: int, W: int, seq_len: int, bo: int,
               bq: int) -> list[float]:
    """rho per layer: 1 when the budget holds the sequence; 1 (evict, streaming, h2o) or 0 (quant);
    paper q_l / max q; coverage (q_l / max q) * U / (N - W), U the most Original tokens beyond the
    window (`ref_upgrades`)."""
    L = len(layer_scores)
    if N >= seq_len or method in ("evict", "streaming", "h2o"):
        return [1.0] * L
    if method == "quant":
        return [0.0] * L
    relative = [s / max(layer_scores) for s in layer_scores]
    if policy == "paper":
        return relative
    if N == W:
        return [0.0] * L
    return [r * ref_upgrades(N, W, bo, bq, seq_len) / (N - W) for r in relative]


def ref_upgrades(N: int, W: int, bo: int, bq: int, seq_len: int) -> int:
    """The largest U (Original tokens beyond the window) whose C_o + C_q holds as many of the seq_len
    tokens as any U does."""
    held = {u: min(sum(ref_capacities(u / (N - W), N, W, bo, bq)), seq_len) for u in range(N - W + 1)}
    return max(u for u in held if held[u] == max(held.values()))


def ref_assignment(pooled: list[float], means: list[float], seq_len: int, method: str, window: int, c_o: int,
                   c_q: int) -> tuple[set, set, float]:
    """Tokens 0..T-1: the window (and for streaming the sinks) first, then by pooled score (streaming:
    by position; h2o: by accumulated attention, W times the unpooled mean), highest first; the
    first C_o Original, the next C_q Quantized. Returns the two sets and the smallest relative gap
    (scores are positive) at a cut between ranked tokens, INF if none."""
    T = len(pooled)
    protected = [t >= seq_len - window or (method == "streaming" and t < SINKS) for t in range(T)]
    rank_key = {"streaming": [float(t) for t in range(T)], "h2o": means}.get(method, pooled)
    order = sorted(range(T), key=lambda t: (not protected[t], -rank_key[t]))
    gap = INF
    for cut in (c_o, c_o + c_q):
        if 0 < cut < T and not protected[order[cut - 1]]:
            above, below = rank_key[order[cut - 1]], rank_key[order[cut]]
            gap = min(gap, (above - below) / above)
    return set(order[:c_o]), set(order[c_o:c_o + c_q]), gap


class ReferenceRow:
    """One (layer, batch row, KV head): position -> [K/V as attended (float64 [2, D]), mean, variance,
    count] for the Original and the Quantized tokens, placed and scored by the decode rules:

    - the new token takes a free Original slot; else the weakest Original token outside the window
      (positions > new - W stay) is demoted: into a free Quantized slot, or over the weakest
      Quantized token if that one scores strictly lower (evicting it), else it is evicted;
    - score: mean + gamma var (arkv, evict, quant), accumulated attention (h2o), position with the
      sinks first (streaming);
    - after attending, each held token's attention a (averaged over the GQA group) updates
      (mean, var, n): weight w = max(1 / (n + 1), 1 / W), mean += w d, var = (1 - w)(var + w d^2)
      with d = a - mean (h2o: mean += a; streaming: nothing).

    Where two choices are within float tolerance the cache may take either: `place` asserts that
    its choice is one of them and follows it."""

    def __init__(self, method: str, kv_quant: str, window: int, c_o: int, c_q: int):
        self.method, self.kv_quant, self.window, self.c_o, self.c_q = method, kv_quant, window, c_o, c_q
        self.original: dict[int, list] = {}
        self.quantized: dict[int, list] = {}

    def score(self, pos: int, entry: list) -> float:
        if self.method == "streaming":
            return INF if pos < SINKS else float(pos)
        if self.method == "h2o":
            return entry[1]
        return entry[1] + GAMMA * entry[2]

    def place(self, pos: int, kv: torch.Tensor, held_o: set, held_q: set):
        """Place token `pos` (kv [2, D] float32); held_o / held_q: what the cache holds after it."""
        victim = None
        if len(self.original) == self.c_o:
            outside = {p: self.score(p, e) for p, e in self.original.items() if p <= pos - self.window}
            left = set(self.original) - held_o
            assert len(left) == 1, f"exactly one token leaves Original, got {sorted(left)}"
            victim = left.pop()
            assert victim in outside and near_or_below(outside[victim], min(outside.values())), (
                f"position {victim} left Original; weakest outside the window: {min(outside, key=outside.get)}")
        else:
            assert set(self.original) <= held_o, "an Original token left while a slot was free"
        if victim is not None:
            entry = self.original.pop(victim)
            if self.method in QUANTIZING and len(self.quantized) < self.c_q:
                assert victim in held_q, f"position {victim} evicted while a Quantized slot was free"
                self.quantized[victim] = [quantize_round_trip(self.kv_quant, entry[0].float()), *entry[1:]]
            elif self.method in QUANTIZING and self.quantized:
                q_scores = {p: self.score(p, e) for p, e in self.quantized.items()}
                weakest, mine = min(q_scores.values()), self.score(victim, entry)
                gone = set(self.quantized) - held_q
                if victim in held_q:
                    assert weakest < mine or near(weakest, mine), f"position {victim} demoted over a stronger token"
                    assert len(gone) == 1 and near_or_below(q_scores[next(iter(gone))], weakest), f"evicted {gone}"
                    del self.quantized[gone.pop()]
                    self.quantized[victim] = [quantize_round_trip(self.kv_quant, entry[0].float()), *entry[1:]]
                else:
                    assert weakest >= mine or near(weakest, mine), f"position {victim} evicted, beating {weakest}"
                    assert not gone, f"Quantized tokens {gone} evicted without a demotion"
            else:
                assert victim not in held_q, f"position {victim} demoted without a Quantized region"
        self.original[pos] = [kv.double(), 0.0, 0.0, 0]
        assert set(self.original) == held_o and set(self.quantized) == held_q

    def attend_and_update(self, q: torch.Tensor):
        """q [G, D]: attention of the group's query heads over the held tokens, then the score update."""
        entries = list(self.original.values()) + list(self.quantized.values())
        keys = torch.stack([e[0][0] for e in entries])  # [n, D]
        logits = q.double() @ keys.T / math.sqrt(q.shape[-1])  # [G, n]
        e = (logits - logits.max(-1, keepdim=True).values).exp()
        attention = (e / e.sum(-1, keepdim=True)).mean(0).tolist()
        for entry, a in zip(entries, attention):
            if self.method == "h2o":
                entry[1] += a
            elif self.method != "streaming":
                w = max(1 / (entry[3] + 1), 1 / self.window)
                d = a - entry[1]
                entry[1], entry[2] = entry[1] + w * d, (1 - w) * (entry[2] + w * d * d)
            entry[3] += 1


def near(a: float, b: float) -> bool:
    """Equal within the cache's float32 noise: 1e-4 relative plus 1e-5 absolute, since its running
    mean m + w (a - m) resolves a small attention a only to about 2^-24 of the m it held before
    (and the variance enters the score times gamma = 263.8)."""
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= 1e-4 * max(abs(a), abs(b)) + 1e-5


def near_or_below(a: float, bound: float) -> bool:
    return a <= bound or near(a, bound)


# ---------------------------------------------------------------------------------------------
# Driving the caches.


def make_manager(config: ARKVConfig, n_layer: int, heads: tuple[int, int], head_dim: int, batch: int,
                 max_seq_len: int) -> ARKV:
    args = ModelArgs(dim=32, n_layer=n_layer, n_head=heads[0], n_kv_heads=heads[1], head_dim=head_dim,
                     intermediate_size=32, vocab_size=16, max_seq_len=max_seq_len)
    manager = ARKV(config, args, torch.float32)
    for layer in range(n_layer):
        manager.cache_factory(layer, args, batch, max_seq_len, torch.float32)
    return manager


def random_attention(g: torch.Generator, batch: int, heads: tuple[int, int], S: int, D: int, sharp: float):
    """q [B, H, S, D], k, v [B, Hkv, S, D]: random, queries leaning to a shared direction u that
    about 1 key in 8 carries (heavy hitters), `sharp` scaling the logits."""
    H, Hkv = heads
    u = torch.randn(D, generator=g)
    u = u / u.norm() * D**0.25  # u . u / sqrt(D) = 1
    q = sharp * (torch.randn(batch, H, S, D, generator=g) + 1.5 * u)
    heavy = (torch.rand(batch, Hkv, S, 1, generator=g) < 0.125).float()
    k = torch.randn(batch, Hkv, S, D, generator=g) + 3 * heavy * u
    return q, k, torch.randn(batch, Hkv, S, D, generator=g)


def head_dim_for(kv_quant: str) -> int:
    return 64 if kv_quant == "int4" else 16


@st.composite
def scenarios(draw, max_layers: int = 3):
    method = draw(st.sampled_from(arkv.METHODS))
    kv_quant = draw(st.sampled_from(sorted(kv_arena.FORMATS)))
    window = draw(st.integers(1, 8))
    kv_budget = window + (SINKS if method == "streaming" else 0) + draw(st.integers(0, 16))
    prompt_len = draw(st.integers(2, kv_budget + 40))
    return dict(config=ARKVConfig(kv_budget=kv_budget, method=method, window=window, kv_quant=kv_quant,
                                  oq_policy=draw(st.sampled_from(arkv.OQ_POLICIES))),
                n_layer=draw(st.integers(1, max_layers)), heads=draw(st.sampled_from(HEADS)),
                batch=draw(st.integers(1, 2)), prompt_len=prompt_len, steps=draw(st.integers(4, 24)),
                sharp=draw(st.floats(0.3, 2.5)), seed=draw(st.integers(0, 2**31 - 1)))


def prefill(s: dict, batch: int | None = None):
    """Prefill every layer with its own random pattern and compress. Returns the manager, per layer
    the reference window probabilities and the prompt's K/V [B, Hkv, T, 2, D], and the generator."""
    config, heads, D = s["config"], s["heads"], head_dim_for(s["config"].kv_quant)
    B, T = batch or s["batch"], s["prompt_len"]
    manager = make_manager(config, s["n_layer"], heads, D, B, T + s["steps"])
    g = torch.Generator().manual_seed(s["seed"])
    probs, kvs = [], []
    for cache in manager.caches:
        q, k, v = random_attention(g, B, heads, T, D, s["sharp"])
        cache(q, k, v, torch.arange(T))
        probs.append(ref_window_probabilities(q, k, config.window))
        kvs.append(torch.stack([k, v], dim=3))
    manager.compress()
    return manager, probs, kvs, g


def held(cache, b: int, g: int) -> tuple[set, set]:
    return ({int(p) for p in cache.o_pos[b, g] if p >= 0}, {int(p) for p in cache.q_pos[b, g] if p >= 0})


# ---------------------------------------------------------------------------------------------
# 1. The math functions against the reference.


@settings(max_examples=25, **SETTINGS)
@given(heads=st.sampled_from(HEADS), S=st.integers(1, 24), window=st.integers(1, 10), gamma=st.floats(0, 500),
       kernel=st.sampled_from([1, 3, 5, 7]), sharp=st.floats(0.3, 3.0), seed=st.integers(0, 2**31 - 1))
def test_token_statistics_match_reference(heads, S, window, gamma, kernel, sharp, seed):
    """window_probabilities + token_statistics: mean, variance (over window queries, GQA-averaged)
    and the pooled mean + gamma * variance of every key."""
    g = torch.Generator().manual_seed(seed)
    q, k, _ = random_attention(g, 2, heads, S, 16, sharp)
    W = min(window, S)
    key_pos = torch.arange(S).expand(2, heads[1], S)
    probs = arkv.window_probabilities(q[:, :, S - W:], k, torch.arange(S - W, S), key_pos)
    expected_probs = ref_window_probabilities(q, k, window)  # [B, H, W, S]
    torch.testing.assert_close(probs.double().flatten(1, 2), expected_probs, rtol=1e-5, atol=1e-7)
    got = arkv.token_statistics(probs, gamma, kernel)
    expected = ref_token_statistics(expected_probs, heads[0] // heads[1], gamma, kernel)
    for name, a, e in zip(("mean", "variance", "pooled"), got, expected):
        torch.testing.assert_close(a.double(), torch.tensor(e, dtype=torch.float64), rtol=1e-4, atol=1e-7, msg=name)


@settings(max_examples=40, **SETTINGS)
@given(W=st.integers(1, 40), extra=st.integers(1, 40), bo=st.sampled_from([32, 64, 128, 256, 512]),
       bq=st.sampled_from([20, 40, 68, 80, 136, 264]), rho=st.floats(0, 1), seq_len=st.integers(1, 600))
def test_capacities_and_upgrades_match_reference(W, extra, bo, bq, rho, seq_len):
    """C_o = W + round(rho (N - W)), C_q = the slots of the tiles behind the Original region, and the
    byte bound C_o bo + C_q bq <= N bo; max_original_upgrades = `ref_upgrades`."""
    assume(bq < bo)
    N = W + extra
    slots = SlotGeometry(N, W, bo, bq)
    c_o, c_q = slots.capacities(rho)
    assert (c_o, c_q) == ref_capacities(rho, N, W, bo, bq)
    assert c_o * bo + c_q * bq <= N * bo
    assert slots.max_original_upgrades(seq_len) == ref_upgrades(N, W, bo, bq, seq_len)


def test_layer_score_formula():
    """q_l = H^(1/tau1) V^(1/tau2) K^(1/tau3) with the paper's tau."""
    stats = (2.5, 3e-4, 7.0)
    assert math.isclose(arkv.oq_score(stats, ARKVConfig(kv_budget=64).tau), ref_layer_score(stats), rel_tol=1e-12)


@pytest.mark.parametrize("component", [0, 1, 2], ids=["entropy", "variance", "kurtosis"])
@pytest.mark.parametrize("policy", arkv.OQ_POLICIES)
def test_higher_layer_statistic_gets_larger_original_share(component, policy):
    """Doubling one of H, V, K raises q_l by 2^(1/tau): that layer's share is the top one (paper: 1),
    the other's 2^(-1/tau) of it, and the larger share holds more Original slots."""
    base = [1.7, 2e-3, 5.0]
    raised = list(base)
    raised[component] *= 2
    config = ARKVConfig(kv_budget=64, window=8, oq_policy=policy, kv_quant="int4")
    slots = SlotGeometry(64, 8, 512, 80)
    seq_len = 200
    scores = [arkv.oq_score(tuple(base), config.tau), arkv.oq_score(tuple(raised), config.tau)]
    shares = RULES[config.method].original_shares(scores, config, seq_len, slots)
    layer_scores = [ref_layer_score(tuple(base)), ref_layer_score(tuple(raised))]
    expected = ref_shares(layer_scores, "arkv", policy, 64, 8, seq_len, 512, 80)
    assert math.isclose(shares[0] / shares[1], 2 ** (-1 / TAU[component]), rel_tol=1e-9)
    assert all(math.isclose(a, e, rel_tol=1e-9) for a, e in zip(shares, expected)), (shares, expected)
    assert slots.capacities(shares[1])[0] > slots.capacities(shares[0])[0]


@pytest.mark.parametrize("method, share", [("evict", 1.0), ("streaming", 1.0), ("h2o", 1.0), ("quant", 0.0)])
def test_baseline_shares(method, share):
    """evict, streaming, h2o keep Original only (rho 1); quant keeps only the window Original (rho 0)."""
    config = ARKVConfig(kv_budget=40, window=8, method=method, kv_quant="int8")
    assert RULES[config.method].original_shares([0.5, 2.0], config, 300, SlotGeometry(40, 8, 128, 40)) == [share, share]


# ---------------------------------------------------------------------------------------------
# 2. Prefill: shares, capacities and the tri-state assignment of every (layer, row, KV head).


@settings(max_examples=50, **SETTINGS)
@given(s=scenarios())
def test_layer_shares_match_reference(s):
    """One batch row: each layer's share from its reference (H, V, K) of the window attention
    (W >= 2 window queries and 2 keys before them: with fewer, V, K or H is 0 and so is every q_l)."""
    assume(s["config"].window >= 2 and s["prompt_len"] - s["config"].window >= 2)
    manager, probs, _, _ = prefill(s, batch=1)
    config, T = s["config"], s["prompt_len"]
    D = head_dim_for(config.kv_quant)
    bo, bq = 2 * D * 4, quantized_token_bytes(config.kv_quant, D)
    layer_scores = [ref_layer_score(ref_layer_statistics(p, T, config.window)) for p in probs]
    expected = ref_shares(layer_scores, config.method, config.oq_policy, config.kv_budget, config.window,
                          T + s["steps"], bo, bq)
    for layer, cache in enumerate(manager.caches):
        share = layer_share(manager, layer)
        assert math.isclose(share, expected[layer], rel_tol=1e-4, abs_tol=1e-9), (layer, share, expected)
        assert capacities(cache, 0) == ref_capacities(share, config.kv_budget, config.window, bo, bq)


@settings(max_examples=100, **SETTINGS)
@given(s=scenarios())
def test_prefill_assignment_matches_reference(s):
    """Every (layer, row, KV head) holds exactly the reference's Original and Quantized sets for
    its capacities (which follow the layer's share, checked against the byte formula)."""
    manager, probs, _, _ = prefill(s)
    config, T = s["config"], s["prompt_len"]
    D = head_dim_for(config.kv_quant)
    G = s["heads"][0] // s["heads"][1]
    for layer, cache in enumerate(manager.caches):
        means, _, pooled = ref_token_statistics(probs[layer], G, GAMMA, POOL_KERNEL)
        for b in range(s["batch"]):
            c_o, c_q = capacities(cache, b)
            assert (c_o, c_q) == ref_capacities(layer_share(manager, layer), config.kv_budget, config.window,
                                                2 * D * 4, quantized_token_bytes(config.kv_quant, D))
            for g in range(s["heads"][1]):
                original, quantized, gap = ref_assignment(pooled[b][g], means[b][g], T, config.method, config.window,
                                                          c_o, c_q)
                assume(gap > GAP)
                assert held(cache, b, g) == (original, quantized), f"layer {layer} row {b} head {g}"


# ---------------------------------------------------------------------------------------------
# 3. Decode: placement, demotion and score updates, step by step.


@settings(max_examples=80, **SETTINGS)
@given(s=scenarios(max_layers=2))
def test_decode_placement_matches_reference(s):
    """After the reference prefill assignment, every decode step's placement (free slot, demotion,
    eviction) of every (layer, row, KV head) follows the reference rules and scores. Each held
    token's (mean, variance, count) starts from its unpooled window statistics, (mean, var, W);
    h2o: (W mean, 0, W), the attention accumulated over the window."""
    manager, probs, kvs, g = prefill(s)
    config, T, heads = s["config"], s["prompt_len"], s["heads"]
    D, G = head_dim_for(config.kv_quant), heads[0] // heads[1]
    rows = {}
    for layer, cache in enumerate(manager.caches):
        means, variances, pooled = ref_token_statistics(probs[layer], G, GAMMA, POOL_KERNEL)
        count = min(config.window, T)
        for b in range(s["batch"]):
            c_o, c_q = capacities(cache, b)
            for h in range(heads[1]):
                original, quantized, gap = ref_assignment(pooled[b][h], means[b][h], T, config.method, config.window,
                                                          c_o, c_q)
                assume(gap > GAP)
                assert held(cache, b, h) == (original, quantized)
                row = rows[layer, b, h] = ReferenceRow(config.method, config.kv_quant, config.window, c_o,
                                                       c_q if config.method in QUANTIZING else 0)
                for t in original | quantized:
                    mean = means[b][h][t] * (count if config.method == "h2o" else 1)
                    var = 0.0 if config.method == "h2o" else variances[b][h][t]
                    stored = kvs[layer][b, h, t]
                    region = row.original if t in original else row.quantized
                    region[t] = [stored.double() if t in original else quantize_round_trip(config.kv_quant, stored),
                                 mean, var, count]
    for step in range(s["steps"]):
        pos = T + step
        for layer, cache in enumerate(manager.caches):
            q, k, v = random_attention(g, s["batch"], heads, 1, D, s["sharp"])
            cache(q, k, v, torch.tensor([pos]))
            for b in range(s["batch"]):
                for h in range(heads[1]):
                    row = rows[layer, b, h]
                    row.place(pos, torch.stack([k[b, h, 0], v[b, h, 0]]), *held(cache, b, h))
                    row.attend_and_update(q[b, h * G:(h + 1) * G, 0])


# ---------------------------------------------------------------------------------------------
# 4. Planted patterns that a wrong ranking fails.

PLANT_D = 16


def planted(T: int, levels: dict[int, float], lone: dict[int, float] | None = None):
    """One row and head, D = 16: every query is sqrt(D) e0 and key t is levels[t] e0 (0 if absent),
    so key t's logit is levels[t] for every query; `lone` keys sit on e1, which only the first
    window query of 8 also carries: their logit is lone[t] for that query, 0 for the others."""
    e0, e1 = torch.eye(PLANT_D)[:2]
    q = (math.sqrt(PLANT_D) * e0).expand(1, 1, T, PLANT_D).clone()
    k = torch.zeros(1, 1, T, PLANT_D)
    for t, level in levels.items():
        k[0, 0, t] = level * e0
    for t, level in (lone or {}).items():
        k[0, 0, t] = level * e1
        q[0, 0, T - 8] += math.sqrt(PLANT_D) * e1
    v = torch.randn(1, 1, T, PLANT_D, generator=torch.Generator().manual_seed(0))
    return q, k, v


def planted_cache(config: ARKVConfig, q, k, v, steps: int = 0):
    T = q.shape[2]
    manager = make_manager(config, 1, (1, 1), PLANT_D, 1, T + steps)
    manager.caches[0](q, k, v, torch.arange(T))
    manager.compress()
    return manager.caches[0]


@pytest.mark.parametrize("method", ["evict", "h2o", "arkv"])
def test_planted_heavy_hitter_far_from_window_stays_original(method):
    """Key 10 takes most of every query's attention, far before the window; budget = window + 5.
    It is kept Original at prefill and through 24 decode steps whose queries keep attending to it
    (new keys neutral), while other tokens are evicted."""
    T, W, steps = 64, 8, 24
    q, k, v = planted(T, {10: 5.0})
    config = ARKVConfig(kv_budget=W + 5, window=W, method=method, oq_policy="paper", kv_quant="int8")  # arkv: Original
    cache = planted_cache(config, q, k, v, steps)
    assert {10} | set(range(T - W, T)) <= held(cache, 0, 0)[0]
    for step in range(steps):
        cache(q[:, :, :1], torch.zeros(1, 1, 1, PLANT_D), v[:, :, :1], torch.tensor([T + step]))
        assert 10 in held(cache, 0, 0)[0], f"the heavy hitter left Original at step {step}"


@pytest.mark.parametrize("method", ["evict", "arkv"])
def test_planted_pooling_keeps_heavy_hitter_neighbourhood(method):
    """Pooling (kernel 5) spreads key 10's score to keys 8..12, every other prefix key scores alike:
    with room for 5 tokens beyond the window, exactly 8..12 are kept."""
    T, W = 64, 8
    q, k, v = planted(T, {10: 5.0})
    cache = planted_cache(ARKVConfig(kv_budget=W + 5, window=W, method=method, oq_policy="paper", kv_quant="int8"), q, k, v)
    assert held(cache, 0, 0) == (set(range(8, 13)) | set(range(T - W, T)), set())


@pytest.mark.parametrize("method, policy", [("evict", "paper"), ("h2o", "paper"), ("quant", "paper"),
                                            ("arkv", "coverage")])
def test_planted_weakest_tokens_are_evicted(method, policy):
    """Keys 10..14 get almost no attention (logit -8), all others the same; the prompt is 5 tokens
    longer than C_o + C_q: exactly those five are evicted (their pooled scores are the lowest)."""
    W, N = 4, 24
    bo, bq = 2 * PLANT_D * 4, quantized_token_bytes("int8", PLANT_D)
    rho = 1.0 if method in ("evict", "h2o") else 0.0  # coverage: nothing fits, so no Original upgrade
    c_o, c_q = ref_capacities(rho, N, W, bo, bq)
    T = c_o + c_q + 5
    q, k, v = planted(T, {t: -8.0 for t in range(10, 15)})
    cache = planted_cache(ARKVConfig(kv_budget=N, window=W, method=method, oq_policy=policy, kv_quant="int8"), q, k, v)
    original, quantized = held(cache, 0, 0)
    assert original | quantized == set(range(T)) - set(range(10, 15))
    assert len(original) == c_o and set(range(T - W, T)) <= original


def test_h2o_prefill_keeps_most_accumulated_attention():
    """H2O keeps the keys with the most accumulated attention: key 20 (logit 1.5 for every window
    query) beats key 40 (logit 3 for one window query only: less attention in total, but a large
    variance over the window). Budget window + 1: key 20 is the one prefix token kept."""
    T, W = 64, 8
    q, k, v = planted(T, {20: 1.5}, lone={40: 3.0})
    cache = planted_cache(ARKVConfig(kv_budget=W + 1, window=W, method="h2o", kv_quant="int8"), q, k, v)
    probs = ref_window_probabilities(q, k, W)[0, 0]  # [W, T]
    accumulated = probs.sum(0)[: T - W]
    assert int(accumulated.argmax()) == 20, "the planted pattern must make key 20 the H2O choice"
    assert held(cache, 0, 0)[0] == {20} | set(range(T - W, T))
