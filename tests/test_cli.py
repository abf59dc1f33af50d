"""Bad input to generate.py and convert.py: one clear line on stderr and a non-zero exit."""
import json

import pytest

import convert
import generate


def run_main(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    err = err or str(exit_info.value.code)  # sys.exit("message") carries the text in the exception
    assert "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("argv, expected", [
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-k", "0"], "--top-k"),
    (["--dtype", "float8"], "--dtype"),
    (["--device", "tpu:banana"], "--device"),
    (["--prompt", "a", "--prompt-file", "b"], "not allowed with"),
    (["--kv-budget", "0"], "--kv-budget"),
    (["--kv-budget", "lots"], "--kv-budget"),
    (["--kv-budget", "150%"], "--kv-budget"),
    (["--kv-budget", "-5"], "--kv-budget"),
    (["--method", "snapkv"], "--method"),
    (["--kv-quant", "int3"], "--kv-quant"),
    (["--oq-policy", "greedy"], "--oq-policy"),
    (["--window", "-1"], "--window"),
    (["--gamma", "-1"], "--gamma"),
    (["--pool-kernel", "4"], "--pool-kernel"),
    (["--pool-kernel", "0"], "--pool-kernel"),
    (["--tau", "1", "0", "1"], "--tau"),
    (["--prefill-chunk", "0"], "--prefill-chunk"),
    (["--attention", "cuda"], "--attention"),
])
def test_bad_flags(argv, expected, capsys):
    assert expected in run_main(generate.main, argv, capsys)


def test_missing_checkpoint(tmp_path, capsys):
    err = run_main(generate.main, ["--checkpoint", str(tmp_path / "nope")], capsys)
    assert "no such directory" in err


def test_empty_checkpoint(tmp_path, capsys):
    err = run_main(generate.main, ["--checkpoint", str(tmp_path)], capsys)
    assert "model_args.json" in err


def test_unconverted_hf_folder_gets_a_hint(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert "convert.py" in run_main(generate.main, ["--checkpoint", str(tmp_path)], capsys)


def test_missing_prompt_file(smollm2_checkpoint, tmp_path, capsys):
    argv = ["--checkpoint", str(smollm2_checkpoint), "--prompt-file", str(tmp_path / "missing.txt")]
    assert "--prompt-file" in run_main(generate.main, argv, capsys)


def test_prompt_longer_than_context(smollm2_checkpoint, capsys):
    argv = ["--checkpoint", str(smollm2_checkpoint), "--prompt", "hello " * 9000, "--max-new-tokens", "4"]
    assert "model context is 8192" in run_main(generate.main, argv, capsys)


def test_convert_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    err = run_main(convert.main, [str(tmp_path), "--out", str(tmp_path / "out")], capsys)
    assert "config.json" in err and "unsupported model_type" in err


def test_convert_unsupported_rope(tmp_path, capsys):
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 96, "vocab_size": 256, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert "unsupported rope_type 'yarn'" in run_main(convert.main, [str(tmp_path)], capsys)


def test_convert_folder_without_weights(tmp_path, capsys):
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 96, "vocab_size": 256}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert "no *.safetensors" in run_main(convert.main, [str(tmp_path), "--out", str(tmp_path / "o")], capsys)


def test_convert_missing_source(tmp_path, capsys):
    assert "not a Hugging Face checkpoint folder" in run_main(convert.main, [str(tmp_path / "x.bin")], capsys)


def test_budget_smaller_than_window(smollm2_checkpoint, capsys):
    argv = ["--checkpoint", str(smollm2_checkpoint), "--kv-budget", "16", "--window", "32", "--max-new-tokens", "2"]
    assert "smaller than the window 32" in run_main(generate.main, argv, capsys)


def test_prefill_chunk_smaller_than_window(smollm2_checkpoint, capsys):
    argv = ["--checkpoint", str(smollm2_checkpoint), "--kv-budget", "64", "--prefill-chunk", "8", "--max-new-tokens", "2"]
    assert "--prefill-chunk 8: expected at least the window (32)" in run_main(generate.main, argv, capsys)


