r"""`countdown`: reach a target from given numbers with + - * / and parentheses, each number at most once.

Problems are generated from a seed by building a solution first (so every problem is solvable): a
random subset of the numbers combined with whole-number intermediate results. The ground truth is
JSON, `{"numbers": [...], "target": T, "solution": "..."}` (one solution, not the only one).

The response's expression is the content of its last complete `\boxed{}` (`answers.last_boxed`),
else its last non-empty line. If it holds `=`, the expression is what precedes the first `=`, and
every part after it must be the target itself (`\boxed{(3+7)*2 = 20}`). The reward is 1 when the
expression is valid and its exact value equals the target, else 0. The expression is PARSED, never
evaluated as Python: integer literals, `+ - * /` (also `× · ÷ −`, `\times \cdot \div`),
parentheses and spaces; anything else (names, `_`, `.`, `**`, unary minus, decimals) is invalid.

Decisions:
- each literal must be one of the given numbers, each given number used at most once (a number
  given twice may be used twice); numbers may be left unused;
- arithmetic is exact (`fractions.Fraction`): non-integer intermediate results are allowed
  (`(1/3 + 2/3) * 5` is 5), as the value is still exact; division by zero is invalid;
- no unary minus: `-3 + 10` would make a number the problem does not give;
- bounded work: expressions over `MAX_EXPRESSION_CHARS` or nested deeper than `MAX_DEPTH`
  parentheses are invalid before any parsing, and a literal that is not a still-unused given
  number stops the parse at once, so at most len(numbers) values are ever combined.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction

import msgspec

from asyncpolicy.tasks.answers import canonical_number, last_boxed
from asyncpolicy.tasks.base import Example

MAX_EXPRESSION_CHARS = 300
MAX_DEPTH = 16
MAX_LITERAL_DIGITS = 30  # calculator literals (numbers=None): big enough for any count, small enough to stay cheap


class Level(msgspec.Struct, frozen=True, kw_only=True):
    """One difficulty: how many numbers, how large, how many the solution uses, which operations."""

    count: int
    max_number: int
    min_used: int
    max_target: int
    ops: str


LEVELS: dict[int, Level] = {
    1: Level(count=3, max_number=10, min_used=2, max_target=50, ops="+-*"),
    2: Level(count=3, max_number=20, min_used=2, max_target=100, ops="+-*/"),
    3: Level(count=4, max_number=25, min_used=3, max_target=100, ops="+-*/"),
    4: Level(count=4, max_number=50, min_used=4, max_target=200, ops="+-*/"),
    5: Level(count=5, max_number=100, min_used=4, max_target=999, ops="+-*/"),
}


class InvalidExpression(ValueError):
    """The text is not a valid Countdown expression for the given numbers."""


_SYNONYMS = (
    (r"\times", "*"), (r"\cdot", "*"), (r"\div", "/"), (r"\left", ""), (r"\right", ""),
    ("×", "*"), ("·", "*"), ("÷", "/"), ("−", "-"), ("–", "-"), ("$", ""),
)  # fmt: skip
_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()]))")
_RESULT = re.compile(r"\s*\d+(?:\.0*)?\s*")  # what may follow "=": the target, as a plain number


def _tokens(expression: str) -> list[str]:
    for old, new in _SYNONYMS:
        expression = expression.replace(old, new)
    out: list[str] = []
    pos = 0
    expression = expression.rstrip()
    while pos < len(expression):
        match = _TOKEN.match(expression, pos)
        if match is None:
            raise InvalidExpression(f"unexpected {expression[pos:].lstrip()[:10]!r}")
        out.append(match.group(1) or match.group(2))
        pos = match.end()
    return out


class _Parser:
    """expr := term (('+'|'-') term)*;  term := factor (('*'|'/') factor)*;  factor := NUMBER | '(' expr ')'."""

    def __init__(self, tokens: list[str], numbers: Sequence[int] | None) -> None:
        self.tokens = tokens
        self.pos = 0
        self.unused = Counter(numbers) if numbers is not None else None  # None: any literal (the calculator)

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise InvalidExpression("the expression ends too early")
        self.pos += 1
        return token

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            right = self.term(depth)
            value = value + right if op == "+" else value - right
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            right = self.factor(depth)
            if op == "*":
                value *= right
            elif right == 0:
                raise InvalidExpression("division by zero")
            else:
                value /= right
        return value

    def factor(self, depth: int) -> Fraction:
        token = self.take()
        if token == "(":
            if depth >= MAX_DEPTH:
                raise InvalidExpression(f"parentheses nested deeper than {MAX_DEPTH}")
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise InvalidExpression("unbalanced parentheses")
            return value
        if not token.isdigit():
            raise InvalidExpression(f"expected a number, got {token!r}")
        if self.unused is None:
            if len(token) > MAX_LITERAL_DIGITS:
                raise InvalidExpression(f"a number longer than {MAX_LITERAL_DIGITS} digits")
            return Fraction(int(token))
        number = int(token)
        if self.unused[number] <= 0:
            raise InvalidExpression(f"{number} is not given or is used more than once")
        self.unused[number] -= 1
        return Fraction(number)


def evaluate(expression: str, numbers: Sequence[int] | None) -> Fraction:
    """Exact value of a Countdown expression over `numbers`; InvalidExpression if it breaks a rule.

    `numbers=None` takes any integer literals (up to `MAX_LITERAL_DIGITS` digits each): the `calc`
    environment's calculator, the same grammar and limits."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise InvalidExpression(f"longer than {MAX_EXPRESSION_CHARS} characters")
    parser = _Parser(_tokens(expression), numbers)
    if not parser.tokens:
        raise InvalidExpression("empty expression")
    value = parser.expr(0)
    if parser.peek() is not None:
        raise InvalidExpression(f"unexpected {parser.peek()!r}")
    return value


