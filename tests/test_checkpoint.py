"""checkpoint.py through generate.py: a missing, damaged or mismatched converted checkpoint is one
clear line on stderr naming the file and a non-zero exit, never a traceback. A tiny random model
with a byte-level tokenizer (ids = bytes) keeps these fast; damaged copies of it are made per test.
The helpers here (`run_main`, the tiny checkpoint) serve the other command-line tests too."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert
import generate
from model import ModelArgs, Transformer
from tokenizer import BYTE_OF_CHAR


def run_main(main, argv, capsys) -> str:
    """Run a command line's `main(argv)` that must fail -> its error: one line, no traceback, non-zero exit."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    err = err or str(exit_info.value.code)  # sys.exit("message") carries the text in the exception
    assert "\n" not in err and "Traceback" not in err
    return err


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


def test_missing_checkpoint(tmp_path, capsys):
    err = run_main(generate.main, ["--checkpoint", str(tmp_path / "nope")], capsys)
    assert "no such directory" in err


def test_empty_checkpoint(tmp_path, capsys):
    err = run_main(generate.main, ["--checkpoint", str(tmp_path)], capsys)
    assert "model_args.json" in err


def test_unconverted_hf_folder_gets_a_hint(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert "convert.py" in run_main(generate.main, ["--checkpoint", str(tmp_path)], capsys)


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
