"""TrainConfig: every hyperparameter of a training run, validated so that what it trains vLLM can serve.

The config also says how it translates into the libraries that do the work: a PEFT ``LoraConfig``,
a bitsandbytes ``BitsAndBytesConfig`` for QLoRA, and the ``TrainingArguments`` shared by SFT and DPO.
A bad value raises ``InvalidRequest`` (code ``invalid_train_config``) whose ``param`` names the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from core.errors import InvalidRequest

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

# vLLM refuses to start with any other --max-lora-rank, and pads every adapter up to it.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
METHODS = ("sft", "dpo")
PEFT_METHODS = ("lora", "qlora")
COMPUTE_DTYPES = ("auto", "bf16", "fp32")
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
# A LoRA on these would be saved as (or beside) full embedding weights; vLLM serves decoder linear layers only.
EMBEDDING_MODULES = frozenset({"lm_head", "embed_tokens", "wte", "embed_out", "word_embeddings"})
# Learning rates that work for LoRA on small instruct models; DPO moves the policy far less per step.
DEFAULT_LR = {"sft": 2e-4, "dpo": 5e-6}

Method = Literal["sft", "dpo"]
PeftMethod = Literal["lora", "qlora"]
ComputeDtype = Literal["auto", "bf16", "fp32"]


@dataclass(frozen=True)
class TrainConfig:
    """One training run: base model, method, LoRA shape, optimisation and bookkeeping.

    ``lr=None`` takes the method's default (``DEFAULT_LR``). ``max_steps`` overrides ``epochs``.
    Checkpoints are written (and, with validation data, evaluated) every ``save_steps`` optimiser steps.
    ``use_dora``, ``modules_to_save`` and ``bias`` exist so that a request for them is refused with a reason.
    """

    base_model: Path
    output_dir: Path
    method: Method = "sft"
    peft: PeftMethod = "lora"
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"
    epochs: float = 3.0
    max_steps: int | None = None
    lr: float | None = None
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    packing: bool = False
    max_length: int = 1024
    early_stopping_patience: int | None = None
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    save_steps: int = 50
    save_total_limit: int = 2
    compute_dtype: ComputeDtype = "auto"
    beta: float = 0.1
    max_lora_rank: int = 512
    base_model_name: str | None = None
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()
    bias: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_model", Path(self.base_model))
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.modules_to_save, list):
            object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))
        _validate(self)
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR[self.method])

    @property
    def learning_rate(self) -> float:
        """The effective learning rate (never None after construction)."""
        assert self.lr is not None
        return self.lr

    @property
    def checkpoint_dir(self) -> Path:
        """Where the trainer keeps checkpoints (with optimizer state) for resuming."""
        return self.output_dir / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        """Where the finished adapter lands: the PEFT files and ``quiver_manifest.json``, nothing else."""
        return self.output_dir / "adapter"

    @property
    def model_name(self) -> str:
        """The base model's name for people: ``base_model_name`` or the directory's name."""
        return self.base_model_name or self.base_model.name

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready hyperparameters (paths as strings, tuples as lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The inverse of ``to_dict``; unknown keys are refused by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            _fail(f"unknown hyperparameter(s): {', '.join(unknown)}", unknown[0])
        return cls(**data)

    # -- translation into the libraries ----------------------------------------------------------

    def lora_config(self) -> LoraConfig:
        """The PEFT LoRA config: plain LoRA on linear layers, no bias, nothing saved beside A and B."""
        from peft import LoraConfig

        target = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=target,
            bias="none",
            use_dora=False,
            task_type="CAUSAL_LM",
        )

    def resolved_dtype(self, device: str) -> torch.dtype:
        """The compute dtype on ``device`` ("cpu" or "cuda").

        ``auto``: bf16 where the hardware runs it natively (a GPU from Ampere on, a CPU with AVX-512 BF16 or AMX),
        else fp32. The frozen base is loaded in it and matmuls autocast to it; the LoRA weights stay fp32 either way.
        Native bf16 matmuls run about twice as fast as fp32 ones even on a CPU, which is most of a step's time.
        """
        import torch

        if self.compute_dtype == "bf16":
            return torch.bfloat16
        if self.compute_dtype == "fp32":
            return torch.float32
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if _cpu_runs_bf16() else torch.float32

    def quantization_config(self, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
        """QLoRA's 4-bit NF4 with double quantization; None for plain LoRA."""
        if self.peft != "qlora":
            return None
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )

    def trainer_arguments(self, *, has_val: bool, packing: bool, bf16: bool) -> dict[str, Any]:
        """Keyword arguments shared by ``SFTConfig`` and ``DPOConfig``."""
        import torch

        evaluate = "steps" if has_val else "no"
        return {
            "output_dir": str(self.checkpoint_dir),
            "num_train_epochs": self.epochs,
            "max_steps": self.max_steps if self.max_steps is not None else -1,
            "learning_rate": self.learning_rate,
            "lr_scheduler_type": self.lr_scheduler,
            "warmup_steps": self.warmup_ratio,  # below 1 it is a ratio of the total steps
            "weight_decay": self.weight_decay,
            "per_device_train_batch_size": self.batch_size,
            "per_device_eval_batch_size": self.batch_size,
            "gradient_accumulation_steps": self.grad_accum,
            "seed": self.seed,
            "data_seed": self.seed,
            "max_length": self.max_length,
            "gradient_checkpointing": self.gradient_checkpointing,
            "bf16": bf16,
            # transformers refuses bf16 autocast without a GPU unless told that the CPU is meant.
            "use_cpu": not torch.cuda.is_available(),
            "fp16": False,
            "logging_strategy": "steps",
            "logging_steps": self.logging_steps,
            "logging_first_step": True,
            "save_strategy": "steps",
            "save_steps": self.save_steps,
            "save_total_limit": self.save_total_limit,
            "eval_strategy": evaluate,
            "eval_steps": self.save_steps if has_val else None,
            # The best checkpoint by validation loss becomes the adapter, with or without early stopping.
            "load_best_model_at_end": has_val,
            "metric_for_best_model": "eval_loss" if has_val else None,
            "greater_is_better": False if has_val else None,
            # Padded batches count their real tokens; packed ones are padding-free, so every token is real.
            "include_num_input_tokens_seen": "all" if packing else "non_padding",
            "report_to": "none",
            "disable_tqdm": True,
            "dataloader_num_workers": 0,
            # Pinned memory only helps copies to a GPU; without one torch warns that it is ignored.
            "dataloader_pin_memory": torch.cuda.is_available(),
        }


