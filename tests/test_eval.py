"""eval.py: spec parsing and one-line errors, the aggregation math against hand-computed values, the query-mode
oracles (agnostic = aware = generate for the full cache and for an ARKV budget that holds everything), and a smoke
run writing table.md, results.json and plot.png."""
import argparse
import json
import math
import random

import pytest
import torch

import eval as ev
from arkv import ARKVConfig
from checkpoint import load_model
from generate import generate
from tasks import synthetic_sample
from tokenizer import load_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- specs and errors

@pytest.mark.parametrize("text, expected", [
    ("full", ev.Method("full", "full")), ("evict", ev.Method("evict", "evict")),
    ("streaming", ev.Method("streaming", "streaming")), ("h2o", ev.Method("h2o", "h2o")),
    ("quant-fp8", ev.Method("quant-fp8", "quant", kv_quant="fp8")),
    ("arkv-coverage-int8", ev.Method("arkv-coverage-int8", "arkv", kv_quant="int8", oq_policy="coverage")),
    ("arkv-paper-int4", ev.Method("arkv-paper-int4", "arkv", kv_quant="int4", oq_policy="paper"))])
def test_method_specs(text, expected):
    assert ev.method_spec(text) == expected


@pytest.mark.parametrize("text", ["arkv", "arkv-int4", "arkv-paper-int3", "quant", "quant-int2", "full-int4", "snapkv",
                                  "arkv-int4-paper"])
def test_bad_method_specs(text):
    with pytest.raises(argparse.ArgumentTypeError, match="unknown method"):
        ev.method_spec(text)


def test_budgets_and_defaults():
    opts = ev.build_parser().parse_args(["--budgets", "25%", "12.5%", "512"])
    assert opts.budgets == [0.25, 0.125, 512] and isinstance(opts.budgets[2], int)
    assert [ev.budget_label(b) for b in opts.budgets] == ["25%", "12.5%", "512"]
    defaults = ev.build_parser().parse_args([])
    assert defaults.budgets == [0.25, 0.125] and defaults.query_modes == ["aware", "agnostic"]
    assert [m.spec for m in defaults.methods] == list(ev.DEFAULT_METHODS) and defaults.context == 4096


def test_budget_tokens_round_and_clamp(capsys):
    notes = set()
    assert ev.min_budget_tokens(0.25, 1000, notes) == 250 and ev.min_budget_tokens(512, 100, notes) == 512
    assert ev.min_budget_tokens(0.125, 200, notes) == 36 and "raised to 36" in capsys.readouterr().err
    assert ev.min_budget_tokens(0.125, 100, notes) == 36 and capsys.readouterr().err == ""  # noted once per budget


@pytest.mark.parametrize("argv, flag", [
    (["--methods", "arkv-fancy-int4"], "--methods"), (["--tasks", "niah_nothing"], "--tasks"),
    (["--tasks", "longbench:klingon"], "--tasks"), (["--tasks", "longbench:hotpotqa"], "--longbench-dir"),
    (["--tasks", "gsm8k"], "--gsm8k-file"), (["--budgets", "0%"], "--budgets"), (["--budgets", "lots"], "--budgets"),
    (["--query-modes", "psychic"], "--query-modes")])
def test_bad_flags_exit_with_one_line(argv, flag, capsys):
    with pytest.raises(SystemExit):
        ev.main(argv)
    err = capsys.readouterr().err
    assert flag in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv, flag", [
    (["--haystack-file", "/nonexistent/hay.txt"], "--haystack-file"),
    (["--tasks", "longbench:hotpotqa", "--longbench-dir", "/nonexistent"], "--longbench-dir"),
    (["--tasks", "gsm8k", "--gsm8k-file", "/nonexistent.jsonl"], "--gsm8k-file"),
    (["--context", "20"], "--context")])
def test_unreadable_input_exits_with_one_line(argv, flag, smollm2_checkpoint, tmp_path):
    with pytest.raises(SystemExit) as exit:
        ev.main(["--checkpoint", str(smollm2_checkpoint), "--out-dir", str(tmp_path), "--no-plot", *argv])
    assert isinstance(exit.value.code, str) and exit.value.code.startswith(f"eval.py: {flag}")
    assert "\n" not in exit.value.code


# ---------------------------------------------------------------- aggregation

