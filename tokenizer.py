"""Text <-> token ids for a Hugging Face-style checkpoint folder, and single-turn chat prompts.

Backends: byte-level BPE `tokenizer.json` (rebuilt as a tiktoken Encoding), Llama 3's tiktoken-format
`tokenizer.model`, and sentencepiece `tokenizer.model`. Chat templates are not run through jinja: the
layout family (ChatML or Llama 3) is recognized from the template text and written out here.
"""
import abc
import base64
import json
import re
import time
import unicodedata
from pathlib import Path

import sentencepiece
import tiktoken

# Pre-tokenizer regexes, in tiktoken (fancy-regex) syntax.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits(individual_digits) then the GPT-2 regex, as one regex: every number is a piece of its own, so
# no space attaches to it, and a digit ends the text before it (whitespace there counts as trailing).
DIGITS_GPT2_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Meta's Llama 3 special tokens, numbered from the end of the BPE ranks (llama3 tokenizer.py).
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", *(f"<|reserved_special_token_{i}|>" for i in range(4)),
    "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(5, 251)),
]
# Meta-Llama-3-Instruct's chat template, for a tiktoken tokenizer.model that comes without one.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte -> that byte."""
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + i): b for i, b in enumerate(moved)}


BYTE_OF_CHAR = _byte_of_char()


