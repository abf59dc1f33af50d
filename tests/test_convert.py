"""convert.py: a source or an output folder it cannot use is one clear line on stderr naming the
file and a non-zero exit; the undamaged tiny Hugging Face folder converts to the tiny model."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import convert
from checkpoint import load_model
from model import ModelArgs
from test_checkpoint import TINY, edit_weights, run_main, tiny_state, truncate


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
    model = load_model(tmp_path / "out", "cpu", torch.float32)
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
