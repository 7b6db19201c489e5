"""What a person watching a training run sees: a live bar (loss, tokens/s, ETA) and a final loss table."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from training.manifest import LossPoint

# The table keeps at most this many rows; a long run shows evenly spaced points and always the last.
TABLE_ROWS = 20


class RichProgress(TrainerCallback):
    """A rich progress bar over optimiser steps with the latest loss, tokens per second and ETA."""

    def __init__(self, console: Console, description: str) -> None:
        self.console = console
        self.description = description
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._started = 0.0
        self._tokens_at_start = 0
        self._loss = "-"
        self._val_loss = "-"

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("val {task.fields[val_loss]}"),
            TextColumn("{task.fields[tokens_per_s]} tok/s"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
        )
        # A resumed run starts part-way; speed counts only what this process does.
        self._started = time.monotonic()
        self._tokens_at_start = state.num_input_tokens_seen
        self._task = self._progress.add_task(
            self.description,
            total=state.max_steps,
            completed=state.global_step,
            loss=self._loss,
            val_loss=self._val_loss,
            tokens_per_s="-",
        )
        self._progress.start()

    def _speed(self, state: TrainerState) -> str:
        elapsed = time.monotonic() - self._started
        tokens = state.num_input_tokens_seen - self._tokens_at_start
        return f"{tokens / elapsed:,.0f}" if elapsed > 0 and tokens > 0 else "-"

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._progress is None or self._task is None:
            return
        self._progress.update(self._task, completed=state.global_step, tokens_per_s=self._speed(state))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._progress is None or self._task is None or not logs:
            return
        if "loss" in logs:
            self._loss = f"{float(logs['loss']):.4f}"
        if "eval_loss" in logs:
            self._val_loss = f"{float(logs['eval_loss']):.4f}"
        self._progress.update(self._task, loss=self._loss, val_loss=self._val_loss)
        if not self.console.is_terminal and ("loss" in logs or "eval_loss" in logs):
            # A live bar only draws on a terminal; a log file or a pipe gets a line per logged loss instead.
            task = self._progress.tasks[0]
            eta = f"{task.time_remaining:.0f} s" if task.time_remaining is not None else "-"
            self.console.print(
                f"{self.description}: step {state.global_step}/{state.max_steps} loss {self._loss} "
                f"val {self._val_loss} {self._speed(state)} tok/s ETA {eta}",
                highlight=False,
                soft_wrap=True,  # one line per step, however narrow the console thinks it is
            )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class StepReporter(TrainerCallback):
    """Progress for a program rather than a person: an event per logged loss, one per saved checkpoint,
    and a stop between steps once ``should_stop`` says so. The fine-tuning worker reports a job through it.

    ``report(message, kind, data)``: ``kind`` is ``"metrics"`` for losses (``data`` has step, total_steps and
    ``train_loss`` or ``valid_loss``, with the mean token accuracy when the trainer logs it), else ``"message"``.
    ``on_checkpoint(directory, step, metrics)`` gets the latest train and validation values as the metrics.
    """

    def __init__(
        self,
        report: Callable[[str, Literal["message", "metrics"], Mapping[str, Any] | None], None],
        on_checkpoint: Callable[[Path, int, Mapping[str, float]], None],
        should_stop: Callable[[], bool],
    ) -> None:
        self.report = report
        self.on_checkpoint = on_checkpoint
        self.should_stop = should_stop
        self.latest: dict[str, float] = {}

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        resumed = f", resuming at step {state.global_step}" if state.global_step else ""
        self.report(f"Training started: {state.max_steps} steps{resumed}", "message", {"total_steps": state.max_steps})

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        step, total = state.global_step, state.max_steps
        for source, prefix, what in (("loss", "train", "training"), ("eval_loss", "valid", "validation")):
            if source not in logs:
                continue
            data = {"step": step, f"{prefix}_loss": float(logs[source]), "total_steps": total}
            accuracy = logs.get("mean_token_accuracy" if prefix == "train" else "eval_mean_token_accuracy")
            if accuracy is not None:
                data[f"{prefix}_mean_token_accuracy"] = float(accuracy)
            self.latest.update({k: v for k, v in data.items() if k not in ("step", "total_steps")})
            self.report(f"Step {step}/{total}: {what} loss={float(logs[source]):.4f}", "metrics", data)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        directory = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        self.on_checkpoint(directory, state.global_step, dict(self.latest))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.should_stop():
            control.should_training_stop = True


def loss_table(title: str, train: Sequence[LossPoint], val: Sequence[LossPoint], best_step: int | None = None) -> Table:
    """Train and validation loss side by side, per evaluation (or per logging step without validation)."""
    table = Table(title=title)
    table.add_column("step", justify="right")
    table.add_column("train loss", justify="right")
    table.add_column("val loss", justify="right")
    steps = [p.step for p in val] if val else [p.step for p in train]
    if len(steps) > TABLE_ROWS:
        stride = len(steps) / (TABLE_ROWS - 1)
        steps = sorted({steps[int(i * stride)] for i in range(TABLE_ROWS - 1)} | {steps[-1]})
    val_at = {p.step: p.loss for p in val}
    for step in steps:
        # The train loss shown at an evaluation is the last one logged at or before it.
        seen = [p.loss for p in train if p.step <= step]
        marker = " (best)" if step == best_step and val else ""
        table.add_row(
            f"{step}{marker}",
            f"{seen[-1]:.4f}" if seen else "-",
            f"{val_at[step]:.4f}" if step in val_at else "-",
        )
    return table
