"""Generation with a Hugging Face causal LM on the CPU: batched, abortable, in one worker thread.

Requests that arrive while a batch runs wait and form the next batch together (wave batching):
no background task owns the loop — the first waiting request to find the engine idle runs the
next batch for everyone waiting. All torch work, weight loads included, runs in worker threads
under one `CapacityLimiter(1)`, so the event loop never blocks and weights never change in the
middle of a batch; every token of a batch is therefore tagged with the same `version`.

Sampling is our own token-by-token loop over the KV cache (left padding, attention mask,
position ids from the mask), so we know the exact distribution each token was drawn from and
return its logprob under it: softmax(logits / temperature), restricted to the top-p nucleus and
renormalised. `abort_all()` is checked before every forward pass: a running batch stops at a
token boundary and returns the tokens so far with finish_reason "abort".
"""

from __future__ import annotations

import inspect
from collections import deque
from typing import Any

import anyio
import anyio.to_thread
import structlog
import torch

from asyncpolicy.engines.protocols import GenerationRequest, GenerationResult

log = structlog.get_logger(__name__)

GATHER_WAIT_S = 0.002  # a new batch waits while requests keep arriving, this long for each next one...
GATHER_MAX_S = 0.02  # ...but never longer than this: latency of the first request


class _Slot:
    """One request inside the engine: written by the worker thread, read by its caller."""

    __slots__ = ("request", "epoch", "result", "error", "abandoned")

    def __init__(self, request: GenerationRequest, epoch: int) -> None:
        self.request = request
        self.epoch = epoch  # abort_all() calls seen when it was submitted
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self.abandoned = False  # the caller was cancelled: stop spending compute on it


