"""generate.py's command line: bad flags, flags without effect, budgets that must fit and memory
checked before allocating, each a one-line error (or note) on stderr; prompts with a question."""
from pathlib import Path

import pytest
import torch

import generate
from checkpoint import CheckpointError, load_model
from model import Transformer
from test_checkpoint import PROMPT5, run_main, write_tiny_checkpoint
from tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny")


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


def test_missing_prompt_file(smollm2_checkpoint, tmp_path, capsys):
    argv = ["--checkpoint", str(smollm2_checkpoint), "--prompt-file", str(tmp_path / "missing.txt")]
    assert "--prompt-file" in run_main(generate.main, argv, capsys)


def test_prompt_longer_than_context(smollm2_checkpoint, capsys):
    argv = ["--checkpoint", str(smollm2_checkpoint), "--prompt", "hello " * 9000, "--max-new-tokens", "4"]
    assert "model context is 8192" in run_main(generate.main, argv, capsys)


def test_budget_smaller_than_window(smollm2_checkpoint, capsys):
    """ARKVConfig checks the budget as given, before it is clamped to the (shorter) sequence."""
    argv = ["--checkpoint", str(smollm2_checkpoint), "--kv-budget", "16", "--window", "32", "--max-new-tokens", "2"]
    assert "--kv-budget 16 is smaller than the window 32" in run_main(generate.main, argv, capsys)


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
    """ARKVConfig's error for the tokens a percentage resolved to, led by what the user wrote."""
    argv = ["--checkpoint", str(tiny), "--kv-budget", "10%", "--prompt", "abcdefghij", "--max-new-tokens", "2"]
    err = run_main(generate.main, argv, capsys)
    assert err.startswith("generate.py: --kv-budget 10% (1 token of the 10-token prompt): ")
    assert "--kv-budget 1 is smaller than the window 32" in err
    argv[3] = "50%"
    err = run_main(generate.main, [*argv, "--method", "streaming", "--window", "4"], capsys)
    assert err.startswith("generate.py: --kv-budget 50% (5 tokens of the 10-token prompt): ")
    assert "streaming needs" in err and "4 sink tokens" in err


@pytest.mark.parametrize("text, tokens", [("512", 512), ("25%", 10), ("12.5%", 5), ("100%", 40), ("1%", 1)])
def test_kv_budget_is_parsed_once_and_quoted_as_written(text, tokens):
    """The parsed --kv-budget reads back as the user's text, and resolves against a 40-token prompt
    to round(N% x 40), at least 1 token."""
    budget = generate.kv_budget(text)
    assert generate.kv_budget_text(budget) == text
    assert generate.budget_tokens(budget, 40) == tokens


def test_flag_misuse_and_checkpoint_defects_have_their_own_errors(tmp_path):
    """A flag without effect is a FlagError, a missing checkpoint a CheckpointError (both ValueErrors,
    which main prints as one line)."""
    assert not issubclass(generate.FlagError, CheckpointError) and not issubclass(CheckpointError, generate.FlagError)
    with pytest.raises(generate.FlagError, match="--window has no effect"):
        generate.check_flags(generate.build_parser().parse_args(["--window", "8"]))
    with pytest.raises(CheckpointError, match="no such directory"):
        load_model(tmp_path / "none", "cpu", torch.float32)


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


def test_notes_wait_until_the_checks_pass(tmp_path, capsys):
    """A run that fails prints its error alone, not the notes and warnings gathered before it."""
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt")
    (checkpoint / "model_args.json").write_text("[]")
    err = run_main(generate.main, ["--checkpoint", str(checkpoint), "--seed", "1", "--kv-budget", "64", *PROMPT5], capsys)
    assert err == f"generate.py: {checkpoint / 'model_args.json'}: a JSON list; expected an object of ModelArgs fields, as convert.py writes it (a JSON object)"


def test_question_follows_the_document_in_one_turn(tiny, smollm2_checkpoint):
    """--question: the ids spell the document and question as one message (BOS or chat template included), cut
    where the question begins."""
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
    ids, start = generate.prompt_parts(load_tokenizer(tiny), document, "What is the code word?", False, None)
    for mode, expected in (("aware", [len(ids)]), ("agnostic", [start, len(ids)])):
        seen.clear()
        generate.main([*argv, "--kv-budget", "24", "--window", "4", "--query-mode", mode])
        assert seen == expected, mode
