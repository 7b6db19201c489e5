"""Prompt token counts without transformers: ``tokenizers`` and the chat template through jinja2.

transformers is the reference here, and only here: the counts must equal ``apply_chat_template``'s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import jinja2
import pytest
from tokenizers import Tokenizer

from core.errors import InvalidRequest
from gateway import Settings, create_app
from gateway.chat_template import ChatTemplate
from gateway.tokenizer import ModelTokenizer
from gateway.tokens import PromptMeter
from tests.conversations import CONVERSATIONS, Conversation

TEMPLATES = Path(__file__).parent / "chat_templates"
ADDED_BOS = {"__type": "AddedToken", "content": "<|im_start|>", "lstrip": False, "rstrip": False, "normalized": False}
PLACES = ("chat_template.jinja", "tokenizer_config.json", "named templates")


def _reference(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _reference_count(reference: Any, messages: Conversation) -> int:
    ids = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return len(ids)


def _model_dir(base_model_dir: Path, target: Path, template: str | None, place: str = PLACES[0]) -> Path:
    """The embedded model's tokenizer with ``template`` stored at ``place``; special tokens written both ways."""
    target.mkdir()
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(base_model_dir / name, target / name)
    config = json.loads((base_model_dir / "tokenizer_config.json").read_text())
    config["bos_token"] = ADDED_BOS  # an AddedToken's fields, as older configs write it
    if template is not None and place == "chat_template.jinja":
        (target / "chat_template.jinja").write_text(template)
    elif template is not None and place == "tokenizer_config.json":
        config["chat_template"] = template
    elif template is not None:
        config["chat_template"] = [
            {"name": "tool_use", "template": "{{ raise_exception('not the default') }}"},
            {"name": "default", "template": template},
        ]
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    # No added_tokens_decoder in the config: transformers lets special_tokens_map.json decide, so must we.
    pad = {"content": "<|endoftext|>", "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    (target / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad}))
    return target


@pytest.fixture(scope="module")
def meter(base_model_dir: Path) -> PromptMeter:
    return PromptMeter(base_model_dir)


async def test_chat_counts_equal_transformers_on_the_embedded_model(base_model_dir: Path, meter: PromptMeter) -> None:
    reference = _reference(base_model_dir)
    counts = {name: await meter.count({"messages": c}, frontier=False) for name, c in CONVERSATIONS.items()}
    assert counts == {name: _reference_count(reference, c) for name, c in CONVERSATIONS.items()}
    assert len(counts) >= 20 and max(counts.values()) > 1000


@pytest.mark.parametrize("place", PLACES)
async def test_a_richer_template_renders_and_counts_as_in_transformers(
    base_model_dir: Path, tmp_path: Path, place: str
) -> None:
    model_dir = _model_dir(base_model_dir, tmp_path / "m", (TEMPLATES / "rich.jinja").read_text(), place)
    reference, tokenizer = _reference(model_dir), ModelTokenizer.load(model_dir)
    late_system = [
        {"role": "user", "content": "first"},
        {"role": "system", "content": "Answer in Ελληνικά & <b>HTML</b>."},
        {"role": "user", "content": "second"},
    ]
    conversations = {**CONVERSATIONS, "a late system turn": late_system}
    rendered = {name: tokenizer.render(c) for name, c in conversations.items()}
    assert rendered == {
        name: reference.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
        for name, c in conversations.items()
    }
    meter = PromptMeter(model_dir)
    counts = {name: await meter.count({"messages": c}, frontier=False) for name, c in conversations.items()}
    assert counts == {name: _reference_count(reference, c) for name, c in conversations.items()}
    # The template's features showed up: bos_token (an AddedToken), pad_token from special_tokens_map.json,
    # tojson of a dict (non-ASCII kept, indent and sorted keys), a skipped empty turn.
    late = rendered["a late system turn"]
    assert late is not None and late.startswith("<|im_start|>") and '"content": "Answer in Ελληνικά' in late
    assert '{"said": "Yes.", "turn": 1, "é": "ü"}' in str(rendered["ends with the assistant"])
    assert "<|endoftext|>" in str(rendered["many turns"])
    assert "[USER" not in str(rendered["empty user content"])


async def test_a_role_the_template_refuses_is_a_400(base_model_dir: Path, tmp_path: Path) -> None:
    model_dir = _model_dir(base_model_dir, tmp_path / "m", (TEMPLATES / "rich.jinja").read_text())
    messages = [{"role": "user", "content": "hi " * 100}, {"role": "robot", "content": "beep"}]
    with pytest.raises(jinja2.TemplateError, match="not robot"):
        _reference_count(_reference(model_dir), messages)
    with pytest.raises(InvalidRequest, match="not robot") as refused:
        await PromptMeter(model_dir).count({"messages": messages}, frontier=False)
    assert refused.value.status_code == 400

    def vllm(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/models", "the request must be refused before it reaches vLLM"
        return httpx.Response(200, json={"data": [{"id": "m", "root": "/m", "parent": None, "max_model_len": 64}]})

    settings = Settings(data_dir=tmp_path / "data", base_model="m", base_model_path=model_dir, health_interval_s=3600)
    app = create_app(settings, transport=httpx.MockTransport(vllm))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway") as client:
            response = await client.post("/v1/chat/completions", json={"model": "m", "messages": messages})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages" and "must be system, user or assistant, not robot" in error["message"]


async def test_completion_prompts_and_plain_text_count_as_in_transformers(
    base_model_dir: Path, meter: PromptMeter
) -> None:
    reference = _reference(base_model_dir)
    texts = [c[-1]["content"] for c in CONVERSATIONS.values()]
    for text in texts:
        assert meter.count_text(text) == len(reference(text)["input_ids"])
    assert await meter.count({"prompt": texts}, frontier=False) == max(len(reference(t)["input_ids"]) for t in texts)
    assert await meter.count({"prompt": [5, 6, 7]}, frontier=False) == 3


def test_the_longest_token_is_measured_in_bytes_of_the_byte_level_alphabet(base_model_dir: Path) -> None:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab = Tokenizer.from_file(str(base_model_dir / "tokenizer.json")).get_vocab()
    longest = max(len(bytes(byte_of.get(c, 0) for c in token)) for token in vocab)
    assert ModelTokenizer.load(base_model_dir).longest_token_bytes == longest == 81


class _Recording:
    """A tokenizer that notes every text it is asked to encode."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.encoded: list[int] = []

    def encode(self, text: str, add_special_tokens: bool) -> Any:
        self.encoded.append(len(text))
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)


async def test_what_cannot_fit_is_refused_without_tokenizing(base_model_dir: Path, meter: PromptMeter) -> None:
    loaded = ModelTokenizer.load(base_model_dir)
    assert loaded.template is not None and loaded.longest_token_bytes == 81
    recording = _Recording(Tokenizer.from_file(str(base_model_dir / "tokenizer.json")))
    tokenizer = ModelTokenizer(recording, loaded.template, loaded.longest_token_bytes)  # type: ignore[arg-type]
    huge = "x" * 30_000_000
    # 30 MB of bytes need at least 30e6 / 81 tokens: more than a 2048-token context, known without tokenizing.
    assert tokenizer.count(huge, special=False, ceiling=2048) >= 30_000_000 // 81 and recording.encoded == []
    # Under that proof, the text is tokenized: 2048 * 81 bytes could still be 2048 tokens.
    text = "word " * 1000
    assert tokenizer.count(text, special=False, ceiling=2048) == loaded.count(text, special=False)
    assert recording.encoded == [len(text)]
    assert not await meter.fits({"messages": [{"role": "user", "content": huge}]}, 2048, frontier=False)
    assert not await meter.fits({"prompt": huge}, 2048, frontier=False)
    assert not await meter.fits({"messages": [{"role": "user", "content": huge}]}, 128_000, frontier=True)


async def test_the_count_the_rate_limits_charge_is_the_one_the_context_checks_read(base_model_dir: Path) -> None:
    loaded = ModelTokenizer.load(base_model_dir)
    recording = _Recording(Tokenizer.from_file(str(base_model_dir / "tokenizer.json")))
    meter = PromptMeter(base_model_dir)
    meter._tokenizer = ModelTokenizer(recording, loaded.template, loaded.longest_token_bytes)  # type: ignore[arg-type]
    payload = {"messages": [{"role": "user", "content": "word " * 300}], "max_tokens": 10}
    prompt = meter.prompt(payload)
    charged = await prompt.tokens(frontier=False)
    assert len(recording.encoded) == 1
    assert PromptMeter.bound(payload) > charged + 10  # the byte bound alone settles none of the checks below
    # Every context check of the request (one per target tried) reads the same count: nothing is tokenized again.
    assert await prompt.overflow(charged + 10, frontier=False) is None
    assert await prompt.overflow(charged + 9, frontier=False) == "completion"
    assert await prompt.overflow(charged - 1, frontier=False) == "prompt"
    assert len(recording.encoded) == 1


def _tokenizer_spec(base_model_dir: Path) -> dict[str, Any]:
    return dict(json.loads((base_model_dir / "tokenizer.json").read_text()))


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"normalizer": {"type": "NFC"}}, id="a normalizer may shrink the text"),
        pytest.param({"pre_tokenizer": {"type": "Whitespace"}}, id="not byte-level"),
        pytest.param({"strip": True}, id="an added token that swallows whitespace"),
    ],
)
def test_no_proof_where_a_token_may_stand_for_more_than_its_bytes(
    base_model_dir: Path, tmp_path: Path, change: dict[str, Any]
) -> None:
    spec = _tokenizer_spec(base_model_dir)
    if change.pop("strip", False):
        spec["added_tokens"][1]["rstrip"] = True
    spec.update(change)
    model_dir = _model_dir(base_model_dir, tmp_path / "m", None)
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer = ModelTokenizer.load(model_dir)
    assert tokenizer.longest_token_bytes is None
    assert tokenizer.count("x" * 100_000, special=False, ceiling=10) > 10  # counted, not proven


@pytest.mark.parametrize("missing", ["chat template", "tokenizer.json"])
async def test_a_model_without_a_chat_template_or_tokenizer_leaves_the_judgement_to_vllm(
    base_model_dir: Path, tmp_path: Path, missing: str
) -> None:
    model_dir = _model_dir(base_model_dir, tmp_path / "m", None)
    if missing == "tokenizer.json":
        (model_dir / "tokenizer.json").unlink()
    meter = PromptMeter(model_dir)
    payload = {"messages": [{"role": "user", "content": "word " * 1000}]}
    assert await meter.fits(payload, 64, frontier=False)
    assert await meter.count(payload, frontier=False) == PromptMeter.bound(payload)


def test_templates_get_transformers_globals() -> None:
    template = ChatTemplate("{{ strftime_now('%Y') }}|{{ messages | length }}|{{ bos_token }}", {"bos_token": "<s>"})
    assert template.render([{"role": "user", "content": "x"}]) == f"{datetime.now():%Y}|1|<s>"


def test_counting_imports_neither_transformers_nor_torch(base_model_dir: Path) -> None:
    messages = CONVERSATIONS["system and user"] + CONVERSATIONS["emoji sequences"]
    # gateway/__init__ builds the whole app, whose other modules are not this test's concern: the package is
    # registered bare, so what runs is gateway.tokens and everything it imports.
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys, types

        class Forbidden(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("transformers", "torch"):
                    raise ImportError(f"the gateway imported {{name}}")
                return None

        sys.meta_path.insert(0, Forbidden())
        package = types.ModuleType("gateway")
        package.__path__ = [{str(Path(__file__).parents[2] / "gateway")!r}]
        sys.modules["gateway"] = package

        import asyncio
        from pathlib import Path
        from gateway.tokens import PromptMeter

        meter = PromptMeter(Path({str(base_model_dir)!r}))
        print(asyncio.run(meter.count({{"messages": {messages!r}}}, frontier=False)))
        print(meter.count_text("hello world"))
        """
    )
    root = Path(__file__).parents[2]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    reference = _reference(base_model_dir)
    expected = [_reference_count(reference, messages), len(reference("hello world")["input_ids"])]
    assert [int(n) for n in done.stdout.split()] == expected
