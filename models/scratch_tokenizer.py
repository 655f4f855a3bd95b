"""A byte-level BPE tokenizer trained from text, with the dialogue format's speaker tags as tokens.

The ``tiny-scratch`` profile trains one (the offline path: no hub), and the tests and the
benchmarks build their small models on one. Either way the speaker tags of
:mod:`dataset_tools.dialogue_format` are single tokens: the model sees a turn boundary as one
symbol, and the bot can stop generation on the tag's token id.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AddedToken, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dataset_tools.dialogue_format import EOS_TEXT, missing_speaker_tags


def train_scratch_tokenizer(
    texts: Iterable[str], vocab_size: int, *, pad_to: int | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's scheme) trained on the given texts, with the tags as tokens.

    Byte-level means any input, emoji included, is encodable: there is no unknown token.
    ``pad_to`` grows the vocabulary to that many entries with merges of a script the texts never
    use (see :func:`_padded`), for benchmarks that stand in for a real checkpoint's vocabulary.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe_trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=bpe_trainer)
    if pad_to is not None:
        tokenizer = _padded(tokenizer, pad_to - len(missing_speaker_tags(tokenizer.get_vocab())))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TEXT,
        eos_token=EOS_TEXT,
        unk_token=EOS_TEXT,
        pad_token=EOS_TEXT,
    )
    add_speaker_tokens(wrapped)
    return wrapped


def _padded(tokenizer: Tokenizer, size: int) -> Tokenizer:
    """``tokenizer`` with its BPE vocabulary grown to ``size`` by merges a real one would have.

    A real checkpoint's vocabulary (RuGPT-3's: 50,257 entries, 50,000 merges) is a BPE of that
    size with a handful of "added tokens"; the sample dialogues train a few thousand merges. The
    entries added here are words of CJK characters, a script the samples never use: each
    character, then " 丁", then " 丁七", " 丁七万" ..., each reached by merges ranked after the
    trained ones. So the samples tokenize as before, and a benchmark's random model, which
    samples ids all over the vocabulary, gets replies that encode back to (nearly) the same
    ids: but for one byte fragment and 64 characters, each added entry starts a word of its own
    and decodes to whole characters. (The benchmarks once padded with 47,000 added tokens: no
    real checkpoint has those, and transformers copies each one's Python object at load, ~60 MiB
    of a serving process's peak RSS more than a real 50,000-merge tokenizer, and over a second.)
    """
    state = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    merges: list[list[str]] = state["model"]["merges"]
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False)

    def add(left: str, right: str) -> str:
        merged = left + right
        if merged not in vocab and len(vocab) < size:
            merges.append([left, right])
            vocab[merged] = len(vocab)
        return merged

    def spelled(text: str) -> list[str]:
        return list(to_bytes.pre_tokenize_str(text)[0][0])

    characters = []
    for code in range(0x4E00, 0x4E40):  # 64 characters, UTF-8 e4 b8 xx: one shared fragment
        pieces = spelled(chr(code))
        merged = pieces[0]
        for piece in pieces[1:]:
            merged = add(merged, piece)
        characters.append(merged)
    (space,) = spelled(" ")
    words = [add(space, character) for character in characters]
    while len(vocab) < size:
        words = [add(word, character) for word in words for character in characters]
    return Tokenizer.from_str(json.dumps(state, ensure_ascii=False))


def add_speaker_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Make each speaker tag one token that also absorbs the space before it.

    ``lstrip`` means " @@ВТОРОЙ@@" is a single token, so a prompt ends exactly on the bot's tag
    and a reply ends on one token (the user's tag) that generation can stop on.
    """
    missing = missing_speaker_tags(tokenizer.get_vocab())
    return tokenizer.add_tokens([AddedToken(tag, lstrip=True, normalized=False) for tag in missing])