def test_triton_attention_needs_cuda_or_the_interpreter(smollm2_checkpoint, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = ["--checkpoint", str(smollm2_checkpoint), "--kv-budget", "64", "--attention", "triton", "--device", "cpu",
            "--max-new-tokens", "2"]
    assert "--attention triton: needs a CUDA device" in run_main(generate.main, argv, capsys)


@pytest.mark.parametrize("argv, expected", [
    (["--lengths", "0"], "--lengths"),
    (["--lengths", "9000"], "--lengths 9000: the model context is 8192"),
    (["--dtype", "int8"], "--dtype"),
])
def test_bench_bad_flags(argv, expected, smollm2_checkpoint, capsys):
    import bench

    assert expected in run_main(bench.main, ["--checkpoint", str(smollm2_checkpoint), *argv], capsys)


# ---------------------------------------------------------------------------------------------
# Issue 12: damaged inputs, flags without effect, budgets that fit. A tiny random model with a
# byte-level tokenizer (ids = bytes) keeps these fast; damaged copies of it are made per test.

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from model import ModelArgs, Transformer  # noqa: E402
from tokenizer import BYTE_OF_CHAR  # noqa: E402

TINY = dict(dim=32, n_layer=2, n_head=2, n_kv_heads=1, head_dim=64, intermediate_size=64, vocab_size=257,
            max_seq_len=512, tie_embeddings=True)
PROMPT5 = ["--prompt", "abcde", "--max-new-tokens", "2"]  # 5 byte tokens + 2 new: a 7-token sequence


def tiny_state(args: ModelArgs) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = Transformer(args).state_dict()
    return {name: t.detach().clone() for name, t in state.items() if not (args.tie_embeddings and name == "output.weight")}


def write_tiny_checkpoint(out: Path, **overrides) -> Path:
    """A converted checkpoint of a random 2-layer model; the tokenizer maps each byte to its id."""
    args = ModelArgs(**{**TINY, **overrides}, name="tiny")
    convert.write(out, args, tiny_state(args))
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    spec = {"added_tokens": [{"id": 256, "content": "<|im_end|>", "special": True}], "normalizer": None,
            "pre_tokenizer": byte_level, "decoder": byte_level,
            "model": {"type": "BPE", "vocab": dict(BYTE_OF_CHAR), "merges": []}}
    (out / "tokenizer.json").write_text(json.dumps(spec))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "add_bos_token": False}))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture
def tiny_copy(tiny, tmp_path) -> Path:
    return Path(shutil.copytree(tiny, tmp_path / "ckpt"))


def edit_json(path: Path, **changes):
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps({k: v for k, v in values.items() if v is not DROP}))


def edit_weights(path: Path, edit):
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


DROP = object()


def test_tiny_checkpoint_generates(tiny, capsys):
    generate.main(["--checkpoint", str(tiny), *PROMPT5])
    err = capsys.readouterr().err
    assert "prompt: 5 tokens, generated: 2 tokens" in err and "note" not in err and "warning" not in err


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def set_nan(state):
    state["layers.1.feed_forward.w2.weight"][0, 0] = float("nan")


def set_int(state):
    state["norm.weight"] = state["norm.weight"].to(torch.int32)


def rename(state):
    state["layers.0.ffn_norm.bias"] = state.pop("layers.0.ffn_norm.weight")


def add_output(state):
    state["output.weight"] = state["tok_embeddings.weight"].clone()


@pytest.mark.parametrize("damage, expected", [
    (truncate, "model.safetensors: not a readable safetensors file (Error while deserializing header"),
    (lambda p: p.write_bytes(b""), "model.safetensors: not a readable safetensors file"),
    (lambda p: p.write_bytes(b"\xff" * 64), "model.safetensors: not a readable safetensors file"),
    (lambda p: edit_weights(p, rename), "model.safetensors: tensors do not match model_args.json (1 missing "
                                        "['layers.0.ffn_norm.weight'], 1 unexpected ['layers.0.ffn_norm.bias'])"),
    (lambda p: edit_weights(p, add_output), "unexpected ['output.weight']"),
    (lambda p: edit_weights(p, set_nan), "model.safetensors: tensor layers.1.feed_forward.w2.weight holds NaN"),
    (lambda p: edit_weights(p, set_int), "model.safetensors: tensor norm.weight is torch.int32; expected floating-point"),
])
def test_damaged_weights(damage, expected, tiny_copy, capsys):
    damage(tiny_copy / "model.safetensors")
    assert expected in run_main(generate.main, ["--checkpoint", str(tiny_copy), *PROMPT5], capsys)


