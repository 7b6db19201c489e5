"""A small general-knowledge probe: does an adapter still answer what its base model answered?

Task training can make a model forget (everything comes out as the task's JSON, say). The probe asks
short factual questions with no system prompt, to the base and to the adapter, and counts the answers
that contain an accepted word. The score itself says little about the base; the difference does.
"""

from __future__ import annotations

import re

# (question, accepted answers); an answer counts when one of them appears as a whole word.
QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("What is the capital of England?", ("London",)),
    ("What is the capital of Russia?", ("Moscow",)),
    ("What is the capital of Egypt?", ("Cairo",)),
    ("What is the capital of Canada?", ("Ottawa",)),
    ("What is the capital of Australia?", ("Canberra",)),
    ("What is the capital of China?", ("Beijing",)),
    ("What is the capital of Greece?", ("Athens",)),
    ("What is the capital of Portugal?", ("Lisbon",)),
    ("What is the capital of Ireland?", ("Dublin",)),
    ("What is the capital of Norway?", ("Oslo",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("What is the closest star to the Earth?", ("Sun",)),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("What is the longest river in Africa?", ("Nile",)),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("Who painted the Mona Lisa?", ("Leonardo", "Vinci")),
    ("Who developed the theory of relativity?", ("Einstein",)),
    ("Who was the first president of the United States?", ("Washington",)),
    ("What gas do plants absorb from the air for photosynthesis?", ("carbon dioxide", "CO2")),
    ("What gas do humans need to breathe to live?", ("oxygen",)),
    ("What is the chemical formula of water?", ("H2O",)),
    ("What is the chemical symbol for gold?", ("Au",)),
    ("What is the freezing point of water in degrees Celsius?", ("0", "zero")),
    ("What is the boiling point of water in degrees Celsius?", ("100",)),
    ("How many days are there in a week?", ("7", "seven")),
    ("How many hours are there in a day?", ("24", "twenty-four")),
    ("How many legs does a spider have?", ("8", "eight")),
    ("How many continents are there on Earth?", ("7", "seven")),
    ("How many sides does a triangle have?", ("3", "three")),
    ("How many minutes are in an hour?", ("60", "sixty")),
    ("What is 2 plus 2?", ("4", "four")),
    ("What is 10 times 10?", ("100",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What color are ripe bananas?", ("yellow",)),
    ("What do bees make?", ("honey",)),
    ("Which animal is known as the king of the jungle?", ("lion",)),
    ("What is the tallest animal in the world?", ("giraffe",)),
    ("What is the largest mammal in the world?", ("whale",)),
    ("Which organ pumps blood through the human body?", ("heart",)),
    ("What is the opposite of hot?", ("cold",)),
    ("What is the opposite of up?", ("down",)),
    ("What language is mainly spoken in Brazil?", ("Portuguese",)),
    ("What language is spoken in France?", ("French",)),
    ("What is the currency of Japan?", ("yen",)),
    ("What is the currency of the United Kingdom?", ("pound", "sterling")),
    ("What is frozen water called?", ("ice",)),
    ("In which season do leaves fall from the trees?", ("autumn", "fall")),
    ("What do you call a baby cat?", ("kitten",)),
    ("What do you call a baby dog?", ("puppy",)),
    ("Which is the smallest prime number?", ("2", "two")),
    ("How many players are on a soccer team on the field?", ("11", "eleven")),
    ("What instrument has 88 keys?", ("piano",)),
    ("What is the main ingredient of guacamole?", ("avocado",)),
    ("What is the hardest natural substance?", ("diamond",)),
)


def score_probe_answer(answer: str, accepted: tuple[str, ...]) -> float:
    """1.0 when one of the accepted answers appears in ``answer`` as a whole word (any case), else 0.0."""
    return float(any(re.search(rf"(?<!\w){re.escape(word)}(?!\w)", answer, re.IGNORECASE) for word in accepted))
