"""Batched decoding with a position per row (eval.py's rows), against independent oracles.

Rows are prompts of different lengths, each prefilled alone into a one-row cache and stacked into one batch
(`KVCache.stack`, `ARKV.stack`); every decode step then runs all rows at once, each at its own position. Oracles:
transformers' logits for each prompt alone (tiny random Llama and Qwen3), the full cache (for every method with a
budget covering the sequence), and each row decoded alone in a batch of one (under real compression, with budgets
that differ between rows)."""
from __future__ import annotations

import pytest
import torch

from arkv import ARKV, ARKVConfig
from kv_arena import FORMATS
from model import KVCache, full_cache
from test_arkv import tiny_model
from test_model import converted

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = (7, 19, 12)  # prompt lengths of the rows
STEPS = 6


def rows_of_tokens(vocab: int, seed: int = 1, lengths=LENGTHS) -> list[torch.Tensor]:
    """One token sequence per row: its prompt then STEPS teacher-forced tokens."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, n + STEPS), generator=g) for n in lengths]


@torch.no_grad()
def prefill_rows(model, rows: list[torch.Tensor], make_manager) -> tuple[list, list[torch.Tensor]]:
    """Each row's prompt alone in a fresh one-row cache (full when make_manager(row) is None, else that manager's,
    compressed). Full caches share one length (the longest row's), so that they stack; an ARKV cache reads its
    row's sequence length from its size. Returns per row (its layer caches, its manager) and its prefill logits."""
    prepared, logits = [], []
    for b, tokens in enumerate(rows):
        n = tokens.shape[1] - STEPS
        manager = make_manager(b)
        if manager:
            model.setup_caches(1, tokens.shape[1], manager.cache_factory)
        else:
            model.setup_caches(1, max(r.shape[1] for r in rows))
        logits.append(model(tokens[:, :n], torch.arange(n)))
        if manager:
            manager.compress()
        prepared.append(([layer.attention.kv_cache for layer in model.layers], manager))
    return prepared, logits


@torch.no_grad()
def decode_batched(model, rows: list[torch.Tensor], prepared: list, arena: int | None = None) -> list[torch.Tensor]:
    """The rows stacked into one batch, then STEPS decode steps with input_pos [B, 1]: logits per step [B, vocab]."""
    if prepared[0][1] is None:
        caches = [KVCache.stack(list(layer)) for layer in zip(*(p[0] for p in prepared))]
    else:
        caches = ARKV.stack([p[1] for p in prepared], arena).caches
    model.setup_caches(len(rows), max(r.shape[1] for r in rows), lambda layer, *_: caches[layer])
    out, lengths = [], [r.shape[1] - STEPS for r in rows]
    for i in range(STEPS):
        token = torch.cat([r[:, n + i] for r, n in zip(rows, lengths)])[:, None]  # [B, 1]
        input_pos = torch.tensor([[n + i] for n in lengths])  # [B, 1]
        out.append(model(token, input_pos)[:, 0])
    return out


@torch.no_grad()
def decode_alone(model, tokens: torch.Tensor, n: int, manager: ARKV | None) -> list[torch.Tensor]:
    """One row's STEPS decode steps in a batch of one, from its own prefill."""
    model.setup_caches(1, tokens.shape[1], manager.cache_factory if manager else full_cache)
    model(tokens[:, :n], torch.arange(n))
    if manager:
        manager.compress()
    return [model(tokens[:, n + i:n + i + 1], torch.tensor([n + i]))[:, 0] for i in range(STEPS)]


@pytest.mark.parametrize("case", ["llama3-rope-factor8", "qwen3-qknorm-tied"])
def test_batched_rows_of_different_lengths_match_transformers(tmp_path, case):
    hf, ours = converted(tmp_path, case, "rope_parameters")
    rows = rows_of_tokens(ours.args.vocab_size)
    prepared, prefill_logits = prefill_rows(ours, rows, lambda b: None)
    steps = decode_batched(ours, rows, prepared)
    for b, tokens in enumerate(rows):
        with torch.no_grad():
            expected = hf(tokens).logits[0]  # [n + STEPS, vocab]: the row alone, no padding
        n = LENGTHS[b]
        assert (prefill_logits[b][0] - expected[:n]).abs().max() <= 1e-4
        got = torch.stack([step[b] for step in steps])  # [STEPS, vocab]
        assert (got - expected[n:]).abs().max() <= 1e-4, f"row {b}"


METHOD_CASES = [("arkv", "paper", q) for q in FORMATS] + [("arkv", "coverage", "int4"), ("evict", "paper", "int4"),
                                                          ("quant", "paper", "int8"), ("streaming", "paper", "int4"),
                                                          ("h2o", "paper", "int4")]


@pytest.mark.parametrize("method, policy, kv_quant", METHOD_CASES)
def test_batched_rows_with_a_covering_budget_equal_the_full_cache(method, policy, kv_quant):
    """Budgets >= every row's sequence keep every token Original: each method's batched logits equal the full
    cache's, row by row."""
    model = tiny_model(4, 2, 64)
    rows = rows_of_tokens(model.args.vocab_size, seed=2)
    expected = decode_batched(model, rows, prefill_rows(model, rows, lambda b: None)[0])
    budget = max(r.shape[1] for r in rows)
    config = ARKVConfig(kv_budget=budget, method=method, oq_policy=policy, window=4, kv_quant=kv_quant)
    prepared, _ = prefill_rows(model, rows, lambda b: ARKV(config, model.args, torch.float32))
    got = decode_batched(model, rows, prepared, arena=budget)
    for step_got, step_expected in zip(got, expected):
        torch.testing.assert_close(step_got, step_expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method, policy, kv_quant", METHOD_CASES)
def test_batched_rows_under_compression_equal_each_row_alone(method, policy, kv_quant):
    """Budgets smaller than the sequence and different per row (so the stacked arena is larger than some rows'):
    each row's batched logits and final token states equal those of the row decoded alone."""
    configs = [ARKVConfig(kv_budget=n, method=method, oq_policy=policy, window=4, kv_quant=kv_quant, sinks=2)
               for n in (13, 15, 13)]  # even int4 cannot hold every token; each arena holds a tile of int8 tokens
    check_rows_equal_alone(configs, quantizes=method == "quant" or policy == "coverage")


def test_rows_of_methods_that_decode_alike_share_a_batch():
    """eval.py batches the rows of arkv, quant and evict together (arkv.decode_family): each row, under the family's
    rule, still decodes exactly as its own method alone; methods that decode differently refuse to stack."""
    methods = [("evict", "paper"), ("arkv", "coverage"), ("quant", "paper")]
    configs = [ARKVConfig(kv_budget=n, method=m, oq_policy=policy, window=4, kv_quant="int4")
               for n, (m, policy) in zip((13, 15, 13), methods)]
    check_rows_equal_alone(configs, quantizes=True)
    model = tiny_model(4, 2, 64, seed=3)
    managers = []
    for method in ("arkv", "h2o"):
        manager = ARKV(ARKVConfig(kv_budget=6, method=method, window=4), model.args, torch.float32)
        model.setup_caches(1, 20, manager.cache_factory)
        model(torch.zeros(1, 10, dtype=torch.long), torch.arange(10))
        manager.compress()
        managers.append(manager)
    with pytest.raises(ValueError, match="decode differently"):
        ARKV.stack(managers, 6)


def check_rows_equal_alone(configs: list[ARKVConfig], quantizes: bool):
    """Rows of different lengths, one per config, prefilled and compressed alone, then decoded in one batch: each
    row's logits and token states equal those of the row decoded alone (`decode_alone`)."""
    model = tiny_model(4, 2, 64, seed=3)
    lengths = (40, 70, 55)
    rows = rows_of_tokens(model.args.vocab_size, seed=4, lengths=lengths)
    prepared, _ = prefill_rows(model, rows, lambda b: ARKV(configs[b], model.args, torch.float32))
    got = decode_batched(model, rows, prepared, arena=32)
    batched_states = [held_positions(model, b) for b in range(len(rows))]
    for b, tokens in enumerate(rows):
        alone = decode_alone(model, tokens, lengths[b], ARKV(configs[b], model.args, torch.float32))
        for step_got, step_alone in zip(got, alone):
            torch.testing.assert_close(step_got[b], step_alone[0], atol=3e-5, rtol=0)  # float32 sums over other slot counts
        assert batched_states[b] == held_positions(model, 0), f"row {b}: token states differ from the row alone"
    quantized = [bool(q) for state in batched_states for layer in state for _, q in layer]
    if quantizes:  # the paper's shares may leave a tiny model's layers all Original
        assert any(quantized), "nothing Quantized: the Quantized region is untested"
    evicted = [len(o) + len(q) < lengths[b] + STEPS - 1 for b, state in enumerate(batched_states) for layer in state
               for o, q in layer]
    assert all(evicted), "a budget held the whole sequence: nothing was compressed"


def held_positions(model, row: int) -> list[list[tuple[set, set]]]:
    """Per layer and KV head: the (Original, Quantized) positions that batch row `row` holds."""
    out = []
    for layer in model.layers:
        cache = layer.attention.kv_cache
        out.append([({p for p in cache.o_pos[row, h].tolist() if p >= 0}, {p for p in cache.q_pos[row, h].tolist() if p >= 0})
                    for h in range(cache.o_pos.shape[1])])
    return out


def test_full_cache_in_bfloat16_holds_half_the_bytes_and_attends_to_the_rounded_values():
    """--kv-dtype bfloat16 beside float32 compute: half the buffer bytes, and a decode step equals float32
    attention over the bfloat16-rounded K/V (the new token's included)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, n, 10, 16, generator=g) for n in (4, 2, 2))  # B 2, H 4, Hkv 2, T 10, D 16
    assert KVCache(2, 2, 16, 10, torch.bfloat16).nbytes() * 2 == KVCache(2, 2, 16, 10, torch.float32).nbytes()
    cache = KVCache(2, 2, 16, 10, torch.bfloat16)
    cache(q[:, :, :9], k[:, :, :9], v[:, :, :9], torch.arange(9))
    got = cache(q[:, :, 9:], k[:, :, 9:], v[:, :, 9:], torch.tensor([9]))
    expected = reference_attention(q[:, :, 9:], k.bfloat16().double(), v.bfloat16().double())
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    unrounded = reference_attention(q[:, :, 9:], k.double(), v.double())
    assert (unrounded - expected).abs().max() > 1e-4, "rounding to bfloat16 must be visible at this tolerance"


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in float64, query head h reading KV head h // (H / Hkv)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("kv_quant", ["int4", "fp8"])
def test_triton_kernel_reads_each_rows_own_bounds(kv_quant):
    """A stacked cache whose rows have different capacities (o_capacity, q_first per row): the Triton kernel
    (interpreted on the CPU) equals its PyTorch twin, which reads every slot a row may hold."""
    import decode_kernels
    from decode_kernels import mixed_precision_attention

    if not decode_kernels.available():
        pytest.skip("Triton is not installed")
    model = tiny_model(4, 2, 64, seed=5)
    rows = rows_of_tokens(model.args.vocab_size, seed=6, lengths=(40, 70, 55))
    configs = [ARKVConfig(kv_budget=n, window=4, kv_quant=kv_quant, oq_policy="coverage") for n in (6, 20, 24)]
    prepared, _ = prefill_rows(model, rows, lambda b: ARKV(configs[b], model.args, torch.float32))
    cache = ARKV.stack([p[1] for p in prepared], 32).caches[1]
    assert len(set(cache.q_first.tolist())) == 3 and (cache.q_pos >= 0).any()
    assert kv_quant != "int4" or len(set(cache.o_capacity.tolist())) == 3  # int4 leaves bytes for upgrades
    q = torch.randn(3, 4, 1, 64, generator=torch.Generator().manual_seed(7))
    payload, meta = cache.tile_views()
    args = (q, cache.original_view(), cache.o_pos, payload, meta, cache.q_pos, kv_quant)
    y, probs = decode_kernels.tristate_attention(*args, cache.o_capacity, cache.q_first, split=32, block=16)
    y_twin, probs_twin = mixed_precision_attention(*args)
    torch.testing.assert_close(y, y_twin, atol=1e-5, rtol=0)
    torch.testing.assert_close(probs, probs_twin, atol=1e-5, rtol=0)


def test_bfloat16_kv_on_smollm2_answers_paris_and_finds_the_pass_key(smollm2_checkpoint):
    """SmolLM2 computing in float32 with K/V stored in bfloat16 (--kv-dtype) answers as with a float32 cache: the
    capital question, and a 5-digit pass key hidden in ~2.5k tokens of essays; ARKV's arena is half the bytes."""
    from conftest import asset
    from generate import generate, load_model
    from tokenizer import load_tokenizer

    essays = sorted(asset("haystack/PaulGrahamEssays").glob("*.txt"))
    model, tokenizer = load_model(smollm2_checkpoint, "cpu", torch.float32), load_tokenizer(smollm2_checkpoint)
    words = " ".join(path.read_text() for path in essays[:3]).split()[:1900]
    document = " ".join(words[:950] + ["The pass key is 69294. Remember it. 69294 is the pass key."] + words[950:])
    prompts = {"Paris": "What is the capital of France?",
               "69294": document + "\n\nWhat is the pass key? The pass key is"}
    for answer, text in prompts.items():
        ids = tokenizer.prompt_ids(text, chat=answer == "Paris")
        replies = []
        for kv_dtype in (torch.float32, torch.bfloat16):
            model.setup_caches(1, len(ids) + 12, kv_dtype=kv_dtype)
            tokens, _ = generate(model, torch.tensor([ids]), 12, tokenizer.eos_ids)
            replies.append(tokenizer.decode(tokens))
        assert all(answer in reply for reply in replies), replies
    halves = [ARKV(ARKVConfig(kv_budget=64), model.args, dtype) for dtype in (torch.float32, torch.bfloat16)]
    assert halves[0].slots.arena_bytes == 2 * halves[1].slots.arena_bytes