@pytest.mark.parametrize("changes, expected", [
    (dict(dim=48), "model.safetensors: tensor tok_embeddings.weight has shape [257, 32]; model_args.json gives [257, 48]"),
    (dict(vocab_size=300), "model_args.json gives [300, 32]"),
    (dict(intermediate_size=96), "has shape [64, 32]; model_args.json gives [96, 32]"),
    (dict(n_layer=3), "tensors do not match model_args.json (7 missing ['layers.2."),
    (dict(n_kv_heads=2), "tensor layers.0.attention.wqkv.weight has shape [256, 32]; model_args.json gives [384, 32]"),
    (dict(tie_embeddings=False), "1 missing ['output.weight']"),
    (dict(n_kv_heads=0), "model_args.json: n_kv_heads is 0; expected an integer >= 1"),
    (dict(dim="32"), "model_args.json: dim is '32'; expected an integer >= 1"),
    (dict(head_dim=63), "model_args.json: head_dim is 63; expected an even number"),
    (dict(norm_eps=-1), "model_args.json: norm_eps is -1; expected a number > 0"),
    (dict(n_head=3, n_kv_heads=2), "model_args.json: n_head 3 is not a multiple of n_kv_heads 2"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "model_args.json: rope_scaling"),
    (dict(rope_scaling="yes"), "model_args.json: rope_scaling is 'yes'; expected null or an object"),
    (dict(dim=DROP), "model_args.json: missing fields ['dim']"),
    (dict(layers=2), "unknown fields ['layers']"),
])
def test_model_args_disagree(changes, expected, tiny_copy, capsys):
    edit_json(tiny_copy / "model_args.json", **changes)
    assert expected in run_main(generate.main, ["--checkpoint", str(tiny_copy), *PROMPT5], capsys)


@pytest.mark.parametrize("name, text, expected", [
    ("model_args.json", "{\"dim\": 32,", "model_args.json: not valid JSON (Expecting"),
    ("model_args.json", "[1, 2]", "model_args.json: a JSON list; expected an object of ModelArgs fields, as convert.py writes it"),
    ("model_args.json", "", "model_args.json: not valid JSON"),
    ("tokenizer.json", "{\"vocab\": 1}", "tokenizer.json / tokenizer_config.json do not have the layout"),
    ("tokenizer.json", "{not json", "tokenizer.json: not valid JSON"),
    ("tokenizer_config.json", "[1]", "do not have the layout of a Hugging Face tokenizer"),
])
def test_damaged_json(name, text, expected, tiny_copy, capsys):
    (tiny_copy / name).write_text(text)
    assert expected in run_main(generate.main, ["--checkpoint", str(tiny_copy), *PROMPT5], capsys)


def test_tokenizer_ids_outside_the_model_vocab(tmp_path, capsys):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", vocab_size=100)  # the tokenizer knows 257 ids
    err = run_main(generate.main, ["--checkpoint", str(ckpt), "--prompt", "xyz"], capsys)
    assert "the tokenizer gives token id 120 but the model has vocab_size 100" in err


# -- convert.py, Hugging Face folder -----------------------------------------------------------

def write_tiny_hf(folder: Path, **config_changes) -> Path:
    """The tiny model as a Hugging Face folder (separate q/k/v, HF names)."""
    args = ModelArgs(**TINY)
    ours = tiny_state(args)
    hf_name = {ours_name: hf for hf, ours_name in convert.HF_LAYER_NAMES.items()}
    state = {"model.embed_tokens.weight": ours.pop("tok_embeddings.weight"), "model.norm.weight": ours.pop("norm.weight")}
    for name, t in ours.items():
        _, i, rest = name.split(".", 2)
        if rest == "attention.wqkv.weight":
            sizes = [args.n_head * args.head_dim, args.n_kv_heads * args.head_dim, args.n_kv_heads * args.head_dim]
            for p, part in zip("qkv", t.split(sizes)):
                state[f"model.layers.{i}.self_attn.{p}_proj.weight"] = part.contiguous()
        else:
            state[f"model.layers.{i}.{hf_name[rest]}"] = t
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))
    config = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 64, "intermediate_size": 64, "vocab_size": 257,
              "tie_word_embeddings": True, "max_position_embeddings": 512, **config_changes}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_convert_tiny_hf_folder(tmp_path, capsys):
    """The undamaged folder converts to the tiny model's weights (so the failures below come from the damage)."""
    convert.main([str(write_tiny_hf(tmp_path / "hf")), "--out", str(tmp_path / "out")])
    model = generate.load_model(tmp_path / "out", "cpu", torch.float32)
    expected = tiny_state(ModelArgs(**TINY))
    assert all(torch.equal(model.state_dict()[name], t) for name, t in expected.items())


