"""The compiled ARKV decode step equals eager and compiles once for all steps and prompts."""
import pytest
import torch
from torch._dynamo.utils import counters

from arkv import ARKV, ARKVConfig
from decode_kernels import mixed_precision_attention
from kv_arena import FORMATS
from generate import compile_decode_step, decode_one_token, generate
from model import ModelArgs, Transformer
from test_decode_kernels import filled_cache

ARGS = ModelArgs(dim=128, n_layer=2, n_head=4, n_kv_heads=2, head_dim=64, intermediate_size=192, vocab_size=256,
                 max_seq_len=512)


ATTENTION = ["torch"] + (["triton"] if torch.cuda.is_available() else [])  # what this machine can compile


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("method, policy", [("arkv", "coverage"), ("evict", "paper")])
def test_compiled_arkv_decode_equals_eager_without_recompiling(method, policy, attention):
    device = "cuda" if attention == "triton" else "cpu"
    torch.manual_seed(0)
    model = Transformer(ARGS).to(device).eval()
    config = ARKVConfig(kv_budget=24, window=8, method=method, oq_policy=policy, attention=attention)
    manager = ARKV(config, ARGS, torch.float32)
    compiled_step = compile_decode_step(torch.device(device))
    torch._dynamo.reset()
    counters.clear()
    for prompt_len in (100, 137):  # two prompts of different length, 64 decode steps each
        prompt = torch.randint(0, ARGS.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
        prompt = prompt.to(device)
        runs = []
        for step in (decode_one_token, compiled_step):
            model.setup_caches(1, prompt_len + 65, manager.cache_factory)
            tokens, _ = generate(model, prompt, 65, decode_step=step, after_prefill=manager.compress)
            report = manager.report(prompt_len + 64)
            runs.append((tokens, report["original"], report["quantized"]))
        assert runs[0] == runs[1]
        assert report["evicted"] > 0 and (method == "evict" or report["quantized"] > 0)
    assert counters["stats"]["unique_graphs"] == 1


def masked_full_scan(q: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: attention over every slot of both views of the arena, dead slots (position -1)
    masked, in plain PyTorch: output [B, H, 1, D] and probabilities [B, Hkv, G, N + M]."""
    payload, meta = cache.quantized_views()
    kv = torch.cat([cache.original_view().float(), FORMATS[cache.config.kv_quant].dequantize(payload, meta)], dim=2)
    pos = torch.cat([cache.o_pos, cache.q_pos], dim=-1)  # [B, Hkv, N + M]
    kv = torch.where(pos[..., None, None] >= 0, kv, 0.0)  # [B, Hkv, N + M, 2, D]
    B, H, _, D = q.shape
    qg = q.view(B, pos.shape[1], -1, D)  # [B, Hkv, G, D]
    scores = torch.einsum("bhgd,bhtd->bhgt", qg, kv[:, :, :, 0]) / D**0.5
    probs = torch.softmax(scores.masked_fill(pos[:, :, None] < 0, -torch.inf), dim=-1)
    return torch.einsum("bhgt,bhtd->bhgd", probs, kv[:, :, :, 1]).reshape(B, H, 1, D), probs


def test_compiled_attention_one_graph_for_every_split():
    """Eager and compiled mixed-precision attention equal the masked full scan for every
    Original:Quantized split, from all Original to nearly all Quantized, and the compiled function
    never recompiles (the split is data, not a shape)."""
    compiled = torch.compile(mixed_precision_attention, fullgraph=True)
    torch._dynamo.reset()
    counters.clear()
    splits = set()
    for seed, rho in enumerate([1.0, 0.6, 0.25, 0.0]):
        cache = filled_cache("int4", torch.float32, batch=2, n_kv_heads=2, head_dim=64, kv_budget=40, window=4, rho=rho,
                             live_original=0.8, live_quantized=0.7, seed=seed)
        splits.add((int(cache.o_capacity[0]), int(cache.q_first[0])))
        q = torch.randn(2, 6, 1, 64, generator=torch.Generator().manual_seed(seed))
        payload, meta = cache.tile_views()
        args = (q, cache.original_view(), cache.o_pos, payload, meta, cache.q_pos, "int4")
        y_oracle, probs_oracle = masked_full_scan(q, cache)
        for attention in (mixed_precision_attention, compiled):
            y, probs = attention(*args)
            torch.testing.assert_close(y, y_oracle, atol=1e-5, rtol=0)
            torch.testing.assert_close(probs, probs_oracle, atol=1e-6, rtol=0)
    assert len(splits) == 4 and counters["stats"]["unique_graphs"] == 1, splits
