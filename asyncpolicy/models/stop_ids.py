"""The token ids a generation stops at: one answer for every engine.

The CPU engine and vLLM must stop at the same tokens, or the same weights give different responses
(and rewards) on the two. A chat model's generation config lists every end-of-turn id (SmolLM2:
`<|im_end|>` and `<|endoftext|>`); config.json and the tokenizer may name another EOS. vLLM runs
without a tokenizer here, so the ids are read from the directory's files plus the tokenizer's EOS
id, which its caller passes.
"""

from __future__ import annotations

import json
import os


def stop_token_ids(model_path: str, tokenizer_eos: int | None = None) -> list[int]:
    """EOS ids of generation_config.json, then config.json, then the tokenizer's: each once, in that order."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(model_path, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        for e in eos if isinstance(eos, list) else [eos]:
            if isinstance(e, int) and e not in ids:
                ids.append(e)
    if tokenizer_eos is not None and int(tokenizer_eos) not in ids:
        ids.append(int(tokenizer_eos))
    return ids
