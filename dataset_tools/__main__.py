"""Command line: ``python -m dataset_tools prepare|make-sample``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dataset_tools.cleaning import CleaningConfig
from dataset_tools.prepare import PrepareConfig, format_summary, prepare
from dataset_tools.readers import InputError
from dataset_tools.sample_data import DEFAULT_SAMPLE_PATH, write_sample
from dataset_tools.splitting import SplitRatios


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dataset_tools", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prep = commands.add_parser(
        "prepare",
        help="clean a dialogue file and write train/val/test parquet splits with stats.json",
    )
    prep.add_argument(
        "--input",
        type=Path,
        required=True,
        help="parquet, CSV or JSONL with a 'sample' column (list of utterances) "
        "or 'question'/'answer' columns",
    )
    prep.add_argument(
        "--output-dir",
        type=Path,
        required=True,
        help="where train/val/test.parquet and stats.json are written",
    )
    prep.add_argument(
        "--split",
        default="90/5/5",
        help="train/val/test shares in percent (default 90/5/5; e.g. 70/30/0)",
    )
    prep.add_argument(
        "--min-chars",
        type=int,
        default=CleaningConfig.min_chars,
        help="shortest usable turn after cleaning (default %(default)s)",
    )
    prep.add_argument(
        "--max-chars",
        type=int,
        default=CleaningConfig.max_chars,
        help="longest usable turn after cleaning (default %(default)s)",
    )
    prep.add_argument(
        "--min-relevance",
        type=float,
        default=1.0,
        help="with a 'relevance' column, drop rows below this (default 1)",
    )
    prep.add_argument(
        "--batch-size",
        type=int,
        default=10_000,
        help="rows per streamed record batch (default %(default)s)",
    )
    prep.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    sample = commands.add_parser(
        "make-sample", help="(re)generate the project's own sample dataset deterministically"
    )
    sample.add_argument("--output", type=Path, default=DEFAULT_SAMPLE_PATH)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; bad input gives one line on stderr and exit code 2, never a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        if args.command == "make-sample":
            count = write_sample(args.output)
            print(f"wrote {count} dialogues to {args.output}")
            return 0
        config = PrepareConfig(
            cleaning=CleaningConfig(min_chars=args.min_chars, max_chars=args.max_chars),
            split=SplitRatios.parse(args.split),
            min_relevance=args.min_relevance,
            batch_size=args.batch_size,
            show_progress=not args.no_progress,
        )
        stats = prepare(args.input, args.output_dir, config)
    except (InputError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_summary(stats))
    print(f"wrote {args.output_dir}/{{train,val,test}}.parquet and stats.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
