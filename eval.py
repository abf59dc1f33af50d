"""Quality under a KV-memory budget: ARKV against its baselines at equal memory.

    python eval.py --context 4096 --limit 20                      # every synthetic family, default methods
    python eval.py --tasks niah_multikey longbench:hotpotqa --longbench-dir LongBench --methods full arkv-coverage-int4
    python eval.py --tasks gsm8k --gsm8k-file test.jsonl --limit 50 --budgets 50% 25% --query-modes aware
    python eval.py --context 4096 --limit 30 --out-dir grid --resume   # continue a grid where it stopped

Tasks: RULER-style synthetic families (tasks.FAMILIES; a needle at depth i / (limit - 1) in sample i),
`longbench:<dataset>` (rows from --longbench-dir) and `gsm8k` (--gsm8k-shots worked examples as the context).

Methods: full, evict, streaming, h2o, quant-<fmt>, arkv-<policy>-<fmt> (fmt: fp8 int8 int4; policy: paper coverage).

Budgets: every method but `full` gets, per layer and KV head, one arena of `kv_budget` full-precision tokens (K
and V, in --kv-dtype); quantized methods fit more tokens in the same bytes. `25%` is round(0.25 * prompt tokens)
per sample, so it is the KV-memory fraction of a full cache of the prompt for every method; `512` is 512 tokens for
every sample. Budgets under the window + 4 (36 tokens) are raised to it. The bytes reported are measured from each
cache after generation, against a full cache of the same sequence.

KV dtype: Original (and full-cache) K/V are stored in --kv-dtype, bfloat16 by default as on a GPU, so a budget
percentage means what it means there (an int4 token is 80 of 256 bytes for SmolLM2); the model computes in --dtype
(auto: bfloat16 on CUDA and on CPUs with AMX or AVX-512 BF16, else float32).

Query modes (the same prompt ids, context then question, in both):
  aware     context and question are prefilled, then the cache is compressed (the ARKV paper's setting);
  agnostic  the context is prefilled and compressed before the question arrives; the question then goes in as a
            second prefill chunk over what the cache holds, and the cache is compressed again (kvpress's default):
            what was evicted before the question is gone.
Each sample is prefilled once for both modes: causal attention makes the context's keys, values and queries the
same whether the question follows or not, so the agnostic statistics come from the window ending with the context.

Decoding is greedy and batched: the rows of one budget and of methods that decode alike (arkv, quant and evict of
one format; see arkv.decode_family) decode --batch-size at a time, each row at its own positions with its own cache
state and method, exactly as it would alone. A row stops at EOS, at the
task's own answer length (or --max-new-tokens), or, for one-line answers, at the end of the answer line.

Writes to --out-dir: results.jsonl (a row per sample x mode x method x budget, appended as each batch finishes;
--resume skips the rows already there), summary.json and table.md (also printed), plot.png (score vs KV-memory
fraction; needs matplotlib, or pass --no-plot), run.json (the settings every row depends on, checked by --resume).
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
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from arkv import ARKV, ARKVConfig, OQ_POLICIES, decode_family, window_pending
from checkpoint import load_model
from convert import default_checkpoint
from generate import (DTYPES, FlagError, OneLineParser, budget_tokens, compile_decode_step, decode_one_token, kv_budget,
                      kv_budget_text, pool_kernel, positive_int, resolve_attention, resolve_device)
from kv_arena import FORMATS, bytes_per_token
from model import KVCache, full_cache
from tasks import FAMILIES, LONGBENCH_METRICS, Sample, load_gsm8k, load_longbench, score, synthetic_sample
from tokenizer import load_tokenizer

WINDOW = 32  # arkv's default window: the last tokens always kept Original
MIN_BUDGET = WINDOW + 4  # streaming also keeps 4 sink tokens
MODES = ("aware", "agnostic")
DEFAULT_METHODS = ("full", "arkv-paper-int4", "arkv-coverage-int4", "arkv-paper-int8", "arkv-paper-fp8", "evict",
                   "quant-int4", "streaming", "h2o")
ROW_SETTINGS = ("checkpoint", "context", "limit", "seed", "max_new_tokens", "haystack_file", "longbench_dir",
                "gsm8k_file", "gsm8k_shots", "dtype", "kv_dtype", "pool_kernel")  # what a row's result depends on besides its key
SETTINGS_BEFORE_THEIR_FLAG = {"pool_kernel": 5}  # what runs from before a setting's flag used (their run.json lacks it)


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


def budget_label(budget: int | float | None) -> str:
    """'25%', '512', or '-' for the full cache."""
    return "-" if budget is None else kv_budget_text(budget)


@dataclass(eq=False)
class Prompt:
    """One sample, tokenized in two parts: the prompt is context_ids + question_ids."""
    task: str
    index: int
    sample: Sample
    context_ids: list[int]
    question_ids: list[int]
    max_new_tokens: int

    @property
    def length(self) -> int:
        return len(self.context_ids) + len(self.question_ids)


@dataclass(eq=False)
class Row:
    """One result to produce: a prompt in one query mode, under one method and budget (None: full)."""
    prompt: Prompt
    mode: str
    method: Method
    budget: int | float | None

    @property
    def key(self) -> tuple:
        return self.prompt.task, self.prompt.index, self.mode, self.method.spec, budget_label(self.budget)


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
            raise FlagError(f"--haystack-file {opts.haystack_file}: {err}") from None
        if not haystack.strip():
            raise FlagError(f"--haystack-file {opts.haystack_file}: the file is empty")
    out = []
    for task in opts.tasks:
        if task in FAMILIES:
            depths = [i / (opts.limit - 1) for i in range(opts.limit)] if opts.limit > 1 else [0.5]
            try:
                samples = [synthetic_sample(task, tokenizer, opts.context, depth, random.Random(f"{opts.seed}:{task}:{i}"),
                                            haystack) for i, depth in enumerate(depths)]
            except ValueError as err:
                raise FlagError(f"--context {opts.context}: {task}: {err}") from None
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
        raise FlagError(f"{flag} {path}: {err}") from None


# ---------------------------------------------------------------- one prefill per sample

class PrefillRecorder(nn.Module):
    """Every layer's cache during one prefill: causal attention over the prompt, and for each cut (the prompt's
    end: query-aware; the context's end: query-agnostic) what an ARKV cache would hold pending had the prompt ended
    there (arkv.window_pending). Causal attention makes the K/V and queries before a cut the same as in a prefill
    that stops at it, so one prefill serves both modes; the cuts share one copy of the K/V."""

    def __init__(self, config: ARKVConfig, cuts: list[int]):
        super().__init__()
        self.config, self.cuts, self.pendings = config, cuts, {}

    def forward(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor) -> Tensor:
        keys, values = k.contiguous(), v.contiguous()  # [B, Hkv, S, D]: not views of the whole QKV projection
        for cut in self.cuts:
            key_pos = input_pos[:cut].expand(k.shape[0], k.shape[1], cut)
            self.pendings[cut] = window_pending(self.config, q[:, :, :cut], keys[:, :, :cut], values[:, :, :cut],
                                                input_pos[:cut], keys[:, :, :cut], key_pos)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


@torch.no_grad()
def record_prefill(model, ids: list[int], cuts: list[int], pool_kernel: int = ARKVConfig.pool_kernel) -> tuple[dict[int, list[dict]], Tensor]:
    """One prefill of `ids`: for each cut, every layer's pending ARKV state had the prompt ended there (any
    method's fresh cache can load and compress it; token scores pooled over `pool_kernel` positions), and the last
    logits [1, 1, vocab]."""
    config = ARKVConfig(kv_budget=WINDOW, window=WINDOW, pool_kernel=pool_kernel)
    recorders = [PrefillRecorder(config, cuts) for _ in model.layers]
    model.setup_caches(1, len(ids), lambda layer, *_: recorders[layer])
    device = model.tok_embeddings.weight.device
    logits = model(torch.tensor([ids], device=device), torch.arange(len(ids), device=device), last_only=True)
    return {cut: [r.pendings[cut] for r in recorders] for cut in cuts}, logits


def prefill_once(model, ids: list[int]) -> tuple[list[dict], Tensor]:
    """One prefill of `ids`: every layer's pending ARKV state and the last logits."""
    pendings, logits = record_prefill(model, ids, [len(ids)])
    return pendings[len(ids)], logits


