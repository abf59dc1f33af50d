"""tasks.py: synthetic samples checked by re-parsing their text and re-tokenizing; metrics and readers against
hand-computed values."""
import functools
import itertools
import json
import random
import re
import time
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from conftest import asset
from tasks import (ADJECTIVES, FAMILIES, LONGBENCH_METRICS, METRICS, NOUNS, Sample, classification_score,
                   code_sim_score, count_score, gsm8k_exact, load_gsm8k, load_longbench, qa_f1_score, retrieval_score,
                   rouge_score, score, string_match_all, synthetic_sample)
from tokenizer import load_tokenizer

SINGLE = ("niah_single_number", "niah_single_word", "niah_single_uuid")
NEEDLE = re.compile(r"One of the special magic (?:numbers|words|uuids) for (\S+) is: (\S+)\.")
few = settings(max_examples=12, deadline=None)


@pytest.fixture(scope="module")
def tokenizer(smollm2_checkpoint):
    return load_tokenizer(smollm2_checkpoint)


@functools.cache
def essays() -> str:
    return "\n\n".join(p.read_text() for p in sorted((asset("haystack") / "PaulGrahamEssays").glob("*.txt")))


def n_tokens(tokenizer, sample: Sample) -> int:
    return len(tokenizer.encode(sample.context)) + len(tokenizer.encode(sample.question))


def expected_answers(sample: Sample) -> set[str]:
    """The answers worked out from the sample's text alone."""
    if sample.task == "variable_tracking":  # follow every chain "VAR X = 12345." / "VAR Y = VAR X."
        value = re.search(r"assigned the value (\d+)", sample.question)[1]
        known, seen = {}, set()
        for name, source in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", sample.context):
            assert name not in seen, "a variable assigned twice"
            seen.add(name)
            known[name] = source if source.isdigit() else known[source[4:]]  # the source is assigned earlier
        return {name for name, v in known.items() if v == value}
    if sample.task == "common_words":
        entries = re.findall(r"(\d+)\. (\S+)", sample.context)
        assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
        counts = Counter(w for _, w in entries).most_common()
        assert counts[9][1] > counts[10][1], "the 10 most common words are not strictly the most common"
        return {w for w, _ in counts[:10]}
    keys = re.search(r"for (.+) mentioned in the provided text\?", sample.question)[1].replace(", and ", ", ")
    return {v for k, v in NEEDLE.findall(sample.context) if k in keys.split(", ")}


@pytest.mark.parametrize("haystack", ["noise", "essays"])
@pytest.mark.parametrize("context_tokens", [512, 1024, 4096])
@pytest.mark.parametrize("family", FAMILIES)
def test_synthetic_sample_answers_counts_and_length(tokenizer, family, context_tokens, haystack):
    sample = synthetic_sample(family, tokenizer, context_tokens, 0.5, random.Random(7),
                              essays() if haystack == "essays" else None)
    assert abs(n_tokens(tokenizer, sample) - context_tokens) <= 0.05 * context_tokens
    assert sample.question not in sample.context and sample.question.strip()
    assert set(sample.answers) == expected_answers(sample) and len(sample.answers) == len(set(sample.answers))
    assert sample.metric == "string_match_all" and sample.chat and sample.max_new_tokens >= 32
    if family == "common_words":
        return
    if family == "variable_tracking":  # two chains of 5 variables, each assigned once (checked above)
        values = re.findall(r"VAR [A-Z]{5} = (\d+)\.", sample.context)
        assert len(values) == 2 and len(re.findall(r"VAR [A-Z]{5} = ", sample.context)) == 10
        assert len(sample.answers) == 5
    else:
        values = [value for _, value in NEEDLE.findall(sample.context)]
        assert len(values) == (4 if family in ("niah_multikey", "niah_multivalue", "niah_multiquery") else 1)
    assert sorted(values) == sorted(sample.meta["values"])
    for value in values:  # nowhere but in its own needle
        assert sample.context.count(value) == 1


@pytest.mark.parametrize("context_tokens", [512, 8192])
def test_common_words_two_frequencies(tokenizer, context_tokens):
    """10 words share the top count, every other word one lower count (RULER: 30 and 3 at long contexts)."""
    sample = synthetic_sample("common_words", tokenizer, context_tokens, 0.5, random.Random(3))
    counts = Counter(re.findall(r"\d+\. (\S+)", sample.context))
    common, other = sample.meta["repeats"]
    assert {counts[w] for w in sample.answers} == {common} and set(counts.values()) == {common, other}
    assert (common, other) == ((30, 3) if context_tokens == 8192 else (3, 1))


