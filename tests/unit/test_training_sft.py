"""SFT with TRL + PEFT on a tiny Llama that shares SmolLM2's tokenizer and chat template.

What a user would notice: only the assistant's words (and the EOS that ends them) are trained, loss goes
down, the output is an adapter the registry accepts with a complete manifest, a run resumes exactly where
its checkpoint left off, early stopping keeps the best checkpoint, QLoRA trains on a 4-bit base, and a
hyperparameter vLLM cannot serve is refused with the reason.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainerCallback

from adapters import BaseModelSpec, validate_adapter_dir
from core.errors import InvalidRequest
from tests.factories import (
    ADAPTER_FILES,
    output_of,
    quiet,
)
from tests.factories import (
    TRAIN_MAX_STEPS as MAX_STEPS,
)
from tests.factories import (
    TRAIN_SAVE_STEPS as SAVE_STEPS,
)
from tests.factories import train_config as config
from training.config import VLLM_LORA_RANKS, TrainConfig
from training.manifest import (
    LIBRARIES,
    MANIFEST_FILE,
    LossPoint,
    base_model_fingerprint,
    loss_curves,
    read_manifest,
    write_manifest,
)
from training.sft import (
    SMOLLM2_TRAINING_TEMPLATE,
    TrainResult,
    check_chat_examples,
    run_training,
    sft_trainer,
    train_sft,
    training_chat_template,
)

WORDS = ("apple", "pear", "plum", "fig", "kiwi", "lime")


def chat(user: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


TRAIN = [chat(f"Repeat {w}", f"{w} {w} {w}") for w in WORDS]
VAL = TRAIN[:2]


def trained_spans(labels: list[int]) -> list[list[int]]:
    """The runs of consecutive positions whose label is not -100."""
    spans: list[list[int]] = []
    for i, label in enumerate(labels):
        if label == -100:
            continue
        if spans and spans[-1][-1] == i - 1:
            spans[-1].append(i)
        else:
            spans.append([i])
    return spans


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(base_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(base_model_dir)


@pytest.fixture(scope="module")
def finished(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, str]:
    """One uninterrupted SFT run with validation, and what it printed."""
    console = quiet()
    data_files = {"train.jsonl": {"sha256": "ab" * 32, "records": len(TRAIN)}}
    out = tmp_path_factory.mktemp("sft") / "run"
    result = train_sft(config(tiny_base, out), TRAIN, VAL, data_files=data_files, console=console)
    return result, output_of(console)


# -- loss mask, EOS and template -----------------------------------------------------------------


def test_labels_cover_assistant_turns_and_their_eos_even_though_pad_is_eos(
    tiny_base: Path, tmp_path: Path, tokenizer: Any
) -> None:
    examples = [
        chat("Hi", "Hello there"),
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "One?"},
                {"role": "assistant", "content": "Uno, one, eins."},
                {"role": "user", "content": "Two?"},
                {"role": "assistant", "content": "Dos"},
            ]
        },
    ]
    trainer = sft_trainer(config(tiny_base, tmp_path / "run"), examples, console=quiet())
    tok: Any = trainer.processing_class
    dataset: Any = trainer.train_dataset
    eos = tok.eos_token_id
    # SmolLM2 pads with its EOS: padding must be masked by position, not by token id, or EOS is never learned.
    assert tok.pad_token_id == eos == 2

    batch = trainer.data_collator([dataset[i] for i in range(len(examples))])
    expected = [["Hello there<|im_end|>"], ["Uno, one, eins.<|im_end|>", "Dos<|im_end|>"]]
    for row, (example, answers) in enumerate(zip(examples, expected, strict=True)):
        ids = batch["input_ids"][row].tolist()
        labels = batch["labels"][row].tolist()
        real = int(batch["attention_mask"][row].sum())
        # The text trained on is exactly what the base model's own template renders for serving.
        assert tok.decode(ids[:real]) == tokenizer.apply_chat_template(example["messages"], tokenize=False)
        spans = trained_spans(labels)
        # Only the assistant's words and the EOS closing each turn carry labels; system, user, role headers don't.
        assert [tok.decode([ids[i] for i in span]) for span in spans] == answers
        assert all(labels[i] == ids[i] for span in spans for i in span)
        assert all(ids[span[-1]] == eos for span in spans)
        assert all(label == -100 for label in labels[real:])
    # The shorter row is padded with the EOS id, and those pad positions are not trained.
    short = batch["input_ids"][0].tolist()
    assert short[-1] == eos and batch["labels"][0].tolist()[-1] == -100


def test_training_template_renders_what_the_base_template_renders(tokenizer: Any) -> None:
    marked = training_chat_template(tokenizer)
    assert marked == SMOLLM2_TRAINING_TEMPLATE and "{% generation %}" in marked
    conversations = [
        chat("Hi", "Hello"),
        {"messages": [{"role": "system", "content": "S"}, *chat("Q", "A")["messages"], *chat("Q2", "A2")["messages"]]},
    ]
    for c in conversations:
        for generation_prompt in (False, True):
            assert tokenizer.apply_chat_template(
                c["messages"], tokenize=False, add_generation_prompt=generation_prompt
            ) == tokenizer.apply_chat_template(
                c["messages"], tokenize=False, add_generation_prompt=generation_prompt, chat_template=marked
            )
    check_chat_examples(tokenizer, marked, conversations, "train")


def test_a_template_that_renders_differently_is_refused(tokenizer: Any) -> None:
    drifted = SMOLLM2_TRAINING_TEMPLATE.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant \n'")
    with pytest.raises(InvalidRequest, match="train example 0: the training chat template renders it differently"):
        check_chat_examples(tokenizer, drifted, [chat("Hi", "Hello")], "train")


def test_a_template_that_leaves_eos_untrained_is_refused(tokenizer: Any) -> None:
    no_eos = SMOLLM2_TRAINING_TEMPLATE.replace(
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}",
        "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>' }}",
    )
    with pytest.raises(InvalidRequest, match="does not end on the EOS token '<\\|im_end\\|>'"):
        check_chat_examples(tokenizer, no_eos, [chat("Hi", "Hello")], "val")


def test_examples_without_an_assistant_answer_are_refused(tiny_base: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="train example 1 has no assistant message to learn from"):
        sft_trainer(config(tiny_base, tmp_path), [chat("a", "b"), {"messages": [{"role": "user", "content": "?"}]}])
    with pytest.raises(InvalidRequest, match="val example 0: each message needs string 'role' and 'content'"):
        sft_trainer(config(tiny_base, tmp_path), TRAIN, [{"messages": [{"role": "user"}]}])
    # The default system prompt alone is about 20 tokens, so this example would lose its answer's EOS.
    with pytest.raises(InvalidRequest, match="train example 0 is [0-9]+ tokens long, above max_length 16"):
        sft_trainer(config(tiny_base, tmp_path, max_length=16), TRAIN)


# -- a finished run ------------------------------------------------------------------------------


def test_a_few_steps_lower_the_training_loss(finished: tuple[TrainResult, str]) -> None:
    result, _ = finished
    losses = [p.loss for p in result.manifest.train_loss]
    assert [p.step for p in result.manifest.train_loss] == list(range(1, MAX_STEPS + 1))
    assert losses[-1] < losses[0] - 0.5, losses


def test_output_is_exactly_a_servable_adapter_and_its_manifest(
    finished: tuple[TrainResult, str], tiny_base: Path
) -> None:
    result, _ = finished
    assert {p.name for p in result.adapter_dir.iterdir()} == ADAPTER_FILES
    adapter_config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 16
    assert adapter_config["use_dora"] is False and adapter_config["bias"] == "none"
    assert not adapter_config.get("modules_to_save")
    assert adapter_config["base_model_name_or_path"] == str(tiny_base)
    info = validate_adapter_dir(result.adapter_dir, BaseModelSpec.from_model_dir(tiny_base), 16)
    assert info.rank == 8
    assert set(info.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_manifest_records_how_the_adapter_was_made(finished: tuple[TrainResult, str], tiny_base: Path) -> None:
    result, _ = finished
    manifest = read_manifest(result.adapter_dir)
    assert manifest == result.manifest
    assert manifest.method == "sft"
    assert manifest.base_model["name"] == tiny_base.name
    assert manifest.base_model["fingerprint"] == base_model_fingerprint(tiny_base)
    assert manifest.data["files"] == {"train.jsonl": {"sha256": "ab" * 32, "records": len(TRAIN)}}
    assert manifest.data["train"]["examples"] == len(TRAIN) and manifest.data["val"]["examples"] == len(VAL)
    assert len(manifest.data["train"]["sha256"]) == 64
    hp = manifest.hyperparameters
    assert (hp["rank"], hp["alpha"], hp["lr"], hp["max_steps"], hp["target_modules"]) == (8, 16, 1e-2, 8, "all-linear")
    assert hp["peft_config"]["r"] == 8 and manifest.seed == 0
    assert set(manifest.libraries) == set(LIBRARIES)
    assert all(manifest.libraries[name] for name in ("torch", "transformers", "peft", "trl", "datasets"))
    assert [p.step for p in manifest.val_loss] == [SAVE_STEPS, MAX_STEPS]
    assert manifest.result["global_step"] == MAX_STEPS and manifest.result["stopped_early"] is False
    assert manifest.eval is None


def test_progress_and_final_table_are_shown(finished: tuple[TrainResult, str]) -> None:
    result, printed = finished
    assert f"{MAX_STEPS}/{MAX_STEPS}" in printed and "tok/s" in printed and "ETA" in printed
    assert "train loss" in printed and "val loss" in printed
    best = result.manifest.result["best_checkpoint_step"]
    assert f"{best} (best)" in printed
    assert f"{result.manifest.val_loss[-1].loss:.4f}" in printed


# -- resume and early stopping -------------------------------------------------------------------


class StopAt(TrainerCallback):
    """Ends training after ``step``, as a killed job would (its last checkpoint is then on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(
    finished: tuple[TrainResult, str], tiny_base: Path, tmp_path: Path
) -> None:
    uninterrupted, _ = finished
    cfg = config(tiny_base, tmp_path / "run")
    interrupted = sft_trainer(cfg, TRAIN, VAL, console=quiet())
    interrupted.add_callback(StopAt(SAVE_STEPS))
    interrupted.train()
    assert not cfg.adapter_dir.exists()
    with pytest.raises(InvalidRequest, match="holds checkpoints of an earlier run"):
        train_sft(cfg, TRAIN, VAL, console=quiet())

    resumed = train_sft(cfg, TRAIN, VAL, resume=True, console=quiet())

    assert resumed.resumed_from == cfg.checkpoint_dir / f"checkpoint-{SAVE_STEPS}"
    assert resumed.manifest.result["resumed_from_step"] == SAVE_STEPS
    assert resumed.global_step == MAX_STEPS
    assert resumed.manifest.train_loss == uninterrupted.manifest.train_loss
    ours = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    theirs = load_file(uninterrupted.adapter_dir / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key])


