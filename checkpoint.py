"""Reading and checking a checkpoint: the one place that decides whether files are a usable model.

A converted checkpoint (`convert.py` writes it) is a folder of `model_args.json` (the `ModelArgs`),
`model.safetensors` (this project's parameter names) and the Hugging Face tokenizer files. Every
defect found here, in a converted folder or in a source being converted, is one `CheckpointError`
naming the file and what was expected, never a traceback from deep inside torch.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from model import ModelArgs, Transformer
from tokenizer import Tokenizer, load_tokenizer

INT_FIELDS = ("dim", "n_layer", "n_head", "n_kv_heads", "head_dim", "intermediate_size", "vocab_size", "max_seq_len")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


class CheckpointError(ValueError):
    """A checkpoint, converted or a source to convert, that cannot be read, used or written."""


def model_args_problem(values: dict) -> str | None:
    """What makes ModelArgs `values` (field -> value) unusable for building the model: a size that
    is not a positive integer, an odd head_dim, an incomplete llama3 rope_scaling; None if usable.
    Wrong types would otherwise surface as tracebacks deep in torch."""
    for name in INT_FIELDS:
        value = values.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f"{name} is {value!r}; expected an integer >= 1"
    for name in ("rope_theta", "norm_eps"):
        value = values.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
            return f"{name} is {value!r}; expected a number > 0"
    if values["head_dim"] % 2:
        return f"head_dim is {values['head_dim']}; expected an even number (RoPE rotates pairs of channels)"
    scaling = values.get("rope_scaling")
    if scaling and not isinstance(scaling, dict):
        return f"rope_scaling is {scaling!r}; expected null or an object"
    if scaling:  # model.rope_frequencies reads these keys from any non-empty rope_scaling
        missing = [k for k in LLAMA3_ROPE_KEYS if not isinstance(scaling.get(k), (int, float))]
        if missing:
            return f"rope_scaling {scaling} lacks numeric {', '.join(missing)}; expected all of {', '.join(LLAMA3_ROPE_KEYS)}"
    return None


def state_problem(args: ModelArgs, state: dict[str, torch.Tensor], sizes_from: str) -> str | None:
    """How the tensors `state` (our names) disagree with the model `args` describes: missing or
    unexpected names, a shape other than `args` implies (`sizes_from` names where the sizes come
    from), a non-floating-point dtype; None if they match."""
    with torch.device("meta"):
        reference = Transformer(args).state_dict()
    expected = {name: t.shape for name, t in reference.items()}
    dtypes = {name: t.dtype for name, t in reference.items()}
    if args.tie_embeddings and args.weight_quant == "none":
        expected.pop("output.weight")
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        return (f"tensors do not match {sizes_from} ({len(missing)} missing {missing[:3]}, "
                f"{len(extra)} unexpected {extra[:3]})")
    wrong = [name for name in expected if state[name].shape != expected[name]]  # the model's order: embeddings first
    if wrong:
        name = wrong[0]
        return (f"tensor {name} has shape {list(state[name].shape)}; {sizes_from} gives {list(expected[name])} "
                f"({len(wrong)} of {len(state)} tensors disagree: the sizes in {sizes_from} do not match the weights)")
    for name, t in state.items():
        if dtypes[name] in (torch.int8, torch.uint8) and t.dtype != dtypes[name]:
            return (f"tensor {name} is {t.dtype}; expected {str(dtypes[name]).removeprefix('torch.')} "
                    f"(model_args.json says weight_quant {args.weight_quant})")
        if dtypes[name] not in (torch.int8, torch.uint8) and not t.is_floating_point():
            return f"tensor {name} is {t.dtype}; expected floating-point weights"
    return None


def read_json_object(path: Path, expected: str) -> dict:
    """A JSON object from `path`, or one CheckpointError saying what is wrong with the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not valid JSON ({err}); expected {expected}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: a JSON {type(value).__name__}; expected {expected} (a JSON object)")
    return value


