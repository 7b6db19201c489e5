"""The demo task: triage a customer-support message into a JSON object of four labels.

Messages are generated, not collected: a seeded random generator composes each one from
independent parts (greeting, the problem, a detail, an urgency cue, a tone cue, a sign-off),
names a product in one of several ways (full name, short name, model code, description, with
typos), and sometimes mentions a second product in passing. The labels follow from the parts
chosen, so a small model can learn the mapping, while the conventions (a damaged delivery is
``shipping``, not ``technical``; ``KB-7`` is the kettle; "not urgent" is ``low``) are not
guessable from the system prompt alone.

The examples are a user message and the answer, with no system prompt: that is the point of an
adapter. ``SYSTEM_PROMPT`` is in the dataset spec for the eval gate's baselines.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainingdata.formats import ChatExample, DataError, Message, file_fingerprint
from trainingdata.leakage import find_overlaps
from trainingdata.splits import split

TASK = "support_triage"
METRIC = "json_field_accuracy"
FIELDS = ("category", "priority", "product", "sentiment")
CATEGORIES = ("billing", "technical", "account", "shipping", "feature_request")
PRIORITIES = ("low", "medium", "high")
SENTIMENTS = ("negative", "neutral", "positive")
# Each product's canonical label and the ways customers refer to it.
PRODUCT_NAMES: Mapping[str, tuple[str, ...]] = {
    "lumo_lamp": ("Lumo Lamp", "Lumo", "LM-2", "smart desk lamp", "Lumo desk lamp"),
    "nimbus_router": ("Nimbus Router", "Nimbus", "NR-500", "mesh router", "Nimbus wifi router"),
    "orbit_speaker": ("Orbit Speaker", "Orbit", "OS-1", "bluetooth speaker", "Orbit mini speaker"),
    "fernpad": ("Fernpad", "Fernpad tablet", "FP-10", "drawing tablet", "Fernpad Pro"),
    "kettlebird": ("Kettlebird", "Kettlebird kettle", "KB-7", "smart kettle", "Kettlebird 2"),
    "tandem_lock": ("Tandem Lock", "Tandem", "TL-3", "smart bike lock", "Tandem bike lock"),
}
PRODUCTS = tuple(PRODUCT_NAMES)
LABELS: Mapping[str, tuple[str, ...]] = {
    "category": CATEGORIES,
    "priority": PRIORITIES,
    "product": PRODUCTS,
    "sentiment": SENTIMENTS,
}

SYSTEM_PROMPT = (
    "You triage customer support messages for Brightline Devices. Reply with only a JSON object with "
    'the keys "category", "priority", "product" and "sentiment", in that order.\n'
    f"category: {' | '.join(CATEGORIES)}\n"
    f"priority: {' | '.join(PRIORITIES)}\n"
    f"product: {' | '.join(PRODUCTS)}\n"
    f"sentiment: {' | '.join(SENTIMENTS)}"
)

# {p} is the product as the customer names it; the other fields are filled from _FILLERS.
_PROBLEMS: Mapping[str, tuple[str, ...]] = {
    "billing": (
        "I was charged twice for my {p}.",
        "my card got billed for the {p} protection plan I cancelled last month",
        "the invoice for my {p} says {amount} but checkout showed {amount2}.",
        "can I get a refund for the {p}? I sent it back {days} days ago",
        "there's a {amount} charge from you on my statement and I only bought the {p}",
        "the promo code for the {p} didn't apply, I paid full price.",
        "I need a proper VAT invoice for the {p} we bought for the office",
        "the {p} app subscription renewed even though auto-renew was off",
        "you refunded {amount} for the {p} but I paid {amount2}",
        "why was I charged a restocking fee on the {p} return?",
    ),
    "technical": (
        "my {p} keeps disconnecting every few minutes",
        "the {p} won't turn on since the last firmware update.",
        "the app crashes whenever I try to pair the {p}",
        "the {p} is making a weird buzzing noise",
        "my {p} gets really hot after {minutes} minutes of use",
        "the {p} shows a blinking red light and nothing responds",
        "battery on the {p} dies in {hours} hours instead of lasting the day",
        "firmware {version} failed halfway and now the {p} is stuck on the logo",
        "the {p} doesn't show up in the app anymore after I changed my wifi",
        "the {p} resets itself every night around {clock}",
    ),
    "account": (
        "I can't log in to the app that controls my {p}",
        "please change the email on my account, the {p} is registered to my old work address",
        "the password reset email never arrives so I can't set up the {p}",
        "the {p} I bought second hand is still registered to someone else and I can't add it",
        "how do I delete my account? I sold the {p}",
        "my two-factor codes stopped working and I'm locked out of the {p} app",
        "can you merge my two accounts? the {p} is on one and everything else on the other",
        "I want to add my partner as a second user on the {p}",
        "the app says my account is suspended and I can't reach my {p}",
        "I changed my phone number and now I can't verify the account for the {p}",
    ),
    "shipping": (
        "my {p} order still hasn't arrived, it's been {days} days",
        "tracking for the {p} hasn't updated since {weekday}",
        "the {p} arrived with a crushed box and a cracked case",
        "I ordered the {p} in {color} but got the {color2} one",
        "the courier left my {p} at the wrong address",
        "can you ship the {p} to a different address? I'm moving next week",
        "the {p} package says delivered but it's not here",
        "my {p} came without the charger in the box",
        "I was charged customs fees on delivery of the {p}, nobody told me about that",
        "the {p} delivery was pushed back {days} days again",
    ),
    "feature_request": (
        "it would be great if the {p} could work with {integration}",
        "please add a dark mode to the {p} app",
        "any plans to let the {p} run on a schedule?",
        "I'd love a way to export my {p} history as CSV",
        "could you make the {p} support {integration}?",
        "suggestion: let us rename the {p} in the app",
        "it would be nice if the {p} had a quieter mode",
        "please add a home screen widget for the {p}",
        "can the {p} get a guest mode for visitors?",
        "would love to control the {p} from my watch",
    ),
}
_DETAILS: Mapping[str, tuple[str, ...]] = {
    "billing": ("Order number {order}.", "The charge is dated {date}.", "I paid with a {card} card."),
    "technical": ("I already tried restarting it.", "It's on firmware {version}.", "I did a factory reset, no luck."),
    "account": ("My username is {handle}.", "I'm using the {os} app.", "I tried from two different phones."),
    "shipping": ("Order number {order}.", "Tracking number {tracking}.", "I'm in {city}."),
    "feature_request": ("Lots of people on the forum want this too.", "I use it every day.", "Just an idea."),
}
_PRIORITY_CUES: Mapping[str, tuple[str, ...]] = {
    "high": (
        "This is urgent.",
        "I need this sorted today.",
        "Our whole office depends on this.",
        "Please help ASAP!",
        "I have a client demo in an hour.",
        "This is blocking my work completely.",
        "URGENT please.",
    ),
    # Medium is the default: no cue at all, or a mild one.
    "medium": ("", "", "", "Please get back to me.", "Would appreciate a reply this week.", "Let me know."),
    "low": (
        "No rush at all.",
        "Whenever you get a chance.",
        "Not urgent.",
        "It can wait until next month.",
        "Not a big deal, just curious.",
        "No hurry on this one.",
    ),
}
_SENTIMENT_CUES: Mapping[str, tuple[str, ...]] = {
    "negative": (
        "This is really frustrating.",
        "Honestly I'm very disappointed.",
        "Third time I'm writing about this!!",
        "Worst purchase I've made this year.",
        "I'm fed up with this.",
        "Not impressed at all.",
    ),
    "neutral": ("", "", "", "Here are the details.", "Thanks."),
    "positive": (
        "Love the {short} otherwise!",
        "You've been great so far.",
        "Thanks so much, really happy with it otherwise :)",
        "Great product btw.",
        "Big fan of your stuff.",
    ),
}
# Priority leans on the category: a feature request is rarely urgent, a lockout often is.
_PRIORITY_WEIGHTS: Mapping[str, tuple[float, float, float]] = {
    "billing": (0.3, 0.45, 0.25),
    "technical": (0.2, 0.4, 0.4),
    "account": (0.2, 0.4, 0.4),
    "shipping": (0.25, 0.45, 0.3),
    "feature_request": (0.6, 0.35, 0.05),
}
_GREETINGS = ("Hi,", "Hello,", "Hello team,", "hey", "Hi there!", "Good morning,", "Dear support,", "", "")
_SIGN_OFFS = ("Thanks, {name}", "- {name}", "Regards,\n{name}", "{name}", "Cheers, {name}", "", "Sent from my phone")
_NAMES = (
    "Ana", "Ben", "Chloe", "Dmitri", "Emeka", "Fatima", "Gustavo", "Hana", "Ivan", "Jasmine", "Kofi", "Lena",
    "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sanjay", "Tomasz", "Uma", "Viktor", "Wen", "Ximena",
    "Yusuf", "Zoe", "Aiko", "Bruno", "Carmen", "Diego", "Elif", "Finn", "Greta", "Hugo", "Ines", "Jonas",
)  # fmt: skip
_FILLERS: Mapping[str, tuple[str, ...]] = {
    "color": ("black", "white", "sage green", "blue", "red", "sand"),
    "integration": ("Google Home", "Alexa", "HomeKit", "IFTTT", "Home Assistant", "Apple Shortcuts"),
    "weekday": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "the weekend"),
    "os": ("iPhone", "Android", "iPad", "web"),
    "card": ("Visa", "Mastercard", "Amex", "debit"),
    "city": ("Lisbon", "Leeds", "Austin", "Lyon", "Osaka", "Gdansk", "Toronto", "Porto"),
}


@dataclass(frozen=True)
class DemoFiles:
    """Where ``write_demo`` put the splits and the dataset spec."""

    train: Path
    val: Path
    test: Path
    spec: Path


def _typo(word: str, rng: random.Random) -> str:
    # The slips people make on phones: a swapped, dropped or doubled letter.
    if len(word) < 4 or not word.isalpha():
        return word
    k = rng.randrange(1, len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:
        return word[:k] + word[k + 1] + word[k] + word[k + 2 :]
    if kind == 1:
        return word[:k] + word[k + 1 :]
    return word[:k] + word[k] + word[k:]


def _fill(template: str, rng: random.Random, product: str) -> str:
    amount = rng.randrange(19, 400)
    values = {
        "p": product,
        "short": product.split()[0] if product[0].isupper() else "product",
        "amount": f"${amount}.{rng.choice(('00', '99', '49'))}",
        "amount2": f"${amount + rng.randrange(5, 60)}.00",
        "days": str(rng.randrange(3, 22)),
        "minutes": str(rng.choice((5, 10, 15, 20, 30))),
        "hours": str(rng.randrange(2, 7)),
        "version": f"{rng.randrange(1, 5)}.{rng.randrange(0, 10)}.{rng.randrange(0, 20)}",
        "clock": f"{rng.randrange(1, 12)}{rng.choice(('am', 'pm'))}",
        "order": f"#{rng.choice('ABCDEFGH')}{rng.randrange(10000, 99999)}",
        "tracking": f"1Z{rng.randrange(10**9, 10**10)}",
        "date": f"{rng.choice(('March', 'May', 'June', 'October', 'Dec'))} {rng.randrange(1, 29)}",
        "handle": f"{rng.choice(_NAMES).lower()}{rng.randrange(1, 999)}",
        "name": rng.choice(_NAMES),
        "color2": "",
    }
    for key, options in _FILLERS.items():
        values[key] = rng.choice(options)
    values["color2"] = rng.choice([c for c in _FILLERS["color"] if c != values["color"]])
    return template.format(**values)


def generate_example(rng: random.Random) -> tuple[str, dict[str, str]]:
    """One support message and its labels, drawn from ``rng``."""
    category = rng.choice(CATEGORIES)
    priority = rng.choices(PRIORITIES, weights=_PRIORITY_WEIGHTS[category])[0]
    product = rng.choice(PRODUCTS)
    sentiment = rng.choices(SENTIMENTS, weights=(0.35, 0.4, 0.25))[0]

    alias = rng.choice(PRODUCT_NAMES[product])
    if rng.random() < 0.1:
        alias = " ".join(_typo(word, rng) for word in alias.split())
    problem = _fill(rng.choice(_PROBLEMS[category]), rng, alias)
    parts = [problem[0].upper() + problem[1:] if rng.random() < 0.7 else problem]
    if rng.random() < 0.5:
        parts.append(_fill(rng.choice(_DETAILS[category]), rng, alias))
    if rng.random() < 0.15:
        # A second product mentioned in passing: the label is the one with the problem.
        other = rng.choice([name for name in PRODUCTS if name != product])
        parts.append(f"(My {PRODUCT_NAMES[other][rng.randrange(2)]} works fine, it's only this one.)")
    cues = [
        _fill(rng.choice(_PRIORITY_CUES[priority]), rng, alias),
        _fill(rng.choice(_SENTIMENT_CUES[sentiment]), rng, alias),
    ]
    rng.shuffle(cues)
    if rng.random() < 0.3:
        parts[:0] = cues  # the cues first, as in "URGENT please. ..."
    else:
        parts.extend(cues)
    parts.insert(0, rng.choice(_GREETINGS))
    parts.append(_fill(rng.choice(_SIGN_OFFS), rng, alias))

    text = rng.choice((" ", " ", "\n")).join(part for part in parts if part)
    if rng.random() < 0.2:
        text = text.lower()
    if rng.random() < 0.3:
        text = " ".join(_typo(word, rng) if rng.random() < 0.06 else word for word in text.split(" "))
    labels = {"category": category, "priority": priority, "product": product, "sentiment": sentiment}
    return text, labels


def _example(text: str, labels: Mapping[str, str], line: int) -> ChatExample:
    # No system prompt: the adapter learns the behaviour, so serving it needs no instructions (and its
    # prompts are half as long). The prompt lives in the spec, for the baselines that need it.
    messages = (
        Message("user", text),
        Message("assistant", json.dumps({key: labels[key] for key in FIELDS})),
    )
    return ChatExample(messages=messages, source="demo", line=line)


def generate_examples(n: int, seed: int = 0) -> list[ChatExample]:
    """``n`` examples with distinct (normalized) messages, the same for the same seed."""
    rng = random.Random(seed)
    examples: list[ChatExample] = []
    seen: set[str] = set()
    while len(examples) < n:
        text, labels = generate_example(rng)
        key = " ".join(text.casefold().split())
        if key not in seen:
            seen.add(key)
            examples.append(_example(text, labels, len(examples) + 1))
    return examples


def _write_jsonl(path: Path, examples: Sequence[ChatExample]) -> None:
    lines = (json.dumps({"messages": [m.to_dict() for m in ex.messages]}, ensure_ascii=False) for ex in examples)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write_demo(
    out_dir: Path | str, n_train: int = 1000, n_val: int = 100, n_test: int = 200, seed: int = 0
) -> DemoFiles:
    """Write ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (OpenAI chat) and ``dataset_spec.json``.

    No val or test message duplicates another split, exactly or nearly (checked with
    ``find_overlaps`` before anything is written). Same arguments, same bytes.
    """
    if min(n_train, n_val, n_test) < 1:
        raise ValueError("every split needs at least one example")
    out = Path(out_dir)
    # A little more than needed: splitting keeps near-duplicate groups together, and the
    # surplus is trimmed from train.
    pool = generate_examples(n_train + n_val + n_test + (n_train + n_val + n_test) // 10 + 10, seed)
    rest, test = split(pool, val_fraction=n_test / len(pool), seed=seed)
    train, val = split(rest, val_fraction=n_val / len(rest), seed=seed + 1)
    if len(test) != n_test or len(val) != n_val or len(train) < n_train:
        raise DataError(f"could not draw {n_train}/{n_val}/{n_test} distinct examples with seed {seed}")
    train = train[:n_train]
    find_overlaps(train, val, test).raise_if_above(0.0)

    out.mkdir(parents=True, exist_ok=True)
    files = DemoFiles(out / "train.jsonl", out / "val.jsonl", out / "test.jsonl", out / "dataset_spec.json")
    for path, examples in ((files.train, train), (files.val, val), (files.test, test)):
        _write_jsonl(path, examples)
    spec: dict[str, Any] = {
        "task": TASK,
        "description": "Triage a customer-support message into a JSON object of four labels.",
        "metric": METRIC,
        "fields": list(FIELDS),
        "labels": {key: list(values) for key, values in LABELS.items()},
        "system_prompt": SYSTEM_PROMPT,
        "generator": {"module": "training.demo", "seed": seed},
        "splits": {
            name: {"file": path.name, **file_fingerprint(path)}
            for name, path in (("train", files.train), ("val", files.val), ("test", files.test))
        },
    }
    files.spec.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    return files


def _first_json_object(text: str) -> dict[str, Any] | None:
    # Credit a model that wraps the object in prose or a code fence: take the first object.
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def score_json_fields(prediction: str, reference: str) -> float:
    """``json_field_accuracy`` of one answer: the share of the reference's fields the prediction matches.

    The first JSON object in the prediction counts; string values compare case- and
    space-insensitively; no object scores 0. A reference that is not a JSON object is a ``DataError``.
    """
    try:
        expected = json.loads(reference)
    except json.JSONDecodeError as exc:
        raise DataError(f"reference is not JSON: {exc.msg}") from None
    if not isinstance(expected, dict) or not expected:
        raise DataError("reference must be a non-empty JSON object")
    got = _first_json_object(prediction)
    if got is None:
        return 0.0

    def same(a: object, b: object) -> bool:
        if isinstance(a, str) and isinstance(b, str):
            return a.strip().casefold() == b.strip().casefold()
        return a == b

    return sum(key in got and same(got[key], value) for key, value in expected.items()) / len(expected)


# -- replay against forgetting -----------------------------------------------------------------------
# Trained on triage alone, the adapter answers everything with a triage object. Mixing in the base
# model's own answers to general requests (self-distillation) keeps it close to the base outside its task.
# These are not the probe's questions (training.probe): the probe asks facts; these ask for explanations,
# rewrites and small tasks, so the probe measures what carried over rather than what was rehearsed.
_REPLAY_TEMPLATES = (
    "Explain in one or two sentences what {thing} is.",
    "Give me two tips for {activity}.",
    "Write one friendly sentence to wish someone a happy {occasion}.",
    "What is a synonym for the word '{word}'?",
    "Describe {thing} to a child in one sentence.",
    "Suggest a name for a {pet}.",
)
_REPLAY_FILLERS: Mapping[str, tuple[str, ...]] = {
    "thing": ("a rainbow", "a volcano", "photosynthesis", "a library", "gravity", "a bicycle", "the internet",
              "a museum", "a thunderstorm", "a recipe", "an orchestra", "a glacier"),
    "activity": ("sleeping better", "learning a language", "running", "saving money", "studying", "cooking rice",
                 "gardening", "public speaking"),
    "occasion": ("birthday", "new year", "graduation", "retirement", "anniversary", "holiday"),
    "word": ("happy", "big", "fast", "smart", "cold", "quiet", "brave", "tired"),
    "pet": ("cat", "dog", "goldfish", "parrot", "rabbit", "hamster"),
}  # fmt: skip


def replay_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct general requests (fewer if the templates run out), the same for the same seed."""
    rng = random.Random(seed)
    prompts: list[str] = []
    for template in _REPLAY_TEMPLATES:
        key = template[template.index("{") + 1 : template.index("}")]
        prompts.extend(template.format(**{key: value}) for value in _REPLAY_FILLERS[key])
    rng.shuffle(prompts)
    return prompts[:n]


def write_replay(path: Path, answers: Sequence[tuple[str, str]]) -> None:
    """Write (prompt, the base model's answer) pairs as OpenAI chat JSONL."""
    examples = [
        ChatExample(messages=(Message("user", q), Message("assistant", a)), source="replay", line=i + 1)
        for i, (q, a) in enumerate(answers)
    ]
    _write_jsonl(path, examples)
