"""From split files to training tensors: render, tokenize, mask, cut, pack.

Every dialogue is rendered by :mod:`dataset_tools.dialogue_format` (the text the bot will build at
inference) and tokenized once with character offsets, so the loss mask is exact: a token is a
reply token when it starts inside a reply segment. Dialogues are then **packed** back to back into
full blocks, as `run_clm.py`'s ``group_texts`` does, instead of each being padded to a fixed
length and trained with batch size 1 (the recipe this replaces spends most of its compute on
padding: see ``python -m trainer bench``).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from dataset_tools.dialogue_format import BOT_TAG, USER_TAG, render_segments

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
LOSS_ON_CHOICES = ("replies", "all")


def read_dialogues(path: Path, limit: int | None = None) -> list[list[str]]:
    """The ``turns`` column of a split written by ``dataset_tools prepare``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: split not found (run `make dataset` first)")
    turns = pq.read_table(path, columns=["turns"]).column("turns").to_pylist()
    return turns[:limit] if limit else turns


@dataclass(frozen=True)
class TokenizedDialogue:
    """Token ids of one rendered dialogue (or packed block) and its labels (-100: no loss)."""

    input_ids: list[int]
    labels: list[int]


def tokenize_dialogue(
    turns: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    loss_on: str = "replies",
    max_length: int = 512,
    persona: str | None = None,
) -> TokenizedDialogue | None:
    """Tokenize one dialogue with its loss mask, cut on a turn boundary to ``max_length``.

    The EOS id is appended when the whole dialogue fits (the model learns to stop after the last
    reply); a dialogue cut short gets no EOS, since it did not end there. Returns None when not
    even the first exchange fits.
    """
    if loss_on not in LOSS_ON_CHOICES:
        raise ValueError(f"loss_on must be one of {LOSS_ON_CHOICES}, got {loss_on!r}")
    segments = render_segments(turns, persona)
    text = "".join(s.text for s in segments)
    reply_spans: list[tuple[int, int]] = []
    turn_ends: list[int] = []  # character offset where each turn's text ends
    position = 0
    for segment in segments:
        end = position + len(segment.text)
        if segment.is_reply:
            # The loss covers the reply and the user tag that ends it: the model learns what
            # to say and where to stop, never the user's words.
            stop = end + 1 + len(USER_TAG) if text.startswith(f" {USER_TAG}", end) else end
            reply_spans.append((position, stop))
        if segment.is_reply or not segment.text.lstrip().startswith(BOT_TAG):
            turn_ends.append(end)  # a user turn or a reply ends here; a lone bot tag does not
        position = end
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"]
    offsets: list[tuple[int, int]] = encoded["offset_mapping"]

    def in_reply(start: int) -> bool:
        return any(a <= start < b for a, b in reply_spans)

    labels = [
        token if loss_on == "all" or in_reply(start) else IGNORE_INDEX
        for token, (start, _) in zip(ids, offsets, strict=True)
    ]
    eos = tokenizer.eos_token_id
    if len(ids) + 1 <= max_length:
        ends_on_reply = len(turns) % 2 == 0
        return TokenizedDialogue(
            [*ids, eos], [*labels, eos if loss_on == "all" or ends_on_reply else IGNORE_INDEX]
        )
    # Too long: keep the longest prefix of whole turns that fits, at least one exchange.
    starts = [start for start, _ in offsets]
    best = 0
    for turn_index, char_end in enumerate(turn_ends):
        n_tokens = bisect.bisect_left(starts, char_end)  # tokens that start before the turn ends
        if n_tokens > max_length:
            break
        if turn_index >= 1:
            best = n_tokens
    if best == 0:
        return None
    return TokenizedDialogue(ids[:best], labels[:best])


def pack(dialogues: Sequence[TokenizedDialogue], block_size: int) -> list[TokenizedDialogue]:
    """Concatenate dialogues and cut the stream into blocks of ``block_size`` tokens.

    The last, shorter block is kept (the collator pads it) so that small validation sets lose
    nothing. Attention crosses dialogue boundaries inside a block, as in GPT-2's own pretraining;
    EOS between dialogues tells the model where one ends.
    """
    blocks: list[TokenizedDialogue] = []
    ids: list[int] = []
    labels: list[int] = []
    for dialogue in dialogues:
        ids.extend(dialogue.input_ids)
        labels.extend(dialogue.labels)
        while len(ids) >= block_size:
            blocks.append(TokenizedDialogue(ids[:block_size], labels[:block_size]))
            ids, labels = ids[block_size:], labels[block_size:]
    if ids:
        blocks.append(TokenizedDialogue(ids, labels))
    return blocks


class BlockDataset(Dataset):
    """Blocks as the dicts the Trainer feeds the model."""

    def __init__(self, blocks: Sequence[TokenizedDialogue]) -> None:
        self.blocks = list(blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        block = self.blocks[index]
        return {"input_ids": block.input_ids, "labels": block.labels}

    @property
    def n_tokens(self) -> int:
        return sum(len(b.input_ids) for b in self.blocks)


class PadCollator:
    """Pads a batch to its longest row; padding gets attention 0 and no loss."""

    def __init__(self, pad_token_id: int, pad_to: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = self.pad_to or max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def tokenize_all(
    dialogues: Sequence[Sequence[str]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    loss_on: str,
    max_length: int,
) -> Iterator[TokenizedDialogue]:
    """Tokenize each dialogue, skipping (and logging) those whose first exchange cannot fit."""
    skipped = 0
    for turns in dialogues:
        tokenized = tokenize_dialogue(turns, tokenizer, loss_on=loss_on, max_length=max_length)
        if tokenized is None:
            skipped += 1
            continue
        yield tokenized
    if skipped:
        logger.warning(
            "skipped %d dialogues whose first exchange exceeds %d tokens", skipped, max_length
        )