def drop_up_proj(state):
    del state["model.layers.1.mlp.up_proj.weight"]


def drop_q_proj(state):
    del state["model.layers.0.self_attn.q_proj.weight"]


@pytest.mark.parametrize("damage, expected", [
    (truncate, "model.safetensors: not a readable safetensors file (Error while deserializing header"),
    (lambda p: p.write_bytes(b"\x00" * 7), "model.safetensors: not a readable safetensors file"),
    (lambda p: edit_weights(p, drop_up_proj), "tensors do not match config.json (1 missing ['layers.1.feed_forward.w3.weight']"),
    (lambda p: edit_weights(p, drop_q_proj), "tensor model.layers.0.self_attn.q_proj.weight is missing from model.safetensors"),
])
def test_convert_damaged_hf_weights(damage, expected, tmp_path, capsys):
    src = write_tiny_hf(tmp_path / "hf")
    damage(src / "model.safetensors")
    assert expected in run_main(convert.main, [str(src), "--out", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out" / "model_args.json").exists()


@pytest.mark.parametrize("changes, expected", [
    (dict(hidden_size=48), "tensor tok_embeddings.weight has shape [257, 32]; config.json gives [257, 48]"),
    (dict(num_hidden_layers=3), "tensor model.layers.2.self_attn.q_proj.weight is missing from model.safetensors"),
    (dict(num_key_value_heads=2), "config.json gives [384, 32]"),
    (dict(head_dim=None, num_attention_heads=0), "config.json: a head count is 0"),
    (dict(hidden_size="32"), "config.json: dim is '32'; expected an integer >= 1"),
    (dict(rope_scaling={"rope_type": "llama3"}), "config.json: rope_scaling {'rope_type': 'llama3'} lacks numeric factor"),
])
def test_convert_config_disagrees(changes, expected, tmp_path, capsys):
    src = write_tiny_hf(tmp_path / "hf", **changes)
    assert expected in run_main(convert.main, [str(src), "--out", str(tmp_path / "out")], capsys)


@pytest.mark.parametrize("text, expected", [
    ("{\"model_type\": \"llama\",", "config.json: not valid JSON (Expecting"),
    ("[]", "config.json: a JSON list; expected a Hugging Face config.json (a JSON object)"),
    ("{\"model_type\": \"llama\"}", "config.json: missing key 'num_attention_heads'"),
])
def test_convert_bad_config_json(text, expected, tmp_path, capsys):
    src = write_tiny_hf(tmp_path / "hf")
    (src / "config.json").write_text(text)
    assert expected in run_main(convert.main, [str(src), "--out", str(tmp_path / "out")], capsys)


def test_convert_unwritable_out(tmp_path, capsys):
    src = write_tiny_hf(tmp_path / "hf")
    (tmp_path / "file").write_text("")
    err = run_main(convert.main, [str(src), "--out", str(tmp_path / "file")], capsys)
    assert f"{tmp_path / 'file'}: cannot write the checkpoint ([Errno 17] File exists" in err


# -- convert.py, GGUF ----------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0, 3000, 20_000_000])  # empty, inside the metadata, inside the tensors
def test_convert_truncated_gguf(keep, tmp_path, capsys):
    from conftest import smollm2_gguf

    path = tmp_path / "model.gguf"
    with open(smollm2_gguf(), "rb") as f:
        path.write_bytes(f.read(keep))
    err = run_main(convert.main, [str(path), "--out", str(tmp_path / "out")], capsys)
    assert f"{path}: not a readable GGUF file (" in err and "truncated" in err


def test_convert_not_a_gguf(tmp_path, capsys):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGML" + b"\x00" * 60)
    assert f"{path}: not a readable GGUF file (GGUF magic invalid)" in run_main(convert.main, [str(path)], capsys)


# -- flags that would have no effect ------------------------------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["--window", "8"], "--window has no effect with the full cache"),
    (["--kv-quant", "int8"], "--kv-quant has no effect with the full cache"),
    (["--oq-policy", "coverage"], "--oq-policy has no effect with the full cache"),
    (["--gamma", "1"], "--gamma has no effect with the full cache"),
    (["--tau", "1", "1", "1"], "--tau has no effect with the full cache"),
    (["--attention", "torch"], "--attention has no effect with the full cache"),
    (["--method", "full", "--window", "8"], "--window has no effect with the full cache"),
    (["--kv-budget", "64", "--method", "full"], "--kv-budget 64 has no effect with --method full"),
    (["--kv-budget", "10%", "--method", "full"], "--kv-budget 10% has no effect with --method full"),
    (["--kv-budget", "64", "--method", "evict", "--kv-quant", "int8"], "--kv-quant has no effect with --method evict"),
    (["--kv-budget", "64", "--method", "h2o", "--tau", "1", "1", "1"], "--tau has no effect with --method h2o"),
    (["--kv-budget", "64", "--method", "quant", "--oq-policy", "coverage"], "--oq-policy has no effect with --method quant"),
    (["--kv-budget", "64", "--method", "streaming", "--gamma", "2"], "--gamma has no effect with --method streaming"),
    (["--kv-budget", "64", "--method", "h2o", "--pool-kernel", "3"], "--pool-kernel has no effect with --method h2o"),
    (["--pool-kernel", "3"], "--pool-kernel has no effect with the full cache"),
    (["--system", "Be brief."], "--system has no effect without --chat"),
    (["--top-k", "5"], "--top-k 5 has no effect with greedy decoding (--temperature 0)"),
    (["--query-mode", "aware"], "--query-mode aware has no effect without --question"),
    (["--question", "Why?", "--query-mode", "agnostic"], "--query-mode agnostic has no effect with the full cache"),
])
def test_flags_without_effect(argv, expected, tmp_path, capsys):
    """Checked before any checkpoint is read (a missing one here: without the check the run fails on that)."""
    assert expected in run_main(generate.main, ["--checkpoint", str(tmp_path / "none"), *argv], capsys)