PAIRS = {"a": [(1.0, 1.0), (0.0, 1.0)],  # task mean 0.5 vs full 1.0: ratio 0.5
         "b": [(1.0, 0.5), (1.0, 0.5)],  # 1.0 vs 0.5: ratio 2
         "c": [(1.0, 0.0), (0.0, 0.0)]}  # full scores 0: skipped by the mean of ratios


def test_ratio_of_means_and_mean_of_ratios_by_hand():
    rel = ev.relative_to_full(PAIRS)
    assert rel["ratio_of_means"][0] == pytest.approx((1 + 0 + 1 + 1 + 1 + 0) / (1 + 1 + 0.5 + 0.5 + 0 + 0))  # 4 / 3
    assert rel["mean_of_ratios"][0] == pytest.approx((0.5 + 2.0) / 2)
    assert rel["skipped"] == ["c"]


def test_bootstrap_contains_the_estimate_and_is_deterministic():
    rng = random.Random(0)
    pairs = {t: [(float(rng.random() < 0.6), float(rng.random() < 0.8)) for _ in range(30)] for t in "xyz"}
    rel = ev.relative_to_full(pairs, seed=3)
    for name in ("ratio_of_means", "mean_of_ratios"):
        estimate, low, high = rel[name]
        assert low <= estimate <= high and low < high
    assert ev.relative_to_full(pairs, seed=3) == rel and ev.relative_to_full(pairs, seed=4) != rel
    same = ev.relative_to_full({"x": [(0.5, 0.5)] * 5})  # identical to full: a point interval at 1
    assert same["ratio_of_means"] == same["mean_of_ratios"] == (1.0, 1.0, 1.0)


def test_summary_and_table_of_hand_made_results():
    def row(method, budget, task, sample, score):
        return dict(mode="aware", method=method, budget=budget, task=task, sample=sample, score=score, original=6,
                    quantized=3, evicted=1, allocated_bytes=2**20, full_bytes=4 * 2**20, memory_fraction=0.25)
    results = [row("full", "-", t, i, s) for t, i, s in (("a", 0, 1.0), ("a", 1, 1.0), ("b", 0, 0.0))]
    results += [row("evict", "25%", t, i, s) for t, i, s in (("a", 0, 1.0), ("a", 1, 0.0), ("b", 0, 1.0))]
    full, evict = ev.summarize(results, ["a", "b"])
    assert evict["task_means"] == {"a": 0.5, "b": 1.0} and evict["mean"] == pytest.approx(2 / 3)
    assert evict["relative"]["ratio_of_means"][0] == pytest.approx(1.0)  # (1 + 0 + 1) / (1 + 1 + 0)
    assert evict["relative"]["mean_of_ratios"][0] == pytest.approx(0.5) and evict["relative"]["skipped"] == ["b"]
    assert evict["kv_fraction"] == 0.25 and evict["states"] == pytest.approx([0.6, 0.3, 0.1])
    assert full["relative"]["ratio_of_means"] == (1.0, 1.0, 1.0)
    text = ev.table([full, evict], ["a", "b"])
    assert "| aware | evict | 25% | 50.0 | 100.0 | 66.7 | 1.00 [" in text and "(here: b (aware))" in text


# ---------------------------------------------------------------- the model

@pytest.fixture(scope="module")
def model_and_tokenizer(smollm2_checkpoint):
    return load_model(smollm2_checkpoint, "cpu", torch.float32), load_tokenizer(smollm2_checkpoint)


