"""The verifiable task: multi-step integer arithmetic with a short worked answer.

Problem: three one-digit operands (1-9) and two operators from {+, -, *}, e.g. ``3+4*2``
(every prompt has the same length: 5 characters; 6,561 distinct problems). The canonical
worked answer evaluates the products first (left to right), then the sums/differences left to
right, one step per ``;``-separated item, and ends with ``#`` and the value::

    3+4*2  ->  4*2=8;3+8=11;#11

The checker is exact: a response is accepted iff it ends with ``#<int>`` and the int equals the
true value (Python's precedence). It does not look at the work.

The graded quality score of an accepted response (0 < q <= 1) rewards short, correct work:
``q = valid_step_fraction * min(1, len(canonical) / len(response))``; an answer with no work at
all (``#11``) gets 0.2 (a guess that happened to be right).

The broad, mixed-quality corpus that trains the reference policy q_ref mixes five styles, each
example written in one of them (the weights are STYLE_MIX):
- careful:  the canonical worked answer (correct);
- verbose:  the canonical steps, each followed by a rewrite of the remaining expression
            (correct, longer: lower quality);
- shortcut: the final answer only, ``#11`` (correct in the corpus, but a small model must then
            do the whole computation in one token: it is mostly wrong when it tries);
- ltr:      evaluates left to right, ignoring precedence (usually wrong);
- slip:     the canonical steps with one arithmetic slip carried through (wrong).
"""

from __future__ import annotations

import random
import re

OPS = "+-*"
STYLE_MIX = {"careful": 0.30, "verbose": 0.10, "shortcut": 0.30, "ltr": 0.15, "slip": 0.15}
# the teacher's "better data" (teacher.py): correct worked answers only, mostly the short form
TEACHER_MIX = {"careful": 0.85, "verbose": 0.15}
_STEP = re.compile(r"^(-?\d+)([+\-*])(-?\d+)=(-?\d+)$")


N_OPERANDS = 3


def random_problem(rng: random.Random) -> str:
    nums = [rng.randint(1, 9) for _ in range(N_OPERANDS)]
    ops = [rng.choice(OPS) for _ in range(N_OPERANDS - 1)]
    return "".join(f"{n}{o}" for n, o in zip(nums, ops)) + str(nums[-1])


def parse(problem: str) -> tuple[list[int], list[str]]:
    return [int(c) for c in problem[0::2]], list(problem[1::2])


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def true_value(problem: str) -> int:
    return eval(problem)  # noqa: S307  (digits and +-* only; checked by parse/generator)


def _expr(nums, ops) -> str:
    return "".join(f"{n}{o}" for n, o in zip(nums, ops)) + str(nums[-1])


def canonical_steps(problem: str, slip_at: int | None = None, slip: int = 0,
                    verbose: bool = False) -> list[str]:
    """Products first, then left to right. `slip_at`: index of the step whose result is off by
    `slip` (carried through). `verbose`: after each step, the remaining expression."""
    nums, ops = parse(problem)
    steps, k = [], 0
    for phase in ("*", "+-"):
        i = 0
        while i < len(ops):
            if ops[i] in phase:
                r = _apply(nums[i], ops[i], nums[i + 1])
                if k == slip_at:
                    r += slip
                steps.append(f"{nums[i]}{ops[i]}{nums[i + 1]}={r}")
                nums[i:i + 2] = [r]
                del ops[i]
                k += 1
                if verbose and ops:
                    steps.append(_expr(nums, ops))
            else:
                i += 1
    return steps


def ltr_steps(problem: str) -> list[str]:
    nums, ops = parse(problem)
    acc, steps = nums[0], []
    for op, n in zip(ops, nums[1:]):
        r = _apply(acc, op, n)
        steps.append(f"{acc}{op}{n}={r}")
        acc = r
    return steps


def _final(steps: list[str]) -> int:
    return int(steps[-1].split("=")[-1])


def canonical_answer(problem: str) -> str:
    steps = canonical_steps(problem)
    return ";".join(steps) + f";#{_final(steps)}"


def write_answer(problem: str, style: str, rng: random.Random) -> str:
    if style == "careful":
        return canonical_answer(problem)
    if style == "verbose":
        steps = canonical_steps(problem, verbose=True)
        return ";".join(steps) + f";#{true_value(problem)}"
    if style == "shortcut":
        return f"#{true_value(problem)}"
    if style == "ltr":
        steps = ltr_steps(problem)
        return ";".join(steps) + f";#{_final(steps)}"
    if style == "slip":
        steps = canonical_steps(problem, slip_at=rng.randint(0, N_OPERANDS - 2),
                                slip=rng.choice([-3, -2, -1, 1, 2, 3]))
        return ";".join(steps) + f";#{_final(steps)}"
    raise ValueError(style)


def corpus(n: int, rng: random.Random, exclude: set[str] = frozenset(),
           pool: list[str] | None = None, mix: dict[str, float] | None = None) -> list[dict]:
    """The broad, mixed-quality corpus for q_ref (prompt/response/style rows); problems drawn
    uniformly (or from `pool`), never from `exclude`. `mix`: style weights (default
    STYLE_MIX)."""
    styles, weights = zip(*(mix or STYLE_MIX).items())
    rows = []
    while len(rows) < n:
        p = rng.choice(pool) if pool else random_problem(rng)
        if p in exclude:
            continue
        s = rng.choices(styles, weights)[0]
        rows.append({"prompt": p, "response": write_answer(p, s, rng), "style": s})
    return rows


# ------------------------------------------------------------------------------ checking
def final_answer(response: str) -> int | None:
    m = re.search(r"#(-?\d+)$", response)
    return int(m.group(1)) if m else None


def check(problem: str, response: str) -> bool:
    """The exact checker: the final answer equals the true value."""
    a = final_answer(response)
    return a is not None and a == true_value(problem)


def style_of(response: str) -> str:
    """Coarse style of a sampled response (diagnostics only)."""
    return "shortcut" if response.startswith("#") else "worked"


def quality(problem: str, response: str) -> float:
    """Graded quality of an *accepted* response, in (0, 1]."""
    body = response.rsplit("#", 1)[0].rstrip(";")
    if not body:
        return 0.2
    items = body.split(";")
    arith = [m for m in (_STEP.match(s) for s in items) if m]
    if not arith:
        return 0.2
    valid = sum(_apply(int(a), op, int(b)) == int(c) for a, op, b, c in
                (m.groups() for m in arith)) / len(items)
    return round(max(0.05, valid * min(1.0, len(canonical_answer(problem)) / len(response))), 4)
