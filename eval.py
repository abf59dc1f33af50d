"""Quality under a KV-memory budget: ARKV against its baselines at equal memory.

    python eval.py --context 4096 --limit 20                      # every synthetic family, default methods
    python eval.py --tasks niah_multikey longbench:hotpotqa --longbench-dir LongBench --methods full arkv-coverage-int4
    python eval.py --tasks gsm8k --gsm8k-file test.jsonl --limit 50 --budgets 50% 25% --query-modes aware

Tasks: RULER-style synthetic families (tasks.FAMILIES; a needle at depth i / (limit - 1) in sample i),
`longbench:<dataset>` (rows from --longbench-dir) and `gsm8k` (--gsm8k-shots worked examples as the context).

Methods: full, evict, streaming, h2o, quant-<fmt>, arkv-<policy>-<fmt> (fmt: fp8 int8 int4; policy: paper coverage).

Budgets: every method but `full` gets, per layer and KV head, one arena of `kv_budget` full-precision tokens (K
and V); quantized methods fit more tokens in the same bytes. `25%` is round(0.25 * prompt tokens) per sample, so
it is the KV-memory fraction of a full cache of the prompt for every method; `512` is 512 tokens for every sample.
Budgets under the window + 4 (36 tokens) are raised to it. The bytes reported are measured from each cache after
generation, against a full cache of the same sequence.

Query modes (the same prompt ids, context then question, in both):
  aware     context and question are prefilled, then the cache is compressed (the ARKV paper's setting);
  agnostic  the context is prefilled and compressed before the question arrives; the question then goes in as a
            second prefill chunk over what the cache holds, and the cache is compressed again (kvpress's default):
            what was evicted before the question is gone.
Each sample is prefilled once per mode; every method and budget starts from that recorded prefill. Decoding is
greedy, up to the task's max new tokens (or --max-new-tokens), and stops at EOS.

Writes to --out-dir: results.json (every sample x method x budget x mode, the command line, the run time),
table.md (also printed), plot.png (score vs KV-memory fraction; needs matplotlib, or pass --no-plot).
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean as mean

import torch
from tqdm import tqdm

from arkv import ARKV, ARKVConfig, FORMATS, OQ_POLICIES, bytes_per_token
from generate import (DTYPES, CheckpointError, OneLineParser, decode_one_token, default_checkpoint, kv_budget,
                      load_model, positive_int, resolve_attention, resolve_device)
from model import full_cache
from tasks import FAMILIES, LONGBENCH_METRICS, Sample, load_gsm8k, load_longbench, score, synthetic_sample
from tokenizer import load_tokenizer

WINDOW = 32  # arkv's default window: the last tokens always kept Original
MIN_BUDGET = WINDOW + 4  # streaming also keeps 4 sink tokens
MODES = ("aware", "agnostic")
DEFAULT_METHODS = ("full", "arkv-paper-int4", "arkv-coverage-int4", "arkv-paper-int8", "arkv-paper-fp8", "evict",
                   "quant-int4", "streaming", "h2o")


@dataclass(frozen=True)
class Method:
    """One --methods spec: a cache method of arkv.py (or full), its Quantized format and Original-share policy."""
    spec: str
    method: str
    kv_quant: str = "int4"
    oq_policy: str = "paper"


def method_spec(text: str) -> Method:
    """'full', 'evict', 'streaming', 'h2o', 'quant-<fmt>' or 'arkv-<policy>-<fmt>' -> Method."""
    name, *rest = text.split("-")
    if name in ("full", "evict", "streaming", "h2o") and not rest:
        return Method(text, name)
    if name == "quant" and len(rest) == 1 and rest[0] in FORMATS:
        return Method(text, name, kv_quant=rest[0])
    if name == "arkv" and len(rest) == 2 and rest[0] in OQ_POLICIES and rest[1] in FORMATS:
        return Method(text, name, kv_quant=rest[1], oq_policy=rest[0])
    raise argparse.ArgumentTypeError(
        f"unknown method {text!r}; expected full, evict, streaming, h2o, quant-<fmt> or arkv-<policy>-<fmt> "
        f"(fmt: {' '.join(FORMATS)}; policy: {' '.join(OQ_POLICIES)})")


def task_spec(text: str) -> str:
    """A synthetic family, 'longbench:<dataset>' or 'gsm8k'."""
    if text in FAMILIES or text == "gsm8k" or (text.startswith("longbench:") and text[10:] in LONGBENCH_METRICS):
        return text
    raise argparse.ArgumentTypeError(f"unknown task {text!r}; expected one of {' '.join(FAMILIES)}, gsm8k, "
                                     f"or longbench:<dataset> with a dataset of {' '.join(LONGBENCH_METRICS)}")


def budget_label(budget: int | float) -> str:
    return f"{budget * 100:g}%" if isinstance(budget, float) else str(budget)


@dataclass
class Prompt:
    """One sample, tokenized in two parts: the prompt is context_ids + question_ids."""
    task: str
    index: int
    sample: Sample
    context_ids: list[int]
    question_ids: list[int]
    max_new_tokens: int


def split_ids(tokenizer, sample: Sample) -> tuple[list[int], list[int]]:
    """The prompt's ids cut where the question starts: (template head + context, question + template tail)."""
    text = sample.context + sample.question
    chat = sample.chat and bool(tokenizer.chat_template)
    full = tokenizer.render_chat(text, None) if chat else text
    cut = full.rindex(sample.question.strip())  # a chat template may strip the message
    bos = [tokenizer.bos_id] if tokenizer.add_bos and not chat else []
    return bos + tokenizer.encode(full[:cut]), tokenizer.encode(full[cut:])


