r"""`calc`: the `arith` word problems with a calculator tool, for chat models (task.name=calc).

The call format, told to the model in its prompt (`INSTRUCTION`): `<calc>expression</calc>`. The text
between the first complete `<calc>` ... `</calc>` pair of a turn is parsed by the Countdown parser
(`tasks/countdown.evaluate` with any integer literals: `+ - * /`, parentheses, exact Fractions;
never `eval`) and its value is the observation, a message of role "tool" (`12*7 = 84`). A bad
expression or a division by zero is an observation too (`error: division by zero`): the model
may try again; it is not the environment failing. Text around a call is ignored, and an unclosed
`<calc>` (a truncated turn) is no call.

A turn without a call is the final answer: it ends the episode and the arith reward
(`answers.number_reward`: the last `\boxed{}` number, else the last number) scores it. An
episode that still calls at its last turn (`task.max_turns`) scores 0.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from asyncpolicy.envs.protocol import Step
from asyncpolicy.samples import Prompt
from asyncpolicy.tasks import arith
from asyncpolicy.tasks.answers import number_reward
from asyncpolicy.tasks.base import Example
from asyncpolicy.tasks.countdown import InvalidExpression, evaluate

OPEN, CLOSE = "<calc>", "</calc>"
# Says how to call without a worked example and without naming the tags in a phrase: SmolLM2-135M-Instruct
# copies an example's arithmetic (`12*7 = 80`) into its answers and writes out "between <calc> and
# </calc>" as if it were a call. Greedy on 32 held-out problems this phrasing scored 7/32 (arith's
# instruction alone 9/32; two phrasings with an example 0/32 and 2/32): benchmarks/RESULTS.md.
INSTRUCTION = f"If you need to, compute with the calculator tool: {OPEN}expression{CLOSE}. {arith.INSTRUCTION}"


def find_call(text: str) -> str | None:
    """The expression of the first complete call in `text`, None when there is none (one linear scan)."""
    start = text.find(OPEN)
    if start < 0:
        return None
    end = text.find(CLOSE, start + len(OPEN))
    return text[start + len(OPEN) : end] if end >= 0 else None


def calculate(expression: str) -> str:
    """What the calculator answers: `expr = value` (a fraction as `a/b`), or `error: why`."""
    try:
        value = evaluate(expression, None)
    except InvalidExpression as e:
        return f"error: {e}"
    return f"{expression.strip()} = {value}"


class Calculator:
    """One `calc` episode: answers calls until a turn without one, then scores that turn."""

    def __init__(self) -> None:
        self.ground_truth = ""
        self.prompt_text = ""

    def reset(self, prompt: Prompt) -> None:
        self.ground_truth, self.prompt_text = prompt.ground_truth, prompt.text

    def step(self, model_text: str) -> Step:
        expression = find_call(model_text)
        if expression is None:
            return Step(done=True, reward=number_reward(self.prompt_text, model_text, self.ground_truth))
        return Step(observation=calculate(expression), role="tool", tool_call=True)


def with_calculator(example: Example) -> Example:
    """An arith problem whose instruction offers the calculator (the plain prompt is arith's)."""
    question = example.instruction.removesuffix(arith.INSTRUCTION).rstrip()
    return Example(prompt=example.prompt, instruction=f"{question}\n{INSTRUCTION}", answer=example.answer, key=example.key)


def generator(difficulty: int) -> Callable[[random.Random], Example]:
    make = arith.generator(difficulty)
    return lambda rng: with_calculator(make(rng))
