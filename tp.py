"""Tensor parallelism on torch.distributed (Megatron-style, the shape of gpt-fast's tp.py): each rank
holds n_kv_heads / world KV heads of every layer with their query heads, and a slice of every
feed-forward; model.py is untouched, `shard` rewrites the loaded model's linear layers.

    torchrun --nproc-per-node 3 generate.py --chat --prompt "..."    # gloo on the CPU, NCCL on CUDA

Rank r of `world`, in every layer:
- wqkv [(H + 2 Hkv) D, dim]: the rows of its H / world query heads, of its Hkv / world key heads and
  of their value heads. Heads are taken contiguously and query head h reads KV head h // (H / Hkv),
  so a rank's query heads read only its own KV heads. wo [dim, H D]: its query heads' columns; each
  rank's wo output is a partial sum, which one all-reduce adds up.
- w1, w3 [ffn, dim]: a slice of the hidden units' rows; w2 [dim, ffn]: the same units' columns; one
  all-reduce after w2.
- Embeddings, norms and the output layer are replicated (the simplest: every rank computes the same
  logits and samples the same token, nothing is broadcast).
A rank's caches hold its KV heads only: `model.args` becomes a copy with the per-rank head counts
(the checkpoint's ModelArgs object is not changed), which `setup_caches` hands to the cache
factories. ARKV's per-layer statistics are means over all heads: `all_reduce_sum`, the manager's
`reduce` hook, adds their sums and counts, so every rank's Original shares are one process's.

A single process (no torchrun: WORLD_SIZE unset or 1) runs unchanged; every function is then a no-op.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.distributed import _functional_collectives as funcol

from model import Attention, FeedForward, Transformer


def world_size() -> int:
    """Processes that share the model (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's index in [0, world_size)."""
    return int(os.environ.get("RANK", "0"))


def quiet_unless_rank_zero():
    """Only rank 0 prints: the other ranks' stdout and stderr go to /dev/null (so do their one-line
    errors, which every rank meets alike); an uncaught exception still prints its traceback."""
    if rank() == 0:
        return
    sys.stdout = sys.stderr = open(os.devnull, "w")
    sys.excepthook = lambda *exc: traceback.print_exception(*exc, file=sys.__stderr__)


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: with several ranks on CUDA, GPU LOCAL_RANK (one GPU per rank)."""
    if world_size() == 1 or device.type != "cuda":
        return device
    local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local >= count:
        raise ValueError(f"tensor parallelism: local rank {local} needs GPU {local} but {count} are visible; "
                         f"run at most {count} ranks per machine (--nproc-per-node)")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def shard(model: Transformer) -> Transformer:
    """Join the process group and keep this rank's shard of every layer (see the module docstring);
    one process returns `model` unchanged."""
    world, args = world_size(), model.args
    if world == 1:
        return model
    if args.n_kv_heads % world:
        sizes = [n for n in range(1, args.n_kv_heads + 1) if args.n_kv_heads % n == 0]
        raise ValueError(f"tensor parallelism: {world} ranks do not divide the model's {args.n_kv_heads} KV heads "
                         f"(each rank holds whole KV heads); run --nproc-per-node {' or '.join(map(str, sizes))}")
    if args.weight_quant != "none":
        raise ValueError(f"tensor parallelism: {args.weight_quant} weights are not sharded; run the float checkpoint")
    init_process_group(model.tok_embeddings.weight.device)
    for block in model.layers:
        shard_attention(block.attention, world)
        shard_feed_forward(block.feed_forward)
    model.args = dataclasses.replace(args, n_head=args.n_head // world, n_kv_heads=args.n_kv_heads // world)
    return model


def init_process_group(device: torch.device):
    """NCCL for a CUDA model, gloo for a CPU one (torchrun's env:// rendezvous); one line when this
    PyTorch build lacks the backend."""
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"tensor parallelism runs on cpu (gloo) or cuda (NCCL), not {device.type}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    usable = dist.is_available() and (dist.is_nccl_available() if backend == "nccl" else dist.is_gloo_available())
    if not usable:
        raise ValueError(f"tensor parallelism on {device.type} needs torch.distributed's {backend} backend, which this "
                         f"PyTorch build lacks; run one process (python generate.py ...)")
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
        atexit.register(dist.destroy_process_group)


def shard_attention(attention: Attention, world: int):
    """This rank's query heads and their KV heads: rows of wqkv, columns of wo; all-reduce after wo."""
    H, Hkv, D = attention.n_head, attention.n_kv_heads, attention.head_dim
    q, k, v = attention.wqkv.weight.split([H * D, Hkv * D, Hkv * D])  # [H D, dim], [Hkv D, dim], [Hkv D, dim]
    set_weight(attention.wqkv, torch.cat([my_part(q, 0), my_part(k, 0), my_part(v, 0)]))  # [(H + 2 Hkv) D / world, dim]
    set_weight(attention.wo, my_part(attention.wo.weight, 1))  # [dim, H D / world]
    attention.n_head, attention.n_kv_heads = H // world, Hkv // world
    attention.wo.register_forward_hook(all_reduce_output)


def shard_feed_forward(feed_forward: FeedForward):
    """A slice of the hidden units: rows of w1 and w3, the same columns of w2; all-reduce after w2."""
    set_weight(feed_forward.w1, my_part(feed_forward.w1.weight, 0))  # [ffn / world, dim]
    set_weight(feed_forward.w3, my_part(feed_forward.w3.weight, 0))  # [ffn / world, dim]
    set_weight(feed_forward.w2, my_part(feed_forward.w2.weight, 1))  # [dim, ffn / world]
    feed_forward.w2.register_forward_hook(all_reduce_output)


def my_part(weight: Tensor, dim: int) -> Tensor:
    """This rank's contiguous slice of `weight` along `dim` (sizes differ by at most one row when
    `world` does not divide it: the hidden units of a feed-forward need not split evenly)."""
    return torch.tensor_split(weight, world_size(), dim=dim)[rank()]


def set_weight(linear: nn.Linear, weight: Tensor):
    """Replace a linear layer's weight [out, in] with `weight`, copied so that the full one is freed."""
    linear.weight = nn.Parameter(weight.clone(), requires_grad=False)
    linear.out_features, linear.in_features = weight.shape


def all_reduce_output(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    """Forward hook: the sum of every rank's partial output (a functional collective, which
    torch.compile can trace)."""
    return funcol.all_reduce(output, "sum", dist.group.WORLD)


def all_reduce_sum(x: Tensor) -> Tensor:
    """x summed over the ranks (ARKV's `reduce` hook); x itself in one process."""
    if not dist.is_initialized():
        return x
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else x.device
    total = x.to(device, copy=True)
    dist.all_reduce(total)
    return total.to(x.device)


def gather(value) -> list:
    """Every rank's `value` (any picklable object), in rank order; [value] in one process."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def sum_report(report: dict) -> dict:
    """`ARKV.report` of the whole model from every rank's: token states and bytes of all KV heads
    summed (the Original shares are the same on every rank)."""
    reports = gather(report)
    return {key: value if key == "shares" else sum(r[key] for r in reports) for key, value in report.items()}


def rank_bytes_text(rank_bytes: list[int]) -> str:
    """' (per rank: 1.00 + 1.00 MiB)', or '' for one process."""
    if len(rank_bytes) == 1:
        return ""
    return f" (per rank: {' + '.join(f'{n / 2**20:.2f}' for n in rank_bytes)} MiB)"
