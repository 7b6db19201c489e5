"""Conversations whose prompt tokens the gateway must count exactly as vLLM and transformers do.

System turns, several turns, scripts of several widths (CJK, emoji sequences, combining marks), long ones,
empty content, whitespace runs and text that spells special tokens.
"""

from __future__ import annotations

from typing import Any

Conversation = list[dict[str, Any]]


def _user(text: str) -> Conversation:
    return [{"role": "user", "content": text}]


_TURNS: Conversation = [
    msg
    for i in range(12)
    for msg in (
        {"role": "user", "content": f"Question {i}: what is {i} squared, and why?"},
        {"role": "assistant", "content": f"{i} squared is {i * i}, because {i} × {i} = {i * i}."},
    )
]

CONVERSATIONS: dict[str, Conversation] = {
    "one word": _user("hi"),
    "system and user": [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "multi-turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7."},
        {"role": "user", "content": "Another one, larger."},
    ],
    "ends with the assistant": [
        {"role": "user", "content": "Say yes."},
        {"role": "assistant", "content": "Yes."},
    ],
    "system only": [{"role": "system", "content": "Nobody has spoken yet."}],
    "chinese and japanese": _user("请用中文回答：今天天气怎么样？日本語でも答えてください。"),
    "korean and hangul jamo": _user("안녕하세요, 반갑습니다. 각 한"),
    "emoji sequences": _user("👋🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷 ❤️‍🔥 — emoji with modifiers, joiners and flags"),
    "combining marks": _user("e\u0301 vs é, n\u0303, Z̴̡̧͎̈́a̶̛̪͗l̸͇̅g̷̰͝o̵̲͑ text, a\u0308\u0304"),
    "right to left and indic": _user("مرحبا بالعالم — שלום עולם — नमस्ते दुनिया — வணக்கம்"),
    "astral symbols": _user("𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙: ∀x∈ℝ, ∃y: x² + y² ≥ 0 ∎ 𓂀 𐍈"),
    "empty user content": _user(""),
    "empty system content": [{"role": "system", "content": ""}, {"role": "user", "content": "Hello?"}],
    "every content empty": [
        {"role": "system", "content": ""},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": ""},
    ],
    "whitespace runs": _user("  leading\n\n\n" + " " * 100 + "\t\ttabs\r\nCRLF   trailing   "),
    "code": _user(
        "Fix this:\n```python\ndef add(a, b):\n    return a - b\n\n\nclass K:\n\tpass  # tab\n```\n"
        "It prints `add(2, 2) == 0`."
    ),
    "json in content": _user('{"name": "Ada", "tags": ["<b>", "&amp;", "\\u00e9"], "n": 1e-9, "ok": true}'),
    "special tokens spelled in text": _user("Here <|im_start|>user is spelled out, and <|im_end|> and <|endoftext|>."),
    "long prose": _user(
        " ".join(f"Sentence {i} talks about the quarterly report, revenue and churn." for i in range(100))
    ),
    "long mixed scripts": [
        {"role": "system", "content": "Translate everything. " * 20},
        {"role": "user", "content": "漢字とカタカナ、한국어, ελληνικά, русский, 🙂. " * 40},
    ],
    "many turns": _TURNS,
    "numbers and punctuation": _user("3.14159265358979 1,000,000 -42 +7e10 0x1F 1/3 50% $9.99 ... !!! ??? ;;;"),
}
