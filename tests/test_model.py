"""model.py + convert.py + checkpoint.py's loader against independent oracles.

Oracles: transformers' Llama/Qwen3 built in-process from tiny random configs, transformers loading
the real SmolLM2 GGUF, and llama2.c's published greedy output of stories260K."""
import json

import pytest
import torch

from conftest import asset, smollm2_gguf
from checkpoint import load_model
from convert import convert_hf
from generate import generate
from model import ModelArgs

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=256,
            max_position_embeddings=128, rms_norm_eps=1e-5)
CASES = {
    "llama-gqa-untied": ("llama", dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False)),
    "llama-headdim-tied": ("llama", dict(num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)),
    "llama3-rope-factor8": ("llama", dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True,
                                          rope_scaling={"rope_type": "llama3", "factor": 8.0, **LLAMA3_ROPE})),
    "llama3-rope-factor32": ("llama", dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False,
                                           rope_scaling={"rope_type": "llama3", "factor": 32.0, **LLAMA3_ROPE})),
    "qwen3-qknorm-tied": ("qwen3", dict(num_key_value_heads=2, head_dim=32, rope_theta=1e6, tie_word_embeddings=True)),
    "qwen3-mha-untied": ("qwen3", dict(num_key_value_heads=4, head_dim=16, rope_theta=1e6, tie_word_embeddings=False)),
}


def hf_model(kind: str, extra: dict):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(**TINY, **extra)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen3Config(**TINY, **extra)
        model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():  # random norm weights, so a wrong norm cannot hide behind ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.float().eval()


