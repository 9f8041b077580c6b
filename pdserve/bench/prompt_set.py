"""The fixed prompt set of the parity tests, the dtype-agreement report and the codec reports."""

from __future__ import annotations

CHAT_MESSAGES = [{"role": "user", "content": "What are three tips for staying healthy?"}]

TEXT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "Translate to French: I love programming.\nFrench:",
    "日本の首都は",
    "1, 2, 3, 4, 5,",
    "<html>\n<head>\n<title>",
    "Q: What is 17 times 3?\nA:",
    "I feel 😊 today because",
]


def long_prompt(min_words: int = 1300) -> str:
    """A deterministic prose prompt of well over 1,500 tokens."""
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "silver"]
    animals = ["fox", "heron", "badger", "otter", "lynx", "sparrow", "tortoise", "salmon"]
    places = ["river", "meadow", "forest", "harbour", "valley", "orchard"]
    sentences: list[str] = []
    index = 0
    while sum(len(s.split()) for s in sentences) < min_words:
        sentences.append(
            f"On day {index}, the {colors[index % 7]} {animals[index % 8]} walked to the "
            f"{places[index % 6]} and counted {index * 7 % 23} stones before sunset."
        )
        index += 1
    return " ".join(sentences) + " In summary, the animals"