@few
@given(family=st.sampled_from(SINGLE), depth=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**32),
       context_tokens=st.sampled_from([512, 1024, 4096]), noise=st.booleans())
def test_single_needle_depth(tokenizer, family, depth, seed, context_tokens, noise):
    haystack = None if noise else essays()
    sample = synthetic_sample(family, tokenizer, context_tokens, depth, random.Random(seed), haystack)
    assert abs(sample.context.find("One of the special magic") / len(sample.context) - depth) <= 0.1


@few
@given(family=st.sampled_from(("niah_multikey", "niah_multivalue", "niah_multiquery")),
       depth=st.floats(0.0, 1.0), seed=st.integers(0, 2**32))
def test_multi_needles_spread_around_depth(tokenizer, family, depth, seed):
    sample = synthetic_sample(family, tokenizer, 2048, depth, random.Random(seed))
    where = sorted(m.start() / len(sample.context) for m in NEEDLE.finditer(sample.context))
    assert len(where) == 4 and min(where[i + 1] - where[i] for i in range(3)) > 0.08  # 0.4 / 3 apart, about
    assert abs(sum(where) / 4 - min(max(depth, 0.2), 0.8)) <= 0.06  # centred on depth, the span kept in [0, 1]


@few
@given(family=st.sampled_from(FAMILIES), seed=st.integers(0, 2**32), noise=st.booleans())
def test_same_seed_same_sample(tokenizer, family, seed, noise):
    haystack = None if noise else essays()
    first, again = (synthetic_sample(family, tokenizer, 1024, 0.3, random.Random(seed), haystack) for _ in range(2))
    other = synthetic_sample(family, tokenizer, 1024, 0.3, random.Random(seed + 1), haystack)
    assert first == again and first.context != other.context and first.answers != other.answers


def test_synthetic_sample_is_fast(tokenizer):
    start = time.perf_counter()
    for family in FAMILIES:
        synthetic_sample(family, tokenizer, 4096, 0.5, random.Random(0), essays())
    assert (time.perf_counter() - start) / len(FAMILIES) < 0.5


def test_synthetic_sample_errors(tokenizer):
    with pytest.raises(ValueError, match="unknown task family"):
        synthetic_sample("niah_double", tokenizer, 1024, 0.5, random.Random(0))
    with pytest.raises(ValueError, match="depth"):
        synthetic_sample("niah_single_number", tokenizer, 1024, 1.5, random.Random(0))
    with pytest.raises(ValueError, match="too small"):
        synthetic_sample("niah_multivalue", tokenizer, 60, 0.5, random.Random(0))


def test_word_lists_have_no_word_inside_another():
    """So that no "adjective-noun" value occurs inside another one."""
    words = ADJECTIVES + NOUNS
    assert len(set(words)) == len(words)
    assert not [(a, b) for a in words for b in words if a != b and a in b]


# ---------------------------------------------------------------- metrics, hand-computed

def test_qa_f1_score():
    # normalized: "eiffel tower in paris" (4 tokens) vs "eiffel tower": P = 2/4, R = 1, F1 = 2/3
    assert qa_f1_score("The Eiffel Tower, in Paris!", "eiffel tower") == pytest.approx(2 / 3)
    assert qa_f1_score("paris paris", "Paris") == pytest.approx(2 / 3)  # overlap 1: P = 1/2, R = 1
    assert qa_f1_score("An apple.", "the APPLE") == 1.0
    assert qa_f1_score("London", "Paris") == 0.0 and qa_f1_score("the", "a") == 0.0


