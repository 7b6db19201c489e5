"""The training progress a person sees: a live bar on a terminal, a line per logged loss in a log file."""

from __future__ import annotations

import io

from rich.console import Console
from transformers import TrainerControl, TrainerState, TrainingArguments

from training.progress import RichProgress


def test_without_a_terminal_each_logged_loss_is_a_line_with_speed_and_eta(tmp_path: object) -> None:
    out = io.StringIO()
    progress = RichProgress(Console(file=out, force_terminal=False, width=200), "sft lora")
    args, control = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerControl()
    state = TrainerState(max_steps=10, global_step=0)
    progress.on_train_begin(args, state, control)
    for step in (1, 2):
        state.global_step, state.num_input_tokens_seen = step, 1000 * step
        progress.on_step_end(args, state, control)
    progress.on_log(args, state, control, logs={"loss": 0.5})
    progress.on_log(args, state, control, logs={"eval_loss": 0.25})
    progress.on_train_end(args, state, control)
    lines = [line for line in out.getvalue().splitlines() if "step 2/10" in line]
    assert len(lines) == 2, out.getvalue()
    assert "loss 0.5000 val -" in lines[0] and "tok/s ETA" in lines[0]
    assert "val 0.2500" in lines[1]
