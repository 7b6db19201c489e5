"""The RAG path: retrieving for the user's question, and putting the sources in the prompt within a budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.embeddings import Embedder
from core.errors import InvalidRequest, ModelNotFound
from gateway.rag import RagPath, Source, build_messages, ingest, open_index, question
from gateway.rag.retrieval import INSTRUCTION, MESSAGE_OVERHEAD_TOKENS

SOURCES = [
    Source("Port 443 carries HTTPS.", "firewall.md", "Firewall, line 3", 0.41),
    Source("Boil spaghetti for nine minutes.", "pasta.md", "Cooking pasta, line 3", 0.83, {"url": "https://x/p"}),
    Source("Reward the dog with a treat.", "dogs.md", "Training, lines 3-4", 0.12),
]


def _words(text: str) -> int:
    return len(text.split())


def test_sources_go_into_a_new_system_message_numbered_best_first() -> None:
    messages = [{"role": "user", "content": "How long do I boil spaghetti?"}]
    prompt = build_messages(messages, SOURCES)

    assert [s.source for s in prompt.sources] == ["pasta.md", "firewall.md", "dogs.md"]
    assert prompt.messages[1:] == messages
    system = prompt.messages[0]
    assert system["role"] == "system"
    assert system["content"] == (
        f"{INSTRUCTION}\n\n"
        "[1] pasta.md (Cooking pasta, line 3)\nBoil spaghetti for nine minutes.\n\n"
        "[2] firewall.md (Firewall, line 3)\nPort 443 carries HTTPS.\n\n"
        "[3] dogs.md (Training, lines 3-4)\nReward the dog with a treat."
    )
    assert "cite" in INSTRUCTION.lower() and "[1]" in INSTRUCTION
    assert messages == [{"role": "user", "content": "How long do I boil spaghetti?"}], "the input is not modified"


def test_an_existing_system_prompt_is_kept_and_the_sources_follow_it() -> None:
    messages = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Boil time?"},
    ]
    prompt = build_messages(messages, SOURCES[:1])

    assert len(prompt.messages) == 4
    assert prompt.messages[0]["content"].startswith("You are a terse assistant.\n\n" + INSTRUCTION)
    assert prompt.messages[0]["content"].endswith("[1] firewall.md (Firewall, line 3)\nPort 443 carries HTTPS.")
    assert prompt.messages[1:] == messages[1:]
    # Content parts stay parts.
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, messages[-1]]
    assert build_messages(parts, SOURCES[:1]).messages[0]["content"][0] == {"type": "text", "text": "Be brief."}


def test_the_budget_drops_the_lowest_scored_sources_first() -> None:
    messages = [{"role": "user", "content": "How long do I boil spaghetti?"}]
    everything = build_messages(messages, SOURCES)
    full = sum(_words(m["content"]) + MESSAGE_OVERHEAD_TOKENS for m in everything.messages)

    # One word short of all three: the dog source (score 0.12) goes, the other two stay.
    trimmed = build_messages(messages, SOURCES, max_prompt_tokens=full - 1, count_tokens=_words)
    assert [s.source for s in trimmed.sources] == ["pasta.md", "firewall.md"]
    assert "dogs.md" not in trimmed.messages[0]["content"]
    assert sum(_words(m["content"]) + MESSAGE_OVERHEAD_TOKENS for m in trimmed.messages) <= full - 1
    assert build_messages(messages, SOURCES, max_prompt_tokens=full, count_tokens=_words).sources == everything.sources

    # Room for no source at all: the messages go as they are.
    bare = _words(messages[0]["content"]) + MESSAGE_OVERHEAD_TOKENS
    assert build_messages(messages, SOURCES, max_prompt_tokens=bare, count_tokens=_words).messages == messages
    with pytest.raises(InvalidRequest) as caught:
        build_messages(messages, SOURCES, max_prompt_tokens=bare - 1, count_tokens=_words)
    assert caught.value.code == "context_length_exceeded"


def test_the_question_is_the_last_user_message() -> None:
    messages = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "text", "text": "question"}]},
        {"role": "assistant", "content": "partial"},
    ]
    assert question(messages) == "second\nquestion"
    with pytest.raises(InvalidRequest, match="needs a user message"):
        question([{"role": "system", "content": "only a system prompt"}])


def test_a_source_as_clients_see_it() -> None:
    assert SOURCES[1].to_dict() == {
        "source": "pasta.md",
        "location": "Cooking pasta, line 3",
        "score": 0.83,
        "text": "Boil spaghetti for nine minutes.",
        "metadata": {"url": "https://x/p"},
    }


async def test_retrieval_runs_off_the_event_loop_and_fits_the_budget(embedder: Embedder, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "pasta.md").write_text("# Pasta\n\nBoil spaghetti in salted water for nine minutes.\n")
    (docs / "firewall.md").write_text("# Firewall\n\nOpen port 443 with ufw allow 443/tcp.\n")
    index = open_index(f"sqlite:///{tmp_path / 'rag.db'}")
    try:
        ingest(index, embedder, "docs", sorted(docs.iterdir()))
        rag = RagPath(index, embedder)
        messages = [{"role": "user", "content": "how long do I cook spaghetti?"}]

        sources = await rag.aretrieve("docs", question(messages), k=2)
        assert [s.source for s in sources] == ["pasta.md", "firewall.md"]
        prompt = await rag.abuild_messages(messages, sources, max_prompt_tokens=10_000)
        assert prompt.sources == sources
        assert "[1] pasta.md (Pasta, line 3)" in prompt.messages[0]["content"]
        assert [c.name for c in await rag.acollections()] == ["docs"]
        with pytest.raises(ModelNotFound, match="collections: docs"):
            await rag.aretrieve("nope", "anything")
    finally:
        index.close()