class Tokenizer(abc.ABC):
    """One checkpoint's tokenizer: encode/decode from a backend, plus BOS/EOS ids and prompt building."""

    def __init__(self, bos_id: int | None, eos_ids: list[int], chat_template: str | None):
        self.name = ""  # the checkpoint folder, for error messages
        self.bos_id, self.add_bos = bos_id, bos_id is not None
        self.eos_ids, self.chat_template = eos_ids, chat_template

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids for text, no BOS added; special tokens written in the text become their ids."""

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text for ids (special tokens written out); incomplete UTF-8 at the end shows as U+FFFD."""

    @abc.abstractmethod
    def token_id(self, token: str) -> int | None:
        """Id of one whole token given as text, or None if it is not a single token."""

    def prompt_ids(self, text: str, chat: bool, system: str | None = None) -> list[int]:
        """Ids to feed the model: plain text (with BOS if the model wants it) or one chat turn."""
        if not chat:
            return [self.bos_id, *self.encode(text)] if self.add_bos else self.encode(text)
        if not self.chat_template:
            raise ValueError(f"{self.name}: this tokenizer has no chat template; drop --chat")
        return self.encode(self.render_chat(text, system))

    def render_chat(self, text: str, system: str | None) -> str:
        """One user message plus the assistant header, laid out as the chat template would."""
        template = self.chat_template
        if "<|im_start|>" in template:  # ChatML: SmolLM2, Qwen
            if system is None:  # a default system message hard-coded in the template, if any
                found = re.search(r"['\"]<\|im_start\|>system(?:\n|\\n)([^'\"{}]*)<\|im_end\|>", template)
                system = found and found[1]
            head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
            think = "<think>\n\n</think>\n\n" if "enable_thinking" in template else ""  # Qwen3, non-thinking
            return f"{head}<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n{think}"
        if "<|start_header_id|>" in template:  # Llama 3: the template trims message contents
            system = None if system is None else system.strip()
            if "Cutting Knowledge Date" in template:  # Llama 3.1+: a system block is always there
                date = time.strftime("%d %b %Y") if "strftime_now" in template else "26 Jul 2024"
                system = f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n{system or ''}"
            head = "" if system is None else f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
            return (f"<|begin_of_text|>{head}<|start_header_id|>user<|end_header_id|>\n\n{text.strip()}<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
        raise ValueError(f"{self.name}: unsupported chat template (only ChatML and Llama 3 layouts); drop --chat")


class TiktokenTokenizer(Tokenizer):
    """Byte-level BPE run by tiktoken, with ids translated to the checkpoint's own numbering."""

    def __init__(self, pattern: str, id_bytes: dict[int, bytes], merge_order: list[bytes],
                 specials: dict[str, int], nfc: bool, bos_id: int | None, eos_ids: list[int],
                 chat_template: str | None = None):
        """merge_order: token bytes by merge priority (first occurrence counts), tiktoken's ranks; the
        single bytes are ranked after them (their rank is never compared)."""
        super().__init__(bos_id, eos_ids, chat_template)
        id_of = {b: i for i, b in id_bytes.items()}
        ranked = list(dict.fromkeys([*merge_order, *(bytes([b]) for b in range(256))]))
        self._rank_to_id = [id_of.get(b, -1) for b in ranked]  # -1: a byte missing from the vocab
        self._enc = tiktoken.Encoding("bpe", pat_str=pattern, mergeable_ranks={b: r for r, b in enumerate(ranked)},
                                      special_tokens={})
        self._id_bytes = id_bytes | {i: s.encode() for s, i in specials.items()}
        self._specials, self._nfc = specials, nfc
        # Longest first, so overlapping special tokens match like Hugging Face's leftmost-longest search.
        alternatives = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
        self._special_re = re.compile(f"({alternatives or '(?!)'})")

    def encode(self, text: str) -> list[int]:
        ids = []
        for i, part in enumerate(self._special_re.split(text)):  # odd parts are special tokens
            if i % 2:
                ids.append(self._specials[part])
            elif part:
                part = unicodedata.normalize("NFC", part) if self._nfc else part
                ranks = self._enc.encode_ordinary(part)
                ids.extend(t for t in map(self._rank_to_id.__getitem__, ranks) if t >= 0)  # HF drops such bytes
        return ids

    def decode(self, ids: list[int]) -> str:
        """Ids with no token (padding rows of an embedding) decode to nothing."""
        return b"".join(self._id_bytes.get(i, b"") for i in ids).decode("utf-8", errors="replace")

    def token_id(self, token: str) -> int | None:
        ids = self.encode(token)
        return ids[0] if len(ids) == 1 else None


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (Llama 2 style). Special tokens in text are not recognized."""

    def __init__(self, processor: sentencepiece.SentencePieceProcessor):
        self._sp = processor
        bos, eos = processor.bos_id(), processor.eos_id()
        super().__init__(bos if bos >= 0 else None, [eos] if eos >= 0 else [], None)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def token_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None


def _pre_tokenizer_pattern(pre: dict | None, path: Path) -> str:
    """The one tiktoken regex that splits text as a supported tokenizer.json pre_tokenizer does."""
    steps = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [s["type"] for s in steps]
    if kinds and kinds[-1] == "ByteLevel" and not steps[-1].get("add_prefix_space"):
        use_regex, first = steps[-1].get("use_regex", True), steps[0]
        if kinds == ["ByteLevel"] and use_regex:
            return GPT2_PATTERN
        if kinds == ["Digits", "ByteLevel"] and use_regex and first.get("individual_digits"):
            return DIGITS_GPT2_PATTERN
        if (kinds == ["Split", "ByteLevel"] and not use_regex and "Regex" in first["pattern"]
                and first["behavior"] == "Isolated" and not first["invert"]):
            return first["pattern"]["Regex"]
    raise ValueError(f"{path}: unsupported pre_tokenizer {json.dumps(pre)[:300]}")


def _from_tokenizer_json(path: Path, spec: dict) -> TiktokenTokenizer:
    """A byte-level BPE tokenizer.json (GPT-2, SmolLM2, Qwen, Llama 3 HF format)."""
    model, normalizer = spec["model"], (spec.get("normalizer") or {}).get("type")
    if not _is_byte_level_bpe(spec) or any(model.get(k) for k in ("dropout", "continuing_subword_prefix",
                                                                   "end_of_word_suffix", "byte_fallback")):
        raise ValueError(f"{path}: only plain byte-level BPE is supported (model {model.get('type')}, "
                         f"decoder {(spec.get('decoder') or {}).get('type')})")
    if normalizer not in (None, "NFC"):
        raise ValueError(f"{path}: unsupported normalizer {normalizer}")
    vocab, specials = model["vocab"], {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    special_ids = set(specials.values())
    normal = {token: i for token, i in vocab.items() if i not in special_ids}
    try:
        id_bytes = {i: bytes(BYTE_OF_CHAR[c] for c in token) for token, i in normal.items()}
    except KeyError as e:
        raise ValueError(f"{path}: vocab has a character outside the byte-level alphabet: {e}") from None
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
    # HF merges by merge-list order, tiktoken by rank: rank each merge's result in merge order.
    order = [vocab[a + b] for a, b in merges]
    if model.get("ignore_merges"):  # a whole word found in the vocab is taken as is, as tiktoken does
        order += normal.values()
    return TiktokenTokenizer(_pre_tokenizer_pattern(spec.get("pre_tokenizer"), path), id_bytes,
                             [id_bytes[i] for i in order if i in id_bytes], specials, normalizer == "NFC",
                             _leading_special_id(spec.get("post_processor")), [])


def _is_byte_level_bpe(spec: dict) -> bool:
    return spec["model"].get("type") == "BPE" and (spec.get("decoder") or {}).get("type") == "ByteLevel"


def _leading_special_id(post: dict | None) -> int | None:
    """The id a tokenizer.json post-processor puts before every text (Llama 3's BOS), if any."""
    for p in post.get("processors", [post]) if post else []:
        first = (p.get("single") or [{}])[0] if p["type"] == "TemplateProcessing" else {}
        if "SpecialToken" in first:
            return p["special_tokens"][first["SpecialToken"]["id"]]["ids"][0]
    return None


def _from_tokenizer_model(path: Path) -> Tokenizer:
    """tokenizer.model: Llama 3's tiktoken BPE file ("base64 rank" lines) or a sentencepiece model."""
    data = path.read_bytes()
    if re.match(rb"[A-Za-z0-9+/]+=* \d+\r?\n", data):
        ranks = {base64.b64decode(token): int(rank) for token, rank in (ln.split() for ln in data.splitlines() if ln)}
        specials = {s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIALS)}
        eos = [specials["<|end_of_text|>"], specials["<|eot_id|>"]]
        return TiktokenTokenizer(LLAMA3_PATTERN, {r: b for b, r in ranks.items()}, sorted(ranks, key=ranks.get),
                                 specials, False, specials["<|begin_of_text|>"], eos, LLAMA3_TEMPLATE)
    try:
        return SentencePieceTokenizer(sentencepiece.SentencePieceProcessor(model_file=str(path)))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path}: neither a tiktoken BPE file nor a sentencepiece model ({e})") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.exists() else None


