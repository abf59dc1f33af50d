"""Evaluation data: RULER-style synthetic tasks, LongBench and GSM8K readers, and their metrics.

    sample = synthetic_sample("niah_multikey", tokenizer, 4096, 0.5, random.Random(0))
    prediction = ...  # generated from sample.context + sample.question
    score(sample, prediction)  # in [0, 1]

A Sample splits its prompt in two: `context`, the long part a KV-cache method compresses, and `question`,
which may be appended after compression (query-agnostic) or before it (query-aware: the prompt is
context + question). Synthetic tasks follow RULER (Hsieh et al., 2024; NVIDIA/RULER scripts/data/synthetic),
the metrics and the LongBench reader follow LongBench (Bai et al., 2023; THUDM/LongBench metrics.py, eval.py,
pred.py).
"""
from __future__ import annotations

import json
import random
import re
import string
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Sample:
    task: str  # synthetic family, LongBench dataset or "gsm8k"
    context: str  # the long part, compressed by the KV-cache method
    question: str  # follows context in the prompt
    answers: list[str]
    metric: str  # a key of METRICS
    max_new_tokens: int
    chat: bool  # wrap context + question in the model's chat template
    meta: dict = field(default_factory=dict)  # depth, needle values, LongBench all_classes, ...


# ---------------------------------------------------------------- RULER-style synthetic tasks

FAMILIES = ("niah_single_number", "niah_single_word", "niah_single_uuid", "niah_multikey", "niah_multivalue",
            "niah_multiquery", "variable_tracking", "common_words")
MAX_NEW_TOKENS = {"niah_single_number": 32, "niah_single_word": 32, "niah_single_uuid": 64, "niah_multikey": 32,
                  "niah_multivalue": 128, "niah_multiquery": 128, "variable_tracking": 64, "common_words": 128}
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."  # one line
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
SPREAD = 0.4  # multi-needle families: needles evenly over this share of the haystack, around depth
# Words are "adjective-noun". No word is a substring of another, so no word is inside another word.
ADJECTIVES = """bright quiet gentle brave clever eager fancy jolly lively proud silly witty calm dusty foggy frosty
gloomy hazy misty rainy snowy sunny windy stormy golden purple crimson amber ivory scarlet violet azure hollow narrow
shallow steep smooth rough sharp blunt sticky fuzzy shiny rusty soggy crispy crunchy spicy salty sweet sour bitter
tiny giant humble noble loyal swift sleepy hungry thirsty grumpy lucky happy merry nimble polite curious ancient
modern rapid distant""".split()
NOUNS = """river stone cloud forest garden bridge castle valley meadow harbor island candle mirror window ladder basket
pencil rocket engine planet comet desert glacier canyon jungle lantern anchor compass feather pebble shell coral tulip
maple cedar willow falcon otter badger beaver rabbit turtle salmon whale dolphin tiger zebra camel llama parrot spider
beetle cricket hammer wrench shovel bucket kettle teapot blanket pillow carpet curtain violin guitar trumpet piano drum
banjo cookie muffin waffle pretzel noodle pickle carrot potato tomato onion pepper lemon melon cherry peach mango grape
olive walnut almond button zipper ribbon needle thread marble copper silver velvet cotton wagon sled canoe kayak
tractor scooter helmet jacket boot glove scarf""".split()


