"""Training renders chat exactly as serving does: the training template's tokens equal vLLM's for the same messages."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from core import embedded
from core.vllm_server import VllmServer
from training.sft import training_chat_template

CONVERSATIONS = [
    [{"role": "user", "content": "My keyboard KB-7 arrived broken!!"}],
    [
        {"role": "system", "content": "Answer with a JSON object."},
        {"role": "user", "content": "Where is my order?"},
        {"role": "assistant", "content": '{"category": "shipping"}'},
        {"role": "user", "content": "And the refund?"},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_training_prompt_tokens_equal_what_vllm_serves(
    vllm: VllmServer, base_model_dir: Path, messages: list[dict[str, str]]
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    template = training_chat_template(tokenizer)
    ours = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    ours_ids = tokenizer(ours, add_special_tokens=False)["input_ids"]
    served = httpx.post(
        f"{vllm.url}/tokenize",
        json={"model": embedded.SERVED_NAME, "messages": messages, "add_generation_prompt": True},
        timeout=60,
    )
    assert served.status_code == 200, served.text
    assert served.json()["tokens"] == ours_ids