@torch.no_grad()
def load_prefill(model, pendings: list[dict], max_seq_len: int, config: ARKVConfig | None,
                 kv_dtype: torch.dtype | None = None) -> ARKV | None:
    """Fresh one-row caches for `max_seq_len` tokens (full, or ARKV/baseline by `config`), K/V stored in `kv_dtype`
    (default: the model's), holding a recorded prefill; ARKV compresses it. Returns the ARKV manager (None: full)."""
    kv_dtype = kv_dtype or model.tok_embeddings.weight.dtype
    manager = ARKV(config, model.args, kv_dtype) if config else None
    model.setup_caches(1, max_seq_len, manager.cache_factory if manager else full_cache, kv_dtype)
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


@dataclass
class Prepared:
    """A row ready to decode: its one-row caches (one per layer), ARKV manager (None: full), first new token."""
    caches: list[nn.Module]
    manager: ARKV | None
    first_token: int
    budget_tokens: int | None


@torch.no_grad()
def prepare_row(model, row: Row, record: tuple[list[dict], Tensor], attention: str, kv_dtype: torch.dtype,
                cache_len: int, notes: set, pool_kernel: int = ARKVConfig.pool_kernel) -> Prepared:
    """The row alone (batch 1): a fresh cache holding its recorded prefill, compressed; in agnostic mode the
    question then goes in as a prefill chunk over what the cache holds, and the cache is compressed again. A full
    cache is sized for `cache_len` tokens, one size for every sample (one compiled shape); an ARKV arena depends on
    the budget only, and ARKV reads the sequence length from the size."""
    prompt, device = row.prompt, model.tok_embeddings.weight.device
    pendings, logits = record
    tokens_budget = None if row.budget is None else min_budget_tokens(row.budget, prompt.length, notes)
    config = None if row.budget is None else arkv_config(row.method, tokens_budget, attention, pool_kernel)
    manager = load_prefill(model, pendings, prompt.length + prompt.max_new_tokens if config else cache_len, config,
                           kv_dtype)
    if row.mode == "agnostic":
        question = torch.tensor([prompt.question_ids], device=device)
        logits = model(question, torch.arange(len(prompt.context_ids), prompt.length, device=device), last_only=True)
        if manager:
            manager.compress()
    return Prepared([layer.attention.kv_cache for layer in model.layers], manager, int(logits[0, -1].argmax()),
                    tokens_budget)


