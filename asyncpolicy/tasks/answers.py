r"""The final answer of a response, and the reward of a numeric answer (arith, gsm8k).

The rule, one for every numeric task:

1. If the response holds a complete `\boxed{...}` (or `\fbox{...}`; braces inside may nest), the
   answer is taken from the box that closes LAST, and from it alone: the last number inside it.
   A box with no number in it (`\boxed{}`, `\boxed{x}`) is an answer of no number: reward 0,
   however many numbers the text around it holds. An unclosed `\boxed{` (a truncated response)
   is not a box.
2. Without a complete box, the answer is the last number of the whole response.

So the last answer wins (`\boxed{17} ... \boxed{18}` is 18), and a box beats loose numbers after it.

A number is digits with optional thousands commas (`1,234`) and decimals (`72.50`), and a sign:
`-` or `−` (U+2212) is a sign only where it does not follow a letter, digit, `.` or closing
bracket (`12-5` is 12 and 5, `= -5` is -5). `$`, `%`, units and LaTeX around the digits are
ignored. Numbers compare by their canonical decimal text: commas, a `+` sign, leading zeros and
trailing fractional zeros dropped (`1,234.0` = `1234`, `-0` = `0`), exactly, at any length (no
float, no int conversion: a 10,000-digit number costs linear time, never an error).

The gold answer is the first number after the last `####` when there is one (GSM8K's format,
`... #### 72`), else the first number of the ground truth. Every scan is one linear pass, so
any response length costs bounded time and no recursion.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"(?:(?<![\w.)\]}])[-−])?(?<![\d.])(?:\d+(?:,\d{3}(?!\d))*(?:\.\d+)?|\.\d+)")
_BRACES = re.compile(r"\\(?:boxed|fbox)\s*\{|[{}]")


def canonical_number(match: str) -> str:
    """`-1,234.50` → `-1234.5`; `+007` → `7`; `-0.0` → `0`: one text per value."""
    text = match.replace(",", "").replace("−", "-")
    negative = text.startswith("-")
    whole, _, fraction = text.lstrip("+-").partition(".")
    whole = whole.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    number = f"{whole}.{fraction}" if fraction else whole
    return f"-{number}" if negative and number != "0" else number


def numbers(text: str) -> list[str]:
    """Every number of `text`, canonical, in order."""
    return [canonical_number(m) for m in _NUMBER.findall(text)]


def last_number(text: str) -> str | None:
    found = numbers(text)
    return found[-1] if found else None


def last_boxed(text: str) -> str | None:
    r"""Content of the `\boxed{...}` that closes last; None if no box is complete.

    One pass with a stack of open braces, each remembering whether it opened a box: linear in the
    text, whatever the nesting or however many unbalanced braces.
    """
    opened: list[int | None] = []  # per open brace: where its box content starts, None for a plain brace
    span: tuple[int, int] | None = None  # sliced once at the end: slicing every nested box would be quadratic
    for match in _BRACES.finditer(text):
        token = match.group()
        if token == "}":
            if opened:
                start = opened.pop()
                if start is not None:
                    span = (start, match.start())
        elif token == "{":
            opened.append(None)
        else:
            opened.append(match.end())
    return text[span[0] : span[1]] if span is not None else None


def extract_answer(response: str) -> str | None:
    """The response's final answer as a canonical number, by the module's rule; None = no answer."""
    boxed = last_boxed(response)
    return last_number(boxed if boxed is not None else response)


def gold_answer(ground_truth: str) -> str | None:
    """The gold number: the first after the last `####` (GSM8K), else the first of the text."""
    _, sep, after = ground_truth.rpartition("####")
    found = numbers(after if sep else ground_truth)
    return found[0] if found else None


def number_reward(prompt: str, response: str, ground_truth: str) -> float:
    """1.0 when the response's final answer equals the gold number exactly, else 0.0.

    The reward of the `arith` and `gsm8k` tasks; as `task.reward_fn=asyncpolicy.tasks.answers:number_reward`
    it scores any data whose ground truth is a number or a GSM8K answer (`... #### 72`).
    """
    gold = gold_answer(ground_truth)
    return float(gold is not None and extract_answer(response) == gold)
