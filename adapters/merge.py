"""Merge an adapter version into its base model, for latency: one plain model that vLLM serves with LoRA off.

A merge is trusted only after an equivalence check: on a few chat prompts, the merged model must pick
the same greedy tokens as base + adapter (the unmerged PEFT model), with the chosen tokens' logprobs
within a tolerance. The merged directory appears at its final path complete (write beside it, fsync,
rename) and, unless forced, only when the check passed. Blocking torch work: call it from a thread or
a worker process, never on an event loop.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from adapters.catalog import MERGE_FILE, AdapterVersion
from adapters.store import delete_tree, fsync, seal
from core.errors import InvalidRequest

# Short, varied chat turns: facts, arithmetic, code, instructions, open-ended text.
GOLDEN_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Give me three tips for writing clear emails.",
    "Explain what a hash table is in one sentence.",
    "Write a Python function that reverses a string.",
    "Translate 'good morning' into Spanish.",
    "My order arrived damaged. What should I do?",
)
NEW_TOKENS = 16
# The check runs in fp32 whatever the merged model's precision: the base and adapter upcast exactly, so
# base + adapter is computed as exactly as it can be, and the only difference a correct merge leaves is
# the rounding of the merged weights to their saved precision. (In bf16 arithmetic the two sides differ
# by far more: on the embedded model greedy tokens parted on about half the prompts, logprobs by up to
# 0.25, for a correct merge, so bf16 arithmetic could not tell a correct merge from a subtly wrong one.)
CHECK_DTYPE = torch.float32
# The largest |logprob difference| of a chosen token that still counts as equal, by saved precision.
# Measured on the embedded SmolLM2-135M (30 layers) with three random rank-8 adapters on q/v, 8 prompts
# x 16 tokens each: fp32 saves differ by at most 3e-5; bf16 saves by at most 0.062, all tokens identical.
LOGPROB_TOLERANCE: Mapping[torch.dtype, float] = {torch.float32: 1e-2, torch.bfloat16: 0.15}


@dataclass(frozen=True)
class PromptCheck:
    """One golden prompt: the greedy tokens of base + adapter (``reference``) and of the merged model.

    ``max_logprob_diff`` compares the reference's chosen tokens' logprobs under both models, up to and
    including the first position where the greedy tokens part (after it, the two decode different text).
    """

    prompt: str
    reference: tuple[int, ...]
    merged: tuple[int, ...]
    max_logprob_diff: float

    @property
    def identical(self) -> bool:
        """Whether both models chose the same greedy tokens."""
        return self.reference == self.merged

    def to_json(self) -> dict[str, Any]:
        """The JSON form stored in the registry."""
        return {
            "prompt": self.prompt,
            "identical": self.identical,
            "max_logprob_diff": self.max_logprob_diff,
            "reference_tokens": list(self.reference),
            "merged_tokens": list(self.merged),
        }


@dataclass(frozen=True)
class Equivalence:
    """The equivalence check: every prompt's tokens identical and every logprob within ``tolerance``.

    ``dtype`` is the merged model's saved precision, which sets the tolerance; the check computes in fp32.
    """

    dtype: str
    tolerance: float
    new_tokens: int
    checks: tuple[PromptCheck, ...]

    @property
    def equivalent(self) -> bool:
        """Whether the merged model may stand in for base + adapter."""
        return all(c.identical and c.max_logprob_diff <= self.tolerance for c in self.checks)

    @property
    def max_logprob_diff(self) -> float:
        """The largest difference over all prompts."""
        return max((c.max_logprob_diff for c in self.checks), default=0.0)

    def to_json(self) -> dict[str, Any]:
        """The JSON form stored in the registry."""
        return {
            "equivalent": self.equivalent,
            "dtype": self.dtype,
            "check_dtype": str(CHECK_DTYPE).removeprefix("torch."),
            "logprob_tolerance": self.tolerance,
            "new_tokens": self.new_tokens,
            "max_logprob_diff": self.max_logprob_diff,
            "prompts": [c.to_json() for c in self.checks],
        }


@dataclass(frozen=True)
class MergeReport:
    """What ``merge_version`` did: where the merged model is (``saved``) and how it compared."""

    lora_name: str
    adapter_sha256: str
    base_dir: Path
    path: Path
    saved: bool
    merge_s: float
    check_s: float
    equivalence: Equivalence
    # How the adapter was trained ("lora", "qlora"), from its manifest, when it has one.
    trained_with: str | None = None

    @property
    def equivalent(self) -> bool:
        """Whether the merged model may stand in for base + adapter."""
        return self.equivalence.equivalent

    def to_json(self) -> dict[str, Any]:
        """The JSON form stored in the registry (``DeploymentStore.record_merge``)."""
        return {
            "model": self.lora_name,
            "adapter_sha256": self.adapter_sha256,
            "base_dir": str(self.base_dir),
            "path": str(self.path),
            "trained_with": self.trained_with,
            "merge_s": round(self.merge_s, 2),
            "check_s": round(self.check_s, 2),
            **self.equivalence.to_json(),
        }


def merge_version(
    version: AdapterVersion,
    base_dir: Path,
    out_dir: Path,
    prompts: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
    *,
    new_tokens: int = NEW_TOKENS,
    force: bool = False,
) -> MergeReport:
    """Merge ``version`` into the base at ``base_dir`` and save a complete model directory at ``out_dir``.

    The merge runs in fp32; ``dtype`` is the precision saved, by default the base's own (bf16 when its
    config says bf16, else fp32). The directory lands at ``out_dir`` (replacing one there) only when the
    merged model is equivalent to base + adapter on ``prompts`` (default ``GOLDEN_PROMPTS``), or with
    ``force``; ``saved`` says which.
    """
    dtype = dtype or model_dtype(base_dir)
    if dtype not in LOGPROB_TOLERANCE:
        raise InvalidRequest(
            f"cannot save a merged model in {dtype}; use torch.bfloat16 or torch.float32", param="dtype"
        )
    started = time.monotonic()
    # Always the full-precision base, even for an adapter trained with QLoRA on a 4-bit base: vLLM serves
    # the adapter on the full-precision base, so that is what the merged model must reproduce; and
    # merging into 4-bit weights would round the adapter's small delta away in the re-quantization.
    unmerged, tokenizer, reference = _reference(base_dir, version.path, prompts or GOLDEN_PROMPTS, new_tokens)
    # Merged in fp32, so the weights are rounded once, to the saved precision.
    merged: PreTrainedModel = unmerged.merge_and_unload().to(dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _staging(out_dir) as staged:
        merged.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        del merged, unmerged
        merge_s = time.monotonic() - started
        started = time.monotonic()
        # Check what was written, as vLLM will read it, not the model still in memory.
        equivalence = reference.compare(_load(staged), LOGPROB_TOLERANCE[dtype], dtype)
        report = MergeReport(
            lora_name=version.lora_name,
            adapter_sha256=version.sha256,
            base_dir=base_dir,
            path=out_dir,
            saved=equivalence.equivalent or force,
            merge_s=merge_s,
            check_s=time.monotonic() - started,
            equivalence=equivalence,
            trained_with=_trained_with(version),
        )
        if report.saved:
            (staged / MERGE_FILE).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
            _replace(staged, out_dir)
    return report


def check_equivalence(
    base_dir: Path,
    adapter_dir: Path,
    merged_dir: Path,
    prompts: Sequence[str] | None = None,
    *,
    new_tokens: int = NEW_TOKENS,
) -> Equivalence:
    """Compare the merged model at ``merged_dir`` with base + the adapter at ``adapter_dir``."""
    dtype = model_dtype(merged_dir)
    unmerged, _, reference = _reference(base_dir, adapter_dir, prompts or GOLDEN_PROMPTS, new_tokens)
    del unmerged
    return reference.compare(_load(merged_dir), LOGPROB_TOLERANCE[dtype], dtype)


def model_dtype(model_dir: Path) -> torch.dtype:
    """bf16 when the model's config says bf16 (its weights hold nothing finer), else fp32."""
    config = AutoConfig.from_pretrained(model_dir)
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return torch.bfloat16 if declared in (torch.bfloat16, "bfloat16") else torch.float32