def load_samples(opts, tokenizer) -> list[tuple[str, int, Sample]]:
    """(task, index, tasks.Sample) for every task of --tasks."""
    haystack = None
    if opts.haystack_file:
        try:
            haystack = opts.haystack_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(f"--haystack-file {opts.haystack_file}: {err}") from None
        if not haystack.strip():
            raise CheckpointError(f"--haystack-file {opts.haystack_file}: the file is empty")
    out = []
    for task in opts.tasks:
        if task in FAMILIES:
            depths = [i / (opts.limit - 1) for i in range(opts.limit)] if opts.limit > 1 else [0.5]
            try:
                samples = [synthetic_sample(task, tokenizer, opts.context, depth, random.Random(f"{opts.seed}:{task}:{i}"),
                                            haystack) for i, depth in enumerate(depths)]
            except ValueError as err:
                raise CheckpointError(f"--context {opts.context}: {task}: {err}") from None
        elif task == "gsm8k":
            samples = guarded("--gsm8k-file", load_gsm8k, opts.gsm8k_file, opts.gsm8k_shots, opts.limit, opts.seed)
        else:
            samples = guarded("--longbench-dir", load_longbench, opts.longbench_dir, task.partition(":")[2],
                              tokenizer, opts.context, opts.limit)
        out += [(task, i, sample) for i, sample in enumerate(samples)]
    return out


def guarded(flag: str, loader, path: Path, *args):
    """loader(path, *args), its errors as one line naming the flag."""
    try:
        return loader(path, *args)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{flag} {path}: {err}") from None


@torch.no_grad()
def prefill_once(model, ids: list[int]) -> tuple[list[dict], torch.Tensor]:
    """One prefill through a recording ARKV cache; returns every layer's pending prefill (K/V and statistics),
    which any method's fresh cache can load and compress, and the last logits [1, 1, vocab]."""
    recorder = ARKV(ARKVConfig(kv_budget=WINDOW, window=WINDOW), model.args, model.output.weight.dtype)
    model.setup_caches(1, len(ids), recorder.cache_factory)
    device = model.output.weight.device
    logits = model(torch.tensor([ids], device=device), torch.arange(len(ids), device=device), last_only=True)
    return [cache.pending for cache in recorder.caches], logits