def test_split_ids_is_the_chat_prompt(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    sample = synthetic_sample("niah_multikey", tokenizer, 300, 0.3, random.Random(1))
    context, question = ev.split_ids(tokenizer, sample)
    assert context + question == tokenizer.prompt_ids(sample.context + sample.question, chat=True)
    assert tokenizer.decode(question).startswith(sample.question) and tokenizer.decode(question).endswith("assistant\n")
    sample.chat = False
    context, question = ev.split_ids(tokenizer, sample)
    assert tokenizer.decode(context + question) == sample.context + sample.question
    assert tokenizer.decode(question) == sample.question


def decode_one(model, tokenizer, prompt: ev.Prompt, mode: str, record, method: str, budget, cache_len: int):
    """One row through eval's path (prepare_row, then decode_rows in a batch of one): (tokens, report)."""
    row = ev.Row(prompt, mode, ev.method_spec(method), budget)
    prepared = ev.prepare_row(model, row, record, "torch", torch.float32, cache_len, set())
    return ev.decode_rows(model, [row], [prepared], tokenizer, torch.float32, cache_len)[0]


def test_agnostic_equals_aware_equals_generate_for_full_and_a_covering_budget(model_and_tokenizer):
    """The full cache, and ARKV with a budget >= prompt + new tokens (everything Original): the agnostic path
    (context prefill, compress, question chunk, compress) and the aware one give generate()'s tokens."""
    model, tokenizer = model_and_tokenizer
    sample = synthetic_sample("niah_single_number", tokenizer, 150, 0.5, random.Random(2))
    context, question = ev.split_ids(tokenizer, sample)
    ids, n = context + question, 6
    prompt = ev.Prompt(sample.task, 0, sample, context, question, n)
    model.setup_caches(1, len(ids) + n)
    expected = generate(model, torch.tensor([ids]), n, tokenizer.eos_ids)[0]
    cuts, logits = ev.record_prefill(model, ids, [len(ids), len(context)])
    records = {"aware": (cuts[len(ids)], logits), "agnostic": (cuts[len(context)], None)}
    for method, budget in (("full", None), ("arkv-paper-int8", len(ids) + n)):
        for mode in ev.MODES:
            for cache_len in (len(ids) + n, len(ids) + n + 100):  # a longer sample elsewhere changes nothing
                tokens, report = decode_one(model, tokenizer, prompt, mode, records[mode], method, budget, cache_len)
                assert tokens == expected and report["evicted"] == report["quantized"] == 0
    _, report = decode_one(model, tokenizer, prompt, "agnostic", records["agnostic"], "arkv-paper-int4", 48, len(ids) + n)
    stored = len(ids) + n - 1 if len(expected) == n else len(ids) + len(expected) - 1
    assert report["evicted"] > 0 and report["allocated_bytes"] == pytest.approx(48 / stored * report["full_bytes"])


def test_one_prefill_serves_both_query_modes(model_and_tokenizer):
    """record_prefill's two cuts of one prefill of context + question equal separate prefills of the whole prompt
    (aware) and of the context alone (agnostic): K/V, token statistics, layer statistics and last logits."""
    model, tokenizer = model_and_tokenizer
    sample = synthetic_sample("niah_multikey", tokenizer, 200, 0.3, random.Random(4))
    context, question = ev.split_ids(tokenizer, sample)
    ids = context + question
    cuts, logits = ev.record_prefill(model, ids, [len(ids), len(context)])
    for cut, prompt in ((len(ids), ids), (len(context), context)):
        alone, alone_logits = ev.prefill_once(model, prompt)
        if cut == len(ids):
            torch.testing.assert_close(logits, alone_logits, atol=1e-4, rtol=0)
        for shared, separate in zip(cuts[cut], alone):
            for name in ("k", "v"):  # float32 round-off of prefills of different lengths (up to 1.5e-5 seen)
                torch.testing.assert_close(shared[name], separate[name], atol=1e-4, rtol=1e-4)
            for name in ("mean", "variance", "score"):
                torch.testing.assert_close(shared[name], separate[name], atol=1e-5, rtol=1e-4)
            assert torch.equal(shared["pos"], separate["pos"]) and shared["seq_len"] == separate["seq_len"] == cut
            assert shared["stats"] == pytest.approx(separate["stats"], rel=1e-4)


def test_pool_kernel_sets_how_the_recorded_scores_are_pooled(model_and_tokenizer):
    """--pool-kernel reaches the recorded prefill: kernel 1 leaves each token's score its own mean + gamma * variance
    (the oracle tests check kernels 1-7 against plain loops); kernel 9 averages it over 9 positions."""
    model, tokenizer = model_and_tokenizer
    ids = ev.split_ids(tokenizer, synthetic_sample("niah_single_number", tokenizer, 120, 0.5, random.Random(1)))[0]
    unpooled = ev.record_prefill(model, ids, [len(ids)], pool_kernel=1)[0][len(ids)][0]
    pooled = ev.record_prefill(model, ids, [len(ids)], pool_kernel=9)[0][len(ids)][0]
    own = unpooled["mean"] + ARKVConfig(kv_budget=32).gamma * unpooled["variance"]
    torch.testing.assert_close(unpooled["score"], own)
    middle = torch.nn.functional.avg_pool1d(own.flatten(0, 1)[:, None], 9, stride=1).view(*own.shape[:2], -1)
    torch.testing.assert_close(pooled["score"][..., 4:-4], middle)


SMALL_RUN = ["--context", "300", "--tasks", "niah_single_number", "niah_multivalue", "--methods", "full",
             "arkv-coverage-int4", "evict", "h2o", "--budgets", "25%", "48", "--max-new-tokens", "5", "--no-plot", "--no-compile"]


def run_rows(checkpoint, out_dir, *extra) -> dict:
    ev.main(["--checkpoint", str(checkpoint), *SMALL_RUN, "--out-dir", str(out_dir), *extra])
    rows = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
    return {(r["task"], r["sample"], r["mode"], r["method"], r["budget"]): r for r in rows}


def test_batch_of_8_equals_batch_of_1_and_a_killed_run_resumes_to_the_same_rows(smollm2_checkpoint, tmp_path,
                                                                                monkeypatch):
    """Rows decoded 8 at a time (samples x modes of one budget and of methods that decode alike, arkv-coverage-int4
    with evict; prompts of different lengths) give the predictions, token states and bytes of rows decoded alone;
    a run killed after two batches and resumed ends with the rows of an uninterrupted run; --resume on a finished
    grid runs nothing and keeps its rows."""
    one = run_rows(smollm2_checkpoint, tmp_path / "one", "--limit", "2", "--batch-size", "1")
    eight = run_rows(smollm2_checkpoint, tmp_path / "eight", "--limit", "2", "--batch-size", "8")
    assert len(one) == len(eight) == 2 * 2 * 2 * (1 + 3 * 2)  # tasks x samples x modes x (full + methods x budgets)
    assert len({r["prompt_tokens"] for r in one.values()}) > 1, "prompts of one length would not test positions"
    assert one == eight
    decode_rows, batches = ev.decode_rows, []

    def killed_after_two_batches(*args, **kwargs):
        if len(batches) == 2:
            raise KeyboardInterrupt
        batches.append(1)
        return decode_rows(*args, **kwargs)

    monkeypatch.setattr(ev, "decode_rows", killed_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        run_rows(smollm2_checkpoint, tmp_path / "killed", "--limit", "2", "--batch-size", "4")
    partial = (tmp_path / "killed" / "results.jsonl").read_text().splitlines()
    assert len(partial) == 8, "each finished batch is on disk at once"
    monkeypatch.setattr(ev, "decode_rows", decode_rows)
    assert run_rows(smollm2_checkpoint, tmp_path / "killed", "--limit", "2", "--batch-size", "4", "--resume") == one
    monkeypatch.setattr(ev, "record_prefill", None)  # a finished grid prefills nothing
    assert run_rows(smollm2_checkpoint, tmp_path / "killed", "--limit", "2", "--batch-size", "4", "--resume") == one
    (tmp_path / "killed" / "results.jsonl").write_text("\n".join(partial) + "\n")  # a grid cut short
    run_rows(smollm2_checkpoint, tmp_path / "killed", "--limit", "2", "--batch-size", "4", "--resume", "--summarize")
    summarized = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summarized["rows_run"] == 0 and sum(g["n"] for g in summarized["groups"]) == len(partial)
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    group = next(g for g in summary["groups"] if g["method"] == "full" and g["mode"] == "aware"
                 and g["task"] == "niah_multivalue")
    scores = [r["score"] for r in one.values() if r["method"] == "full" and r["mode"] == "aware"
              and r["task"] == "niah_multivalue"]
    assert group["n"] == 2 and group["mean"] == pytest.approx(sum(scores) / 2)
    assert group["ci_low"] <= group["mean"] <= group["ci_high"]


def test_resume_refuses_other_settings_and_a_fresh_run_keeps_old_results(smollm2_checkpoint, tmp_path):
    out = tmp_path / "grid"
    out.mkdir()
    settings = dict(checkpoint=str(smollm2_checkpoint), context=512, limit=1, seed=0, max_new_tokens=5,
                    haystack_file=None, longbench_dir=None, gsm8k_file=None, gsm8k_shots=8, dtype="float32",
                    kv_dtype="bfloat16")  # as SMALL_RUN's but --context
    (out / "run.json").write_text(json.dumps(settings))
    (out / "results.jsonl").write_text("{}\n")
    for extra, message in (([], "pass --resume"), (["--resume"], "--context")):
        with pytest.raises(SystemExit) as exit:
            ev.main(["--checkpoint", str(smollm2_checkpoint), *SMALL_RUN, "--limit", "1", "--dtype", "float32",
                     "--out-dir", str(out), *extra])
        assert isinstance(exit.value.code, str) and message in exit.value.code and "\n" not in exit.value.code
    (out / "run.json").write_text(json.dumps({**settings, "context": 300}))  # a run.json from before --pool-kernel
    with pytest.raises(SystemExit) as exit:
        ev.main(["--checkpoint", str(smollm2_checkpoint), *SMALL_RUN, "--limit", "1", "--dtype", "float32",
                 "--out-dir", str(out), "--resume", "--pool-kernel", "9"])
    assert "--pool-kernel 5" in exit.value.code  # what those runs used


def test_smoke_run_writes_table_results_summary_and_plot(smollm2_checkpoint, tmp_path, capsys):
    ev.main(["--checkpoint", str(smollm2_checkpoint), "--context", "512", "--limit", "2", "--tasks",
             "niah_single_number", "--methods", "full", "arkv-paper-int4", "--budgets", "25%", "--max-new-tokens", "3",
             "--no-compile", "--out-dir", str(tmp_path)])
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "table.md").read_text()
    assert table in capsys.readouterr().out
    for mode in ("aware", "agnostic"):
        assert f"| {mode} | full | - | " in table and f"| {mode} | arkv-paper-int4 | 25% | " in table
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "--methods full arkv-paper-int4" in summary["command"] and summary["seconds"] > 0
    assert summary["kv_dtype"] == "bfloat16" and summary["rows_run"] == 8
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(results) == 2 * 2 * 2  # samples x modes x methods
    assert sorted({r["depth"] for r in results}) == [0.0, 1.0]
    for r in results:
        assert {"task", "sample", "depth", "prompt_tokens", "budget_tokens", "memory_fraction", "prediction", "answers",
                "score", "original", "quantized", "evicted", "held_bytes", "allocated_bytes", "kv_dtype"} <= set(r)
        assert r["new_tokens"] <= 3 and 0 <= r["score"] <= 1
        assert r["full_bytes"] == (r["prompt_tokens"] + r["new_tokens"] - 1) * 30 * 3 * 2 * 64 * 2  # bfloat16 K/V
        if r["method"] == "full":
            assert r["budget_tokens"] is None and r["allocated_bytes"] == r["full_bytes"]
        else:
            assert r["budget_tokens"] == round(0.25 * r["prompt_tokens"])
            assert math.isclose(r["memory_fraction"], r["budget_tokens"] / r["prompt_tokens"])
            assert r["held_bytes"] <= r["allocated_bytes"] < r["full_bytes"] / 3


def test_compiled_run_equals_eager_with_one_graph_per_method_and_budget(smollm2_checkpoint, tmp_path):
    """--compile decodes the same tokens into the same cache states as eager (float32), and two samples x two
    query modes (one batch per method, padded to --batch-size) compile one graph per method and budget."""
    from torch._dynamo.utils import counters

    args = ["--checkpoint", str(smollm2_checkpoint), "--context", "400", "--limit", "1", "--tasks", "niah_single_word",
            "niah_multivalue", "--methods", "full", "arkv-paper-int4", "--budgets", "64", "--max-new-tokens", "4",
            "--no-plot", "--dtype", "float32"]
    runs = []
    for name in ("eager", "compile"):
        torch._dynamo.reset()
        counters.clear()
        ev.main([*args, "--compile" if name == "compile" else "--no-compile", "--out-dir", str(tmp_path / name)])
        results = [json.loads(line) for line in (tmp_path / name / "results.jsonl").read_text().splitlines()]
        runs.append([(r["mode"], r["method"], r["prediction"], r["original"], r["quantized"], r["evicted"]) for r in results])
    assert runs[0] == runs[1] and len(runs[0]) == 2 * 2 * 2
    assert counters["stats"]["unique_graphs"] == 2