@dataclass(frozen=True)
class ChatBatch:
    """Token ids of rendered chat prompts, padded on the left, and their attention mask."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def chat_inputs(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> ChatBatch:
    """Each prompt as one user turn rendered with the tokenizer's chat template, padded on the left."""
    texts = [
        str(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True))
        for p in prompts
    ]
    encoded = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    return ChatBatch(encoded["input_ids"].to(_device()), encoded["attention_mask"].to(_device()))


# -- internals ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reference:
    """Base + adapter's greedy decode of the prompts: tokens (prompts, steps), log-probs (prompts, steps, vocab)."""

    prompts: Sequence[str]
    batch: ChatBatch
    tokens: torch.Tensor
    logprobs: torch.Tensor

    def compare(self, merged: torch.nn.Module, tolerance: float, dtype: torch.dtype) -> Equivalence:
        """Decode with ``merged`` and compare, prompt by prompt."""
        new_tokens = self.tokens.shape[1]
        tokens, logprobs = _greedy(merged, self.batch, new_tokens)
        checks = []
        for row, prompt in enumerate(self.prompts):
            parted = (self.tokens[row] != tokens[row]).nonzero()
            # Up to the first step where the tokens part: after it the two models continue different text.
            steps = torch.arange(int(parted[0]) + 1 if len(parted) else new_tokens)
            chosen = self.tokens[row, steps]
            diff = (self.logprobs[row, steps, chosen] - logprobs[row, steps, chosen]).abs().max()
            reference, got = tuple(self.tokens[row].tolist()), tuple(tokens[row].tolist())
            checks.append(PromptCheck(prompt, reference, got, float(diff)))
        return Equivalence(str(dtype).removeprefix("torch."), tolerance, new_tokens, tuple(checks))


