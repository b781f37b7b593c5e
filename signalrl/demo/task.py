"""The demo's synthetic task: prompts, responses, preference pairs and the task score.

A prompt is three letters and ``>`` (``"kqe>"``); a response is a short string over ``abcd``. The *task score*
of a response is the number of ``a`` characters divided by max(length, 8): a response of at least 8
characters, all ``a``, scores 1; the supervised data (:func:`sft_response`) scores ≈ 0.25.
"""
from __future__ import annotations

import random

ALPHABET = "abcd"
TARGET = "a"
PROMPT_LETTERS = "efghijklmnopqrstuvwxyz"
MIN_SCORED_LENGTH = 8


def task_score(text: str) -> float:
    """Number of ``a`` in ``text`` divided by max(len(text), 8)."""
    return text.count(TARGET) / max(len(text), MIN_SCORED_LENGTH)


def make_prompt(rng: random.Random) -> str:
    return "".join(rng.choice(PROMPT_LETTERS) for _ in range(3)) + ">"


def sft_response(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(6, 10)))


def varied_response(rng: random.Random) -> str:
    """Responses over the whole range of task scores (and lengths), for the preference pairs."""
    p = rng.random()
    n = rng.choice([rng.randint(1, 5), rng.randint(6, 12), rng.randint(6, 12)])
    return "".join(TARGET if rng.random() < p else rng.choice(ALPHABET[1:]) for _ in range(n))


def preference_pair(rng: random.Random) -> dict[str, str]:
    while True:
        a, b = varied_response(rng), varied_response(rng)
        sa, sb = task_score(a), task_score(b)
        if abs(sa - sb) >= 0.1:
            chosen, rejected = (a, b) if sa > sb else (b, a)
            return {"prompt": make_prompt(rng), "chosen": chosen, "rejected": rejected}