def _cpu_runs_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _fail(message: str, param: str) -> NoReturn:
    raise InvalidRequest(message, param=param, code="invalid_train_config")


def _validate(c: TrainConfig) -> None:
    """Refuse the first problem, naming the field and, for what vLLM cannot serve, why."""
    if c.method not in METHODS:
        _fail(f"method must be one of {', '.join(METHODS)}, got {c.method!r}", "method")
    if c.peft not in PEFT_METHODS:
        _fail(f"peft must be one of {', '.join(PEFT_METHODS)}, got {c.peft!r}", "peft")
    if c.max_lora_rank not in VLLM_LORA_RANKS:
        _fail(
            f"max_lora_rank {c.max_lora_rank} is not one vLLM accepts for --max-lora-rank "
            f"({', '.join(map(str, VLLM_LORA_RANKS))})",
            "max_lora_rank",
        )
    if not isinstance(c.rank, int) or isinstance(c.rank, bool) or c.rank not in VLLM_LORA_RANKS:
        _fail(
            f"rank {c.rank!r} is not one of vLLM's LoRA slot sizes ({', '.join(map(str, VLLM_LORA_RANKS))}): "
            "vLLM pads every adapter to its --max-lora-rank, which must be one of these, so any other rank "
            "costs the compute of the next size up",
            "rank",
        )
    if c.rank > c.max_lora_rank:
        _fail(
            f"rank {c.rank} is above max_lora_rank {c.max_lora_rank}: vLLM refuses adapters larger than its "
            "--max-lora-rank slot; choose rank <= max_lora_rank or serve with a larger slot",
            "rank",
        )
    if c.use_dora:
        _fail(
            "DoRA (use_dora) cannot be served: vLLM's LoRA kernels have no magnitude vector, "
            "so it refuses DoRA adapters at load time; train plain LoRA",
            "use_dora",
        )
    if c.modules_to_save:
        _fail(
            f"modules_to_save {list(c.modules_to_save)} cannot be served: it saves fully trained copies of "
            "those modules, and vLLM applies only LoRA A/B matrices on top of the shared base weights",
            "modules_to_save",
        )
    if c.bias != "none":
        _fail(
            f"bias {c.bias!r} cannot be served: trained biases change the base model's weights, "
            "which vLLM shares between all adapters; use bias 'none'",
            "bias",
        )
    _validate_targets(c.target_modules)
    _positive_int(c.alpha, "alpha")
    if not isinstance(c.dropout, int | float) or not 0.0 <= c.dropout < 1.0:
        _fail(f"dropout must be in [0, 1), got {c.dropout!r}", "dropout")
    if c.max_steps is not None:
        _positive_int(c.max_steps, "max_steps")
    else:
        _positive_number(c.epochs, "epochs")
    if c.lr is not None:
        _positive_number(c.lr, "lr")
    if c.lr_scheduler not in LR_SCHEDULERS:
        _fail(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {c.lr_scheduler!r}", "lr_scheduler")
    if not 0.0 <= c.warmup_ratio < 1.0:
        _fail(f"warmup_ratio must be in [0, 1), got {c.warmup_ratio!r}", "warmup_ratio")
    if c.weight_decay < 0:
        _fail(f"weight_decay must be >= 0, got {c.weight_decay!r}", "weight_decay")
    for name in ("batch_size", "grad_accum", "logging_steps", "save_steps", "save_total_limit"):
        _positive_int(getattr(c, name), name)
    if not isinstance(c.seed, int) or isinstance(c.seed, bool) or c.seed < 0:
        _fail(f"seed must be a non-negative integer, got {c.seed!r}", "seed")
    if not isinstance(c.max_length, int) or c.max_length < 16:
        _fail(f"max_length must be an integer >= 16, got {c.max_length!r}", "max_length")
    if c.early_stopping_patience is not None:
        _positive_int(c.early_stopping_patience, "early_stopping_patience")
    if c.packing and c.method != "sft":
        _fail("packing applies to SFT only; DPO compares chosen and rejected answers of one prompt", "packing")
    if c.compute_dtype not in COMPUTE_DTYPES:
        _fail(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {c.compute_dtype!r}", "compute_dtype")
    _positive_number(c.beta, "beta")


def _validate_targets(targets: str | tuple[str, ...]) -> None:
    if isinstance(targets, str):
        if targets != "all-linear":
            _fail(
                f"target_modules must be 'all-linear' or a list of module names, got {targets!r}",
                "target_modules",
            )
        return
    if not targets or not all(isinstance(t, str) and t for t in targets):
        _fail("target_modules must be 'all-linear' or a non-empty list of module names", "target_modules")
    embeddings = sorted(EMBEDDING_MODULES.intersection(t.rsplit(".", 1)[-1] for t in targets))
    if embeddings:
        _fail(
            f"target_modules {embeddings} are the embeddings or the LM head: vLLM serves LoRA on the decoder's "
            "linear layers only, and a LoRA there would be saved with full embedding weights",
            "target_modules",
        )


def _positive_int(value: object, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(f"{name} must be a positive integer, got {value!r}", name)


def _positive_number(value: object, name: str) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        _fail(f"{name} must be a positive number, got {value!r}", name)