def _reference(
    base_dir: Path, adapter_dir: Path, prompts: Sequence[str], new_tokens: int
) -> tuple[PeftModel, PreTrainedTokenizerBase, _Reference]:
    """Base + adapter in fp32 as PEFT runs it (unmerged), its tokenizer, and its greedy decode of ``prompts``."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    batch = chat_inputs(tokenizer, prompts)
    model = PeftModel.from_pretrained(_load(base_dir), str(adapter_dir))  # in eval mode, like from_pretrained
    return model, tokenizer, _Reference(prompts, batch, *_greedy(model, batch, new_tokens))


def _load(model_dir: Path) -> PreTrainedModel:
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(model_dir, dtype=CHECK_DTYPE)
    model.to(_device())  # type: ignore[arg-type]  # transformers types the device argument too narrowly
    return model


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def _greedy(model: torch.nn.Module, batch: ChatBatch, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``new_tokens`` greedy steps for the whole batch with a KV cache; end-of-sequence does not stop it.

    Returns the tokens (prompts, steps) and each step's log-probabilities (prompts, steps, vocab), on the CPU.
    """
    mask = batch.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
    tokens: list[torch.Tensor] = []
    steps: list[torch.Tensor] = []
    for _ in range(new_tokens):
        logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        tokens.append(logprobs.argmax(dim=-1))
        steps.append(logprobs.cpu())
        if len(tokens) < new_tokens:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
            positions = positions[:, -1:] + 1
            out = model(
                input_ids=tokens[-1][:, None],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
    return torch.stack(tokens, dim=1).cpu(), torch.stack(steps, dim=1)


def _trained_with(version: AdapterVersion) -> str | None:
    hyperparameters = (version.manifest or {}).get("hyperparameters")
    peft = hyperparameters.get("peft") if isinstance(hyperparameters, Mapping) else None
    return peft if isinstance(peft, str) else None


@contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A fresh directory beside ``out_dir`` (same file system, so the rename is atomic), removed on exit."""
    staged = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.merging-"))
    try:
        yield staged
    finally:
        delete_tree(staged)


def _replace(staged: Path, out_dir: Path) -> None:
    """Seal ``staged`` and rename it to ``out_dir``; an existing ``out_dir`` is moved aside first, then deleted."""
    seal(staged)
    old = out_dir.parent / f".{out_dir.name}.replaced-{uuid.uuid4().hex[:8]}"
    if out_dir.exists():
        os.rename(out_dir, old)
    os.rename(staged, out_dir)
    fsync(out_dir.parent)
    delete_tree(old)
