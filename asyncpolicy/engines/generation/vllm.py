"""Generation on GPUs with vLLM's AsyncLLM (engine core in its own process, as vLLM runs it).

Invariants the actors rely on:
* every returned token carries the logprob of the distribution it was sampled from
  (`logprobs_mode="processed_logprobs"`: after temperature/top-p, what PPO ratios need) and the
  policy version that was loaded when it arrived; a version only changes while generation is
  paused, and tokens that arrive around a resume are labelled with the OLDER version, which can
  only overstate staleness, never hide it. With an in-place pause (`in_flight_updates`: vLLM's mode
  "keep") a request runs on across a sync; every token sampled before the pause has reached its
  output collector by the time the pause returns, so the output that first shows the new version
  keeps the older label for all its tokens, and later outputs hold only tokens sampled after resume;
* `abort_all` makes every running `generate` return its tokens so far with finish_reason "abort";
  a later `generate` with those tokens continues the response (partial rollout).

vllm is an optional extra, imported only in `start`, in a worker thread like the engine's construction.

Signals: the engine core must not die from the terminal's Ctrl-C (SIGINT to the whole process
group) — the supervisor stops it, after its stop checkpoint. vLLM's engine core installs its own
SIGINT/SIGTERM handlers, so an inherited SIG_IGN would not hold; `start` builds AsyncLLM inside
`children_shielded(ignore=False)` (in the building thread: a signal mask is per thread), and the
engine core, forked by vLLM (its default while this process has not touched CUDA, which it never
does), inherits SIGINT/SIGTERM blocked. Limits: with `VLLM_WORKER_MULTIPROC_METHOD=spawn` the
child starts unblocked (not shielded); and vLLM's own shutdown, which sends SIGTERM, ends the
engine core with SIGKILL of its process tree after its 5 s grace period.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import msgspec
import structlog

from asyncpolicy.config import Config
from asyncpolicy.engines.child_procs import children_shielded
from asyncpolicy.engines.protocols import GenerationRequest, GenerationResult
from asyncpolicy.errors import ConfigError, EngineTimeout
from asyncpolicy.models.cache import has_weights
from asyncpolicy.models.stop_ids import stop_token_ids

log = structlog.get_logger("asyncpolicy.vllm")

WORKER_EXTENSION = "asyncpolicy.engines.generation.vllm_worker_ext.AsyncPolicyWorkerExt"
# CUDA_VISIBLE_DEVICES is process-wide: one engine is built at a time (replicas restarting together)
_BUILD_LOCK = threading.Lock()
_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


class VLLMSettings(msgspec.Struct, kw_only=True):
    """What the engine needs to start; built from the run config by `vllm_settings`."""

    model_path: str
    gpus: list[int]  # physical GPU indices (CUDA_VISIBLE_DEVICES of the engine core)
    dummy_weights: bool  # config-only model dir: random weights, real ones arrive by weight sync
    stop_token_ids: list[int]
    max_model_len: int
    gpu_memory_utilization: float = 0.5
    max_num_seqs: int = 256
    enforce_eager: bool = False
    enable_sleep_mode: bool = False
    ignore_eos: bool = False  # benchmarks: fixed response lengths
    seed: int = 0
    start_timeout_s: float = 900.0
    rpc_timeout_s: float = 300.0


def vllm_settings(cfg: Config, model_path: str, gpus: list[int], eos_token_id: int | None, replica: int = 0) -> VLLMSettings:
    """One vLLM engine of a run (its own or a rollout server's): stops at the model's EOS ids and the
    tokenizer's, dummy weights when the directory has none (the trainer's arrive before the first generation)."""
    return VLLMSettings(
        model_path=model_path,
        gpus=gpus,
        dummy_weights=not has_weights(model_path),
        stop_token_ids=stop_token_ids(model_path, eos_token_id),
        max_model_len=cfg.data.max_prompt_length + cfg.data.max_response_length + 8,
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        max_num_seqs=max(8, min(1024, cfg.rollout.max_concurrency)),
        enforce_eager=cfg.rollout.enforce_eager,
        seed=cfg.seed + replica,  # replicas sample different streams
        rpc_timeout_s=cfg.async_training.sync_timeout,
    )


def import_vllm() -> Any:
    """Import vllm or explain how to get it (exit code 2 through ConfigError)."""
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(
            f"rollout.engine=vllm needs vLLM, which is not importable ({e}); install it with "
            "`pip install asyncpolicy[vllm]`",
            key="rollout.engine",
        ) from None
    return vllm


def _import_async_llm() -> tuple[Any, Any]:
    vllm = import_vllm()
    from vllm.v1.engine.async_llm import AsyncLLM

    return vllm, AsyncLLM


@contextlib.contextmanager
def visible_devices(gpus: list[int]):
    """CUDA_VISIBLE_DEVICES for processes spawned inside the block (vLLM's engine core), then restored."""
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    if old:
        physical = [int(x) for x in old.split(",") if x.strip()]
        mapped = [physical[g] for g in gpus]
    else:
        mapped = list(gpus)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in mapped)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


