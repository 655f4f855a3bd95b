"""Does memory help the model itself? The mean log-probability a trained checkpoint gives a right
reply (the set's ``answer_text``) after the bot's prompt with memory and without.

``python -m bot.memory_eval`` is run twice on one set (``--memory on`` and ``off``); this reads
both prompt files and scores ``answer_text`` as the bot's reply after each prompt (the prompt
ends with the bot's tag), per token, with the model the prompts were built for. A 4M-parameter
``tiny-scratch`` model answers nothing well; what is measured is whether the facts in the
prompt make the right answer more likely.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.memory_logprob", description=__doc__
    )
    parser.add_argument("--set", type=Path, required=True)
    parser.add_argument("--with-memory", type=Path, required=True, help="prompts, --memory on")
    parser.add_argument("--without-memory", type=Path, required=True, help="prompts, --memory off")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--json", type=Path, help="also write a result for benchmarks/results/")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    window = model.config.n_positions

    def logprob(prompt: str, reply: str) -> float:
        """Mean log-probability per token of ``reply`` after ``prompt``."""
        context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + reply, add_special_tokens=False)["input_ids"]
        ids = (context + answer)[-window:]
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0]
        scores = torch.log_softmax(logits[:-1].float(), dim=-1)
        start = len(ids) - len(answer)
        picked = scores[start - 1 : len(ids) - 1].gather(1, torch.tensor(ids[start:])[:, None])
        return picked.mean().item()

    items = {i["id"]: i for i in _lines(args.set) if i.get("answer_text")}
    on = {r["id"]: r["prompt"] for r in _lines(args.with_memory)}
    off = {r["id"]: r["prompt"] for r in _lines(args.without_memory)}
    pairs = [
        (logprob(on[i], item["answer_text"]), logprob(off[i], item["answer_text"]))
        for i, item in items.items()
        if i in on and i in off
    ]
    with_memory = statistics.fmean(p[0] for p in pairs)
    without = statistics.fmean(p[1] for p in pairs)
    better = sum(p[0] > p[1] for p in pairs)
    print(
        f"{len(pairs)} answers: mean log-probability per token {with_memory:.3f} with memory, "
        f"{without:.3f} without ({with_memory - without:+.3f}); higher with memory for "
        f"{better} of {len(pairs)}"
    )
    if args.json:
        from benchmarks.machine import describe_machine

        document = {
            "benchmark": "memory_logprob",
            "machine": describe_machine(),
            "settings": {"model": args.model.resolve().name, "set": args.set.name},
            "figures": {
                "answers": len(pairs),
                "logprob_with_memory": round(with_memory, 4),
                "logprob_without_memory": round(without, 4),
                "higher_with_memory": better,
            },
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
