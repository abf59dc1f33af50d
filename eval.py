"""Pass-key retrieval at equal KV memory: full cache vs ARKV and its baselines.

    python eval.py --samples 12 --context 3000 --budgets 128 256 --methods full arkv evict quant

Each sample hides a 5-digit pass key at an evenly spread depth of essay text (the haystack of
../shared/assets, or --haystack-file), asks for it at the end (query-aware: the question is inside
the compressed prompt), and decodes greedily after compression. The prompt is prefilled once per
sample; every method and budget is compressed from that same prefill.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from arkv import ARKV, ARKVConfig, FORMATS, METHODS
from generate import CheckpointError, OneLineParser, decode_one_token, default_checkpoint, load_model, positive_int
from model import full_cache
from tokenizer import load_tokenizer

HAYSTACK = Path(__file__).parent.parent / "shared" / "assets" / "haystack" / "PaulGrahamEssays"
QUESTION = "What is the pass key? Answer with the number only."


def haystack_text(path: Path | None) -> str:
    if path is not None:
        return path.read_text()
    if not HAYSTACK.is_dir():
        raise CheckpointError(f"{HAYSTACK} is absent: pass --haystack-file")
    return "\n\n".join(p.read_text() for p in sorted(HAYSTACK.glob("*.txt")))


def passkey_sample(tokenizer, haystack: str, context: int, depth: float, rng: random.Random) -> tuple[list[int], str]:
    """Chat prompt of about `context` tokens with the needle at relative `depth`; returns ids and key."""
    key = str(rng.randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    words = haystack.split()
    start = rng.randrange(0, max(1, len(words) - 4 * context))
    words = words[start:start + context]  # more than enough words; trimmed to tokens below
    body = tokenizer.encode(" ".join(words))
    budget = context - len(tokenizer.prompt_ids(needle + QUESTION, chat=True))
    body = body[:budget]
    cut = int(len(body) * depth)
    text = tokenizer.decode(body[:cut]) + needle + tokenizer.decode(body[cut:]) + "\n\n" + QUESTION
    return tokenizer.prompt_ids(text, chat=True), key


@torch.no_grad()
def prefill_once(model, ids: list[int], window: int):
    """One prefill; returns the first generated token and every layer's prompt K/V and statistics."""
    recorder = ARKV(ARKVConfig(kv_budget=window, window=window), model.args, model.output.weight.dtype)
    model.setup_caches(1, len(ids), recorder.cache_factory)
    logits = model(torch.tensor([ids]), torch.arange(len(ids)), last_only=True)
    return logits[:, -1].argmax(-1, keepdim=True), [cache.pending for cache in recorder.caches]


@torch.no_grad()
def decode_after(model, pendings, first: torch.Tensor, seq_len: int, config: ARKVConfig | None, max_new_tokens: int,
                 eos_ids) -> tuple[list[int], dict | None]:
    """Load the recorded prefill into a fresh cache (full, or compressed by `config`), then decode."""
    manager = ARKV(config, model.args, model.output.weight.dtype) if config else None
    model.setup_caches(1, seq_len + max_new_tokens, manager.cache_factory if manager else full_cache)
    for layer, pending in zip(model.layers, pendings):
        cache = layer.attention.kv_cache
        if manager:
            cache.pending = dict(pending)
        else:
            cache.k_cache[:, :, :seq_len] = pending["k"]
            cache.v_cache[:, :, :seq_len] = pending["v"]
    if manager:
        manager.compress()
    tokens, token = [int(first)], first
    input_pos = torch.tensor([seq_len])
    while len(tokens) < max_new_tokens and tokens[-1] not in eos_ids:
        token = decode_one_token(model, token, input_pos, 0.0, None)
        tokens.append(int(token))
        input_pos += 1
    return tokens, manager.report(seq_len + len(tokens) - 1) if manager else None


def main(argv: list[str] | None = None):
    parser = OneLineParser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--haystack-file", type=Path)
    parser.add_argument("--samples", type=positive_int, default=12)
    parser.add_argument("--context", type=positive_int, default=3000, help="prompt length in tokens")
    parser.add_argument("--budgets", type=positive_int, nargs="+", default=[128, 256])
    parser.add_argument("--methods", nargs="+", default=["full", "arkv", "evict", "quant"], choices=["full", *METHODS])
    parser.add_argument("--kv-quant", default="int4", choices=list(FORMATS))
    parser.add_argument("--oq-policy", default="paper", choices=["paper", "coverage"])
    parser.add_argument("--max-new-tokens", type=positive_int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write every sample's result as JSON here")
    opts = parser.parse_args(argv)
    try:
        run(opts)
    except (CheckpointError, ValueError, OSError) as err:
        sys.exit(f"eval.py: {err}")


def run(opts):
    checkpoint = opts.checkpoint or default_checkpoint()
    model, tokenizer = load_model(checkpoint, "cpu", torch.float32), load_tokenizer(checkpoint)
    haystack, rng = haystack_text(opts.haystack_file), random.Random(opts.seed)
    runs = [("full", None)] if "full" in opts.methods else []
    runs += [(m, b) for m in opts.methods if m != "full" for b in opts.budgets]
    hits = {run: 0 for run in runs}
    memory: dict = {}
    results = []
    start = time.perf_counter()
    for i in range(opts.samples):
        ids, key = passkey_sample(tokenizer, haystack, opts.context, (i + 0.5) / opts.samples, rng)
        first, pendings = prefill_once(model, ids, 32)
        for method, budget in runs:
            config = None if method == "full" else ARKVConfig(kv_budget=budget, method=method, kv_quant=opts.kv_quant,
                                                              oq_policy=opts.oq_policy)
            tokens, report = decode_after(model, pendings, first, len(ids), config, opts.max_new_tokens, tokenizer.eos_ids)
            answer = tokenizer.decode([t for t in tokens if t not in tokenizer.eos_ids])
            found = key in answer
            hits[(method, budget)] += found
            if report:
                memory[(method, budget)] = report
            results.append(dict(sample=i, prompt_tokens=len(ids), key=key, method=method, budget=budget,
                                answer=answer, found=found, report=report))
        elapsed = time.perf_counter() - start
        print(f"sample {i + 1}/{opts.samples} ({len(ids)} tokens) {elapsed:.0f} s, "
              f"ETA {elapsed / (i + 1) * (opts.samples - i - 1):.0f} s", file=sys.stderr)
    full_bytes = 2 * model.args.head_dim * 4 * model.args.n_kv_heads * model.args.n_layer * len(ids)
    print(f"\n| method | budget (tokens) | found | KV bytes allocated | vs full prompt KV | O / Q / E (last sample) |")
    print("|---|---|---|---|---|---|")
    for method, budget in runs:
        report = memory.get((method, budget))
        if report is None:
            row = f"{full_bytes / 2**20:.2f} MiB | 1.000 | all Original"
        else:
            total = report["original"] + report["quantized"] + report["evicted"]
            row = (f"{report['allocated_bytes'] / 2**20:.2f} MiB | {report['allocated_bytes'] / full_bytes:.3f} | "
                   f"{report['original'] / total:.1%} / {report['quantized'] / total:.1%} / {report['evicted'] / total:.1%}")
        print(f"| {method} | {budget or '-'} | {hits[(method, budget)]}/{opts.samples} | {row} |")
    print(f"\n{opts.samples} samples, prompt ~{opts.context} tokens, kv-quant {opts.kv_quant}, "
          f"oq-policy {opts.oq_policy}, {time.perf_counter() - start:.0f} s")
    if opts.out:
        opts.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
