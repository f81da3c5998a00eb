"""The verifiable task: one-step arithmetic word problems that SmolLM2-135M-Instruct half-solves.

A problem is a sentence like "Mia has 7 coins and gets 5 more. How many coins does Mia have
now?" (addition of two numbers in 2..9) or "... has 14 coins and gives away 6. How many coins
are left?" (subtraction, minuend 5..19). The prompt is the chat template with a short system
message that fixes the answer format; the checker is exact: the FIRST "The answer is N" in the
response must carry the true value. Generation stops right after that sentence (`stop_at`),
so a response is a short worked line ending in "The answer is N." Everything is made here,
offline, from a fixed seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

SYSTEM = 'Solve the problem. End with "The answer is N." where N is the number.'
# One worked example as an earlier chat turn. The 135M model follows it far better than a
# format described in words (greedy answer-format rate measured 0.98, vs 0.15 for the format
# in words and 0.9 for the example inside the user message, whose samples at T = 1 were also
# right 3x less often). The example's assistant turn carries "weight": 0, so the trainer
# treats it as context, not as a target (iwsft_kernels/trainer/data.py).
EXAMPLE = ("Kim has 4 cups and gets 3 more. How many cups does Kim have now?",
           "Kim has 4 + 3 = 7 cups. The answer is 7.")
NAMES = ["Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Leo", "Zoe"]
ITEMS = ["apples", "marbles", "books", "stickers", "coins", "pencils", "cards", "shells"]
ANSWER = re.compile(r"The answer is (-?\d+)")
# a complete answer sentence: the number followed by something that is not a digit
STOP = re.compile(r"The answer is -?\d+(\.|[^\d.])")


@dataclass(frozen=True)
class Problem:
    text: str
    answer: int
    op: str  # "+" or "-"


def make_problem(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if rng.random() < 0.5:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return Problem(f"{name} has {a} {item} and gets {b} more. How many {item} does {name} "
                       f"have now?", a + b, "+")
    a = rng.randint(5, 19)
    b = rng.randint(2, a - 1)
    return Problem(f"{name} has {a} {item} and gives away {b}. How many {item} does {name} "
                   f"have left?", a - b, "-")


def splits(seed: int, n_test: int, n_train: int) -> tuple[list[Problem], list[Problem]]:
    """Disjoint test and training problems (distinct texts), drawn from one seeded stream."""
    if n_test < 0 or n_train < 0:
        raise ValueError(f"n_test and n_train must be >= 0, got {n_test}, {n_train}")
    rng, seen, out = random.Random(seed), set(), []
    limit = 100 * (n_test + n_train) + 1000
    while len(out) < n_test + n_train:
        limit -= 1
        if limit < 0:
            raise ValueError(f"cannot draw {n_test + n_train} distinct problems")
        p = make_problem(rng)
        if p.text not in seen:
            seen.add(p.text)
            out.append(p)
    return out[:n_test], out[n_test:]


def messages(p: Problem) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": EXAMPLE[0]},
            {"role": "assistant", "content": EXAMPLE[1], "weight": 0},
            {"role": "user", "content": p.text}]


def cut(response: str) -> str:
    """The response up to its first complete answer sentence (what generation keeps)."""
    m = STOP.search(response)
    if m is None:
        return response
    return response[: m.end()] if m.group(1) == "." else response[: m.start(1)]


def parse(response: str) -> int | None:
    m = ANSWER.search(response)
    return int(m.group(1)) if m else None


def check(p: Problem, response: str) -> bool:
    return parse(response) == p.answer
