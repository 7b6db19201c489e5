"""The demo task: seeded and reproducible, no leakage between splits, every label used, and its metric."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from training.demo import FIELDS, LABELS, METRIC, SYSTEM_PROMPT, DemoFiles, score_json_fields, write_demo
from trainingdata.formats import DataError, DataFormat, file_fingerprint, load_examples
from trainingdata.leakage import find_overlaps

SIZES = {"n_train": 400, "n_val": 60, "n_test": 120}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoFiles:
    return write_demo(tmp_path_factory.mktemp("demo"), **SIZES, seed=0)


def labels_of(path: Path) -> list[dict[str, str]]:
    return [json.loads(example.messages[-1].content) for example in load_examples(path).chat_examples()]


def test_same_seed_same_bytes_other_seed_other_data(demo: DemoFiles, tmp_path: Path) -> None:
    again = write_demo(tmp_path / "again", **SIZES, seed=0)
    other = write_demo(tmp_path / "other", **SIZES, seed=1)
    for name in ("train", "val", "test"):
        assert getattr(again, name).read_bytes() == getattr(demo, name).read_bytes()
        assert getattr(other, name).read_bytes() != getattr(demo, name).read_bytes()
    assert again.spec.read_text() == demo.spec.read_text()


def test_splits_are_openai_chat_of_the_requested_sizes(demo: DemoFiles) -> None:
    for path, size in ((demo.train, 400), (demo.val, 60), (demo.test, 120)):
        data = load_examples(path)
        assert data.format is DataFormat.OPENAI_CHAT and len(data) == size
        for example in data.chat_examples():
            # The adapter learns the behaviour: its data needs no instructions.
            assert [m.role for m in example.messages] == ["user", "assistant"]


def test_no_message_leaks_between_splits(demo: DemoFiles) -> None:
    train, val, test = (load_examples(path) for path in (demo.train, demo.val, demo.test))
    report = find_overlaps(train, val, test, near_threshold=0.9)
    assert report.overlaps == ()


def test_answers_are_compact_json_with_every_label_used(demo: DemoFiles) -> None:
    train = labels_of(demo.train)
    for answer in train:
        assert tuple(answer) == FIELDS
        assert all(answer[key] in LABELS[key] for key in FIELDS)
    for key in FIELDS:
        assert set(LABELS[key]) == {answer[key] for answer in train}, key
    test = labels_of(demo.test)
    for key in ("category", "product"):
        assert set(LABELS[key]) == {answer[key] for answer in test}, key


def test_guessing_the_most_common_labels_scores_poorly(demo: DemoFiles) -> None:
    # The task is not solved by priors: the learnable part is in the messages.
    train = labels_of(demo.train)
    guess = json.dumps({key: Counter(answer[key] for answer in train).most_common(1)[0][0] for key in FIELDS})
    test = labels_of(demo.test)
    score = sum(score_json_fields(guess, json.dumps(answer)) for answer in test) / len(test)
    assert score < 0.45


def test_spec_names_the_metric_labels_and_files(demo: DemoFiles) -> None:
    spec = json.loads(demo.spec.read_text())
    assert spec["metric"] == METRIC == "json_field_accuracy"
    assert spec["fields"] == list(FIELDS)
    assert spec["labels"] == {key: list(values) for key, values in LABELS.items()}
    assert spec["system_prompt"] == SYSTEM_PROMPT
    for name in ("train", "val", "test"):
        path = getattr(demo, name)
        assert spec["splits"][name] == {"file": path.name, **file_fingerprint(path)}


REFERENCE = '{"category": "billing", "priority": "high", "product": "fernpad", "sentiment": "negative"}'


@pytest.mark.parametrize(
    "prediction, score",
    [
        (REFERENCE, 1.0),
        ('{"category": "billing", "priority": "low", "product": "fernpad", "sentiment": "negative"}', 0.75),
        ('{"sentiment": "negative", "product": "fernpad", "priority": "high", "category": "billing", "x": 1}', 1.0),
        ('Sure! ```json\n{"category": "Billing", "priority": " HIGH", "product": "kettlebird"}\n```', 0.5),
        ('{"category": billing} {"category": "billing"}', 0.25),
        ('["billing", "high", "fernpad", "negative"]', 0.0),
        ("billing, high, fernpad, negative", 0.0),
        ("", 0.0),
    ],
    ids=["exact", "one wrong", "any order", "in prose", "first valid object", "array", "no json", "empty"],
)
def test_json_field_accuracy(prediction: str, score: float) -> None:
    assert score_json_fields(prediction, REFERENCE) == score


def test_a_broken_reference_is_a_data_error() -> None:
    with pytest.raises(DataError, match="reference is not JSON"):
        score_json_fields(REFERENCE, "{broken")
    with pytest.raises(DataError, match="non-empty JSON object"):
        score_json_fields(REFERENCE, "[]")