def test_resume_needs_a_checkpoint(tiny_base: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="no checkpoint to resume from"):
        train_sft(config(tiny_base, tmp_path), TRAIN, resume=True, console=quiet())


def test_early_stopping_keeps_the_best_checkpoint(tiny_base: Path, tmp_path: Path) -> None:
    # Validation answers share nothing with the training answers: once training fits its own words,
    # the validation loss can only climb.
    unrelated = [chat(f"Repeat {w}", "zebra quantum violin") for w in ("oak", "elm")]
    cfg = config(tiny_base, tmp_path / "run", max_steps=40, save_steps=1, lr=3e-2, early_stopping_patience=2)
    result = train_sft(cfg, TRAIN, unrelated, console=quiet())

    val = result.manifest.val_loss
    best = min(val, key=lambda p: p.loss)
    assert result.stopped_early and result.global_step < 40
    assert result.global_step == best.step + 2  # two evaluations without improvement
    assert result.best_checkpoint is not None and result.best_checkpoint.name == f"checkpoint-{best.step}"
    kept = load_file(result.best_checkpoint / "adapter_model.safetensors")
    last = load_file(cfg.checkpoint_dir / f"checkpoint-{result.global_step}" / "adapter_model.safetensors")
    final = load_file(result.adapter_dir / "adapter_model.safetensors")
    for key in final:
        torch.testing.assert_close(final[key], kept[key])
    # The adapter is the best checkpoint's, not the last step's.
    assert any(not torch.equal(final[key], last[key]) for key in final)


