r"""`gsm8k`: the user's GSM8K-format files (`{"question": ..., "answer": "... #### 72"}`), scored by number.

Rows load through the data-file path (`data.train_files`, `data.val_files`; JSONL or Parquet). The
question gets the same `\boxed{}` instruction as `arith`; the gold answer is the number after the
last `####` (commas stripped, `answers.gold_answer`), checked at load: a row without one is bad
input naming its file and line. The reward is `answers.number_reward`.
"""

from __future__ import annotations

from asyncpolicy.tasks.answers import gold_answer
from asyncpolicy.tasks.arith import BOX_INSTRUCTION
from asyncpolicy.tasks.base import Example

PROMPT_COLUMN, ANSWER_COLUMN = "question", "answer"


def example(question: str, answer: str) -> Example:
    """The row as a problem; ValueError saying what is wrong when its answer holds no gold number."""
    gold = gold_answer(answer)
    if gold is None:
        raise ValueError(f"answer {answer[-60:]!r} has no number (GSM8K's format ends '#### <number>')")
    return Example(
        prompt=f"Question: {question}\nAnswer:", instruction=f"{question}\n{BOX_INSTRUCTION}", answer=gold
    )
