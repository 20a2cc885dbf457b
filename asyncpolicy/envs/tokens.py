"""The token rule: which token ids an observation adds to an episode. The one place it is decided.

The runtime owns an episode's token ids: the model's tokens are kept exactly as sampled and never
decoded and encoded again (re-tokenising drifts: the trainer would score tokens the engine never
sampled). An observation is appended as the tokens its chat-template rendering ADDS:

    render(conversation + [observation], with the assistant's header) minus render(conversation)

taken as a suffix of the text, then tokenised on its own (it starts at a special token or a
newline, so it tokenises the same alone as in the whole). Before it come the tokens the template
closes an assistant turn with (`<|im_end|>\\n` in ChatML) that the model did not sample itself
(it stops at `<|im_end|>`; the newline is the template's). A template that renders the earlier
turns differently once a message is added (one that strips think blocks from past turns, say) is
refused with `TemplateNotAppendOnly`: the model would have been trained on a context it never
saw. A tokenizer without a chat template (the embedded model) appends the observation's text,
encoded plainly.

Episodes call the rule through `opening_ids` / `append_ids`, which run it in a worker thread
unless it is cheap: a tokenizer without a chat template and a text of at most `ON_LOOP_CHARS`
characters is encoded on the event loop. The thread hop costs the loop more than that encoding
(~100 µs of loop time and a GIL hand-over each way, twice an episode-turn, vs 5-80 µs to encode
20 characters), and a tokenizer's encode holds the GIL, so the thread never spared the loop
that time anyway: it only cuts work longer than the switch interval (5 ms) into slices. Chat
templates render the whole conversation (Jinja, growing with each turn): always a thread.
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
import msgspec

from asyncpolicy.tasks.base import ChatMessage

_PROBE = "PROBE"  # an assistant turn's stand-in content, to find what the template closes a turn with
# Longest text encoded on the event loop (no chat template): the slowest tokenizer here, the embedded
# model's (a word per character), takes 0.1-0.7 ms for 256 characters on a loaded 2-core AMD EPYC
ON_LOOP_CHARS = 512


class TemplateNotAppendOnly(ValueError):
    """The chat template re-renders earlier turns when a message is added: its episodes cannot be token-exact."""


def _render(tokenizer: Any, messages: list[ChatMessage], generation_prompt: bool) -> str:
    chat = [msgspec.to_builtins(m) for m in messages]
    text: str = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
    return text


def _encode(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def _suffix(longer: str, shorter: str, what: str) -> str:
    if not longer.startswith(shorter):
        at = next((i for i, (a, b) in enumerate(zip(longer, shorter, strict=False)) if a != b), len(shorter))
        raise TemplateNotAppendOnly(
            f"the chat template renders the earlier turns differently once {what} is added (first difference at "
            f"character {at}: {shorter[at:at + 40]!r} became {longer[at:at + 40]!r}); multi-turn episodes need an "
            "append-only template (docs/agents.md, 'The token rule')"
        )
    return longer[len(shorter):]


class ObservationTokens:
    """The token rule for one tokenizer (see the module's docstring)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self._closing: list[int] = []
        if self.chat:  # what follows an assistant turn's content in the template: found once, on a probe turn
            user = ChatMessage("user", "p")
            opened = _render(tokenizer, [user], generation_prompt=True)
            closed = _render(tokenizer, [user, ChatMessage("assistant", _PROBE)], generation_prompt=False)
            turn = _suffix(closed, opened, "an assistant turn")
            if not turn.startswith(_PROBE):
                raise TemplateNotAppendOnly(
                    f"the chat template does not render an assistant turn's text as it is ({turn!r}); multi-turn "
                    "episodes need an append-only template (docs/agents.md, 'The token rule')"
                )
            self._closing = _encode(tokenizer, turn[len(_PROBE):])

    def on_loop(self, text: str) -> bool:
        """Whether the rule for `text` is cheap enough to run on the event loop (the module's docstring)."""
        return not self.chat and len(text) <= ON_LOOP_CHARS

    async def opening_ids(self, text: str) -> list[int]:
        """`opening(text)`, in a worker thread unless it is cheap."""
        if self.on_loop(text):
            return self.opening(text)
        return await anyio.to_thread.run_sync(self.opening, text)

    async def append_ids(self, conversation: list[ChatMessage], turn_tokens: list[int], observation: ChatMessage) -> list[int]:
        """`append(...)`, in a worker thread unless it is cheap."""
        if self.on_loop(observation.content):
            return self.append(conversation, turn_tokens, observation)
        return await anyio.to_thread.run_sync(self.append, conversation, turn_tokens, observation)

    def opening(self, text: str) -> list[int]:
        """An episode opened by the environment's first observation: a prompt of `text`, as tasks encode one."""
        from asyncpolicy.tasks.loading import encode_prompt

        return encode_prompt(self.tokenizer, text)

    def append(self, conversation: list[ChatMessage], turn_tokens: list[int], observation: ChatMessage) -> list[int]:
        """The ids to append after the model's turn `turn_tokens` for `observation`.

        `conversation` is the episode so far as messages, ending with the model's turn (its text,
        decoded from `turn_tokens`: used to render, never as tokens). Raises TemplateNotAppendOnly.
        """
        if not self.chat:
            return _encode(self.tokenizer, observation.content)
        before = _render(self.tokenizer, conversation, generation_prompt=False)
        after = _render(self.tokenizer, [*conversation, observation], generation_prompt=True)
        added = _encode(self.tokenizer, _suffix(after, before, "an observation"))
        return self.closing_left(turn_tokens) + added

    def closing_left(self, turn_tokens: list[int]) -> list[int]:
        """The template's end-of-turn tokens that the model's turn does not already end with."""
        closing = self._closing
        for k in range(min(len(closing), len(turn_tokens)), 0, -1):
            if turn_tokens[-k:] == closing[:k]:
                return closing[k:]
        return list(closing)
