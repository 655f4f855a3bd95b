"""The model card: the ``README.md`` of a trained model directory, rendered from its metrics.

Written at the end of every training run and again by ``trainer push``, so a published model
always says what it is: its base, the data it saw (rows, split, what cleaning removed), the
dialogue format with a snippet that uses it, the training settings, the metrics before and after
training, the loss plot, and its limits. Everything comes from ``metrics.json``: a card can be
rendered again for any run, on any machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dataset_tools.dialogue_format import BOT_TAG, USER_TAG, render_prompt

CARD_NAME = "README.md"
#: The dataset statistics (dataset_tools ``stats.json``) a card reports.
DATA_FIELDS = ("input", "rows_read", "dialogues_kept", "dialogues_dropped", "turn_edits", "splits")


def data_summary(data_dir: Path) -> dict[str, Any] | None:
    """What the card says about the data, from the prepared splits' ``stats.json``."""
    path = data_dir / "stats.json"
    if not path.exists():
        return None
    stats = json.loads(path.read_text(encoding="utf-8"))
    return {key: stats[key] for key in DATA_FIELDS if key in stats}


def _number(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "—" if value is None else str(value)


def _counts(counts: dict[str, int] | None) -> str:
    if not counts:
        return "none"
    return ", ".join(f"{name} {count:,}" for name, count in counts.items())


def render_model_card(metrics: dict[str, Any], repo_id: str | None = None) -> str:
    """The card's Markdown (with the Hub's YAML header) for a run's ``metrics.json``."""
    base = metrics.get("base_model") or "scratch"
    name = repo_id or metrics.get("run", "this-model")
    settings = metrics.get("profile_settings", {})
    data = metrics.get("data") or {}
    decoding = metrics.get("decoding") or {}
    header = [
        "---",
        "language: ru",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [gpt2, conversational, russian, dialogue]",
    ]
    if base != "scratch":
        header.append(f"base_model: {base}")
    header.append("---")

    splits = data.get("splits") or {}
    example = render_prompt(["Привет! Как дела?"])
    lines = [
        *header,
        "",
        f"# {name}",
        "",
        f"A Russian dialogue model fine-tuned from **{base}** "
        f"({_number(metrics.get('parameters'))} parameters) with the rugpt-chatbot trainer, "
        f"profile `{metrics.get('profile')}`.",
        "",
        "## Data",
        "",
        f"- source: `{data.get('input', 'not recorded')}`; rows read "
        f"{_number(data.get('rows_read'))}, dialogues kept {_number(data.get('dialogues_kept'))}",
        f"- split: train {_number(splits.get('train'))}, val {_number(splits.get('val'))}, "
        f"test {_number(splits.get('test'))} (trained on {_number(metrics.get('train_dialogues'))}"
        f" dialogues, {_number(metrics.get('train_tokens'))} tokens)",
        f"- dropped by cleaning: {_counts(data.get('dialogues_dropped'))}",
        f"- turns edited by cleaning: {_counts(data.get('turn_edits'))}",
        "",
        "## Dialogue format",
        "",
        f"Turns alternate between the user (`{USER_TAG}`) and the bot (`{BOT_TAG}`); the model",
        "continues after the bot's tag and stops at the next tag or the end of text. The sampling",
        "defaults (temperature, top-p, top-k, repetition penalty) are in",
        "`generation_config.json`.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        f'prompt = "{example}"',
        'ids = tokenizer(prompt, return_tensors="pt").input_ids',
        "out = model.generate(ids, max_new_tokens=64)  # sampling from generation_config.json",
        'reply = tokenizer.decode(out[0, ids.shape[1]:]).split("@@")[0].strip()',
        "```",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| steps / epochs | {_number(metrics.get('global_step'))} / "
        f"{_number(metrics.get('epochs'))} |",
        f"| global batch | {_number(metrics.get('global_batch'))} "
        f"({_number(metrics.get('processes', 1))} process(es)) |",
        f"| learning rate | {settings.get('learning_rate')} (cosine, "
        f"{settings.get('warmup_steps')} warm-up steps) |",
        f"| block / max dialogue length | {settings.get('block_size')} / "
        f"{settings.get('max_length')} tokens |",
        f"| loss on | {settings.get('loss_on')} |",
        f"| device | {metrics.get('device')} |",
        f"| time | {_number(metrics.get('train_time_s'), 1)} s, "
        f"{_number(metrics.get('tokens_per_s'), 1)} tokens/s |",
        "",
        "## Evaluation (validation split)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| reply perplexity before training | {_number(metrics.get('perplexity_before_training'))}"
        " |",
        f"| reply perplexity after training | {_number(metrics.get('perplexity'))} |",
        f"| BLEU / chrF | {_number(metrics.get('bleu'))} / {_number(metrics.get('chrf'))} |",
        f"| distinct-1 / distinct-2 | {_number(metrics.get('distinct_1'), 3)} / "
        f"{_number(metrics.get('distinct_2'), 3)} |",
        "",
        f"Replies for BLEU/chrF/distinct were decoded {decoding.get('mode', 'as recorded')}"
        + (f" (seed {decoding['seed']})" if decoding.get("seed") is not None else "")
        + ".",
        "",
        "![training and validation loss](loss.png)",
        "",
        "## Limits",
        "",
        "- Trained on the dialogues above only: it knows what they contain, and no more. It",
        "  makes things up, and it has no notion of facts, dates or the person it talks to.",
        "- Replies are short and conversational; it does not follow instructions.",
        "- Cleaning removed links, mentions and markup, not opinions: it can repeat the biases and",
        "  rudeness of its data. Put a human or a filter in the loop before a public audience.",
    ]
    if base == "scratch":
        lines.append(
            "- Trained from scratch (no pre-trained base): a demonstration of the pipeline; its "
            "replies are not meant to make sense."
        )
    return "\n".join(lines) + "\n"


def write_model_card(model_dir: Path, repo_id: str | None = None) -> Path:
    """(Re)write ``README.md`` in a run directory from its ``metrics.json``."""
    metrics = json.loads((model_dir / "metrics.json").read_text(encoding="utf-8"))
    path = model_dir / CARD_NAME
    path.write_text(render_model_card(metrics, repo_id), encoding="utf-8")
    return path