def test_early_stopping_needs_validation_data(tiny_base: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="early_stopping_patience needs validation data"):
        train_sft(config(tiny_base, tmp_path, early_stopping_patience=2), TRAIN, console=quiet())


# -- QLoRA ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bitsandbytes_cpu() -> None:
    bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (the training extra)")
    try:
        bnb.functional.quantize_4bit(torch.ones(64, 64), quant_type="nf4", compress_statistics=True)
    except Exception as e:  # any failure means this machine's bitsandbytes cannot run 4-bit here
        pytest.skip(f"bitsandbytes cannot quantize to 4 bits on this machine: {e}")


@pytest.mark.usefixtures("bitsandbytes_cpu")
def test_qlora_trains_on_a_4bit_nf4_base_with_full_precision_lora(tiny_base: Path, tmp_path: Path) -> None:
    from bitsandbytes.nn import Linear4bit  # type: ignore[attr-defined]

    cfg = config(tiny_base, tmp_path / "run", peft="qlora", max_steps=2, gradient_checkpointing=True)
    trainer = sft_trainer(cfg, TRAIN, console=quiet())
    model: Any = trainer.model
    base: Any = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base, Linear4bit)
    weight: Any = base.weight
    assert weight.quant_type == "nf4" and weight.quant_state.nested  # nested: double quantization
    assert base.compute_dtype == cfg.resolved_dtype("cpu")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)

    result = run_training(trainer, cfg, data={}, checkpoint=None, console=quiet())

    assert result.global_step == 2
    assert all(math.isfinite(p.loss) for p in result.manifest.train_loss)
    assert {p.name for p in result.adapter_dir.iterdir()} == ADAPTER_FILES
    assert {t.dtype for t in load_file(result.adapter_dir / "adapter_model.safetensors").values()} == {torch.float32}
    assert read_manifest(result.adapter_dir).hyperparameters["peft"] == "qlora"


