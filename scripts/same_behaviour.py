"""Check that two revisions of this repository generate the same thing.

    python scripts/same_behaviour.py BASE [OTHER]           # OTHER: default the working tree
    python scripts/same_behaviour.py BASE --tree PATH       # OTHER: an existing directory

A refactor must not change behaviour: for a fixed set of `generate.py` commands (the README's demo
and its paper-policy and query-agnostic variants, then every cache method, Original-share policy
and Quantized format, a bfloat16 cache, a chunked prefill, a clamped budget and the compiled decode
step) the greedy text and the KV report must be identical in both trees. Each command runs in each
tree (a revision is checked out into a temporary `git worktree`, the working tree runs in place)
with this script's Python and one converted checkpoint, so both read the same weights. The outputs
are compared after masking only what varies from run to run (wall-clock times, tokens/s, the
process's peak memory). Prints one line per case, with a unified diff of the masked outputs where
they differ; exits 1 if any does (or if a case fails in both trees alike, which compares nothing).
"""
from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=Path(__file__).parent,
                           capture_output=True, text=True, check=True).stdout.strip())
DEFAULT_CHECKPOINT = REPO / "checkpoints" / "SmolLM2-135M-Instruct"

DEMO = ["--chat", "--prompt-file", "docs/demo_document.txt", "--question",
        "What is the special magic number for lucky-whale mentioned in the provided text?"]
# A document of about 250 tokens with one fact to retrieve: long enough that a 25% budget keeps
# more than the window, short enough that each case prefills in a few seconds.
SHORT_DOCUMENT = """\
The harbour town of Elmsworth sits where the river Alder meets the sea. Its fishermen leave before
dawn and sell their catch on the stone quay by nine, when the bakers open their shutters and the
ferry to the islands sounds its horn. In winter the fog stays until noon and the lighthouse keeper
rings a bell every two minutes.
The town council keeps a ledger of every ship that enters the harbour. Last spring the ledger
recorded that the schooner Marigold carried exactly 4817 barrels of salted herring, the largest
cargo in the town's history.
Children learn to row in the shallow bay behind the church, and every August the whole town
gathers for a regatta that ends with a supper of grilled mackerel and apple cake. Visitors come
from the inland villages by the old railway, which runs twice a day along the cliffs.
The library holds maps of the coast drawn two centuries ago, when the river was deeper and the
quay was built of timber. Scholars still argue about where the first lighthouse stood."""
SHORT = ["--chat", "--prompt", SHORT_DOCUMENT, "--question", "How many barrels did the schooner Marigold carry?"]

CASES: dict[str, list[str]] = {
    "readme-demo (arkv, coverage, int4)": [*DEMO, "--kv-budget", "25%", "--max-new-tokens", "32"],
    "readme-demo, paper": [*DEMO, "--kv-budget", "25%", "--oq-policy", "paper", "--max-new-tokens", "32"],
    "readme-demo, agnostic": [*DEMO, "--kv-budget", "25%", "--query-mode", "agnostic", "--max-new-tokens", "32"],
    "full cache, seed warning": ["--chat", "--prompt", "What is the capital of France?", "--seed", "1",
                                 "--max-new-tokens", "24"],
    "arkv, paper, fp8, agnostic": [*SHORT, "--kv-budget", "25%", "--oq-policy", "paper", "--kv-quant", "fp8",
                                   "--query-mode", "agnostic", "--max-new-tokens", "24"],
    "quant, int8, prefill-chunk": [*SHORT, "--method", "quant", "--kv-budget", "25%", "--kv-quant", "int8",
                                   "--prefill-chunk", "96", "--max-new-tokens", "24"],
    "evict, bfloat16 cache": [*SHORT, "--method", "evict", "--kv-budget", "25%", "--kv-dtype", "bfloat16",
                              "--max-new-tokens", "24"],
    "streaming": [*SHORT, "--method", "streaming", "--kv-budget", "25%", "--max-new-tokens", "24"],
    "h2o": [*SHORT, "--method", "h2o", "--kv-budget", "25%", "--max-new-tokens", "24"],
    "arkv, budget above the sequence (note)": [*SHORT, "--kv-budget", "1000", "--max-new-tokens", "24"],
    "arkv, coverage, int8, compiled": [*SHORT, "--kv-budget", "64", "--oq-policy", "coverage", "--kv-quant", "int8",
                                       "--compile", "--max-new-tokens", "24"],
}

