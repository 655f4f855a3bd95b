"""Single-user decode speed and serving memory of one model configuration.

``python -m bot.engine.bench_decode --shape medium --quantize int8`` builds a random-weight model of
RuGPT-3 medium's shape (24 layers, 1024 wide, vocab 50264), saves it, loads it the way the bot
does (``bot.engine.load_model``, so memory-mapped safetensors and the same quantization path),
and prints decode tokens/s for one user and the process's peak RSS. Run it once per
configuration: peak RSS is per process. ``--compare`` runs float32 and int8 in two child
processes and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bot.engine.bench_model import SHAPES, build, peak_rss_kb


def measure(path: Path, quantize: str, prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    from bot.engine import load_model

    model, _ = load_model(str(path), "cpu", "float32", quantize)
    ids = torch.randint(10, 3000, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    kwargs = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - started
    return {
        "quantize": quantize,
        "prefill_s": round(prefill, 3),
        "decode_tokens_per_s": round((new_tokens - 1) / max(total - prefill, 1e-9), 2),
        "peak_rss_mb": round(peak_rss_kb() / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot.engine.bench_decode", description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="medium")
    parser.add_argument("--quantize", choices=["none", "int8"], default="none")
    parser.add_argument("--model", type=Path, help="an existing model directory instead of --shape")
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--compare", action="store_true", help="float32 vs int8, one process each")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or Path(tmp) / "model"
        if args.model is None:
            build(args.shape, path)
        if not args.compare:
            print(json.dumps(measure(path, args.quantize, args.prompt_tokens, args.new_tokens)))
            return 0
        results = {}
        for quantize in ("none", "int8"):
            out = (
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "bot.engine.bench_decode",
                        "--model",
                        str(path),
                        "--quantize",
                        quantize,
                        "--prompt-tokens",
                        str(args.prompt_tokens),
                        "--new-tokens",
                        str(args.new_tokens),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            results[quantize] = json.loads(out)
            print(f"{quantize:5} {results[quantize]}")
        speed = results["int8"]["decode_tokens_per_s"] / results["none"]["decode_tokens_per_s"]
        rss = results["int8"]["peak_rss_mb"] / results["none"]["peak_rss_mb"]
        print(f"int8 / float32: decode speed {speed:.2f}x, peak RSS {rss:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
