"""What the episode properties share: a recording generation engine, the random configs, and the
checks every trained episode must pass (tests/property, on the path under pytest)."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import strategies as st

from asyncpolicy.config import Config
from asyncpolicy.engines.protocols import GenerationRequest, GenerationResult
from asyncpolicy.engines.simulated import SimulatedGenerationEngine
from asyncpolicy.envs.loading import EpisodeSpec
from asyncpolicy.samples import Sample


class RecordingGeneration:
    """The simulated engine, recording each request's final tokens (the ones an episode must keep);
    `on_generate(request)` is called as each call starts (a property stops the run from it)."""

    def __init__(
        self, inner: SimulatedGenerationEngine, on_generate: Callable[[GenerationRequest], None] | None = None
    ) -> None:
        self.inner = inner
        self.on_generate = on_generate
        self.sampled: dict[str, list[int]] = {}

    @property
    def version(self) -> int:
        return self.inner.version

    def set_version(self, version: int) -> None:
        self.inner.set_version(version)

    async def start(self) -> None:
        await self.inner.start()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if self.on_generate is not None:
            self.on_generate(request)
        result = await self.inner.generate(request)
        if result.finish_reason != "abort":
            self.sampled[request.request_id] = list(result.response_tokens)
        return result

    async def abort_all(self) -> None:
        await self.inner.abort_all()

    async def aclose(self) -> None:
        await self.inner.aclose()


@st.composite
def episode_configs(draw: st.DrawFn, envs: tuple[str, ...] = ("RandomEnv", "RandomEnv", "PlainEnv")) -> list[str]:
    """Small runs of episodes of one of `envs` (classes of episode_envs): turns, batch, queue, group
    size, sync period, partial rollout, latencies and lengths all drawn."""
    threshold = draw(st.integers(0, 2))
    batch = draw(st.integers(1, 3))
    return [
        f"task.env=episode_envs:{draw(st.sampled_from(envs))}",
        f"task.max_turns={draw(st.integers(1, 5))}",
        f"task.max_turn_tokens={draw(st.integers(0, 4))}",
        f"async_training.staleness_threshold={threshold}",
        f"data.train_batch_size={batch}",
        f"async_training.max_queue_size={draw(st.integers(batch, 3 * batch))}",
        f"rollout.n={draw(st.integers(1, 3))}",
        f"async_training.trigger_parameter_sync_step={draw(st.integers(1, threshold + 1))}",
        f"async_training.partial_rollout={draw(st.booleans())}",
        f"trainer.total_training_steps={draw(st.integers(1, 5))}",
        f"rollout.simulated.mean_latency_s={draw(st.sampled_from([0.0, 0.0005, 0.002]))}",
        f"data.max_response_length={draw(st.integers(2, 24))}",
        f"trainer.test_freq={draw(st.sampled_from([0, 0, 2]))}",
    ]


def model_tokens(sample: Sample, i: int) -> list[int]:
    t = sample.trajectories[i]
    return [tok for tok, m in zip(t.response_tokens, t.loss_mask, strict=True) if m]


def assert_episodes_whole(
    batch: list[Sample], version: int, cfg: Config, spec: EpisodeSpec, sampled: Callable[[Sample], dict[str, list[int]]]
) -> None:
    """Each episode of a batch trained at `version`: within the bound, its lists aligned (env tokens
    with logprob 0), versions never decreasing along it, within its limits, and its model tokens
    exactly those the engine sampled (`sampled(sample)`: the recording of the engine that made it) —
    the simulated tokenizer's decode→encode is not the identity, so a re-encoded turn would differ."""
    for sample in batch:
        assert version - sample.min_version <= cfg.async_training.staleness_threshold
        for i, t in enumerate(sample.trajectories):
            n = len(t.response_tokens)
            assert len(t.behaviour_logprobs) == len(t.token_versions) == len(t.loss_mask) == n
            assert all(lp == 0.0 for lp, m in zip(t.behaviour_logprobs, t.loss_mask, strict=True) if not m)
            assert all(a <= b for a, b in zip(t.token_versions, t.token_versions[1:], strict=False))
            assert 1 <= t.turns <= spec.max_turns and n <= cfg.data.max_response_length
            if not t.reward_error:  # a failed environment may end an episode before its turns are kept
                request = f"train/{sample.prompt.uid}/{i}"
                turns = sampled(sample)
                kept = [tok for k in range(t.turns) for tok in turns[f"{request}/t{k}"]]
                assert model_tokens(sample, i) == kept, "a model turn's tokens changed (re-encoded?)"