def answer_done(tokens: list[int], prompt: Prompt, tokenizer) -> bool:
    """EOS, the task's answer length, or (one-line answers) a line break after the answer's first words."""
    if tokens[-1] in tokenizer.eos_ids or len(tokens) >= prompt.max_new_tokens:
        return True
    return prompt.sample.meta.get("one_line", False) and "\n" in tokenizer.decode(tokens).lstrip()


@torch.no_grad()
def decode_rows(model, rows: list[Row], prepared: list[Prepared], tokenizer, kv_dtype: torch.dtype, cache_len: int,
                arena: int | None = None, pad_to: int = 0, step=decode_one_token) -> list[tuple[list[int], dict]]:
    """Decode rows of one method together: their one-row caches stacked into one batch (`KVCache.stack`, or
    `ARKV.stack` into arenas of `arena` tokens: each row keeps its own state and budget), each row at its own
    positions. A finished row is reported at once (token states and bytes measured from its cache, then) and stays
    at its position until every row is done. With `pad_to`, copies of the last row fill the batch to that size
    (one shape for a compiled step; their tokens are dropped). Returns each row's new tokens and report."""
    device, n_rows = model.tok_embeddings.weight.device, len(rows)
    rows = rows + [rows[-1]] * (pad_to - len(rows))
    prepared = prepared + [prepared[-1]] * (pad_to - len(prepared))
    B, manager = len(rows), None
    if rows[0].budget is None:
        caches = [KVCache.stack(list(layer)) for layer in zip(*(p.caches for p in prepared))]
    else:
        manager = ARKV.stack([p.manager for p in prepared], arena or max(p.budget_tokens for p in prepared))
        caches = manager.caches
    model.setup_caches(B, cache_len, lambda layer, *_: caches[layer], kv_dtype)
    outputs = [[p.first_token] for p in prepared]
    reports: list[dict | None] = [None] * B

    def finish(b: int) -> bool:
        if reports[b] is None and answer_done(outputs[b], rows[b].prompt, tokenizer):
            stored = rows[b].prompt.length + len(outputs[b]) - 1  # the last token is never written to the cache
            reports[b] = manager.report(stored, b) if manager else full_report(model.args, kv_dtype, stored)
        return reports[b] is not None

    done = [finish(b) for b in range(B)]
    token = torch.tensor([[p.first_token] for p in prepared], device=device)  # [B, 1]
    input_pos = torch.tensor([[row.prompt.length] for row in rows], device=device)  # [B, 1]
    while not all(done):
        token = step(model, token, input_pos, 0.0, None).clone()
        for b, new in enumerate(token[:, 0].tolist()):
            if not done[b]:
                outputs[b].append(new)
                done[b] = finish(b)
        input_pos += torch.tensor([[not d] for d in done], device=device)  # finished rows stay where they are
    return list(zip(outputs, reports))[:n_rows]


