"""Convert a Hugging Face checkpoint folder, a GGUF file, or a Hub repo into `checkpoints/<name>/`.

The output folder holds `model.safetensors` (this project's parameter names, q/k/v fused into
`wqkv`), `model_args.json` (the derived `ModelArgs`) and the tokenizer files `tokenizer.py` reads.

    python convert.py path/to/hf_folder            # config.json + *.safetensors (+ index)
    python convert.py path/to/model.gguf           # Llama-architecture GGUF, dequantized to float32
    python convert.py --repo Qwen/Qwen3-0.6B       # download with huggingface-hub first
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from model import ModelArgs

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


class ConversionError(ValueError):
    pass


def convert_hf(src: Path, out: Path) -> ModelArgs:
    """Hugging Face folder (config.json, one or many *.safetensors) -> our layout in `out`."""
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{src}: no config.json; expected a Hugging Face checkpoint folder")
    try:
        args = ModelArgs.from_hf_config(json.loads(config_path.read_text()), name=out.name)
    except (ValueError, KeyError) as err:
        raise ConversionError(f"{config_path}: {err}") from None
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{src}: no *.safetensors files (PyTorch .bin checkpoints are not supported)")
    hf: dict[str, torch.Tensor] = {}
    for path in tqdm(files, desc="reading", unit="file", disable=len(files) == 1):
        with safe_open(path, framework="pt") as f:
            hf.update({name: f.get_tensor(name) for name in f.keys()})
    state = {"tok_embeddings.weight": hf.pop("model.embed_tokens.weight"), "norm.weight": hf.pop("model.norm.weight")}
    lm_head = hf.pop("lm_head.weight", None)
    if not args.tie_embeddings:
        if lm_head is None:
            raise ConversionError(f"{src}: lm_head.weight is missing and tie_word_embeddings is false")
        state["output.weight"] = lm_head
    for i in tqdm(range(args.n_layer), desc="converting", unit="layer"):
        prefix = f"model.layers.{i}."
        qkv = [hf.pop(prefix + f"self_attn.{p}_proj.weight") for p in "qkv"]
        state[f"layers.{i}.attention.wqkv.weight"] = torch.cat(qkv)
        for hf_name, name in HF_LAYER_NAMES.items():
            if prefix + hf_name in hf:
                state[f"layers.{i}.{name}"] = hf.pop(prefix + hf_name)
    leftover = [name for name in hf if "rotary_emb" not in name]
    if leftover:
        raise ConversionError(f"{src}: unexpected tensors {leftover[:3]} (unsupported architecture variant)")
    write(out, args, state)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return args


def convert_gguf(path: Path, out: Path) -> ModelArgs:
    """Llama-architecture GGUF -> our layout: weights dequantized to float32, llama.cpp's q/k row
    permutation undone, tokenizer metadata written back as Hugging Face tokenizer files."""
    import gguf  # only needed for this path

    reader = gguf.GGUFReader(str(path))
    meta = {name: field.contents() for name, field in reader.fields.items()}
    if meta.get("general.architecture") != "llama":
        raise ConversionError(f"{path}: architecture {meta.get('general.architecture')!r}; only llama GGUF is supported")
    n_head, n_kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    dim = meta["llama.embedding_length"]
    tensors = {t.name: t for t in reader.tensors}
    args = ModelArgs(
        dim=dim, n_layer=meta["llama.block_count"], n_head=n_head, n_kv_heads=n_kv_heads,
        head_dim=meta.get("llama.attention.key_length", dim // n_head),
        intermediate_size=meta["llama.feed_forward_length"], vocab_size=len(meta["tokenizer.ggml.tokens"]),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
        tie_embeddings="output.weight" not in tensors, max_seq_len=meta["llama.context_length"], name=out.name)

    def load(name: str) -> torch.Tensor:
        t = tensors[name]
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()

    state = {"tok_embeddings.weight": load("token_embd.weight"), "norm.weight": load("output_norm.weight")}
    if not args.tie_embeddings:
        state["output.weight"] = load("output.weight")
    for i in tqdm(range(args.n_layer), desc="dequantizing", unit="layer"):
        q = unpermute_gguf(load(f"blk.{i}.attn_q.weight"), n_head)
        k = unpermute_gguf(load(f"blk.{i}.attn_k.weight"), n_kv_heads)
        state[f"layers.{i}.attention.wqkv.weight"] = torch.cat([q, k, load(f"blk.{i}.attn_v.weight")])
        for gguf_name, name in GGUF_LAYER_NAMES.items():
            state[f"layers.{i}.{name}"] = load(f"blk.{i}.{gguf_name}.weight")
    write(out, args, state)
    write_gguf_tokenizer(path, meta, out)
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
        raise ConversionError(f"{path}: tokenizer model {meta.get('tokenizer.ggml.model')!r}; only gpt2 (byte-level BPE) is supported")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in GGUF_PRETOKENIZERS:
        raise ConversionError(f"{path}: pre-tokenizer {pre!r} is not supported; supported: {', '.join(GGUF_PRETOKENIZERS)}")
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
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}, indent=1))


def write(out: Path, args: ModelArgs, state: dict[str, torch.Tensor]):
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous() for name, t in state.items()}, str(out / "model.safetensors"))
    (out / "model_args.json").write_text(json.dumps(args.to_dict(), indent=1))


def download(repo_id: str) -> Path:
    """Fetch config, weights and tokenizer files of a Hub repo (needs network access)."""
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", *TOKENIZER_FILES]
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def convert(src: Path, out: Path) -> ModelArgs:
    if src.is_file() and src.suffix == ".gguf":
        return convert_gguf(src, out)
    if src.is_dir():
        return convert_hf(src, out)
    raise ConversionError(f"{src}: not a Hugging Face checkpoint folder or a .gguf file")


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", type=Path, help="Hugging Face folder or .gguf file")
    parser.add_argument("--repo", help="Hugging Face Hub repo id to download first")
    parser.add_argument("--out", type=Path, help="output folder (default: checkpoints/<name>)")
    opts = parser.parse_args(argv)
    if (opts.source is None) == (opts.repo is None):
        parser.error("give exactly one of SOURCE or --repo")
    src = download(opts.repo) if opts.repo else opts.source
    name = opts.repo.split("/")[-1] if opts.repo else src.stem if src.suffix == ".gguf" else src.resolve().name
    out = opts.out or Path("checkpoints") / name
    try:
        args = convert(src, out)
    except (ConversionError, ValueError) as err:
        sys.exit(f"convert.py: {err}")
    print(f"wrote {out}: {args.n_layer} layers, dim {args.dim}, {args.n_head}/{args.n_kv_heads} heads, head_dim {args.head_dim}")


if __name__ == "__main__":
    main()