class VLLMGenerationEngine:
    """GenerationEngine over one AsyncLLM (tensor-parallel over `settings.gpus`)."""

    def __init__(self, settings: VLLMSettings) -> None:
        self.settings = settings
        self._version = 0
        self._llm: Any = None
        self._abort: anyio.Event | None = None
        self._ids = itertools.count()
        self._active: set[str] = set()  # vLLM request ids of running `generate` calls
        self._ready = anyio.Event()  # set once started; a transport waits on it during a restart
        self._paused = False
        self.generated_tokens = 0
        self.start_s = 0.0
        self.incarnation = 0  # +1 per start: transports redo their set-up after a restart

    @property
    def version(self) -> int:
        return self._version

    @property
    def llm(self) -> Any:
        if self._llm is None:
            raise RuntimeError("VLLMGenerationEngine used before start()")
        return self._llm

    @property
    def errored(self) -> bool:
        """The engine core died: every call fails until the engine is restarted."""
        return self._llm is not None and bool(getattr(self._llm, "errored", False))

    def set_version(self, version: int) -> None:
        """Called by the weight transport once `version`'s weights are loaded (generation paused)."""
        self._version = version

    async def start(self) -> None:
        # importing vllm takes seconds; it only fills sys.modules, so a cancel may abandon it
        vllm, AsyncLLM = await anyio.to_thread.run_sync(_import_async_llm, abandon_on_cancel=True)

        s = self.settings
        args = vllm.AsyncEngineArgs(
            model=s.model_path,
            load_format="dummy" if s.dummy_weights else "auto",
            skip_tokenizer_init=True,  # token ids in and out; the run's tokenizer lives in the supervisor
            dtype="bfloat16",
            tensor_parallel_size=len(s.gpus),
            gpu_memory_utilization=s.gpu_memory_utilization,
            max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs,
            logprobs_mode="processed_logprobs",
            enforce_eager=s.enforce_eager,
            enable_sleep_mode=s.enable_sleep_mode,
            enable_prefix_caching=True,
            seed=s.seed,
            worker_extension_cls=WORKER_EXTENSION,
        )
        t0 = time.perf_counter()
        built: list[Any] = []

        def build() -> None:
            # Shielded: the engine core it forks never sees the terminal's SIGINT/SIGTERM (module notes).
            with _BUILD_LOCK, visible_devices(s.gpus), children_shielded(ignore=False):
                built.append(AsyncLLM.from_engine_args(args))

        # Built in a worker thread: the engine's start (tens of seconds: config, engine-core process,
        # model load) must not freeze the host's loop. AsyncLLM supports this: built outside a
        # running loop, it defers its output handler to the first request. The thread is never
        # abandoned (it would leave an engine core nobody owns); a cancel waits for it, then shuts
        # the engine down.
        try:
            await anyio.to_thread.run_sync(build)
        except BaseException:
            if built:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(built[0].shutdown)
            raise
        self._llm = built[0]
        # Start the output handler now, on the loop thread, as AsyncLLM does when built inside a
        # running loop: an engine-core failure before the first request is then seen at once.
        start_output_handler = getattr(self._llm, "_run_output_handler", None)
        if start_output_handler is not None:
            start_output_handler()
        self.start_s = time.perf_counter() - t0
        self._abort = anyio.Event()
        self.incarnation += 1
        self._ready.set()
        log.info("vllm_started", gpus=s.gpus, start_s=round(self.start_s, 1), dummy_weights=s.dummy_weights)

    def _sampling_params(self, request: GenerationRequest, max_tokens: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            logprobs=0,  # the sampled token's logprob only
            detokenize=False,
            ignore_eos=self.settings.ignore_eos,
            stop_token_ids=[] if self.settings.ignore_eos else list(self.settings.stop_token_ids),
            output_kind=RequestOutputKind.CUMULATIVE,
        )

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        llm = self.llm
        remaining = request.max_tokens - len(request.response_tokens)
        if remaining <= 0:
            return GenerationResult.so_far(request, "length")
        assert self._abort is not None
        abort = self._abort
        rid = f"{request.request_id}#{next(self._ids)}"  # unique: retries and continuations reuse ids
        prompt = {  # a TokensPrompt
            "prompt_token_ids": list(request.prompt_tokens) + list(request.response_tokens),
            # Prefix-cache blocks are keyed by the weights that computed them: a request never reuses
            # KV from older weights, with no cache reset (which walks every block) on each sync.
            "cache_salt": f"{self.incarnation}.{self._version}",
        }
        finish = ""
        best: Any = None  # latest output; CUMULATIVE outputs share vLLM's growing token/logprob lists
        seen = 0  # tokens observed so far
        spans = [(0, self._version)]  # (index of first token, version loaded when it was observed)
        # The loop body stays as cheap as a bare vLLM client's (no per-token work, no helper task
        # per request): tokens and logprobs are read once at the end. abort_all aborts the vLLM
        # ids in `_active` itself.
        self._active.add(rid)
        try:
            stream = llm.generate(prompt, self._sampling_params(request, remaining), request_id=rid)
            try:
                async for out in stream:
                    c = out.outputs[0]
                    if best is None or len(c.token_ids) >= len(best.token_ids):
                        best = c
                    seen = len(best.token_ids)
                    if self._version != spans[-1][1]:
                        # The output that reveals a new version may still hold tokens sampled before the
                        # pause (an in-place pause keeps requests running): they keep the older label.
                        spans.append((seen, self._version))
                    if out.finished:
                        finish = _FINISH.get(c.finish_reason or "", "stop")
                    elif abort.is_set():
                        finish = "abort"  # abort_all ran before vLLM knew this request: leave now
                        break
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    await stream.aclose()  # after a break: vLLM aborts the request itself
                    if not finish:  # cancelled by the caller: make sure vLLM stops this request
                        await llm.abort(rid)
        finally:
            self._active.discard(rid)
        tokens: list[int] = list(best.token_ids) if best is not None else []
        logprobs = [pos[t].logprob for t, pos in zip(tokens, best.logprobs or (), strict=False)] if best is not None else []
        versions: list[int] = []
        for k, (first, v) in enumerate(spans):
            upto = spans[k + 1][0] if k + 1 < len(spans) else len(tokens)
            versions.extend([v] * (upto - first))
        if len(logprobs) != len(tokens):
            raise RuntimeError(f"vLLM returned {len(tokens)} tokens but {len(logprobs)} logprobs for {rid}")
        self.generated_tokens += len(tokens)
        return GenerationResult(
            request_id=request.request_id,
            response_tokens=list(request.response_tokens) + tokens,
            behaviour_logprobs=list(request.behaviour_logprobs) + logprobs,
            token_versions=list(request.token_versions) + versions,
            finish_reason=finish or "stop",
        )

    async def abort_all(self) -> None:
        if self._abort is not None:
            self._abort.set()
        self._abort = anyio.Event()
        ids = list(self._active)
        if ids and self._llm is not None:
            with anyio.fail_after(self.settings.rpc_timeout_s):
                await self._llm.abort(ids)  # each stream then ends with an "abort" output
        await anyio.lowlevel.checkpoint()

    # ---- used by the weight transports ---------------------------------------------------

    async def wait_ready(self) -> None:
        """Wait for `start` to finish (the supervisor may be restarting the engine right now)."""
        with anyio.fail_after(self.settings.start_timeout_s):
            await self._ready.wait()

    async def pause(self) -> None:
        """Stop scheduling; requests still queued keep their state and resume later."""
        await self.wait_ready()
        core = getattr(self.llm, "engine_core", None)
        with anyio.fail_after(self.settings.rpc_timeout_s):
            if core is not None and hasattr(core, "pause_scheduler_async"):
                # AsyncLLM.pause_generation adds a fixed 20 ms sleep for log ordering; skip it.
                await core.pause_scheduler_async(mode="keep", clear_cache=False)
            else:
                await self.llm.pause_generation(mode="keep", clear_cache=False)
        self._paused = True

    async def resume(self) -> None:
        with anyio.fail_after(self.settings.rpc_timeout_s):
            await self.llm.resume_generation()
        self._paused = False

    async def rpc(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        """Call a worker-extension method on every vLLM worker; bounded in time."""
        limit = timeout or self.settings.rpc_timeout_s
        try:
            with anyio.fail_after(limit):
                return await self.llm.collective_rpc(method, timeout=limit, args=args)
        except TimeoutError:
            raise EngineTimeout(f"vLLM collective_rpc {method!r} took longer than {limit}s") from None

    async def sleep(self, level: int = 1) -> None:
        """Free GPU memory for a colocated trainer (needs enable_sleep_mode)."""
        with anyio.fail_after(self.settings.rpc_timeout_s):
            await self.llm.sleep(level)

    async def wake_up(self) -> None:
        with anyio.fail_after(self.settings.rpc_timeout_s):
            await self.llm.wake_up()

    async def aclose(self) -> None:
        await self.abort_all()
        self._ready = anyio.Event()
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await anyio.to_thread.run_sync(llm.shutdown)