def rewrite_config_classic(folder):
    """Turn transformers 5.x `rope_parameters` into the classic top-level rope_theta / rope_scaling."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = rope
    path.write_text(json.dumps(config))


def converted(tmp_path, case: str, form: str):
    kind, extra = CASES[case]
    model = hf_model(kind, extra)
    src, out = tmp_path / "hf", tmp_path / "ours"
    model.save_pretrained(src)
    assert "rope_parameters" in json.loads((src / "config.json").read_text())
    if form == "classic":
        rewrite_config_classic(src)
    convert_hf(src, out)
    return model, load_model(out, "cpu", torch.float32)


def step_logits(model, ids: torch.Tensor, n_prefill: int) -> torch.Tensor:
    """Logits of prefill over ids[:, :n_prefill], then of one decode step per remaining token."""
    model.setup_caches(ids.shape[0], ids.shape[1])
    with torch.no_grad():
        out = [model(ids[:, :n_prefill], torch.arange(n_prefill))]
        for pos in range(n_prefill, ids.shape[1]):
            out.append(model(ids[:, pos:pos + 1], torch.tensor([pos])))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("case, form", [(case, "rope_parameters") for case in CASES]
                         + [("llama3-rope-factor8", "classic"), ("qwen3-qknorm-tied", "classic")])
def test_logits_match_transformers(tmp_path, case, form):
    hf, ours = converted(tmp_path, case, form)
    ids = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    got = step_logits(ours, ids, n_prefill=20)  # 20 prefill positions + 20 decode steps
    assert (got - expected).abs().max().item() <= 1e-4


def test_config_forms_agree():
    classic = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 256, "rope_theta": 500000.0,
               "rope_scaling": {"rope_type": "llama3", "factor": 32.0, **LLAMA3_ROPE}}
    new = {k: v for k, v in classic.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 32.0, **LLAMA3_ROPE}
    a, b = ModelArgs.from_hf_config(classic), ModelArgs.from_hf_config(new)
    assert a == b and a.rope_scaling["factor"] == 32.0 and a.head_dim == 16


@pytest.mark.parametrize("bad, message", [
    ({"model_type": "mistral"}, "unsupported model_type"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "unsupported rope_type"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "unsupported rope_type"),
    ({"use_sliding_window": True}, "sliding-window"),
    ({"attention_bias": True}, "biases"),
])
def test_unsupported_configs_are_refused(bad, message):
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 96, "vocab_size": 256, **bad}
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_hf_config(config)


def test_prefill_equals_token_by_token(tmp_path):
    _, ours = converted(tmp_path, "qwen3-qknorm-tied", "rope_parameters")
    ids = torch.randint(0, TINY["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(2))
    one_go = step_logits(ours, ids, n_prefill=24)
    token_by_token = step_logits(ours, ids, n_prefill=1)
    assert (one_go - token_by_token).abs().max().item() <= 1e-5


def test_smollm2_gguf_matches_transformers(smollm2_checkpoint):
    gguf = smollm2_gguf()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()
    ours = load_model(smollm2_checkpoint, "cpu", torch.float32)
    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(ids).logits
    got = step_logits(ours, ids, n_prefill=32)  # 32 prefill positions + 16 decode steps
    assert (got - expected).abs().max().item() <= 1e-3  # 30 layers of float32 (observed ~3e-5)


def test_stories260k_reproduces_llama2c_golden_output(tmp_path):
    from tokenizer import load_tokenizer

    folder = asset("stories260K-hf")
    convert_hf(folder, tmp_path / "stories")
    model = load_model(tmp_path / "stories", "cpu", torch.float32)
    tokenizer = load_tokenizer(tmp_path / "stories")
    model.setup_caches(1, 257)
    # llama2.c `run -n 256`: forward at positions 0..255, one sampled token each, stop at BOS (= 1)
    tokens, _ = generate(model, torch.tensor([[tokenizer.bos_id]]), 256, tokenizer.eos_ids)
    golden = (folder / "golden_greedy_from_bos.txt").read_text()
    assert tokenizer.decode([t for t in tokens if t not in tokenizer.eos_ids]) == golden.rstrip("\n")


def test_compiled_decode_equals_eager_without_recompiling(tmp_path):
    from torch._dynamo.utils import counters

    from generate import compile_decode_step

    _, ours = converted(tmp_path, "llama-gqa-untied", "rope_parameters")
    prompt = torch.randint(0, TINY["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(4))
    ours.setup_caches(1, 48)
    eager, _ = generate(ours, prompt, 33)
    torch._dynamo.reset()
    counters.clear()
    compiled_step = compile_decode_step(torch.device("cpu"))
    compiled, _ = generate(ours, prompt, 33, decode_step=compiled_step)  # 32 decode steps
    assert compiled == eager
    assert counters["stats"]["unique_graphs"] == 1  # one graph for all 32 steps: no recompilation


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_attention_equals_eager(kv_dtype):
    """The compiled decode attention (a sum per query head of the GQA group) equals eager's matmuls,
    for every head of a 3-head group, rows with their own valid slots, and a 16-bit cache."""
    from decode_kernels import decode_attention

    torch.manual_seed(0)
    B, n_kv_heads, G, T, D = 2, 2, 3, 70, 64
    q = torch.randn(B, n_kv_heads * G, 1, D)
    k, v = (torch.randn(B, n_kv_heads, T, D).to(kv_dtype) for _ in range(2))
    valid = torch.rand(B, 1, T) < 0.8
    compiled = torch.compile(decode_attention, fullgraph=True, dynamic=False)
    for got, expected in zip(compiled(q, k, v, valid), decode_attention(q, k, v, valid)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gguf_tokenizer_matches_hf_tokenizers(smollm2_checkpoint):
    """convert.py's tokenizer.json loads in Hugging Face `tokenizers` and encodes like tokenizer.py."""
    from tokenizers import Tokenizer as HFTokenizer

    from tokenizer import load_tokenizer

    text = "The pass key is 40512.  Remember it: a  12, x.5, it's 2024!\n\n<|im_start|>user\nhi<|im_end|>"
    expected = HFTokenizer.from_file(str(smollm2_checkpoint / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert load_tokenizer(smollm2_checkpoint).encode(text) == expected
