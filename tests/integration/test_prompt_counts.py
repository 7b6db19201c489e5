"""The gateway counts prompt tokens exactly as the vLLM it fronts does, without transformers."""

from __future__ import annotations

from pathlib import Path

import httpx

from core import embedded
from core.vllm_server import VllmServer
from gateway.tokens import PromptMeter
from tests.conversations import CONVERSATIONS


async def test_chat_and_completion_counts_equal_vllms_tokenize(vllm: VllmServer, base_model_dir: Path) -> None:
    meter = PromptMeter(base_model_dir)
    ours, theirs = {}, {}
    async with httpx.AsyncClient(base_url=vllm.url, timeout=60) as client:
        for name, messages in CONVERSATIONS.items():
            ours[name] = await meter.count({"messages": messages}, frontier=False)
            chat = {"model": embedded.SERVED_NAME, "messages": messages, "add_generation_prompt": True}
            served = await client.post("/tokenize", json=chat)
            assert served.status_code == 200, served.text
            theirs[name] = served.json()["count"]
            # The last message's text as a completion prompt: the tokenizer's own special tokens, if any.
            text = messages[-1]["content"]
            ours[f"{name} (prompt)"] = await meter.count({"prompt": text}, frontier=False)
            served = await client.post("/tokenize", json={"model": embedded.SERVED_NAME, "prompt": text})
            assert served.status_code == 200, served.text
            theirs[f"{name} (prompt)"] = served.json()["count"]
    assert ours == theirs
    assert len(CONVERSATIONS) >= 20 and max(ours.values()) > 1000