def load_tokenizer(checkpoint_dir: str | Path) -> Tokenizer:
    """The tokenizer of a Hugging Face-style folder, with BOS/EOS and chat template from its configs."""
    d = Path(checkpoint_dir)
    spec, model_file = _read_json(d / "tokenizer.json"), d / "tokenizer.model"
    if spec and (_is_byte_level_bpe(spec) or not model_file.exists()):
        tok = _from_tokenizer_json(d / "tokenizer.json", spec)
    elif model_file.exists():
        tok = _from_tokenizer_model(model_file)
    else:
        raise ValueError(f"{d}: no tokenizer.json or tokenizer.model found")
    tok.name = str(d)
    cfg, gen = _read_json(d / "tokenizer_config.json"), _read_json(d / "generation_config.json")
    template = cfg.get("chat_template") or _read_text(d / "chat_template.jinja")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {t["name"]: t["template"] for t in template}.get("default")
    tok.chat_template = template or tok.chat_template

    def named(key: str) -> int | None:  # "<s>" or {"content": "<s>", ...}
        token = cfg.get(key)
        return tok.token_id(token["content"] if isinstance(token, dict) else token) if token else None

    bos_candidates = [named("bos_token"), gen.get("bos_token_id"), tok.bos_id]
    tok.bos_id = next((i for i in bos_candidates if i is not None), None)
    tok.add_bos = tok.bos_id is not None and bool(cfg.get("add_bos_token", tok.add_bos))
    gen_eos = gen.get("eos_token_id")
    eos = [*(gen_eos if isinstance(gen_eos, list) else [gen_eos]), named("eos_token"), *tok.eos_ids]
    tok.eos_ids = [i for i in dict.fromkeys(eos) if i is not None]
    return tok