# What legitimately differs between two runs of the same code: the number is masked, the line kept.
VARYING = [
    (re.compile(r"(time to first token: )[\d.]+( s; first decode step: )[\d.]+( s)"), r"\1<t>\2<t>\3"),
    (re.compile(r"(decode: )(?:[\d.]+|nan)( tokens/s)"), r"\1<rate>\2"),
    (re.compile(r"(peak memory: )[\d.]+( MiB)"), r"\1<mib>\2"),
]


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"same_behaviour.py: git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


@contextmanager
def checkout(revision: str | None) -> Iterator[Path]:
    """The tree of `revision` in a temporary detached worktree, removed afterwards; None: the
    working tree itself."""
    if revision is None:
        yield REPO
        return
    commit = git("rev-parse", "--verify", f"{revision}^{{commit}}")
    with tempfile.TemporaryDirectory(prefix="same_behaviour-") as parent:
        tree = Path(parent) / commit[:12]
        git("worktree", "add", "--detach", "--quiet", str(tree), commit)
        try:
            yield tree
        finally:
            git("worktree", "remove", "--force", str(tree))
            git("worktree", "prune")


def run_case(tree: Path, args: list[str], checkpoint: Path) -> tuple[int, str, float]:
    """generate.py with `args` in `tree` -> (exit status, stdout and stderr masked, seconds)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(checkpoint), *args],
                          cwd=tree, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = f"exit status {done.returncode}\n-- stdout\n{done.stdout}\n-- stderr\n{done.stderr}"
    return done.returncode, mask(output), seconds


def mask(output: str) -> str:
    for pattern, replacement in VARYING:
        output = pattern.sub(replacement, output)
    return output


def indented(lines) -> str:
    return "\n".join(f"    {line}" for line in lines)


def compare(base: Path, other: Path, checkpoint: Path) -> bool:
    """Run every case in both trees; print one line per case: same, DIFFERENT (with the diff) or
    FAILED (generate.py fails in both trees alike, so the case compares nothing). True when all
    are the same."""
    all_same, totals = True, [0.0, 0.0]
    for name, args in CASES.items():
        base_status, base_out, base_s = run_case(base, args, checkpoint)
        _, other_out, other_s = run_case(other, args, checkpoint)
        totals[0] += base_s
        totals[1] += other_s
        verdict = "DIFFERENT" if base_out != other_out else "FAILED" if base_status != 0 else "same"
        all_same &= verdict == "same"
        print(f"{verdict:9} {name}  ({base_s:.0f} s / {other_s:.0f} s)", flush=True)
        if verdict == "DIFFERENT":
            print(indented(difflib.unified_diff(base_out.splitlines(), other_out.splitlines(), "base", "other",
                                                lineterm="")), flush=True)
        elif verdict == "FAILED":
            print(indented(base_out.splitlines()), flush=True)
    print(f"{'all same' if all_same else 'NOT all same'}: {len(CASES)} cases; {totals[0]:.0f} s in base, "
          f"{totals[1]:.0f} s in other")
    return all_same


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", metavar="BASE", help="git revision to compare against")
    parser.add_argument("other", metavar="OTHER", nargs="?", help="git revision (default: the working tree)")
    parser.add_argument("--tree", type=Path, help="an existing directory to use as OTHER instead of a revision")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                        help="converted checkpoint both trees read (default: %(default)s)")
    opts = parser.parse_args()
    if opts.tree is not None and opts.other is not None:
        parser.error("give OTHER or --tree, not both")
    if opts.tree is not None and not (opts.tree / "generate.py").is_file():
        parser.error(f"--tree {opts.tree}: no generate.py there")
    if not (opts.checkpoint / "model_args.json").is_file():
        parser.error(f"--checkpoint {opts.checkpoint}: not a converted checkpoint (run `python generate.py "
                     f"--max-new-tokens 1` once in {REPO} to convert the default model there)")
    return opts


def main():
    opts = parse_args()
    with ExitStack() as stack:
        base = stack.enter_context(checkout(opts.base))
        other = opts.tree.resolve() if opts.tree is not None else stack.enter_context(checkout(opts.other))
        all_same = compare(base, other, opts.checkpoint.resolve())
    sys.exit(0 if all_same else 1)


if __name__ == "__main__":
    main()
