"""The compiled ARKV decode step equals eager and compiles once for all steps and prompts."""
import pytest
import torch
from torch._dynamo.utils import counters

from arkv import ARKV, ARKVConfig
from generate import decode_one_token, generate
from model import ModelArgs, Transformer

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
    compiled_step = torch.compile(decode_one_token, fullgraph=True)
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