def full_report(args, dtype: torch.dtype, seq_len: int) -> dict:
    """A full cache sized to the sequence: every token Original."""
    entries = seq_len * args.n_kv_heads * args.n_layer
    nbytes = entries * bytes_per_token(None, args.head_dim, dtype)
    return dict(original=entries, quantized=0, evicted=0, held_bytes=nbytes, allocated_bytes=nbytes, full_bytes=nbytes)


def result_row(row: Row, prepared: Prepared, tokens: list[int], report: dict, tokenizer, settings: dict) -> dict:
    prompt = row.prompt
    prediction = tokenizer.decode([t for t in tokens if t not in tokenizer.eos_ids])
    return dict(
        mode=row.mode, task=prompt.task, sample=prompt.index, depth=prompt.sample.meta.get("depth"),
        method=row.method.spec, budget=budget_label(row.budget), prompt_tokens=prompt.length,
        context_tokens=len(prompt.context_ids), budget_tokens=prepared.budget_tokens,
        memory_fraction=1.0 if row.budget is None else prepared.budget_tokens / prompt.length,
        new_tokens=len(tokens), prediction=prediction, answers=prompt.sample.answers,
        score=score(prompt.sample, prediction), dtype=settings["dtype"], kv_dtype=settings["kv_dtype"],
        **{k: report[k] for k in ("original", "quantized", "evicted", "held_bytes", "allocated_bytes", "full_bytes")})


def decode_group(method: Method, attention: str) -> tuple:
    """Methods whose rows decode in one batch share this key (`arkv.decode_family`); full decodes alone."""
    return ("full",) if method.method == "full" else decode_family(arkv_config(method, MIN_BUDGET, attention))


def arkv_config(method: Method, budget: int, attention: str, pool_kernel: int = ARKVConfig.pool_kernel) -> ARKVConfig:
    return ARKVConfig(kv_budget=budget, method=method.method, oq_policy=method.oq_policy, window=WINDOW,
                      kv_quant=method.kv_quant, attention=attention, pool_kernel=pool_kernel)


def min_budget_tokens(budget: int | float, prompt_len: int, notes: set) -> int:
    """Tokens of a budget for one prompt (`generate.budget_tokens`), raised to MIN_BUDGET (with a
    note, once per budget)."""
    tokens = budget_tokens(budget, prompt_len)
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


