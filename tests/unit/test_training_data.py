"""Training data: every format loads as chat examples, every malformed record is named by file and line,
splits are deterministic and never leak, and the leakage check finds exact and near duplicates."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from core.errors import InvalidRequest
from trainingdata.formats import (
    ChatExample,
    DataError,
    DataFormat,
    Message,
    PreferenceExample,
    file_fingerprint,
    load_examples,
)
from trainingdata.leakage import find_overlaps, normalize_text
from trainingdata.splits import split

SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "What is 2 + 2?"}
ASSISTANT = {"role": "assistant", "content": "4"}
CHAT = {"messages": [USER, ASSISTANT]}


def write_jsonl(path: Path, records: Sequence[object | str]) -> Path:
    """One line per record; a ``str`` is written as it is (blank lines, broken JSON)."""
    lines = [record if isinstance(record, str) else json.dumps(record) for record in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def chat(user: str, reply: str = "ok", *, line: int = 1, source: str = "mem.jsonl") -> ChatExample:
    return ChatExample(
        messages=(Message("system", "Shared system prompt."), Message("user", user), Message("assistant", reply)),
        source=source,
        line=line,
    )


def load_error(path: Path) -> DataError:
    with pytest.raises(DataError) as caught:
        load_examples(path)
    return caught.value


# --- formats --------------------------------------------------------------------------------------


def test_openai_chat_keeps_messages_and_weights_with_line_numbers(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [SYSTEM, USER, ASSISTANT], "weight": 2, "id": "ignored-metadata"},
            "",
            {"messages": [USER, ASSISTANT, {"role": "user", "content": "And 3 + 3?"}, ASSISTANT]},
        ],
    )
    data = load_examples(path)
    assert data.format is DataFormat.OPENAI_CHAT
    assert len(data) == 2
    first, second = data.chat_examples()
    assert first.messages == (
        Message("system", "You are terse."),
        Message("user", "What is 2 + 2?"),
        Message("assistant", "4"),
    )
    assert (first.weight, first.line, first.source) == (2.0, 1, str(path))
    assert (second.weight, second.line) == (1.0, 3)  # the blank line counts
    assert [m.to_dict() for m in second.messages][2] == {"role": "user", "content": "And 3 + 3?"}


def test_alpaca_becomes_user_and_assistant_turns(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Translate to French.", "input": "cat", "output": "chat", "system": "Be exact."},
            {"instruction": "Name a colour.", "input": "", "output": "Blue"},
            {"instruction": "Name a shape.", "input": None, "output": "Circle", "system": ""},
        ],
    )
    data = load_examples(path)
    assert data.format is DataFormat.ALPACA
    first, second, third = data.chat_examples()
    assert first.messages == (
        Message("system", "Be exact."),
        Message("user", "Translate to French.\n\ncat"),
        Message("assistant", "chat"),
    )
    assert second.messages == (Message("user", "Name a colour."), Message("assistant", "Blue"))
    assert third.messages == (Message("user", "Name a shape."), Message("assistant", "Circle"))


def test_sharegpt_maps_human_gpt_and_system(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "sharegpt.jsonl",
        [
            {
                "conversations": [
                    {"from": "system", "value": "Be kind."},
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello!"},
                ]
            },
            {
                "system": "Be brief.",
                "conversations": [{"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye."}],
            },
        ],
    )
    data = load_examples(path)
    assert data.format is DataFormat.SHAREGPT
    first, second = data.chat_examples()
    assert [m.role for m in first.messages] == ["system", "user", "assistant"]
    assert second.messages[0] == Message("system", "Be brief.")


def test_preference_pairs_accept_string_and_conversational_prompts(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "prefs.jsonl",
        [
            {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
            {
                "prompt": [SYSTEM, USER],
                "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "5"}],
            },
        ],
    )
    data = load_examples(path)
    assert data.format is DataFormat.PREFERENCE
    first, second = data.preference_examples()
    assert first == PreferenceExample(
        prompt=(Message("user", "Capital of France?"),), chosen="Paris.", rejected="Lyon.", source=str(path), line=1
    )
    assert [m.role for m in second.prompt] == ["system", "user"]
    assert (second.chosen, second.rejected) == ("4", "5")
    with pytest.raises(DataError, match="preference pairs, which train with DPO"):
        data.chat_examples()


def test_sft_data_is_refused_where_preference_pairs_are_needed(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="DPO needs preference pairs"):
        load_examples(write_jsonl(tmp_path / "chat.jsonl", [CHAT])).preference_examples()


def test_json_array_records_carry_their_line(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(
        '[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "c",\n   "output": "d"},'
        '  {"instruction": "e", "output": "f"}\n]\n',
        encoding="utf-8",
    )
    data = load_examples(path)
    assert [example.line for example in data] == [2, 4, 5]


def test_json_array_bad_record_is_named_by_its_line(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(
        '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": ""}\n]', encoding="utf-8"
    )
    assert str(load_error(path)) == f"{path}:3: 'output' is empty"


def test_byte_order_mark_is_not_data(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(CHAT).encode() + b"\n")
    assert len(load_examples(path)) == 1


def test_fingerprint_names_hash_count_and_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT, CHAT])
    assert file_fingerprint(path) == {
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "count": 2,
        "format": "openai_chat",
    }


# --- malformed records -------------------------------------------------------------------------------

MALFORMED = {
    "bad JSON": ('{"messages": [', "bad JSON: "),
    "not an object": ("[1, 2]", "a record must be a JSON object, not an array"),
    "unknown format": ({"prompt": "x", "completion": "y"}, "unknown record format (keys: 'prompt', 'completion')"),
    "ambiguous": ({"messages": [USER, ASSISTANT], "conversations": []}, "ambiguous record"),
    "messages not a list": ({"messages": "hi"}, "'messages' must be a list of messages, not a string"),
    "messages empty": ({"messages": []}, "'messages' is an empty list"),
    "message not an object": ({"messages": ["hi", ASSISTANT]}, "message 1 must be an object"),
    "missing role": ({"messages": [{"content": "hi"}, ASSISTANT]}, "message 1 has no 'role'"),
    "wrong role": ({"messages": [USER, {"role": "bot", "content": "4"}]}, "message 2 has role 'bot'; expected one of"),
    "missing content": ({"messages": [USER, {"role": "assistant"}]}, "message 2 (assistant) has no 'content'"),
    "content not text": (
        {"messages": [{"role": "user", "content": 7}, ASSISTANT]},
        "content must be a string, not a number",
    ),
    "empty content": (
        {"messages": [USER, {"role": "assistant", "content": "  "}]},
        "message 2 (assistant) content is empty",
    ),
    "last not assistant": ({"messages": [USER]}, "the last message is from the user; it must be from the assistant"),
    "not alternating": (
        {"messages": [USER, USER, ASSISTANT]},
        "message 2 is from the user where the assistant was expected",
    ),
    "starts with assistant": (
        {"messages": [ASSISTANT, USER, ASSISTANT]},
        "message 1 is from the assistant where the user",
    ),
    "late system": ({"messages": [USER, SYSTEM, ASSISTANT]}, "message 2 is a system message; only the first"),
    "only system": ({"messages": [SYSTEM]}, "there is only a system message"),
    "weight not a number": ({**CHAT, "weight": "high"}, "'weight' must be a number, not a string"),
    "weight negative": ({**CHAT, "weight": -1}, "'weight' must be a finite number >= 0"),
    "weight boolean": ({**CHAT, "weight": True}, "'weight' must be a number, not a boolean"),
    "weight fractional": ({**CHAT, "weight": 0.5}, "'weight' must be a whole number"),
    "tools": ({**CHAT, "tools": []}, "'tools': tool definitions are not supported"),
    "per-message weight": (
        {"messages": [USER, {**ASSISTANT, "weight": 0}]},
        "message 2: 'weight': per-message 'weight' is not supported",
    ),
    "mixed formats": (
        {"instruction": "a", "output": "b"},
        "this record is alpaca ('instruction'/'output') but the file",
    ),
}


@pytest.mark.parametrize("record, fragment", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_chat_record_is_named_by_file_and_line(tmp_path: Path, record: object, fragment: str) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [CHAT, "", record, CHAT])
    error = load_error(path)
    assert str(error).startswith(f"{path}:3: "), str(error)
    assert fragment in str(error)
    assert isinstance(error, InvalidRequest) and error.status_code == 400


MALFORMED_OTHER = {
    "alpaca missing output": ({"instruction": "a", "output": "b"}, {"instruction": "a"}, "missing key 'output'"),
    "alpaca empty instruction": (
        {"instruction": "a", "output": "b"},
        {"instruction": "", "output": "b"},
        "'instruction' is empty",
    ),
    "alpaca input not text": (
        {"instruction": "a", "output": "b"},
        {"instruction": "a", "input": ["x"], "output": "b"},
        "'input' must be a string, not an array",
    ),
    "alpaca history": (
        {"instruction": "a", "output": "b"},
        {"instruction": "a", "output": "b", "history": [["q", "a"]]},
        "alpaca 'history' (earlier turns) is not supported",
    ),
    "sharegpt wrong role": (
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]},
        "turn 2 is from 'robot'; expected one of human, gpt, system",
    ),
    "sharegpt empty value": (
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]},
        "turn 2 (gpt) value is empty",
    ),
    "sharegpt ends with human": (
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"conversations": [{"from": "human", "value": "a"}]},
        "the last turn is from the user; it must be from the assistant",
    ),
    "sharegpt missing value": (
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"conversations": [{"from": "human"}, {"from": "gpt", "value": "b"}]},
        "turn 1 (human) has no 'value'",
    ),
    "preference missing rejected": (
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a"},
        "missing key 'rejected'",
    ),
    "preference missing prompt": (
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"chosen": "a", "rejected": "b"},
        "missing key 'prompt'",
    ),
    "preference identical replies": (
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "same", "rejected": "same "},
        "'chosen' and 'rejected' are the same text",
    ),
    "preference prompt ends with assistant": (
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": [USER, ASSISTANT], "chosen": "a", "rejected": "b"},
        "the last message is from the assistant; it must be from the user",
    ),
    "preference chosen from user": (
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": [USER], "rejected": "b"},
        "'chosen' holds a user message; it must be the assistant's reply",
    ),
    "preference empty rejected": (
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": ""},
        "'rejected' is empty",
    ),
}


@pytest.mark.parametrize("good, bad, fragment", MALFORMED_OTHER.values(), ids=MALFORMED_OTHER.keys())
def test_malformed_record_of_other_formats_is_named(tmp_path: Path, good: object, bad: object, fragment: str) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [good, bad])
    error = load_error(path)
    assert str(error).startswith(f"{path}:2: "), str(error)
    assert fragment in str(error)


def test_every_malformed_record_is_listed_in_one_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", ["{oops", CHAT, {"messages": [USER]}, CHAT, "[]"])
    error = load_error(path)
    assert str(error).startswith(f"{path}: 3 malformed records:")
    assert [problem.split(": ", 1)[0] for problem in error.problems] == [f"{path}:1", f"{path}:3", f"{path}:5"]


def test_invalid_utf8_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(CHAT).encode() + b"\n" + b'{"messages": "\xff"}\n')
    assert str(load_error(path)).startswith(f"{path}:2: not valid UTF-8")


def test_the_first_good_record_sets_the_format(tmp_path: Path) -> None:
    # A broken alpaca record before chat records is reported as the odd one out, not the chat ones.
    path = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "a"}, CHAT, CHAT])
    error = load_error(path)
    assert error.problems == (
        f"{path}:1: this record is alpaca ('instruction'/'output') but the file is OpenAI chat ('messages') "
        "(from line 2); a file holds one format",
    )


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("empty.jsonl", "", "no records; the file is empty"),
        ("blank.jsonl", "\n  \n", "no records; the file is empty"),
        ("empty.json", "[]", "no records; the file is empty"),
        ("object.json", '{"messages": []}', ":1: a .json data file must hold a JSON array of records, not an object"),
        ("broken.json", '[\n{"a": 1},\n{"b": }\n]', ":3: bad JSON: "),
        ("data.csv", "a,b\n", "unsupported file type '.csv'; use .jsonl or .json"),
    ],
)
def test_unusable_file_is_refused(tmp_path: Path, name: str, content: str, fragment: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    error = load_error(path)
    assert str(error).startswith(str(path)) and fragment in str(error)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    assert str(load_error(tmp_path / "nope.jsonl")) == f"{tmp_path / 'nope.jsonl'}: no such file"


# --- split ----------------------------------------------------------------------------------------

# No two are near duplicates at 0.9: each pair differs in a whole word or audience.
TOPICS = [
    f"{word}: how would you explain {word} to {audience} who has never heard of it before, "
    "using at most three short sentences and one example?"
    for word, audience in itertools.product(
        ["gravity", "money", "rain", "music", "sleep", "maps", "clocks", "bread"],
        ["a child", "a pilot", "my grandmother", "a farmer", "a poet", "an alien", "a chef", "a judge"],
    )
]


def test_split_is_deterministic_complete_and_ordered() -> None:
    examples = [chat(text, line=n + 1) for n, text in enumerate(TOPICS)]
    train, val = split(examples, val_fraction=0.2, seed=7)
    assert (train, val) == split(examples, val_fraction=0.2, seed=7)
    assert val != split(examples, val_fraction=0.2, seed=8)[1]
    assert len(val) == round(len(examples) * 0.2)
    assert sorted([*train, *val], key=lambda example: example.line) == examples
    assert [example.line for example in val] == sorted(example.line for example in val)


def test_split_keeps_duplicates_on_one_side() -> None:
    examples = [chat(text, line=n + 1) for n, text in enumerate(TOPICS)]
    # Each topic again, once reworded only in case and punctuation and once with one letter changed.
    examples += [chat(text.upper().replace("?", "!!"), line=1000 + n) for n, text in enumerate(TOPICS)]
    examples += [chat(text.replace("heard", "heart"), line=2000 + n) for n, text in enumerate(TOPICS)]
    for seed in range(5):
        train, val = split(examples, val_fraction=0.1, seed=seed)
        assert len(val) == round(len(examples) * 0.1) // 3 * 3  # whole groups of three
        assert find_overlaps(train, val).overlaps == ()


def test_split_refuses_too_little_data() -> None:
    with pytest.raises(DataError, match="too few to hold out"):
        split([chat("only one")], val_fraction=0.5)
    with pytest.raises(DataError, match="every group of duplicate examples is larger"):
        split([chat("same"), chat("Same!"), chat("same.")], val_fraction=0.3)
    with pytest.raises(ValueError, match="val_fraction"):
        split([chat("a"), chat("b")], val_fraction=1.0)


# --- leakage ----------------------------------------------------------------------------------------


def test_exact_duplicates_are_found_after_normalization() -> None:
    train = [chat("How do I reset my password?", line=1), chat("Where is my order?", line=2)]
    val = [chat("  how do i RESET my password ", line=1), chat("Something else entirely", line=2)]
    report = find_overlaps(train, val)
    (overlap,) = report.overlaps
    assert (overlap.split, overlap.index, overlap.other_split, overlap.other_index) == ("val", 0, "train", 0)
    assert overlap.exact and overlap.similarity == 1.0
    assert report.fraction("val") == 0.5
    assert report.to_dict() == {"near_threshold": 0.9, "val": {"size": 2, "exact": 1, "near": 0, "fraction": 0.5}}


def test_normalization_strips_case_punctuation_and_spacing() -> None:
    assert normalize_text("  Héllo,\tWORLD!!  it's  me_ ") == "héllo world its me"


def test_near_duplicates_are_found_and_unrelated_text_is_not() -> None:
    base = "My Nimbus router keeps dropping the connection every evening around nine, even after a reset."
    train = [chat(base), chat("Please add a dark mode to the app; my eyes hurt at night.")]
    val = [
        chat(base.replace("nine", "ten")),  # near
        chat("My Orbit speaker will not pair with my phone since the update last Tuesday."),  # unrelated
    ]
    report = find_overlaps(train, val, near_threshold=0.8)
    (overlap,) = report.overlaps
    assert not overlap.exact and 0.8 <= overlap.similarity < 1.0
    assert report.near == report.overlaps and report.exact == ()
    assert find_overlaps(train, val, near_threshold=None).overlaps == ()
    assert find_overlaps(train, val, near_threshold=0.99).overlaps == ()


def test_shared_system_prompt_is_not_leakage() -> None:
    report = find_overlaps([chat("Is it going to rain today?")], [chat("What is the capital of Peru?")])
    assert report.overlaps == ()


def test_test_split_is_checked_against_train_and_val() -> None:
    train = [chat("alpha beta gamma delta epsilon", line=1)]
    val = [chat("zeta eta theta iota kappa", line=1)]
    test = [chat("Zeta, eta, theta, iota, kappa.", line=1), chat("ALPHA beta gamma delta epsilon", line=2)]
    report = find_overlaps(train, val, test)
    assert [(o.split, o.index, o.other_split) for o in report.leaked("test")] == [
        ("test", 0, "val"),
        ("test", 1, "train"),
    ]
    assert report.leaked("val") == ()


def test_a_duplicate_within_val_is_reported_for_each_copy() -> None:
    report = find_overlaps([chat("shared question")], [chat("Shared question."), chat("shared  question")])
    assert [overlap.index for overlap in report.leaked("val")] == [0, 1]


def test_raise_if_above_names_counts_and_examples() -> None:
    train = [chat(text, source="train.jsonl", line=n + 1) for n, text in enumerate(TOPICS[:50])]
    val = [chat(TOPICS[3], source="val.jsonl", line=1)] + [
        chat(f"unrelated prompt number {n} about {n * 7} llamas", source="val.jsonl", line=n + 2) for n in range(9)
    ]
    report = find_overlaps(train, val)
    report.raise_if_above(0.1)  # 1 of 10 is not above 10%
    with pytest.raises(DataError) as caught:
        report.raise_if_above(0.05)
    message = str(caught.value)
    assert (
        "1 of 10 val examples (10.0%) duplicate train (1 exact, 0 near at similarity >= 0.9), above the 5.0% allowed"
        in message
    )
    assert "val val.jsonl:1 ~ train train.jsonl:4 (same text)" in message


def _brute_force_leaks(train: Sequence[str], val: Sequence[str], threshold: float) -> set[int]:
    def grams(text: str) -> set[str]:
        text = normalize_text(text)
        return {text[k : k + 5] for k in range(max(1, len(text) - 4))}

    train_grams = [grams(text) for text in train]
    leaks = set()
    for index, text in enumerate(val):
        mine = grams(text)
        if any(len(mine & other) / len(mine | other) >= threshold for other in train_grams):
            leaks.add(index)
    return leaks


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9])
def test_near_duplicate_search_misses_nothing_brute_force_finds(threshold: float) -> None:
    # Random letters make almost every 5-gram rare, so pairs near the threshold share few of the
    # n-grams the search indexes: the cases where an off-by-one in its pruning would show.
    rng = random.Random(threshold)
    letters = "abcdefghijklmnopqrstuvwxyz"
    train = ["".join(rng.choices(letters, k=rng.randrange(12, 60))) for _ in range(300)]
    val = []
    for _ in range(300):
        text = list(rng.choice(train))
        if rng.random() < 0.5:
            for _ in range(rng.randrange(1, 5)):
                text[rng.randrange(len(text))] = rng.choice(letters)
        else:
            # Cut from one end: the 5-grams become a subset, the tightest case for the search.
            cut = rng.randrange(1, 7)
            text = text[cut:] if rng.random() < 0.5 else text[:-cut]
        val.append("".join(text))
    report = find_overlaps([chat(text) for text in train], [chat(text) for text in val], near_threshold=threshold)
    expected = _brute_force_leaks(train, val, threshold)
    assert 0 < len(expected) < len(val)
    assert {overlap.index for overlap in report.leaked("val")} == expected


def test_a_weight_counts_an_example_that_many_times_and_zero_leaves_it_out(tmp_path: Path) -> None:
    from training.train import chat_rows

    path = tmp_path / "weighted.jsonl"
    records = [
        {"messages": [USER, {"role": "assistant", "content": content}], "weight": weight}
        for content, weight in (("twice", 2), ("never", 0), ("once", 1))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = chat_rows(load_examples(path).chat_examples())
    assert [row["messages"][-1]["content"] for row in rows] == ["twice", "twice", "once"]
