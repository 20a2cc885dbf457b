r"""`gsm8k`: the user's GSM8K-format files (`{"question": ..., "answer": "... #### 72"}`), scored by number.

Rows load through the data-file path (`data.train_files`, `data.val_files`; JSONL or Parquet). The
question asks for step-by-step reasoning and the answer in `\boxed{}` (`BOX_INSTRUCTION`: GSM8K's
problems need the steps, unlike `arith`'s short ones); the gold answer is the number after the
last `####` (commas stripped, `answers.gold_answer`), checked at load: a row without one is bad
input naming its file and line. The reward is `answers.number_reward`.
"""

from __future__ import annotations

from asyncpolicy.tasks.answers import gold_answer
from asyncpolicy.tasks.base import Example

PROMPT_COLUMN, ANSWER_COLUMN = "question", "answer"
BOX_INSTRUCTION = r"Please reason step by step, and put your final answer within \boxed{}."


def example(question: str, answer: str) -> Example:
    """The row as a problem; ValueError saying what is wrong when its answer holds no gold number."""
    gold = gold_answer(answer)
    if gold is None:
        raise ValueError(f"answer {answer[-60:]!r} has no number (GSM8K's format ends '#### <number>')")
    return Example(
        prompt=f"Question: {question}\nAnswer:", instruction=f"{question}\n{BOX_INSTRUCTION}", answer=gold
    )