@torch.no_grad()
def load_prefill(model, pendings: list[dict], max_seq_len: int, config: ARKVConfig | None) -> ARKV | None:
    """Fresh caches for `max_seq_len` tokens (full, or ARKV/baseline by `config`) holding a recorded prefill;
    ARKV compresses it. Returns the ARKV manager (None for full)."""
    manager = ARKV(config, model.args, model.output.weight.dtype) if config else None
    model.setup_caches(1, max_seq_len, manager.cache_factory if manager else full_cache)
    for layer, pending in zip(model.layers, pendings):
        cache = layer.attention.kv_cache
        if manager:
            cache.pending = dict(pending)
        else:
            recorded = pending["k"].shape[2]  # pending K/V: [1, Hkv, T, D]
            cache.k_cache[:, :, :recorded], cache.v_cache[:, :, :recorded] = pending["k"], pending["v"]
    if manager:
        manager.compress()
    return manager


@torch.no_grad()
def decode_after(model, pendings: list[dict], logits: torch.Tensor, prompt_len: int, question_ids: list[int] | None,
                 config: ARKVConfig | None, max_new_tokens: int, eos_ids, cache_len: int,
                 step=decode_one_token) -> tuple[list[int], dict]:
    """Load a recorded prefill into a fresh cache (full, or ARKV/baseline by `config`), compress it; with
    `question_ids` (agnostic) prefill them as a chunk and compress again; then decode greedily with `step`.
    A full cache is sized for `cache_len` tokens, one size for every sample (so a compiled `step` keeps one
    graph); an ARKV arena depends on the budget only, and ARKV reads the sequence length from the size.
    Returns the new tokens and the cache report (token states and bytes, measured)."""
    device, dtype = model.output.weight.device, model.output.weight.dtype
    manager = load_prefill(model, pendings, prompt_len + max_new_tokens if config else cache_len, config)
    if question_ids:
        begin = prompt_len - len(question_ids)
        logits = model(torch.tensor([question_ids], device=device), torch.arange(begin, prompt_len, device=device),
                       last_only=True)
        if manager:
            manager.compress()
    token = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
    tokens, input_pos = [int(token)], torch.tensor([prompt_len], device=device)
    while len(tokens) < max_new_tokens and tokens[-1] not in eos_ids:
        token = step(model, token, input_pos, 0.0, None).clone()
        tokens.append(int(token))
        input_pos += 1
    stored = prompt_len + len(tokens) - 1  # the last token is never written to the cache
    return tokens, manager.report(stored) if manager else full_report(model.args, dtype, stored)


def full_report(args, dtype: torch.dtype, seq_len: int) -> dict:
    """A full cache sized to the sequence: every token Original."""
    entries = seq_len * args.n_kv_heads * args.n_layer
    nbytes = entries * bytes_per_token(None, args.head_dim, dtype)
    return dict(original=entries, quantized=0, evicted=0, held_bytes=nbytes, allocated_bytes=nbytes, full_bytes=nbytes)


def evaluate(model, tokenizer, prompt: Prompt, mode: str, methods: list[Method], budgets: list, attention: str,
             notes: set, cache_len: int, step=decode_one_token) -> list[dict]:
    """Every method x budget on one sample in one query mode, from a single recorded prefill (`cache_len`: see
    decode_after)."""
    ids = prompt.context_ids + prompt.question_ids
    pendings, logits = prefill_once(model, ids if mode == "aware" else prompt.context_ids)
    question = prompt.question_ids if mode == "agnostic" else None
    rows = []
    for method in methods:
        for budget in [None] if method.method == "full" else budgets:
            tokens_budget = None if budget is None else budget_tokens(budget, len(ids), notes)
            config = None if budget is None else arkv_config(method, tokens_budget, attention)
            tokens, report = decode_after(model, pendings, logits, len(ids), question, config, prompt.max_new_tokens,
                                          tokenizer.eos_ids, cache_len, step)
            prediction = tokenizer.decode([t for t in tokens if t not in tokenizer.eos_ids])
            rows.append(dict(
                mode=mode, task=prompt.task, sample=prompt.index, depth=prompt.sample.meta.get("depth"),
                method=method.spec, budget="-" if budget is None else budget_label(budget),
                prompt_tokens=len(ids), context_tokens=len(prompt.context_ids), budget_tokens=tokens_budget,
                memory_fraction=1.0 if budget is None else tokens_budget / len(ids), new_tokens=len(tokens),
                prediction=prediction, answers=prompt.sample.answers, score=score(prompt.sample, prediction),
                **{k: report[k] for k in ("original", "quantized", "evicted", "held_bytes", "allocated_bytes",
                                          "full_bytes")}))
    return rows