def mean_interval(scores: list[float], resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of `scores` (`seed` fixed)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(scores, dtype=torch.float64)
    means = x[torch.randint(len(x), (resamples, len(x)), generator=g)].mean(-1)  # [R]
    low, high = means.quantile(torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def task_summaries(results: list[dict]) -> list[dict]:
    """One object per (mode, method, budget, task): n, mean and its 95% bootstrap interval."""
    groups = defaultdict(list)
    for r in results:
        groups[r["mode"], r["method"], r["budget"], r["task"]].append(r["score"])
    return [dict(mode=mode, method=method, budget=budget, task=task, n=len(scores), mean=mean(scores),
                 ci_low=(ci := mean_interval(scores))[0], ci_high=ci[1])
            for (mode, method, budget, task), scores in groups.items()]


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
    parser.add_argument("--pool-kernel", type=pool_kernel, default=ARKVConfig.pool_kernel,
                        help="positions a token score is average-pooled over (odd; 1: no pooling) for arkv, quant "
                             "and evict, which rank tokens by it (default: %(default)s, the paper's and SnapKV's)")
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="rows (samples x modes x methods that decode alike, of one budget) decoded together; samples prefilled "
                             "per group of this many")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="compute dtype; auto: bfloat16 on CUDA and on CPUs with AMX or AVX-512 BF16, else float32")
    parser.add_argument("--kv-dtype", default="bfloat16", choices=["auto", *DTYPES],
                        help="dtype of Original and full-cache K/V (auto: the compute dtype); budgets are its bytes")
    parser.add_argument("--out-dir", type=Path, default=Path("eval_out"))
    parser.add_argument("--resume", action="store_true", help="keep --out-dir's results.jsonl and skip its rows")
    parser.add_argument("--summarize", action="store_true",
                        help="with --resume: run nothing, write table.md and summary.json from the rows already there "
                             "(a grid cut short)")
    parser.add_argument("--no-plot", action="store_true", help="skip plot.png (then matplotlib is not needed)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="compile the decode step (default; about 10x faster decoding on the CPU after 20-40 s of "
                             "compiling per group of methods and budget): batches are padded to one size per group and a "
                             "budget's arenas sized for the longest prompt, so each group and budget compiles once")
    return parser


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    opts = parser.parse_args(argv)
    if any(t.startswith("longbench:") for t in opts.tasks) and opts.longbench_dir is None:
        parser.error("--tasks longbench:<dataset> needs --longbench-dir")
    if "gsm8k" in opts.tasks and opts.gsm8k_file is None:
        parser.error("--tasks gsm8k needs --gsm8k-file")
    if opts.summarize and not opts.resume:
        parser.error("--summarize reads an existing run: it needs --resume")
    if not opts.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit("eval.py: plot.png needs matplotlib: pip install matplotlib (or pass --no-plot)")
    try:
        run(opts, argv)
    except (ValueError, OSError) as err:  # FlagError, checkpoint.CheckpointError
        sys.exit(f"eval.py: {err}")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (Linux flags amx_bf16 or avx512_bf16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" or cpu_has_bf16() else torch.float32


def open_results(opts, settings: dict) -> dict[tuple, dict]:
    """The rows of results.jsonl by key (with --resume; without it, a fresh file), after checking that run.json's
    settings are this run's."""
    results, run_file = opts.out_dir / "results.jsonl", opts.out_dir / "run.json"
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    if not opts.resume:
        if results.exists() and results.stat().st_size:
            raise FlagError(f"--out-dir {opts.out_dir}: results.jsonl exists; pass --resume to continue it, or "
                            "choose another --out-dir")
        run_file.write_text(json.dumps(settings, indent=1))
        results.write_text("")
        return {}
    if run_file.exists():
        saved = json.loads(run_file.read_text())
        saved = {**SETTINGS_BEFORE_THEIR_FLAG, **saved}
        changed = [name for name in ROW_SETTINGS if saved.get(name) != settings[name]]
        if changed:
            name = changed[0]
            raise FlagError(f"--resume: {opts.out_dir / 'run.json'} was run with --{name.replace('_', '-')} "
                            f"{saved.get(name)}, this run has {settings[name]}; rows would not be comparable")
    run_file.write_text(json.dumps(settings, indent=1))
    rows = {}
    if results.exists():
        for line in results.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted write: that row is redone
            rows[row["task"], row["sample"], row["mode"], row["method"], row["budget"]] = row
        results.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    return rows


def run(opts, argv: list[str]):
    start = time.perf_counter()
    device = resolve_device(opts.device)
    dtype = compute_dtype(opts.dtype, device)
    kv_dtype = dtype if opts.kv_dtype == "auto" else DTYPES[opts.kv_dtype]
    checkpoint = opts.checkpoint or default_checkpoint()
    model, tokenizer = load_model(checkpoint, device, dtype), load_tokenizer(checkpoint)
    attention = resolve_attention("auto", device)
    methods, budgets = list(dict.fromkeys(opts.methods)), list(dict.fromkeys(opts.budgets))
    for m in methods:
        if m.method != "full":
            try:
                ARKV(arkv_config(m, MIN_BUDGET, attention, opts.pool_kernel), model.args, kv_dtype)
            except ValueError as err:
                raise FlagError(f"--methods {m.spec}: {err}") from None
    prompts = []
    for task, index, sample in load_samples(opts, tokenizer):
        context_ids, question_ids = split_ids(tokenizer, sample)
        max_new = min(sample.max_new_tokens, opts.max_new_tokens or sample.max_new_tokens)
        if len(context_ids) + len(question_ids) + max_new > model.args.max_seq_len:
            raise FlagError(f"--context {opts.context}: {task} sample {index} needs {len(context_ids)} + "
                            f"{len(question_ids)} + {max_new} tokens; the model context is {model.args.max_seq_len}")
        prompts.append(Prompt(task, index, sample, context_ids, question_ids, max_new))
    cache_len = max(p.length + p.max_new_tokens for p in prompts)
    longest = max(p.length for p in prompts)  # a budget's arenas hold min_budget_tokens(budget, longest)
    settings = {name: getattr(opts, name) for name in ROW_SETTINGS if name not in ("dtype", "kv_dtype")}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}
    settings.update(checkpoint=str(checkpoint), dtype=str(dtype).removeprefix("torch."),
                    kv_dtype=str(kv_dtype).removeprefix("torch."))
    print(f"eval.py: computing in {settings['dtype']}"
          f"{' (this CPU has AMX / AVX-512 BF16)' if dtype == torch.bfloat16 and device.type == 'cpu' else ''}, "
          f"K/V stored in {settings['kv_dtype']}", file=sys.stderr)
    done = open_results(opts, settings)
    rows = [Row(p, mode, m, b) for p in prompts for mode in opts.query_modes for m in methods
            for b in ([None] if m.method == "full" else budgets)]
    if opts.summarize:
        rows = [row for row in rows if row.key in done]
    todo = [row for row in rows if row.key not in done]
    step = decode_one_token
    if opts.compile:
        for limit in ("recompile_limit", "accumulated_recompile_limit"):  # graphs (methods x shapes), not steps
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 4096))
        step = compile_decode_step(device, dynamic=False)
    groups = defaultdict(list)  # (decode family, budget) -> its methods: their rows decode in shared batches
    for m in methods:
        for b in [None] if m.method == "full" else budgets:
            groups[decode_group(m, attention), b].append(m)
    pad_to = {key: min(opts.batch_size, sum(row.budget == key[1] and row.method in ms for row in todo))
              for key, ms in groups.items()}  # one batch shape per group: one compiled step each
    notes: set = set()
    progress = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="eval", unit="row", file=sys.stderr)
    # sample 0 of every task, then sample 1, ...: a grid cut short still covers every task
    pending_prompts = sorted(dict.fromkeys(row.prompt for row in todo), key=lambda p: (p.index, opts.tasks.index(p.task)))
    with (opts.out_dir / "results.jsonl").open("a") as out:
        for first in range(0, len(pending_prompts), opts.batch_size):
            group = pending_prompts[first:first + opts.batch_size]
            records = {}
            for prompt in group:  # one prefill per sample serves both query modes
                cuts, logits = record_prefill(model, prompt.context_ids + prompt.question_ids,
                                              [prompt.length, len(prompt.context_ids)], opts.pool_kernel)
                records[prompt] = {"aware": (cuts[prompt.length], logits), "agnostic": (cuts[len(prompt.context_ids)], None)}
            for key, group_methods in groups.items():
                budget = key[1]
                group_rows = [row for row in todo if row.prompt in records and row.budget == budget
                              and row.method in group_methods]
                # one method and mode per batch where the rows allow: a batch reads the largest Quantized
                # region among its rows, which an eviction-only row beside quantizing ones would pay for
                group_rows.sort(key=lambda row: (group_methods.index(row.method), row.mode))
                arena = None if budget is None else min_budget_tokens(budget, longest, notes)
                for b in range(0, len(group_rows), opts.batch_size):
                    batch = group_rows[b:b + opts.batch_size]
                    prepared = [prepare_row(model, row, records[row.prompt][row.mode], attention, kv_dtype, cache_len,
                                            notes, opts.pool_kernel) for row in batch]
                    decoded = decode_rows(model, batch, prepared, tokenizer, kv_dtype, cache_len, arena,
                                          pad_to[key] if opts.compile else 0, step)
                    for row, ready, (tokens, report) in zip(batch, prepared, decoded):
                        result = result_row(row, ready, tokens, report, tokenizer, settings)
                        done[row.key] = result
                        out.write(json.dumps(result) + "\n")
                    out.flush()
                    progress.update(len(batch))
            del records
    progress.close()
    results = [done[row.key] for row in rows]
    tasks = list(dict.fromkeys(opts.tasks))
    summaries = summarize(results, tasks)
    command = shlex.join(["python", "eval.py", *argv])
    seconds = time.perf_counter() - start
    text = table(summaries, tasks) + (f"\n`{command}`: {len(prompts)} samples, {len(todo)} of {len(rows)} rows run "
                                      f"here, {seconds:.0f} s ({settings['dtype']} compute, {settings['kv_dtype']} K/V)\n")
    print(text)
    (opts.out_dir / "table.md").write_text(text)
    (opts.out_dir / "summary.json").write_text(json.dumps(dict(
        command=command, seconds=round(seconds, 1), rows_run=len(todo), **settings,
        groups=task_summaries(results), summaries=summaries), indent=1))
    if not opts.no_plot:
        plot(summaries, opts.query_modes, opts.out_dir / "plot.png")


if __name__ == "__main__":
    main()