def sampling_distribution(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (B, V) of softmax(logits / T) restricted to the top-p nucleus and renormalised;
    a row with T = 0 is greedy: all its mass on the argmax (log 1 = 0 there, -inf elsewhere)."""
    greedy = temperature <= 0  # (B,)
    logp = torch.log_softmax(logits.float() / torch.where(greedy, 1.0, temperature)[:, None], dim=-1)  # (B, V)
    if bool(greedy.any()):
        top = torch.zeros_like(logp).scatter(-1, logp.argmax(-1, keepdim=True), 1.0) > 0  # (B, V)
        logp = torch.where(greedy[:, None] & ~top, float("-inf"), torch.where(greedy[:, None], 0.0, logp))
    if bool((top_p < 1.0).any()):
        sorted_logp, order = logp.sort(dim=-1, descending=True)  # (B, V)
        sorted_p = sorted_logp.exp()
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p  # (B, V) probability of strictly likelier tokens
        drop_sorted = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)  # the most likely token always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


class HFGenerationEngine:
    """`GenerationEngine` over a transformers causal LM; see the module docstring."""

    def __init__(self, model_path: str, dtype: str = "float32", threads: int = 0, ignore_eos: bool = False) -> None:
        self.model_path = model_path
        self.dtype = dtype
        self.threads = threads
        self.ignore_eos = ignore_eos  # generate to max_tokens regardless (fixed-length benchmarks, tests)
        self._model: Any = None
        self._eos: set[int] = set()
        self._pad = 0
        self._cache_kw = "past_key_values"
        self._version = 0
        self._limiter = anyio.CapacityLimiter(1)
        self._pending: list[_Slot] = []
        self._busy = False
        self._batch_done = anyio.Event()
        self._arrived = anyio.Event()  # set by each new request; a batch being gathered waits on it
        self._abort_epoch = 0
        self.batch_sizes: deque[int] = deque(maxlen=10_000)  # rows of the latest batches, for metrics and tests
        self.generated_tokens = 0

    @property
    def version(self) -> int:
        return self._version

    @property
    def model(self) -> Any:
        return self._model

    async def start(self) -> None:
        from asyncpolicy.models.stop_ids import stop_token_ids
        from asyncpolicy.models.tiny import load_model, load_tokenizer

        def load() -> None:
            model = load_model(self.model_path, self.dtype)
            model.eval()
            tokenizer = load_tokenizer(self.model_path)
            self._eos = set(stop_token_ids(self.model_path, tokenizer.eos_token_id))  # the same as vLLM's
            self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            # transformers renamed `past_key_values` to `cache`; support both.
            params = inspect.signature(model.forward).parameters
            self._cache_kw = "cache" if "cache" in params else "past_key_values"
            self._model = model

        await anyio.to_thread.run_sync(load, limiter=self._limiter)
        log.info("generation_engine_started", path=self.model_path, dtype=self.dtype, eos=sorted(self._eos))

    # -- requests -------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if self._model is None:
            raise RuntimeError("HFGenerationEngine.generate called before start() or after aclose()")
        slot = _Slot(request, self._abort_epoch)
        self._pending.append(slot)
        self._arrived.set()
        try:
            while slot.result is None:
                if slot.error is not None:
                    raise RuntimeError(f"generation batch failed: {slot.error!r}") from slot.error
                if self._busy:
                    done = self._batch_done
                    await done.wait()
                else:
                    await self._run_next_batch()
        finally:
            slot.abandoned = True
            if slot in self._pending:
                self._pending.remove(slot)
        return slot.result

    async def _run_next_batch(self) -> None:
        """Run every waiting request as one batch in the worker thread; wake all waiters after."""
        self._busy = True
        try:
            await self._gather()
            slots, self._pending = self._pending, []
            if slots:
                self.batch_sizes.append(len(slots))
                try:
                    await anyio.to_thread.run_sync(self._generate_batch, slots, limiter=self._limiter)
                except Exception as exc:
                    for s in slots:
                        s.error = exc
                    raise
        finally:
            self._busy = False
            done, self._batch_done = self._batch_done, anyio.Event()
            done.set()

    async def _gather(self) -> None:
        """Let requests started in the same moment (the n of a group, a wave of admissions) join
        this batch: wait while they keep arriving, woken by each arrival, until none came for
        GATHER_WAIT_S or GATHER_MAX_S passed."""
        with anyio.move_on_after(GATHER_MAX_S):
            while True:
                self._arrived = arrived = anyio.Event()
                with anyio.move_on_after(GATHER_WAIT_S):
                    await arrived.wait()
                if not arrived.is_set():
                    return

    async def abort_all(self) -> None:
        """Every request submitted so far returns at its next token boundary with finish_reason 'abort'."""
        self._abort_epoch += 1
        await anyio.lowlevel.checkpoint()

    async def load_state_dict_from(self, source_model: Any) -> None:
        """Copy another in-process model's weights into ours (no disk); the transport then sets the version."""
        await self.load_weights(source_model.state_dict())

    async def load_weights(self, state_dict: dict[str, Any]) -> None:
        """Load full weights (Hugging Face names); never under a running batch."""

        def copy() -> None:
            with torch.no_grad():
                self._model.load_state_dict(state_dict)

        await anyio.to_thread.run_sync(copy, limiter=self._limiter)

    def set_version(self, version: int) -> None:
        """Tokens of batches started from now on carry `version` (a batch reads it as it starts)."""
        self._version = version

    async def aclose(self) -> None:
        """Abort what runs, wait for the worker thread to let go, then drop the model."""
        await self.abort_all()
        async with self._limiter:
            self._model = None

    # -- the worker thread ----------------------------------------------------------------------

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, Any]:
        kwargs = {self._cache_kw: cache} if cache is not None else {}
        out = self._model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        new_cache = getattr(out, "cache", None) if self._cache_kw == "cache" else out.past_key_values
        return out.logits[:, -1], new_cache  # (B, V)

    def _generate_batch(self, slots: list[_Slot]) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        version = self._version
        reqs = [s.request for s in slots]
        tokens = [list(r.response_tokens) for r in reqs]
        logprobs = [list(r.behaviour_logprobs) for r in reqs]
        versions = [list(r.token_versions) for r in reqs]
        finish: list[str | None] = [None] * len(slots)
        for i, r in enumerate(reqs):
            if len(tokens[i]) >= r.max_tokens:
                finish[i] = "length"
        generators = [
            torch.Generator().manual_seed((r.seed * 1_000_003 + len(r.response_tokens)) % (2**63)) for r in reqs
        ]
        temperature = torch.tensor([r.temperature for r in reqs], dtype=torch.float32)  # (B,)
        top_p = torch.tensor([r.top_p for r in reqs], dtype=torch.float32)  # (B,)

        # prefill: prompt + earlier response tokens, left-padded
        seqs = [r.prompt_tokens + tokens[i] for i, r in enumerate(reqs)]
        B, L = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((B, L), self._pad, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, L - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, L - len(seq) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, L) real tokens at 0..len-1
        cache = None
        with torch.inference_mode():
            while True:
                for i, s in enumerate(slots):  # a token boundary: honour aborts and cancelled callers
                    if finish[i] is None and (s.abandoned or s.epoch != self._abort_epoch):
                        finish[i] = "abort"
                if all(f is not None for f in finish):
                    break
                logits, cache = self._forward(ids, mask, positions, cache)  # (B, V)
                logp = sampling_distribution(logits, temperature, top_p)  # (B, V)
                cdf = logp.exp().cumsum(dim=-1)  # (B, V)
                u = torch.cat([torch.rand(1, generator=g) for g in generators])  # (B,) one draw per row
                nxt = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).clamp(max=cdf.shape[-1] - 1)  # (B, 1)
                # never sample a token the nucleus removed, whatever the rounding of the cdf
                nxt = torch.where(logp.gather(-1, nxt) == float("-inf"), logp.argmax(-1, keepdim=True), nxt)
                nxt_logp = logp.gather(-1, nxt).squeeze(-1)  # (B,)
                for i, r in enumerate(reqs):
                    if finish[i] is not None:
                        continue
                    tok = int(nxt[i])
                    tokens[i].append(tok)
                    logprobs[i].append(float(nxt_logp[i]))
                    versions[i].append(version)
                    self.generated_tokens += 1
                    if tok in self._eos and not self.ignore_eos:
                        finish[i] = "stop"
                    elif len(tokens[i]) >= r.max_tokens:
                        finish[i] = "length"
                ids = torch.where(torch.tensor([f is None for f in finish])[:, None], nxt, self._pad)  # (B, 1)
                mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.long)], dim=1)  # (B, L+t)
                positions = positions[:, -1:] + 1  # (B, 1)
        for i, s in enumerate(slots):
            s.result = GenerationResult(
                request_id=s.request.request_id,
                response_tokens=tokens[i],
                behaviour_logprobs=logprobs[i],
                token_versions=versions[i],
                finish_reason=finish[i] or "abort",
            )