def test_rouge_score():
    # LCS("the cat sat on the mat", "the cat lay on a mat") = "the cat on mat": 4; P = R = 4/6
    assert rouge_score("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(2 / 3)
    # LCS = "the gunman": 2; P = 2/4, R = 2/6, F = 2PR / (P + R) = (1/6) / (5/12) = 0.4; '.' separates tokens
    assert rouge_score("police killed the gunman.", "the gunman was shot by police") == pytest.approx(0.4)
    assert rouge_score("", "anything") == 0.0 and rouge_score("a b", "c d") == 0.0


def test_code_sim_score():
    # LCS("kitten", "sitting") = "ittn": 4; indel distance = 6 + 7 - 2 * 4 = 5; similarity 1 - 5/13
    assert code_sim_score("kitten", "sitting") == pytest.approx(1 - 5 / 13)
    prediction = "\n```python\n# the next line\nx = f(y)  // no\nkitten\nmore"
    assert code_sim_score(prediction, "sitting") == pytest.approx(8 / 13)
    assert code_sim_score("# only comments", "x = 1") == 0.0


def test_classification_score():
    classes = ["Human being", "Human", "Location", "Entity"]
    assert classification_score("Location", "Location", all_classes=classes) == 1.0
    assert classification_score("Location or Entity", "Location", all_classes=classes) == 0.5
    # "Human" is inside the answer "Human being": dropped from the matches
    assert classification_score("Human being", "Human being", all_classes=classes) == 1.0
    assert classification_score("Human being", "Human", all_classes=classes) == 0.5
    assert classification_score("no idea", "Location", all_classes=classes) == 0.0


def test_retrieval_count_and_gsm8k_scores():
    assert retrieval_score("Paragraph 12, or maybe Paragraph 3", "Paragraph 12") == 0.5
    assert retrieval_score("Paragraph 12", "Paragraph 12") == 1.0 and retrieval_score("none", "Paragraph 1") == 0.0
    assert count_score("There are 7 unique paragraphs out of 10", "7") == 0.5 and count_score("seven", "7") == 0.0
    assert gsm8k_exact("4 boxes of 300 and 34 more, so 1,234 apples. The answer is 1,234.", "1234") == 1.0
    assert gsm8k_exact("The answer is 1,234. Or 12.", "1234") == 0.0
    assert gsm8k_exact("She makes $18.00 a day.", "18") == 1.0 and gsm8k_exact("-3 degrees", "-3") == 1.0
    assert gsm8k_exact("no idea", "5") == 0.0


def test_string_match_all_partial_credit():
    assert string_match_all("They are 7368886 and 4522457.", ["7368886", "2574702", "4522457"]) == pytest.approx(2 / 3)
    assert string_match_all("BRIGHT-River", ["bright-river"]) == 1.0


def test_score_max_over_answers_and_first_line():
    qa = Sample("hotpotqa", "", "", ["eiffel tower", "the eiffel tower in paris"], "qa_f1_score", 32, True, {})
    assert score(qa, "The Eiffel Tower, in Paris!") == 1.0  # max(2/3, 1)
    trec = Sample("trec", "", "", ["Location"], "classification_score", 64, False,
                  {"all_classes": ["Location", "Entity", "Human being"]})
    assert score(trec, "\nLocation\nEntity Human being") == 1.0  # first line only; else 1/3
    assert score(trec, "Entity\nLocation") == 0.0
    niah = Sample("niah_multivalue", "", "", ["1111111", "2222222", "3333333", "4444444"], "string_match_all", 128,
                  True, {})
    assert score(niah, "2222222, 4444444 and 5555555") == 0.5
    assert set(LONGBENCH_METRICS.values()) <= set(METRICS)


@settings(max_examples=50, deadline=None)
@given(a=st.text("abc", max_size=7), b=st.text("abc", max_size=7))
def test_code_sim_against_brute_force_lcs(a, b):
    """Oracle: the longest subsequence of a (all 2^len(a) tried) that is also a subsequence of b."""
    def is_subsequence(s, t):
        it = iter(t)
        return all(c in it for c in s)
    lcs = max(r for r in range(len(a) + 1) for s in itertools.combinations(a, r) if is_subsequence(s, b))
    assert code_sim_score(a, b) == (pytest.approx(2 * lcs / (len(a) + len(b))) if a and b else 0.0)


# ---------------------------------------------------------------- readers

def write_longbench(root, flat: bool):
    config = root if flat else root / "config"
    data = root if flat else root / "data"
    config.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    (config / "dataset2prompt.json").write_text(json.dumps({
        "hotpotqa": "Passages:\n{context}\n\nQuestion: {input}\nAnswer:",
        "trec": "Classify the question.\n\n{context}\n{input}"}))
    (config / "dataset2maxlen.json").write_text(json.dumps({"hotpotqa": 32, "trec": 64}))
    long = " ".join(f"w{i}" for i in range(3000))
    rows = [dict(input="Who?", context="Alice met Bob.", answers=["Alice"], all_classes=None, length=3, _id="a"),
            dict(input="Where?", context=long, answers=["w7"], all_classes=None, length=3000, _id="b"),
            dict(input="When?", context="In 1999.", answers=["1999", "in 1999"], all_classes=None, length=2, _id="c")]
    (data / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trec = [dict(input="Where is Rome?", context="What is an atom?\nType: Entity", answers=["Location"],
                 all_classes=["Entity", "Location"], length=9, _id="t")]
    (data / "trec.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trec))


@pytest.mark.parametrize("flat", [False, True])
def test_load_longbench(tokenizer, tmp_path, flat):
    write_longbench(tmp_path, flat)
    samples = load_longbench(tmp_path, "hotpotqa", tokenizer, 300, None)
    assert len(samples) == 3 and len(load_longbench(tmp_path, "hotpotqa", tokenizer, 300, 2)) == 2
    short, long, _ = samples
    assert short.context == "Passages:\nAlice met Bob." and short.question == "\n\nQuestion: Who?\nAnswer:"
    assert (short.answers, short.metric, short.max_new_tokens, short.chat) == (["Alice"], "qa_f1_score", 32, True)
    assert 290 <= n_tokens(tokenizer, long) <= 300  # the middle cut out, up to the limit
    assert long.context.startswith("Passages:\nw0 w1 w2 ") and long.context.endswith(" w2998 w2999")
    assert " w1500 " not in long.context and long.question == "\n\nQuestion: Where?\nAnswer:"
    trec, = load_longbench(tmp_path, "trec", tokenizer, 300, None)
    assert trec.meta["all_classes"] == ["Entity", "Location"] and not trec.chat and trec.max_new_tokens == 64
    assert trec.context + trec.question == "Classify the question.\n\nWhat is an atom?\nType: Entity\nWhere is Rome?"
    assert score(trec, "Location\nEntity") == 1.0


def test_load_longbench_errors(tokenizer, tmp_path):
    write_longbench(tmp_path, False)
    with pytest.raises(ValueError, match=r"musique\.jsonl: no such file"):
        load_longbench(tmp_path, "musique", tokenizer, 300, None)
    (tmp_path / "data" / "musique.jsonl").write_text('{"input": "q", "context": "c", "answers": ["a"]}\n')
    with pytest.raises(ValueError, match=r"dataset2prompt\.json: no entry for musique"):
        load_longbench(tmp_path, "musique", tokenizer, 300, None)
    rows = [dict(input="q", context="c", answers=["a"]), dict(input="q", context="c")]
    (tmp_path / "data" / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"hotpotqa\.jsonl: row 2 lacks answers"):
        load_longbench(tmp_path, "hotpotqa", tokenizer, 300, None)
    with pytest.raises(ValueError, match="not supported"):
        load_longbench(tmp_path, "dureader", tokenizer, 300, None)


def write_gsm8k(path):
    rows = [dict(question=f"Problem {i}: how many?", answer=f"Add <<{i}+1={i + 1}>>{i + 1} ones.\n#### {i + 1}")
            for i in range(9)]
    rows.append(dict(question="Problem 9: how many?", answer="Multiply 1234 * 1 = <<1234*1=1234>>1234.\n#### 1,234"))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_load_gsm8k(tmp_path):
    write_gsm8k(tmp_path / "gsm8k.jsonl")
    samples = load_gsm8k(tmp_path / "gsm8k.jsonl", 3, None, 0)
    assert len(samples) == 7 and len(load_gsm8k(tmp_path / "gsm8k.jsonl", 3, 2, 0)) == 2
    shots = [int(i) for i in re.findall(r"Question: Problem (\d+)", samples[0].context)]
    worked = {i: f"Add {i + 1} ones.\nThe answer is {i + 1}." for i in range(9)}  # '<<...>>' and '#### N' rewritten
    worked[9] = "Multiply 1234 * 1 = 1234.\nThe answer is 1234."
    assert len(set(shots)) == 3
    assert samples[0].context == "".join(f"Question: Problem {i}: how many?\nAnswer: {worked[i]}\n\n" for i in shots)
    shot_problems = {f"Problem {i}" for i in shots}
    evaluated = {re.match(r"Question: (Problem \d+)", s.question)[1] for s in samples}
    assert len(evaluated) == 7 and not evaluated & shot_problems
    for s in samples:
        i = int(re.match(r"Question: Problem (\d+)", s.question)[1])
        assert s.answers == ["1234" if i == 9 else str(i + 1)] and s.question.endswith("how many?\nAnswer:")
        assert (s.context + s.question).count("Question:") == 4 and s.context == samples[0].context
        assert (s.metric, s.chat, s.max_new_tokens) == ("gsm8k_exact", False, 256)
    assert load_gsm8k(tmp_path / "gsm8k.jsonl", 0, None, 0)[9].answers == ["1234"]  # from '#### 1,234'
    assert load_gsm8k(tmp_path / "gsm8k.jsonl", 3, None, 0) == samples
    assert load_gsm8k(tmp_path / "gsm8k.jsonl", 3, None, 1)[0].context != samples[0].context


def test_load_gsm8k_real_file():
    samples = load_gsm8k(asset("gsm8k") / "test.jsonl", 8, 20, 0)
    assert len(samples) == 20 and all(re.fullmatch(r"-?\d+(\.\d+)?", s.answers[0]) for s in samples)
    assert samples[0].context.count("Question:") == 8 and samples[0].context.count("The answer is ") == 8
    assert samples[0].question.startswith("Question: ") and samples[0].question not in samples[0].context
