"""The token rule (envs/tokens.py): an observation adds exactly the tokens its rendering adds, the
model's tokens are never re-encoded, and a template that is not append-only is refused."""

from __future__ import annotations

import copy
import threading
from typing import Any

import pytest

from asyncpolicy.envs.tokens import ON_LOOP_CHARS, ObservationTokens, TemplateNotAppendOnly
from asyncpolicy.models import tiny
from asyncpolicy.models.cache import model_cache
from asyncpolicy.tasks.base import ChatMessage
from asyncpolicy.tasks.loading import encode_prompt


def _smollm2_tokenizer() -> Any:
    """The tokenizer of SmolLM2-135M-Instruct when the model cache already holds it (never built here)."""
    found = sorted(model_cache().glob("smollm2-135m-instruct-*/tokenizer.json"))
    if not found:
        pytest.skip(f"SmolLM2-135M-Instruct is not materialised under {model_cache()} (python -m asyncpolicy run model.path=smollm2-135m-instruct)")
    return tiny.load_tokenizer(str(found[-1].parent))


@pytest.fixture(scope="module")
def smollm2() -> Any:
    return _smollm2_tokenizer()


def test_embedded_tokenizer_appends_the_observation_text_encoded_plainly() -> None:
    tok = tiny.build_tokenizer()
    rule = ObservationTokens(tok)
    assert not rule.chat
    turn = tok("5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    added = rule.append([ChatMessage("user", "?"), ChatMessage("assistant", "5")], turn, ChatMessage("user", "+"))
    assert added == tok("+", add_special_tokens=False)["input_ids"]
    assert tok.decode(added) == "+" and tok.bos_token_id not in added


def test_smollm2_suffix_is_the_rendering_difference_and_the_models_tokens_stay(smollm2: Any) -> None:
    tok = smollm2
    rule = ObservationTokens(tok)
    prompt = encode_prompt(tok, "What is 6*7? Use the calculator.")
    # the model's turn as sampled, ending at its stop token <|im_end|> (id 2), with a tokenisation the
    # text's own encoding would NOT give: "calc" spelled as single characters
    sampled = [tok.convert_tokens_to_ids(c) for c in "calc"] + tok(" 6*7", add_special_tokens=False)["input_ids"] + [2]
    assert tok("calc 6*7", add_special_tokens=False)["input_ids"] != sampled[:-1]  # re-encoding would change them
    text = tok.decode(sampled, skip_special_tokens=True)
    conversation = [ChatMessage("user", "What is 6*7? Use the calculator."), ChatMessage("assistant", text)]
    added = rule.append(conversation, sampled, ChatMessage("tool", "42"))
    context = prompt + sampled + added
    # the whole context renders as the template renders the conversation with the observation
    rendered = tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in [*conversation, ChatMessage("tool", "42")]],
        tokenize=False, add_generation_prompt=True,
    )
    assert tok.decode(context) == rendered
    assert context[len(prompt) : len(prompt) + len(sampled)] == sampled  # the model's ids, untouched
    assert tok.decode(added) == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"  # <|im_end|> was the model's


def test_smollm2_turn_cut_by_the_token_limit_is_closed_by_the_template(smollm2: Any) -> None:
    tok = smollm2
    rule = ObservationTokens(tok)
    sampled = tok("calc 6*", add_special_tokens=False)["input_ids"]  # finish "length": no <|im_end|>
    conversation = [ChatMessage("user", "q"), ChatMessage("assistant", "calc 6*")]
    added = rule.append(conversation, sampled, ChatMessage("user", "bad call"))
    assert tok.decode(added) == "<|im_end|>\n<|im_start|>user\nbad call<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_that_rewrites_earlier_turns_is_refused(smollm2: Any) -> None:
    tok = copy.deepcopy(smollm2)
    # like Qwen3's: an assistant turn's think block is stripped once a later message follows it
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}"
        "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    rule = ObservationTokens(tok)  # append-only on a turn without a think block
    sampled = tok("<think>hm</think>12", add_special_tokens=False)["input_ids"] + [2]
    conversation = [ChatMessage("user", "q"), ChatMessage("assistant", "<think>hm</think>12")]
    with pytest.raises(TemplateNotAppendOnly, match="renders the earlier turns differently"):
        rule.append(conversation, sampled, ChatMessage("user", "higher"))


def test_a_template_that_changes_the_assistants_text_is_refused_at_once(smollm2: Any) -> None:
    tok = copy.deepcopy(smollm2)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | lower }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(TemplateNotAppendOnly, match="assistant turn's text"):
        ObservationTokens(tok)



class _ThreadRecording:
    """The embedded tokenizer, recording the thread of every encode (and render), with an optional ChatML template."""

    def __init__(self, chat_template: str | None = None) -> None:
        self.inner = tiny.build_tokenizer()
        self.chat_template = chat_template
        self.threads: list[int] = []

    def __call__(self, text: str, **kw: Any) -> Any:
        self.threads.append(threading.get_ident())
        return self.inner(text, **kw)

    def apply_chat_template(self, chat: list[dict[str, str]], **kw: Any) -> Any:
        self.threads.append(threading.get_ident())
        return self.inner.apply_chat_template(chat, chat_template=self.chat_template, **kw)


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.anyio
@pytest.mark.parametrize("template", [None, CHATML], ids=["plain", "chatml"])
async def test_the_rule_runs_on_the_loop_only_when_cheap_and_gives_the_same_ids_either_way(template: str | None) -> None:
    tok = _ThreadRecording(template)
    rule = ObservationTokens(tok)
    loop = threading.get_ident()
    conversation = [ChatMessage("user", "?"), ChatMessage("assistant", "5")]
    turn = tok.inner("5", add_special_tokens=False)["input_ids"]
    for text in ("+", "x" * (ON_LOOP_CHARS + 1)):
        tok.threads.clear()
        ids = await rule.append_ids(conversation, turn, ChatMessage("user", text))
        on_loop = template is None and len(text) <= ON_LOOP_CHARS
        assert rule.on_loop(text) is on_loop
        assert tok.threads and all((t == loop) is on_loop for t in tok.threads), (text[:5], on_loop)
        assert ids == rule.append(conversation, turn, ChatMessage("user", text))
        tok.threads.clear()
        assert await rule.opening_ids(text) == rule.opening(text)
        assert tok.threads[0] == loop if on_loop else tok.threads[0] != loop
