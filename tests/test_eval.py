"""eval.py's pass-key prompts, and one prefill reused across caches."""
import random

import torch

from arkv import ARKV, ARKVConfig
from eval import decode_after, passkey_sample, prefill_once
from generate import generate, load_model
from tokenizer import load_tokenizer

HAYSTACK = " ".join(f"Sentence {i} talks about gardens, rivers and the price of bread." for i in range(2000))


def test_passkey_prompt_has_the_key_once_near_the_target_length(smollm2_checkpoint):
    tokenizer = load_tokenizer(smollm2_checkpoint)
    for depth in (0.0, 0.5, 1.0):
        ids, key = passkey_sample(tokenizer, HAYSTACK, 600, depth, random.Random(1))
        text = tokenizer.decode(ids)
        assert text.count(f"The pass key is {key}.") == 1 and len(key) == 5
        assert abs(len(ids) - 600) <= 30 and text.rstrip().endswith("assistant")


def test_decode_after_a_recorded_prefill_equals_generate(smollm2_checkpoint):
    """Reusing one prefill (full cache, and ARKV compressed from it) gives the same tokens as a
    normal generation with that cache."""
    model = load_model(smollm2_checkpoint, "cpu", torch.float32)
    tokenizer = load_tokenizer(smollm2_checkpoint)
    ids, _ = passkey_sample(tokenizer, HAYSTACK, 300, 0.5, random.Random(2))
    first, pendings = prefill_once(model, ids, 32)
    reused, _ = decode_after(model, pendings, first, len(ids), None, 6, ())
    model.setup_caches(1, len(ids) + 6)
    assert reused == generate(model, torch.tensor([ids]), 6)[0]
    config = ARKVConfig(kv_budget=64)
    reused, report = decode_after(model, pendings, first, len(ids), config, 6, ())
    manager = ARKV(config, model.args, torch.float32)
    model.setup_caches(1, len(ids) + 6, manager.cache_factory)
    assert reused == generate(model, torch.tensor([ids]), 6, after_prefill=manager.compress)[0]
    assert report["evicted"] > 0