# -- config and manifest -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "param", "fragment"),
    [
        ({"rank": 12}, "rank", "not one of vLLM's LoRA slot sizes (1, 8, 16, 32, 64, 128, 256, 320, 512)"),
        ({"rank": 32}, "rank", "rank 32 is above max_lora_rank 16"),
        ({"max_lora_rank": 24}, "max_lora_rank", "not one vLLM accepts for --max-lora-rank"),
        ({"use_dora": True}, "use_dora", "vLLM's LoRA kernels have no magnitude vector"),
        ({"modules_to_save": ("lm_head",)}, "modules_to_save", "vLLM applies only LoRA A/B matrices"),
        ({"bias": "lora_only"}, "bias", "vLLM shares between all adapters"),
        ({"target_modules": ("q_proj", "lm_head")}, "target_modules", "decoder's linear layers only"),
        ({"target_modules": "all"}, "target_modules", "'all-linear' or a list"),
        ({"dropout": 1.0}, "dropout", "dropout must be in [0, 1)"),
        ({"lr": 0.0}, "lr", "lr must be a positive number"),
        ({"max_steps": 0}, "max_steps", "max_steps must be a positive integer"),
        ({"batch_size": 0}, "batch_size", "batch_size must be a positive integer"),
        ({"method": "ppo"}, "method", "method must be one of sft, dpo"),
        ({"peft": "ia3"}, "peft", "peft must be one of lora, qlora"),
        ({"method": "dpo", "packing": True}, "packing", "packing applies to SFT only"),
        ({"early_stopping_patience": 0}, "early_stopping_patience", "must be a positive integer"),
    ],
)
def test_config_refuses_what_cannot_train_or_be_served(changes: dict[str, Any], param: str, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        config(Path("base"), Path("out"), **changes)
    assert caught.value.param == param
    assert fragment in caught.value.message
    assert caught.value.code == "invalid_train_config"


def test_config_defaults_are_servable_and_round_trip() -> None:
    sft = TrainConfig(base_model=Path("base"), output_dir=Path("out"))
    assert sft.rank in VLLM_LORA_RANKS and sft.target_modules == "all-linear" and sft.bias == "none"
    assert sft.learning_rate == 2e-4
    assert TrainConfig(base_model=Path("b"), output_dir=Path("o"), method="dpo").learning_rate == 5e-6
    assert TrainConfig.from_dict(sft.to_dict()) == sft
    with pytest.raises(InvalidRequest, match="unknown hyperparameter"):
        TrainConfig.from_dict({**sft.to_dict(), "learning_rate": 1.0})


def test_manifest_loss_curves_and_round_trip(finished: tuple[TrainResult, str], tmp_path: Path) -> None:
    train, val = loss_curves(
        [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.7}, {"step": 2, "train_loss": 1.8}]
    )
    assert train == (LossPoint(1, 2.0), LossPoint(2, 1.5)) and val == (LossPoint(2, 1.7),)
    manifest = finished[0].manifest
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    newer = {**json.loads((tmp_path / MANIFEST_FILE).read_text()), "format_version": 99}
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(newer))
    with pytest.raises(ValueError, match="format_version 99"):
        read_manifest(tmp_path)