def synthetic_sample(family: str, tokenizer, context_tokens: int, depth: float, rng: random.Random,
                     haystack: str | None = None) -> Sample:
    """One RULER-style sample whose context + question (each encoded alone) is about `context_tokens` tokens.

    Needles go at the sentence boundary nearest `depth` (0 = start, 1 = end of the haystack); multi-needle
    families spread them evenly around it. The haystack is RULER's noise, or `haystack` (e.g. essays) from a
    random sentence start; common_words has none. The same rng state gives the same sample.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; expected one of {', '.join(FAMILIES)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} is outside [0, 1]")
    if family == "common_words":
        return _common_words(tokenizer, context_tokens, rng)
    head, needles, question, answers, keys, values = _needle_task(family, rng)
    fixed = sum(len(tokenizer.encode(t)) for t in (head, question, "\n", *(" " + n for n in needles)))
    hay = _haystack(tokenizer, context_tokens - fixed, rng, haystack)
    while any(s in hay for s in keys + values):  # the haystack happens to hold a key or value: draw new ones
        head, needles, question, answers, keys, values = _needle_task(family, rng)
    depths = [depth] if len(needles) == 1 else [min(max(depth - SPREAD / 2, 0.0), 1.0 - SPREAD)
                                                  + SPREAD * i / (len(needles) - 1) for i in range(len(needles))]
    context = head + _insert(hay, needles, depths) + "\n"
    return Sample(family, context, question, answers, "string_match_all", MAX_NEW_TOKENS[family], True,
                  {"depth": depth, "keys": keys, "values": values, "one_line": len(answers) == 1})


def _value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "names":  # variable tracking
        return "".join(rng.choices(string.ascii_uppercase, k=5))
    if kind == "values":  # variable tracking
        return str(rng.randint(10000, 99999))
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _draw(kind: str, n: int, rng: random.Random, taken: set[str]) -> list[str]:
    """n distinct values of one kind, none already in `taken` (which gets them)."""
    out = []
    while len(out) < n:
        value = _value(kind, rng)
        if value not in taken:
            taken.add(value)
            out.append(value)
    return out


def _needle_task(family: str, rng: random.Random) -> tuple[str, list[str], str, list[str], list[str], list[str]]:
    """(instruction, needles in insertion order, question, answers, keys, values), worded as RULER's.
    Variable tracking: keys are the variable names, values the two chains' numbers."""
    taken: set[str] = set()
    if family == "variable_tracking":  # a 4-hop chain and a distractor chain, interleaved in order
        names, values = _draw("names", 10, rng, taken), _draw("values", 2, rng, taken)
        chains = [[f"VAR {names[c]} = {values[c // 5]}.", *(f"VAR {names[c + j]} = VAR {names[c + j - 1]}."
                                                             for j in range(1, 5))] for c in (0, 5)]
        order = [0] * 5 + [1] * 5
        rng.shuffle(order)
        statements = [iter(chain) for chain in chains]
        head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        question = f"Question: Find all variables that are assigned the value {values[0]} in the text above."
        return head, [next(statements[c]) for c in order], question, names[:5], names, values
    kind = {"niah_single_word": "words", "niah_single_uuid": "uuids"}.get(family, "numbers")
    n_keys = 4 if family in ("niah_multikey", "niah_multiquery") else 1
    keys = _draw("words", n_keys, rng, taken)
    values = [_draw(kind, 4 if family == "niah_multivalue" else 1, rng, taken) for _ in keys]  # values[i]: of keys[i]
    needles = [NEEDLE.format(kind=kind, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    asked = rng.sample(range(n_keys), 4 if family == "niah_multiquery" else 1)
    query = ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]] if len(asked) > 1 else keys[asked[0]]
    answers = [v for i in asked for v in values[i]]
    head = (f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {kind} afterwards.\n")
    question = f"What are all the special magic {kind} for {query} mentioned in the provided text?"
    if len(answers) == 1:  # RULER's singular wording
        head, question = (s.replace("Some", "A").replace("are all", "is").replace("are", "is").replace(kind, kind[:-1])
                          for s in (head, question))
    return head, needles, question, answers, keys, [v for vs in values for v in vs]


def _haystack(tokenizer, n_tokens: int, rng: random.Random, text: str | None) -> str:
    """About n_tokens of filler: RULER's noise lines, or `text` (repeated if short) from a random sentence start.
    Encoded once, cut to n_tokens, decoded, and trimmed back to a whole word."""
    if n_tokens < 16:
        raise ValueError(f"context_tokens is too small for the task's own text ({n_tokens} haystack tokens left)")
    if text is None:
        source = "\n".join([NOISE] * (n_tokens // 16 + 2))  # NOISE is at least 16 tokens
    elif not text.strip():
        raise ValueError("the haystack text is empty")
    else:
        window = 12 * n_tokens  # characters: more than n_tokens tokens of prose
        text = "\n".join([text] * ((window + 2000) // len(text) + 1))
        start = rng.randrange(len(text) - window - 2000 + 1)
        found = re.compile(r"[.!?]\s+").search(text, start, start + 2000)
        start = found.end() if found else start
        source = text[start:start + window]
    ids = tokenizer.encode(source)
    if len(ids) < n_tokens:
        raise ValueError(f"haystack text gives {len(ids)} tokens for {len(source)} characters; need {n_tokens}")
    return re.sub(r"\s*\S*$", "", tokenizer.decode(ids[:n_tokens]))


def _insert(hay: str, needles: list[str], depths: list[float]) -> str:
    """hay with needles[i] at the sentence boundary nearest depths[i] * len(hay) (the nearest word boundary
    if no sentence ends within len(hay) / 40 characters); needles keep their order."""
    sentences = [0, *(m.end() for m in re.finditer(r"[.!?]\s+", hay)), len(hay)]
    words = [0, *(m.end() for m in re.finditer(r"\s+", hay)), len(hay)]
    cuts = []
    for depth in depths:
        target = depth * len(hay)
        cut = min(sentences, key=lambda c: abs(c - target))
        cuts.append(cut if abs(cut - target) <= len(hay) / 40 else min(words, key=lambda c: abs(c - target)))
    pieces, last = [], 0
    for cut, needle in zip(sorted(cuts), needles):
        space = "" if cut == 0 or hay[cut - 1].isspace() else " "
        pieces += [hay[last:cut], space + needle + (" " if cut < len(hay) else "")]
        last = cut
    return "".join(pieces) + hay[last:]


def _common_words(tokenizer, context_tokens: int, rng: random.Random) -> Sample:
    """RULER's common words extraction: a numbered word list, sized to the budget from trial encodings."""
    head = ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n")
    question = "Question: What are the 10 most common words in the above list?"
    budget = context_tokens - sum(len(tokenizer.encode(t)) for t in (head, question, "\n"))
    if budget < 100:
        raise ValueError(f"context_tokens {context_tokens} is too small for common_words")
    picks = rng.sample(range(len(ADJECTIVES) * len(NOUNS)), min(len(ADJECTIVES) * len(NOUNS), budget // 2))
    words = [f"{ADJECTIVES[i // len(NOUNS)]}-{NOUNS[i % len(NOUNS)]}" for i in picks]  # the first 10 are common
    n = budget // 6
    for _ in range(2):  # rescale the entry count to the measured tokens per entry (twice: numbers get longer)
        n = round(n * budget / len(tokenizer.encode(_word_list(n, words, rng)[0])))
    text, repeats = _word_list(n, words, rng)
    return Sample("common_words", head + text + "\n", question, words[:10], "string_match_all",
                  MAX_NEW_TOKENS["common_words"], True, {"repeats": repeats})


def _word_list(n: int, words: list[str], rng: random.Random) -> tuple[str, tuple[int, int]]:
    """About n entries "1. w 2. w ...", shuffled: words[:10] repeated r_c times, as many following words as fit
    r_u < r_c times (RULER: 30 and 3 from 4k tokens, else 6 and 1); returns (text, (r_c, r_u))."""
    r_common, r_other = min(30, max(3, n // 20)), 1 if n < 500 else 3
    entries = words[:10] * r_common + words[10:10 + max(0, n - 10 * r_common) // r_other] * r_other
    rng.shuffle(entries)
    return " ".join(f"{i}. {w}" for i, w in enumerate(entries, 1)), (r_common, r_other)


# ---------------------------------------------------------------- metrics: fn(prediction, reference, **meta)

def string_match_all(prediction: str, references: list[str], **meta) -> float:
    """RULER: mean over references of [reference.lower() in prediction.lower()] (partial credit)."""
    return sum(r.lower() in prediction.lower() for r in references) / len(references)


def normalize_answer(s: str) -> str:
    """LongBench (from SQuAD): lower case, drop punctuation, drop articles a/an/the, collapse whitespace."""
    s = s.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def qa_f1_score(prediction: str, reference: str, **meta) -> float:
    """LongBench: token F1 = 2PR / (P + R) of the normalized answers, overlap counted with multiplicity."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs(a, b) -> int:
    """Length of the longest common subsequence of two sequences (one DP row)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_score(prediction: str, reference: str, **meta) -> float:
    """ROUGE-L F1 = 2PR / (P + R), P = LCS / |prediction|, R = LCS / |reference|, over whitespace tokens with '.'
    as a separator; 0 if either is empty. LongBench calls the `rouge` package's rouge-l f, which also splits at
    '.' but takes a union LCS per reference sentence over distinct words, so long summaries score differently."""
    pred, ref = prediction.replace(".", " ").split(), reference.replace(".", " ").split()
    common = _lcs(pred, ref) if pred and ref else 0
    return 0.0 if common == 0 else 2 * common / (len(pred) + len(ref))


def classification_score(prediction: str, reference: str, all_classes: list[str] | None = None, **meta) -> float:
    """LongBench: the classes named in the prediction, less those that are a strict substring of the answer;
    1 / (their number) if the answer is among them, else 0. (LongBench's list-removal while iterating, which can
    skip a substring, is not reproduced; its similarity fallback is unreachable there and left out.)"""
    matches = [c for c in all_classes or [] if c in prediction]
    matches = [c for c in matches if not (c in reference and c != reference)]
    return 1.0 / len(matches) if reference in matches else 0.0


def retrieval_score(prediction: str, reference: str, **meta) -> float:
    """LongBench: share of the numbers in the prediction equal to N of the answer's "Paragraph N"."""
    numbers, target = re.findall(r"\d+", prediction), re.findall(r"Paragraph (\d+)", reference)[0]
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, reference: str, **meta) -> float:
    """LongBench: share of the numbers in the prediction equal to the answer."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(reference) for n in numbers) / len(numbers) if numbers else 0.0


def code_sim_score(prediction: str, reference: str, **meta) -> float:
    """LongBench: the first prediction line containing no '`', '#' or '//', against the answer by Indel similarity
    1 - indel_distance / (len(a) + len(b)), indel_distance = len(a) + len(b) - 2 LCS(a, b): fuzzywuzzy's
    fuzz.ratio / 100 with python-Levenshtein (which rounds to whole percent; not done here); 0 if either is empty."""
    lines = [line for line in prediction.lstrip("\n").split("\n") if not any(s in line for s in ("`", "#", "//"))]
    line = lines[0] if lines else ""
    return 2 * _lcs(line, reference) / (len(line) + len(reference)) if line and reference else 0.0


def gsm8k_exact(prediction: str, reference: str, **meta) -> float:
    """1 if the last number in the prediction, commas removed, equals the reference number, else 0."""
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", prediction)
    return float(bool(numbers) and float(numbers[-1].replace(",", "")) == float(reference.replace(",", "")))


METRICS = {f.__name__: f for f in (string_match_all, qa_f1_score, rouge_score, classification_score, retrieval_score,
                                   count_score, code_sim_score, gsm8k_exact)}
# LongBench eval.py's dataset2metric, English datasets.
LONGBENCH_METRICS = {
    "narrativeqa": "qa_f1_score", "qasper": "qa_f1_score", "multifieldqa_en": "qa_f1_score", "hotpotqa": "qa_f1_score",
    "2wikimqa": "qa_f1_score", "musique": "qa_f1_score", "gov_report": "rouge_score", "qmsum": "rouge_score",
    "multi_news": "rouge_score", "trec": "classification_score", "triviaqa": "qa_f1_score", "samsum": "rouge_score",
    "passage_retrieval_en": "retrieval_score", "passage_count": "count_score", "lcc": "code_sim_score",
    "repobench-p": "code_sim_score"}
LONGBENCH_ZH = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")
FIRST_LINE = ("trec", "triviaqa", "samsum", "lsht")  # LongBench scores only the prediction's first line
NO_CHAT = (*FIRST_LINE, "lcc", "repobench-p")  # LongBench prompts these without the chat template


def score(sample: Sample, prediction: str) -> float:
    """string_match_all: all answers at once. Other metrics: LongBench's scorer, the max over answers (from 0) of
    metric(prediction, answer, all_classes=...), on the first line only for FIRST_LINE datasets."""
    if sample.metric == "string_match_all":
        return string_match_all(prediction, sample.answers)
    if sample.task in FIRST_LINE:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[sample.metric]
    return max([0.0] + [metric(prediction, a, all_classes=sample.meta.get("all_classes")) for a in sample.answers])


# ---------------------------------------------------------------- real benchmarks (data brought by the user)

def load_longbench(directory: Path, dataset: str, tokenizer, context_tokens: int, limit: int | None = None
                   ) -> list[Sample]:
    """LongBench rows from directory/[data/]<dataset>.jsonl, prompted with LongBench's config/dataset2prompt.json
    and dataset2maxlen.json (in directory/config or directory). Context = the template up to and including the
    context, question = the rest with the input. As LongBench's pred.py, an over-long context loses its middle
    tokens (first and last halves kept) so that context + question is about context_tokens tokens at most."""
    if dataset in LONGBENCH_ZH:
        raise ValueError(f"{dataset}: Chinese LongBench datasets are not supported (their metrics need jieba)")
    if dataset not in LONGBENCH_METRICS:
        raise ValueError(f"unknown LongBench dataset {dataset!r}; expected one of {', '.join(LONGBENCH_METRICS)}")
    directory = Path(directory)
    path = _first_file(directory / f"{dataset}.jsonl", directory / "data" / f"{dataset}.jsonl")
    template, max_new_tokens = (_config(directory, name, dataset) for name in ("dataset2prompt", "dataset2maxlen"))
    head, found, tail = template.partition("{context}")
    if not found:
        raise ValueError(f"dataset2prompt.json: the {dataset} template has no {{context}}")
    needed = ("input", "context", "answers", *(["all_classes"] if dataset == "trec" else []))
    head_tokens, samples = len(tokenizer.encode(head)), []
    for row in _jsonl(path, needed, limit):
        question, context = tail.replace("{input}", row["input"]), row["context"]
        ids, room = tokenizer.encode(context), context_tokens - head_tokens - len(tokenizer.encode(question))
        if room < 2:
            raise ValueError(f"{path}: context_tokens {context_tokens} leaves no room for the {dataset} context")
        if len(ids) > room:
            context = tokenizer.decode(ids[:room // 2]) + tokenizer.decode(ids[-(room // 2):])
        meta = {"all_classes": row.get("all_classes"), "length": row.get("length"), "_id": row.get("_id")}
        samples.append(Sample(dataset, head + context, question, list(row["answers"]), LONGBENCH_METRICS[dataset],
                              int(max_new_tokens), dataset not in NO_CHAT, meta))
    return samples


def load_gsm8k(path: Path, n_shots: int, limit: int | None = None, seed: int = 0) -> list[Sample]:
    """GSM8K rows {"question", "answer": "...#### N"}; context = n_shots worked examples drawn (seeded) from the
    same file and not evaluated, each "Question: q\\nAnswer: <work, calculator <<...>> notes dropped>\\nThe answer
    is N.\\n\\n"; question = "Question: q\\nAnswer:"; reference N without commas."""
    path = Path(path)
    rows = list(_jsonl(path, ("question", "answer"), None))
    if any("####" not in row["answer"] for row in rows):
        raise ValueError(f"{path}: every answer must end in '#### N'")
    shots = random.Random(seed).sample(range(len(rows)), n_shots)
    context = "".join(f"Question: {rows[i]['question']}\nAnswer: {_worked(rows[i]['answer'])}\n\n" for i in shots)
    evaluated = [row for i, row in enumerate(rows) if i not in shots][:limit]
    return [Sample("gsm8k", context, f"Question: {row['question']}\nAnswer:", [_final(row["answer"])], "gsm8k_exact",
                   256, False, {}) for row in evaluated]


def _final(answer: str) -> str:
    return answer.rpartition("####")[2].strip().replace(",", "")


def _worked(answer: str) -> str:
    work = re.sub(r"<<[^>]*>>", "", answer.rpartition("####")[0]).strip()
    return f"{work}\nThe answer is {_final(answer)}."


def _first_file(*paths: Path) -> Path:
    for path in paths:
        if path.is_file():
            return path
    raise ValueError(f"{paths[0]}: no such file (nor {', '.join(map(str, paths[1:]))})")


def _config(directory: Path, name: str, dataset: str):
    path = _first_file(directory / "config" / f"{name}.json", directory / f"{name}.json")
    config = json.loads(path.read_text(encoding="utf-8"))
    if dataset not in config:
        raise ValueError(f"{path}: no entry for {dataset}")
    return config[dataset]


def _jsonl(path: Path, needed: tuple[str, ...], limit: int | None):
    """The first `limit` rows (all if None) of a jsonl file, each checked to have the `needed` keys."""
    with open(path, encoding="utf-8") as f:
        lines = (line for line in f if line.strip())
        for number, line in enumerate(lines, 1):
            if limit is not None and number > limit:
                return
            row = json.loads(line)
            missing = [k for k in needed if k not in row]
            if missing:
                raise ValueError(f"{path}: row {number} lacks {', '.join(missing)} (expected {', '.join(needed)})")
            yield row
