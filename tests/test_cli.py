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
