"""The GPU bench's model: Qwen2.5-0.5B's shape with random weights (a config and a small local
tokenizer, no hub), and its tiny twin for the CPU tests. vLLM starts with dummy weights and gets the
real ones through the sync; `bench gpu --make-model DIR` writes the directory (the e2e script uses it).
"""

from __future__ import annotations

import json
import os
from typing import Any

QWEN05: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
    "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 21, "attention_dropout": 0.0,
}
# The CPU test's model: the same architecture, small enough to train over gloo in well under a second.
TINY_QWEN: dict[str, Any] = {
    **QWEN05, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 200, "max_position_embeddings": 256, "max_window_layers": 2,
    "bos_token_id": 1, "eos_token_id": 0,
}


def make_model_dir(path: str, config: dict[str, Any] | None = None, tokenizer: bool = True) -> str:
    """A model directory with `config` (Qwen2.5-0.5B's by default) and no weights; with `tokenizer`,
    a small byte-level BPE tokenizer trained here (no hub), whose special-token ids replace the config's."""
    cfg = dict(config or QWEN05)
    os.makedirs(path, exist_ok=True)
    if tokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        corpus = [" ".join(str(i) for i in range(k, k + 50)) + " reverse copy add the = + - ?" for k in range(0, 2000, 50)]
        tok.train_from_iterator(
            corpus,
            trainers.BpeTrainer(
                vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            ),
        )
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>")
        fast.save_pretrained(path)
        # EOS must mean the same token to the tokenizer, vLLM and the trainer
        cfg.update(eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id, pad_token_id=fast.pad_token_id)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": cfg["eos_token_id"], "bos_token_id": cfg["bos_token_id"]}, f)
    return path



def vocab_size(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json")) as f:
        return int(json.load(f)["vocab_size"])