def arkv_config(method: Method, budget: int, attention: str) -> ARKVConfig:
    return ARKVConfig(kv_budget=budget, method=method.method, oq_policy=method.oq_policy, window=WINDOW,
                      kv_quant=method.kv_quant, attention=attention)


def budget_tokens(budget: int | float, prompt_len: int, notes: set) -> int:
    """Tokens of a budget for one prompt, raised to MIN_BUDGET (with a note, once per budget)."""
    tokens = budget if isinstance(budget, int) else round(budget * prompt_len)
    if tokens < MIN_BUDGET and budget not in notes:
        notes.add(budget)
        tqdm.write(f"note: budget {budget_label(budget)} is {tokens} tokens of a {prompt_len}-token prompt; raised to "
                   f"{MIN_BUDGET} (window {WINDOW} + 4)", file=sys.stderr)
    return max(tokens, MIN_BUDGET)


# ---------------------------------------------------------------- aggregation

def ratios(per_task: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """per_task[i] [..., n_i, 2] (method, full) scores -> (ratio of means, mean over tasks of task-mean ratios,
    tasks where full's mean is 0 left out), each [...]; NaN where undefined."""
    nan = torch.tensor(torch.nan, dtype=torch.float64)
    sums = sum(x.sum(-2) for x in per_task)  # [..., 2]
    of_means = torch.where(sums[..., 1] > 0, sums[..., 0] / sums[..., 1], nan)
    means = torch.stack([x.mean(-2) for x in per_task])  # [tasks, ..., 2]
    of_ratios = torch.where(means[..., 1] > 0, means[..., 0] / means[..., 1], nan).nanmean(0)
    return of_means, of_ratios


def relative_to_full(pairs: dict[str, list[tuple[float, float]]], resamples: int = 1000, seed: int = 0) -> dict:
    """Method vs full on the same samples, pairs[task] = [(method score, full score), ...] -> ratio_of_means and
    mean_of_ratios, each (estimate, low, high) with a 95% percentile bootstrap (samples resampled within their
    task, `seed` fixed), and `skipped`: the tasks where full scores 0."""
    g = torch.Generator().manual_seed(seed)
    point = [torch.tensor(p, dtype=torch.float64) for p in pairs.values()]  # [n_t, 2] each
    drawn = [x[torch.randint(len(x), (resamples, len(x)), generator=g)] for x in point]  # [R, n_t, 2] each
    out = {}
    for name, estimate, boot in zip(("ratio_of_means", "mean_of_ratios"), ratios(point), ratios(drawn)):
        low, high = boot.nanquantile(torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        out[name] = (estimate.item(), low, high)
    out["skipped"] = [task for task, x in zip(pairs, point) if x[:, 1].sum() == 0]
    return out


def summarize(results: list[dict], tasks: list[str]) -> list[dict]:
    """One summary per (mode, method, budget), in the order first seen."""
    groups, full = defaultdict(list), {}
    for r in results:
        groups[r["mode"], r["method"], r["budget"]].append(r)
        if r["method"] == "full":
            full[r["mode"], r["task"], r["sample"]] = r["score"]
    summaries = []
    for (mode, method, budget), rows in groups.items():
        by_task = {t: [r["score"] for r in rows if r["task"] == t] for t in tasks}
        pairs = {t: [(r["score"], full[mode, t, r["sample"]]) for r in rows if r["task"] == t] for t in tasks}
        entries = sum(r["original"] + r["quantized"] + r["evicted"] for r in rows)
        summaries.append(dict(
            mode=mode, method=method, budget=budget, task_means={t: mean(s) for t, s in by_task.items() if s},
            mean=mean([r["score"] for r in rows]),
            relative=relative_to_full({t: p for t, p in pairs.items() if p}) if full else None,
            memory_fraction=mean([r["memory_fraction"] for r in rows]), kv_bytes=mean([r["allocated_bytes"] for r in rows]),
            kv_fraction=mean([r["allocated_bytes"] / r["full_bytes"] for r in rows]),
            states=[sum(r[k] for r in rows) / entries for k in ("original", "quantized", "evicted")]))
    return summaries


def table(summaries: list[dict], tasks: list[str]) -> str:
    """The markdown table, with its footnote."""
    head = ["mode", "method", "budget", *tasks, "mean", "vs full: ratio of means [95% CI]",
            "vs full: mean of ratios [95% CI]", "KV MiB", "KV / full", "O / Q / E"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    skipped = set()
    for s in summaries:
        rel = s["relative"]
        cells = [s["mode"], s["method"], s["budget"], *(f"{100 * s['task_means'][t]:.1f}" for t in tasks),
                 f"{100 * s['mean']:.1f}"]
        for name in ("ratio_of_means", "mean_of_ratios"):
            cells.append("-" if rel is None else "{:.2f} [{:.2f}, {:.2f}]".format(*rel[name]))
        cells += [f"{s['kv_bytes'] / 2**20:.2f}", f"{s['kv_fraction']:.3f}", " / ".join(f"{x:.1%}" for x in s["states"])]
        lines.append("| " + " | ".join(cells) + " |")
        skipped.update((s["mode"], t) for t in (rel or {}).get("skipped", []))
    note = ", ".join(f"{t} ({mode})" for mode, t in sorted(skipped)) or "none"
    lines.append(f"\nScores x100. vs full: on the same samples; ratio of means = method mean / full mean; mean of "
                 f"ratios = mean over tasks of task mean / full task mean, skipping tasks where full scores 0 "
                 f"(here: {note}). CIs: 1000 bootstrap resamples of the samples within each task, seed 0. KV MiB: "
                 f"allocated per sample; KV / full: against a full cache of the same sequence; O / Q / E: token x KV "
                 f"head x layer entries after generation.")
    return "\n".join(lines) + "\n"


def plot(summaries: list[dict], modes: list[str], path: Path):
    """Score vs KV-memory fraction (budget / prompt tokens): one line per method, one panel per query mode; full as
    a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes):
        lines = defaultdict(list)
        for s in summaries:
            if s["mode"] == mode:
                lines[s["method"]].append((s["memory_fraction"], 100 * s["mean"]))
        for method, points in lines.items():
            if method == "full":
                ax.axhline(points[0][1], color="black", linestyle="--", label="full")
            else:
                ax.plot(*zip(*sorted(points)), marker="o", label=method)
        ax.set(title=f"query-{mode}", xlabel="KV memory / full cache of the prompt", ylabel="mean score (x100)",
               xlim=(0, 1.05), ylim=(-2, 102))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="converted checkpoint folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tasks", nargs="+", type=task_spec, default=list(FAMILIES))
    parser.add_argument("--methods", nargs="+", type=method_spec, default=[method_spec(m) for m in DEFAULT_METHODS])
    parser.add_argument("--budgets", nargs="+", type=kv_budget, default=[0.25, 0.125],
                        help="per layer and KV head: N%% of each prompt or N tokens of full-precision K+V")
    parser.add_argument("--query-modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--context", type=positive_int, default=4096, help="tokens of synthetic and LongBench prompts")
    parser.add_argument("--limit", type=positive_int, default=10, help="samples per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=positive_int, help="cap on the tasks' own max new tokens")
    parser.add_argument("--haystack-file", type=Path, help="text for the synthetic haystacks (default: RULER noise)")
    parser.add_argument("--longbench-dir", type=Path, help="LongBench data: <dataset>.jsonl and dataset2prompt.json")
    parser.add_argument("--gsm8k-file", type=Path, help="GSM8K jsonl (question, answer)")
    parser.add_argument("--gsm8k-shots", type=positive_int, default=8)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on CUDA, else float32")
    parser.add_argument("--out-dir", type=Path, default=Path("eval_out"))
    parser.add_argument("--no-plot", action="store_true", help="skip plot.png (then matplotlib is not needed)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step: one graph per method and budget size (token budgets compile "
                             "once; a percentage sizes each prompt's cache, so it compiles per prompt length)")
    return parser


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    opts = parser.parse_args(argv)
    if any(t.startswith("longbench:") for t in opts.tasks) and opts.longbench_dir is None:
        parser.error("--tasks longbench:<dataset> needs --longbench-dir")
    if "gsm8k" in opts.tasks and opts.gsm8k_file is None:
        parser.error("--tasks gsm8k needs --gsm8k-file")
    if not opts.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit("eval.py: plot.png needs matplotlib: pip install matplotlib (or pass --no-plot)")
    try:
        run(opts, argv)
    except (CheckpointError, ValueError, OSError) as err:
        sys.exit(f"eval.py: {err}")


def run(opts, argv: list[str]):
    start = time.perf_counter()
    device = resolve_device(opts.device)
    dtype = DTYPES[opts.dtype] if opts.dtype != "auto" else torch.bfloat16 if device.type == "cuda" else torch.float32
    checkpoint = opts.checkpoint or default_checkpoint()
    model, tokenizer = load_model(checkpoint, device, dtype), load_tokenizer(checkpoint)
    attention = resolve_attention("auto", device)
    methods, budgets = list(dict.fromkeys(opts.methods)), list(dict.fromkeys(opts.budgets))
    for m in methods:
        if m.method != "full":
            try:
                ARKV(arkv_config(m, MIN_BUDGET, attention), model.args, dtype)
            except ValueError as err:
                raise CheckpointError(f"--methods {m.spec}: {err}") from None
    prompts = []
    for task, index, sample in load_samples(opts, tokenizer):
        context_ids, question_ids = split_ids(tokenizer, sample)
        max_new = min(sample.max_new_tokens, opts.max_new_tokens or sample.max_new_tokens)
        if len(context_ids) + len(question_ids) + max_new > model.args.max_seq_len:
            raise CheckpointError(f"--context {opts.context}: {task} sample {index} needs {len(context_ids)} + "
                                  f"{len(question_ids)} + {max_new} tokens; the model context is {model.args.max_seq_len}")
        prompts.append(Prompt(task, index, sample, context_ids, question_ids, max_new))
    cache_len = max(len(p.context_ids) + len(p.question_ids) + p.max_new_tokens for p in prompts)
    step = decode_one_token
    if opts.compile:
        for limit in ("recompile_limit", "accumulated_recompile_limit"):  # graphs (methods x budget sizes), not steps
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 4096))
        step = torch.compile(decode_one_token, fullgraph=True, dynamic=False,
                             mode="reduce-overhead" if device.type == "cuda" else "default")
    results, notes = [], set()
    for prompt in tqdm(prompts, desc="eval", unit="sample", file=sys.stderr):
        for mode in opts.query_modes:
            results += evaluate(model, tokenizer, prompt, mode, methods, budgets, attention, notes, cache_len, step)
    tasks = list(dict.fromkeys(opts.tasks))
    summaries = summarize(results, tasks)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "eval.py", *argv])
    text = table(summaries, tasks) + f"\n`{command}`: {len(prompts)} samples, {time.perf_counter() - start:.0f} s\n"
    print(text)
    (opts.out_dir / "table.md").write_text(text)
    if not opts.no_plot:
        plot(summaries, opts.query_modes, opts.out_dir / "plot.png")
    (opts.out_dir / "results.json").write_text(json.dumps(dict(
        command=command, checkpoint=str(checkpoint), device=str(device), dtype=str(dtype).removeprefix("torch."),
        seconds=round(time.perf_counter() - start, 1), results=results), indent=1))


if __name__ == "__main__":
    main()
