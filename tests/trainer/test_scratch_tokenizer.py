"""The scratch tokenizer grown to a real checkpoint's vocabulary size (as the benchmarks do)."""

from __future__ import annotations

import json
import random

from dataset_tools.dialogue_format import render_dialogue
from dataset_tools.sample_data import generate_dialogues
from models.scratch_tokenizer import train_scratch_tokenizer

TEXTS = [render_dialogue(d) for d in generate_dialogues()]


def test_a_padded_vocabulary_is_a_bpe_of_that_size_that_tokenizes_the_samples_as_before(tmp_path):
    plain = train_scratch_tokenizer(iter(TEXTS), 600)
    padded = train_scratch_tokenizer(iter(TEXTS), 600, pad_to=20_000)

    assert len(padded) == 20_000
    padded.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    # Like a real checkpoint: the size is in the BPE's merges, not in thousands of added tokens.
    assert len(saved["added_tokens"]) == len(plain.get_added_vocab())
    assert len(saved["model"]["merges"]) > 19_000
    # The speaker tags keep being single tokens, now after the padding.
    tags = {plain.convert_ids_to_tokens(i): i for i in plain.get_added_vocab().values()}
    moved = {i: padded.convert_tokens_to_ids(token) for token, i in tags.items()}
    assert all(new >= 20_000 - len(tags) for new in moved.values() if new != 0)
    for text in TEXTS[:100]:
        before = [moved.get(i, i) for i in plain(text)["input_ids"]]
        assert padded(text)["input_ids"] == before


def test_random_ids_from_a_padded_vocabulary_mostly_encode_back_to_themselves():
    """A random model samples ids all over the vocabulary; its replies come back as history."""
    padded = train_scratch_tokenizer(iter(TEXTS), 600, pad_to=20_000)
    rng = random.Random(0)
    exact, lengths = 0, []
    for _ in range(100):
        ids = [rng.randrange(len(padded)) for _ in range(40)]
        again = padded(padded.decode(ids))["input_ids"]
        exact += again == ids
        lengths.append(len(again))
    assert exact >= 70
    assert 38 <= sum(lengths) / len(lengths) <= 43