def read_model_args(path: Path) -> ModelArgs:
    """`model_args.json` -> ModelArgs, every defect (not JSON, not an object, missing or unknown
    fields, a size that is not a positive integer) as one CheckpointError naming the file."""
    raw = read_json_object(path, "an object of ModelArgs fields, as convert.py writes it")
    fields = {f.name: f for f in dataclasses.fields(ModelArgs)}
    missing = [name for name, f in fields.items() if name not in raw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    unknown = [name for name in raw if name not in fields]
    if missing or unknown:
        wrong = ", ".join(f"{kind} fields {names}" for kind, names in (("missing", missing), ("unknown", unknown)) if names)
        raise CheckpointError(f"{path}: {wrong}; expected the fields {', '.join(fields)}")
    defaults = {name: f.default for name, f in fields.items() if f.default is not dataclasses.MISSING}
    problem = model_args_problem({**defaults, **raw})  # before ModelArgs: n_kv_heads 0 would divide by zero there
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    try:
        return ModelArgs(**raw)
    except (TypeError, ValueError, AttributeError) as err:  # e.g. n_head not a multiple of n_kv_heads
        raise CheckpointError(f"{path}: {err}") from None


def load_model(checkpoint: Path, device: str | torch.device, dtype: torch.dtype) -> Transformer:
    """Build the model from `model_args.json` and load `model.safetensors` written by convert.py:
    floating-point weights in `dtype`, quantized weights and their float32 scales and zeros as
    stored (`quantize.Int8Linear`, `quantize.Int4Linear`)."""
    if not checkpoint.is_dir():
        raise CheckpointError(f"--checkpoint {checkpoint}: no such directory")
    args_path, weights_path = checkpoint / "model_args.json", checkpoint / "model.safetensors"
    if not args_path.is_file() or not weights_path.is_file():
        hint = " (a Hugging Face folder? convert it first: python convert.py DIR)" if (checkpoint / "config.json").is_file() else ""
        raise CheckpointError(f"--checkpoint {checkpoint}: expected model_args.json and model.safetensors{hint}")
    args = read_model_args(args_path)
    with torch.device("meta"):
        model = Transformer(args)
    try:
        state = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({err}); expected the weights "
                              f"convert.py writes (convert the model again)") from None
    problem = state_problem(args, state, "model_args.json")  # names, then shapes against model_args.json
    if problem:
        raise CheckpointError(f"{weights_path}: {problem}")
    # a NaN or inf anywhere makes the tensor's sum non-finite: one cheap pass, one host sync
    sums = torch.stack([t.sum(dtype=torch.float32) for t in state.values()])
    broken = [name for name, finite in zip(state, torch.isfinite(sums).tolist()) if not finite]
    if broken:
        raise CheckpointError(f"{weights_path}: tensor {broken[0]} holds NaN or infinite values "
                              f"({len(broken)} tensors); expected finite weights (a damaged file?)")
    state = {name: t if not t.is_floating_point() or name.endswith((".scales", ".zeros")) else t.to(dtype)
             for name, t in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_embeddings and args.weight_quant == "none":
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def read_tokenizer(checkpoint: Path) -> Tokenizer:
    """load_tokenizer, with tokenizer files of an unexpected layout (valid JSON, wrong keys or
    types) as one CheckpointError rather than a KeyError traceback."""
    try:
        return load_tokenizer(checkpoint)
    except (KeyError, TypeError, AttributeError, IndexError) as err:
        raise CheckpointError(f"{checkpoint}: tokenizer.json / tokenizer_config.json do not have the layout of a "
                              f"Hugging Face tokenizer ({type(err).__name__}: {err})") from None


def check_token_ids(ids: list[int], args: ModelArgs, checkpoint: Path):
    """The tokenizer must not produce ids the model has no embedding for."""
    outside = [i for i in ids if not 0 <= i < args.vocab_size]
    if outside:
        raise CheckpointError(f"{checkpoint}: the tokenizer gives token id {outside[0]} but the model has "
                              f"vocab_size {args.vocab_size} (model_args.json); the tokenizer files do not belong to these weights")