def response_expression(response: str) -> str:
    """The expression a response commits to: its last box, else its last non-empty line."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    lines = [line for line in response.splitlines() if line.strip()]
    return lines[-1].strip().rstrip(".") if lines else ""


def reward(prompt: str, response: str, ground_truth: str) -> float:
    """1.0 when the response's expression is valid and equals the target exactly, else 0.0."""
    problem = json.loads(ground_truth)
    target = Fraction(problem["target"])
    expression, *results = response_expression(response).split("=")
    if any(_RESULT.fullmatch(r) is None or canonical_number(r.strip()) != str(target) for r in results):
        return 0.0
    try:
        return float(evaluate(expression, problem["numbers"]) == target)
    except InvalidExpression:
        return 0.0


def _solution(rng: random.Random, numbers: list[int], level: Level) -> tuple[int, str] | None:
    """A random expression over a subset of `numbers` with whole, positive intermediate results."""
    used = rng.sample(numbers, rng.randint(level.min_used, level.count))
    parts = [(n, str(n)) for n in used]
    while len(parts) > 1:
        (a, ea), (b, eb) = parts.pop(rng.randrange(len(parts))), parts.pop(rng.randrange(len(parts)))
        op = rng.choice(level.ops)
        if op == "-" and a < b:
            (a, ea), (b, eb) = (b, eb), (a, ea)
        if op == "/" and (b in (0, 1) or a % b):
            return None
        if op == "-" and a == b:
            return None
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
        parts.append((value, f"({ea} {op} {eb})" if len(parts) else f"{ea} {op} {eb}"))
    return parts[0]


def make_problem(rng: random.Random, difficulty: int) -> Example:
    """One seeded, solvable problem of `difficulty` (a key of LEVELS)."""
    level = LEVELS[difficulty]
    for _ in range(10_000):  # a few tries suffice: most random solutions land in range
        numbers = rng.sample(range(1, level.max_number + 1), level.count)
        found = _solution(rng, numbers, level)
        if found is None:
            continue
        target, solution = found
        if 1 <= target <= level.max_target and target not in numbers:
            break
    else:
        raise RuntimeError(f"countdown level {difficulty}: no problem in range after 10000 tries")
    listed = ", ".join(map(str, numbers))
    task = (
        f"Using the numbers {listed}, write an arithmetic expression that equals {target}. "
        "You may use +, -, *, / and parentheses, and each number at most once."
    )
    return Example(
        prompt=f"Question: {task} Answer with the expression.\nAnswer:",
        instruction=f"{task}\nPlease reason step by step, and put the final expression within \\boxed{{}}, "
        "for example \\boxed{(1 + 2) * 3}.",
        answer=json.dumps({"numbers": numbers, "target": target, "solution": solution}),
        key=f"{sorted(numbers)} {target}",
    )


def generator(difficulty: int) -> Callable[[random.Random], Example]:
    return lambda rng: make_problem(rng, difficulty)
