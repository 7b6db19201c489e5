"""Training on a CUDA GPU runs the same code as on the CPU: the frozen base in bf16 (where the GPU supports it)
or, for QLoRA, in 4-bit NF4 placed on the GPU, the LoRA weights in fp32, and a servable fp32 adapter at the end.

Marked ``gpu``: skipped without CUDA (tests/conftest.py). A GPU box may lack the training extra, so trl and
bitsandbytes are required lazily, per test.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.factories import ADAPTER_FILES, quiet
from tests.factories import train_config as config

pytestmark = pytest.mark.gpu

TRAIN = [
    {"messages": [{"role": "user", "content": f"Repeat {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
    for w in ("apple", "pear", "plum", "fig")
]


def compute_dtype() -> torch.dtype:
    """What ``compute_dtype="auto"`` must pick on this GPU: bf16 from Ampere on, fp32 before."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32


def train_two_steps(trainer: Any, cfg: Any) -> Any:
    """Run the trainer as ``quiver train`` does and check what a user gets: a finite loss and an fp32 adapter."""
    from training.sft import run_training

    result = run_training(trainer, cfg, data={}, checkpoint=None, console=quiet())
    assert result.global_step == 2
    assert all(math.isfinite(p.loss) for p in result.manifest.train_loss)
    assert {p.name for p in result.adapter_dir.iterdir()} == ADAPTER_FILES
    assert {t.dtype for t in load_file(result.adapter_dir / "adapter_model.safetensors").values()} == {torch.float32}
    return result


def test_lora_trains_on_the_gpu_in_bf16_with_fp32_lora_weights(tiny_base: Path, tmp_path: Path) -> None:
    pytest.importorskip("trl", reason="training needs trl (the training extra)")
    from training.sft import sft_trainer

    cfg = config(tiny_base, tmp_path / "run", max_steps=2)
    trainer = sft_trainer(cfg, TRAIN, console=quiet())
    model: Any = trainer.model
    dtype = compute_dtype()

    assert cfg.resolved_dtype("cuda") == dtype
    assert trainer.args.bf16 is (dtype == torch.bfloat16) and not trainer.args.use_cpu
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {dtype}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)

    result = train_two_steps(trainer, cfg)
    assert result.manifest.hyperparameters["peft"] == "lora"


def test_qlora_trains_on_a_4bit_nf4_base_on_the_gpu(tiny_base: Path, tmp_path: Path) -> None:
    pytest.importorskip("trl", reason="training needs trl (the training extra)")
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (the training extra)")
    from bitsandbytes.nn import Linear4bit  # type: ignore[attr-defined]

    from training.sft import sft_trainer

    cfg = config(tiny_base, tmp_path / "run", peft="qlora", max_steps=2, gradient_checkpointing=True)
    trainer = sft_trainer(cfg, TRAIN, console=quiet())
    model: Any = trainer.model
    base: Any = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer

    assert isinstance(base, Linear4bit)
    weight: Any = base.weight
    assert weight.device.type == "cuda" and weight.dtype == torch.uint8  # packed 4-bit values, two per byte
    assert weight.quant_type == "nf4" and weight.quant_state.nested  # nested: double quantization
    assert base.compute_dtype == compute_dtype()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 and p.device.type == "cuda" for p in trainable)

    result = train_two_steps(trainer, cfg)
    assert result.manifest.hyperparameters["peft"] == "qlora"
