"""What a person watching `make finetune` sees: one progress bar, or a plain line now and then.

The ``Trainer``'s own callbacks print every log as a raw dictionary (``PrinterCallback``, when
its bar is off; ``ProgressCallback`` too, below its bar): about twenty lines of ``{'loss': ...}``
in the demo, with no sense of how long is left. :func:`use_progress` replaces both with
:class:`TrainingProgress`: on a terminal a tqdm bar with the loss, real tokens per second and the
time left; elsewhere (a log file, CI) a line every tenth of the run, which a log keeps readable.
The summary table at the end is the caller's.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import logging as hf_logging

#: Lines a run prints when its output is not a terminal (plus the last step).
PLAIN_LINES = 10


def _clock(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class TrainingProgress(TrainerCallback):
    """Progress of the training steps, with the loss and real (non-padding) tokens per second."""

    def __init__(self, stream: TextIO | None = None, interactive: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.bar: Any = None
        self.started = 0.0
        self.tokens_at_start = 0
        self.first_step = 0
        self.loss: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.started = time.perf_counter()
        self.tokens_at_start = state.num_input_tokens_seen
        self.first_step = state.global_step
        if self.interactive and state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="training",
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
            )

    def tokens_per_s(self, state) -> float:  # type: ignore[no-untyped-def]
        elapsed = time.perf_counter() - self.started
        return (state.num_input_tokens_seen - self.tokens_at_start) / elapsed if elapsed else 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if not state.is_world_process_zero:
            return
        speed = self.tokens_per_s(state)
        loss = "–" if self.loss is None else f"{self.loss:.3f}"
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss}, {speed:,.0f} tok/s", refresh=False)
            self.bar.update(state.global_step - self.bar.n)
            return
        every = max(1, state.max_steps // PLAIN_LINES)
        if state.global_step % every == 0 or state.global_step == state.max_steps:
            done = state.global_step - self.first_step
            elapsed = time.perf_counter() - self.started
            left = elapsed / done * (state.max_steps - state.global_step) if done else 0.0
            print(
                f"step {state.global_step}/{state.max_steps}  loss {loss}  "
                f"{speed:,.0f} tok/s  {_clock(elapsed)} elapsed, {_clock(left)} left",
                file=self.stream,
                flush=True,
            )

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def use_progress(trainer: Trainer, show: bool) -> None:
    """Replace the Trainer's dictionary printers with :class:`TrainingProgress` (or nothing).

    Transformers' own bars go too ("Writing model shards" at every checkpoint): one bar."""
    hf_logging.disable_progress_bar()
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if show:
        trainer.add_callback(TrainingProgress())