def test_seed_without_sampling_warns(tiny, capsys):
    generate.main(["--checkpoint", str(tiny), "--seed", "3", *PROMPT5])
    err = capsys.readouterr().err
    assert "warning: --seed 3 has no effect with greedy decoding (--temperature 0)" in err
    generate.main(["--checkpoint", str(tiny), "--seed", "3", "--temperature", "0.7", "--top-k", "3", *PROMPT5])
    assert "warning" not in capsys.readouterr().err


def test_help_names_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in ["(default: coverage)", "(default: 32)", "(default: int4)", "(default: 263.8)",
                    "(default: 7.774 5.407 5.528)", "(default: auto)", "(default: 0)"]:
        assert default in text


def test_arkv_flags_keep_their_defaults(tiny, monkeypatch, capsys):
    """Flags not given still get their documented values (check_flags fills them in)."""
    seen = {}

    class Spy(generate.ARKVConfig):
        def __init__(self, **kwargs):
            seen.update(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr(generate, "ARKVConfig", Spy)
    generate.main(["--checkpoint", str(tiny), "--kv-budget", "5", "--window", "4", *PROMPT5])
    assert (seen["oq_policy"], seen["kv_quant"], seen["gamma"], seen["tau"]) == ("coverage", "int4", 263.8, (7.774, 5.407, 5.528))
    assert seen["attention"] == "torch" and seen["window"] == 4 and seen["kv_budget"] == 5 and seen["pool_kernel"] == 5
    generate.main(["--checkpoint", str(tiny), "--kv-budget", "5", "--window", "4", "--pool-kernel", "9", *PROMPT5])
    assert seen["pool_kernel"] == 9


# -- budgets that fit ------------------------------------------------------------------------------

def kv_bytes_of_run(argv, monkeypatch, capsys) -> tuple[int, str]:
    """Run generate.py; -> the KV bytes it allocated (model.cache_nbytes) and its stderr."""
    seen = []
    real = Transformer.cache_nbytes
    monkeypatch.setattr(Transformer, "cache_nbytes", lambda self: seen.append(real(self)) or seen[-1])
    generate.main(argv)
    return seen[-1], capsys.readouterr().err


@pytest.mark.parametrize("budget", ["4", "6", "7", "8", "64", "1000000"])
def test_arkv_arena_never_exceeds_the_full_cache(budget, tiny, monkeypatch, capsys):
    full, _ = kv_bytes_of_run(["--checkpoint", str(tiny), *PROMPT5], monkeypatch, capsys)
    assert full == 2 * 2 * 7 * 64 * 4  # K and V, 2 layers, 1 KV head, 7 tokens, head_dim 64, float32
    arkv, err = kv_bytes_of_run(["--checkpoint", str(tiny), "--kv-budget", budget, "--window", "4", *PROMPT5],
                                monkeypatch, capsys)
    assert arkv == min(int(budget), 7) * 2 * 2 * 64 * 4 <= full
    clamped = int(budget) > 7
    assert ("note: --kv-budget " + budget + " is more than the sequence (5 prompt + 2 new tokens): clamped to 7 tokens"
            in err) == clamped
    assert len([line for line in err.splitlines() if "clamped" in line]) == clamped


def test_clamped_budget_shrinks_the_window(tiny, monkeypatch, capsys):
    _, err = kv_bytes_of_run(["--checkpoint", str(tiny), "--kv-budget", "64", *PROMPT5], monkeypatch, capsys)
    assert "clamped to 7 tokens, the size of a full cache, every token kept Original; --window 32 reduced to 7" in err


def test_clamped_streaming_budget_keeps_window_and_sinks_inside(tiny, monkeypatch, capsys):
    argv = ["--checkpoint", str(tiny), "--kv-budget", "64", "--method", "streaming", "--prompt", "ab", "--max-new-tokens", "1"]
    arkv, err = kv_bytes_of_run(argv, monkeypatch, capsys)
    assert arkv == 3 * 2 * 2 * 64 * 4
    assert "clamped to 3 tokens" in err and "--window 32 reduced to 1; sink tokens reduced to 2" in err


def test_percent_budget_quotes_the_users_text(tiny, capsys):
    argv = ["--checkpoint", str(tiny), "--kv-budget", "10%", "--prompt", "abcdefghij", "--max-new-tokens", "2"]
    err = run_main(generate.main, argv, capsys)
    assert "--kv-budget 10% (1 token of the 10-token prompt) is smaller than the window 32 (--window)" in err
    argv[3] = "50%"
    err = run_main(generate.main, [*argv, "--method", "streaming", "--window", "4"], capsys)
    assert "--kv-budget 50% (5 tokens of the 10-token prompt): streaming needs the window 4 + 4 sink tokens" in err


@pytest.fixture
def no_allocation(monkeypatch):
    """About 1000 bytes free, and any cache allocation fails the test."""
    monkeypatch.setattr(generate, "available_memory", lambda device: (1000, "MemAvailable, patched"))

    def allocate(*args, **kwargs):
        raise AssertionError("setup_caches ran: the memory check must come first")

    monkeypatch.setattr(Transformer, "setup_caches", allocate)


def test_full_cache_that_does_not_fit(tiny, no_allocation, capsys):
    err = run_main(generate.main, ["--checkpoint", str(tiny), *PROMPT5], capsys)
    need = 2 * (2 * 7 * 64 * 4 + 8 * 7)  # 2 layers x (K+V of 7 tokens + int64 slot positions)
    assert (f"the full cache for 5 prompt + 2 new tokens: the KV cache would need {need:,} bytes (0.00 GiB) but 1,000 "
            "bytes (0.00 GiB) are available (MemAvailable, patched); give --kv-budget or lower --max-new-tokens") in err


def test_arkv_cache_that_does_not_fit(tiny, no_allocation, capsys):
    err = run_main(generate.main, ["--checkpoint", str(tiny), "--kv-budget", "6", "--window", "4", *PROMPT5], capsys)
    arena = 6 * 2 * 64 * 4  # 6 float32 tokens of K+V
    slots = 6 + arena // (32 * 80) * 32  # Original + int4 Quantized slots (80 bytes each, in whole tiles of 32)
    pending = 5 * 2 * 64 * 4  # the prompt's K/V, held by every layer until compression
    need = 2 * (arena + slots * (8 + 12) + pending)  # 2 layers; per slot an int64 position, 3 float32 statistics
    assert f"--kv-budget 6 (6 tokens): the KV cache would need {need:,} bytes" in err
    assert "but 1,000 bytes (0.00 GiB) are available (MemAvailable, patched); lower --kv-budget" in err


def test_available_memory_falls_back(monkeypatch, tmp_path):
    cpu = torch.device("cpu")
    free, source = generate.available_memory(cpu)
    assert free > 0 and "MemAvailable" in source
    monkeypatch.setattr(generate, "MEMINFO", tmp_path / "missing")
    free, source = generate.available_memory(cpu)
    assert free > 0 and "sysconf" in source

    def unreadable(name):
        raise ValueError(name)

    monkeypatch.setattr(generate.os, "sysconf", unreadable)
    assert generate.available_memory(cpu) is None
    generate.check_memory(10**15, "x", cpu, "y")  # unknown: no check rather than a crash


def test_prefill_chunk_covering_the_prompt_is_noted(tiny, capsys):
    generate.main(["--checkpoint", str(tiny), "--prefill-chunk", "4", *PROMPT5])  # 4 + a last 1-token chunk: one chunk
    assert "note: --prefill-chunk 4 has no effect: the 5-token prompt is one chunk" in capsys.readouterr().err
    generate.main(["--checkpoint", str(tiny), "--prefill-chunk", "3", *PROMPT5])
    assert "note" not in capsys.readouterr().err


def test_notes_wait_until_the_checks_pass(tiny_copy, capsys):
    """A run that fails prints its error alone, not the notes and warnings gathered before it."""
    (tiny_copy / "model_args.json").write_text("[]")
    err = run_main(generate.main, ["--checkpoint", str(tiny_copy), "--seed", "1", "--kv-budget", "64", *PROMPT5], capsys)
    assert err == f"generate.py: {tiny_copy / 'model_args.json'}: a JSON list; expected an object of ModelArgs fields, as convert.py writes it (a JSON object)"


def test_question_follows_the_document_in_one_turn(tiny, smollm2_checkpoint):
    """--question: the ids spell the document and question as one message (BOS or chat template included), cut
    where the question begins."""
    from tokenizer import load_tokenizer

    for checkpoint, chat in ((tiny, False), (smollm2_checkpoint, False), (smollm2_checkpoint, True)):
        tokenizer = load_tokenizer(checkpoint)
        ids, start = generate.prompt_parts(tokenizer, "A long document.\n", "  What is it?", chat, None)
        whole = tokenizer.prompt_ids("A long document.\n\nWhat is it?", chat=chat)  # tokens may differ at the cut
        assert tokenizer.decode(ids) == tokenizer.decode(whole) and ids[:1] == whole[:1]
        assert tokenizer.decode(ids[start:]).startswith("What is it?") and tokenizer.decode(ids[:start]).endswith("\n\n")


def test_query_agnostic_generation_compresses_the_document_first(tiny, capsys, monkeypatch):
    """--query-mode agnostic compresses once the document is in (at the question's first position) and again
    after the question; aware compresses once, after both. With a budget that holds everything, agnostic gives the
    full cache's text."""
    document = "The code word is plum. " * 8
    argv = ["--checkpoint", str(tiny), "--prompt", document, "--question", "What is the code word?",
            "--max-new-tokens", "6"]
    generate.main(argv)
    full = capsys.readouterr().out
    generate.main([*argv, "--kv-budget", "400", "--window", "4", "--query-mode", "agnostic"])
    assert capsys.readouterr().out == full
    real, seen = generate.generate, []

    def recording(model, prompt, *args):
        compress = args[7]  # after_prefill

        def compress_and_record():
            seen.append(model.layers[0].attention.kv_cache.pending["seq_len"])  # tokens in when compressing
            compress()

        return real(model, prompt, *args[:7], compress_and_record, *args[8:])

    monkeypatch.setattr(generate, "generate", recording)
    ids, start = generate.prompt_parts(generate.load_tokenizer(tiny), document, "What is the code word?", False, None)
    for mode, expected in (("aware", [len(ids)]), ("agnostic", [start, len(ids)])):
        seen.clear()
        generate.main([*argv, "--kv-budget", "24", "--window", "4", "--query-mode", mode])
        assert seen == expected, mode
