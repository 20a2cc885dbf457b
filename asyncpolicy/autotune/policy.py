"""The autotune controller's decision: statistics of one interval → the next limits and a reason.

A pure function (`decide`) of plain structs, so every rule is tested alone, without a run.

Two limits are moved, each within bounds the user set:

* the **admission window**: prompt groups generating at once (`Rollouter.set_admission_window`);
* the **effective staleness**: the bound the channel applies and the rollouter's capacity rule
  follows (`VersionedChannel.set_staleness_limit`), never above `staleness_threshold` (the hard
  bound) and never below `trigger_parameter_sync_step - 1` (below it every sample would go stale
  between two syncs: the run would starve itself). With a sync every step that floor is 0:
  on-policy. Autotune starts at 1 (the defaults), and goes down to 0 only by a probe (rule 5).

Why 0 is safe to reach at run time: at an effective bound of 0 the capacity rule admits one
batch per version and the trainer needs all of it before the next sync, so no group generates
across a sync and partial rollout has nothing to continue under newer weights. Groups admitted
before the bound was lowered (and any continued across a sync) are older than 0: the channel
drops and counts them. The hard bound and the accounting hold; a lowering costs at most the
groups then in flight.

The reasoning, rule by rule (first match wins):

1. **No move during a sync or a user pause.** The statistics of such an interval describe the
   pause, not the loop; the limits are held and the streaks are left as they were.
2. **A probe is judged first.** Every loosening (wider window, higher staleness) and every
   tightening is a probe: after `SETTLE` interval(s) without moves (groups admitted under the new
   limits take that long to finish), the next interval either confirms it or takes it back. A
   loosening after which throughput fell by more than `LOSS` while the trainer still waits is
   reverted and everything above the restored value is barred (a *ceiling*) for `BAR_INTERVALS`:
   the engine is saturated, more in flight only costs. A tightening after which throughput fell
   by `LOSS` (or, for a window halved for a full queue, the trainer waits) is reverted and barred
   below (a *floor*). A lower staleness, or a window halved for stale drops, is judged by
   throughput alone: it makes the trainer wait more by construction
   (on-policy, for every batch), and only throughput says whether that waiting costs anything (on
   a device generation and training share, like the CPU, the overlap bought nothing). Judging by
   a loss, not by a gain, is deliberate: an interval's throughput is noisy (a few steps), so "did
   not gain 5 %" would undo good moves half the time, while a real saturation shows up as a loss.
   One exception: leaving on-policy (0 -> 1) must gain more than `LOSS`, since on-policy was kept
   for costing less than that, and its trainer's waiting is no evidence; for the same reason a
   kept move to on-policy bars the bound above it for `BAR_INTERVALS`. The bars expire, so a run
   that changes (longer responses, a replica lost or back) is probed again.
3. **Stale drops → raise the staleness** (one step, if the bound allows) once they pass `RAISE_ON`
   of the trained samples: a dropped sample is generation paid for and thrown away; drops mean
   samples finish later than the bound allows. A few drops do not raise it. A probe judged by
   throughput alone: a higher bound lets more groups in flight, which costs sample age and, on
   this runtime, the work of aborting and continuing them at every sync; where that work costs
   more than `DROPS_LOSS` (a busy CPU) the drops are the cheaper evil, and the bound above is
   barred a while. `DROPS_LOSS` is twice `LOSS`: the drops are measured waste, the loss one
   interval's noisy rate (a held-out run undid a raise for -13 % where the grid says the higher
   bound gains). Judged on the very next interval (no settling: a higher bound admits at once),
   so drops that go on raise it a notch an interval. At the hard bound (or a barred one), with
   the trainer not waiting and more than `WASTE` of the trained samples dropped, halve the window
   instead (probe): fewer groups in flight finish sooner, so fewer go stale. Drops count as a cost
   against the wider window: if the halving keeps the throughput, the wider window is barred for
   `BAR_INTERVALS` (else a waiting trainer would widen it again at once, and the drops come back).
4. **The trainer waits** (idle share above `STARVED` in `PERSIST` intervals in a row), so generation
   is the bottleneck. If the capacity rule held admission back most of the time, the staleness
   bound is what limits generation: raise it. Else, if the window was full most of the time,
   double it (probe). Else generation is saturated at this concurrency: hold.
5. **Generation is ahead** (the trainer never waits, below `FED`, for `CALM` intervals): a full
   queue (backpressure) means the window is wider than the trainer can use: halve it (probe).
   If the trainer is fed and nothing was dropped, lower the staleness by one (probe, down to the
   floor, on-policy included) when the bound costs nothing (the oldest sample trained was younger
   than it) or when it costs learning: the importance weights spread (the trainer's behaviour KL
   above `SPREAD_KL`: the policy moved between sampling and training, so a stale sample is worth
   less than a fresh one). Fresher samples for the same throughput; the probe's verdict says
   whether the throughput stayed. `SPREAD_KL` sits above one engine's numerical mismatch (~1e-9
   on the CPU) and below what the embedded model's policy moves in a step once it learns (2e-4 to
   3e-2 at staleness 1); a trainer that reports no KL (the simulated one) never triggers it.
6. Otherwise hold.

Hysteresis: distinct thresholds to loosen (`STARVED`) and to tighten (`FED`), a persistence
count before either, a probe judged before any other move, and bars on values that did not pay.
"""

from __future__ import annotations

import math

import msgspec

STARVED = 0.10  # trainer idle share above which generation is the bottleneck
FED = 0.03  # trainer idle share below which generation is ahead
PERSIST = 2  # intervals in a row the trainer must wait before a loosening
CALM = 4  # intervals in a row the trainer must be fed before a tightening
LOSS = 0.10  # a probe that costs more than this share of throughput is undone (noise stays below it)
DROPS_LOSS = 0.20  # a raise for stale drops is undone only for a clear loss: the drops are certain waste
BAR_INTERVALS = 12  # how long a reverted value stays barred
MAJORITY = 0.5  # share of an interval's samples a condition must hold in
SETTLE = 1  # intervals after a probe before it is judged: new groups take that long to finish
RAISE_ON = 0.05  # stale drops above this share of the trained samples raise the staleness
WASTE = 0.1  # stale drops above this share of the trained samples make the window shrink at the hard bound
SPREAD_KL = 1e-4  # behaviour KL per token above which stale samples' importance weights spread (see rule 5)


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """What the controller moves."""

    window: int  # prompt groups generating at once
    staleness: int  # the effective staleness bound


class Bounds(msgspec.Struct, frozen=True, kw_only=True):
    """Where the controller may move them (from the config)."""

    min_window: int
    max_window: int
    min_staleness: int  # trigger_parameter_sync_step - 1: below it every sample goes stale between two syncs
    max_staleness: int  # the user's hard staleness_threshold


class Observation(msgspec.Struct, frozen=True, kw_only=True):
    """One interval of the run, as the actors' and the channel's statistics saw it."""

    steps: int  # training steps in the interval
    seconds: float
    trainer_idle: float  # share of the interval the trainer waited for a batch
    window_full: float  # share of samples in which every admission token was taken
    room_exhausted: float  # share of samples in which the capacity (staleness) rule held admission back
    queue_full: float  # share of samples in which the channel was at capacity (backpressure)
    stale_drops: int  # samples dropped as stale in the interval
    trained: int = 0  # samples trained on in the interval
    age_max: float  # the oldest sample trained in the interval (nan: none trained)
    behaviour_kl: float = math.nan  # mean KL(behaviour || trainer) of the trained tokens (nan: the trainer reports none)
    syncing: bool  # a weight sync runs now
    paused: bool  # a user pause holds generation

    @property
    def rate(self) -> float:
        """Training steps per second: the throughput every probe is judged by."""
        return self.steps / self.seconds if self.seconds > 0 else 0.0


class Memory(msgspec.Struct, frozen=True, kw_only=True):
    """What the controller keeps between decisions: its hysteresis."""

    interval: int = 0
    starved: int = 0  # intervals in a row the trainer waited
    fed: int = 0  # intervals in a row the trainer did not wait
    probe: str = ""  # "loosen" | "tighten" | "drops" / "waste" (a raise / a narrower window for stale drops) | "": to be judged
    settle: int = 0  # intervals left before the probe is judged
    before: Limits | None = None  # the limits before that move
    rate_before: float = 0.0
    window_ceiling: int = 0  # barred: no window >= this until window_ceiling_until (0: none)
    window_ceiling_until: int = 0
    window_floor: int = 0  # barred: no window <= this ...
    window_floor_until: int = 0
    staleness_ceiling: int = 0  # barred: no staleness >= this ... (0: none)
    staleness_ceiling_until: int = 0
    staleness_floor: int = -1  # barred: no staleness <= this ...
    staleness_floor_until: int = 0


class AutotuneSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """What a checkpoint holds of the controller: a resumed run tunes on from where it was, not from the defaults."""

    limits: Limits
    memory: Memory
    moves: int
    decisions: int
    last_reason: str


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    limits: Limits
    reason: str  # why (also when nothing moved)
    memory: Memory

    def moved(self, before: Limits) -> bool:
        return self.limits != before


def decide(obs: Observation, limits: Limits, bounds: Bounds, memory: Memory) -> Decision:
    """The next limits after one interval; see the module docstring for the reasoning."""
    if obs.syncing or obs.paused:
        return Decision(limits=limits, reason="sync in progress" if obs.syncing else "paused", memory=memory)
    now = memory.interval + 1
    starved = obs.trainer_idle > STARVED
    fed = obs.trainer_idle < FED
    streaks = msgspec.structs.replace(
        memory, interval=now, starved=memory.starved + 1 if starved else 0, fed=memory.fed + 1 if fed else 0
    )
    if memory.probe and memory.settle > 0:  # the move has not shown its effect yet
        return Decision(limits=limits, reason="settling after a move", memory=msgspec.structs.replace(streaks, settle=memory.settle - 1))
    m = msgspec.structs.replace(streaks, probe="", before=None)
    rate = obs.rate

    # 2. judge the last move
    if memory.probe and memory.before is not None:
        before = memory.before
        leaving_on_policy = memory.probe == "loosen" and before.staleness == 0 < limits.staleness
        lost = rate < memory.rate_before * (1 - LOSS)
        if (memory.probe == "loosen" and (rate < memory.rate_before * (1 + LOSS) if leaving_on_policy else starved and lost)) or (
            memory.probe == "drops" and rate < memory.rate_before * (1 - DROPS_LOSS)
        ):
            # barred: any value above the one restored (not only the one tried: no creeping back up)
            if limits.window > before.window:
                m = msgspec.structs.replace(m, window_ceiling=before.window + 1, window_ceiling_until=now + BAR_INTERVALS)
            if limits.staleness > before.staleness:
                m = msgspec.structs.replace(
                    m, staleness_ceiling=before.staleness + 1, staleness_ceiling_until=now + BAR_INTERVALS
                )
            return Decision(
                limits=before,
                reason=f"reverted: {_describe(before, limits)} gave {rate:.3g} steps/s after {memory.rate_before:.3g}",
                memory=m,
            )
        lowered = limits.staleness < before.staleness
        tightened = memory.probe in ("tighten", "waste")
        # a tightening for nothing but room must not starve the trainer; one for freshness or waste is
        # judged by throughput alone (it makes the trainer wait more by construction)
        if tightened and (rate < memory.rate_before * (1 - LOSS) or (starved and memory.probe == "tighten" and not lowered)):
            if limits.window < before.window:
                m = msgspec.structs.replace(m, window_floor=before.window - 1, window_floor_until=now + BAR_INTERVALS)
            if lowered:
                m = msgspec.structs.replace(
                    m, staleness_floor=before.staleness - 1, staleness_floor_until=now + BAR_INTERVALS
                )
            return Decision(
                limits=before,
                reason=f"reverted: {_describe(before, limits)} cost throughput "
                f"({rate:.3g} steps/s after {memory.rate_before:.3g}, trainer idle {obs.trainer_idle:.2f})",
                memory=m,
            )
        if tightened and limits.staleness == 0 < before.staleness:
            # on-policy kept: its trainer waits by construction, which must not read as a reason to leave it
            m = msgspec.structs.replace(m, staleness_ceiling=1, staleness_ceiling_until=now + BAR_INTERVALS)
        if memory.probe == "waste" and limits.window < before.window:
            # a narrower window that wastes less and costs no throughput: the wider one is a cost, barred a while
            m = msgspec.structs.replace(m, window_ceiling=limits.window + 1, window_ceiling_until=now + BAR_INTERVALS)

    def probe(kind: str, new: Limits, reason: str) -> Decision:
        return Decision(
            limits=new,
            reason=reason,
            # a raise for drops opens admission at once (no groups of the new limits to wait for): judged
            # on the next interval, so that drops that go on raise it a notch an interval, as waste demands
            memory=msgspec.structs.replace(m, probe=kind, settle=0 if kind == "drops" else SETTLE, before=limits, rate_before=rate),
        )

    # 3. stale drops: raise the bound (a probe); a waiting trainer may still widen the window below
    s_ceiling = bounds.max_staleness
    if m.staleness_ceiling and now < m.staleness_ceiling_until:
        s_ceiling = min(s_ceiling, m.staleness_ceiling - 1)
    if obs.stale_drops > RAISE_ON * max(1, obs.trained) and limits.staleness < s_ceiling:
        raised = msgspec.structs.replace(limits, staleness=limits.staleness + 1)
        why = f"{obs.stale_drops} stale drop(s): staleness {limits.staleness} -> {raised.staleness}"
        if m.starved >= PERSIST and obs.window_full > MAJORITY and limits.window < _window_ceiling(bounds, m, now):
            grown = msgspec.structs.replace(raised, window=min(_window_ceiling(bounds, m, now), 2 * limits.window))
            return Decision(
                limits=grown,
                reason=f"{why}; trainer idle {obs.trainer_idle:.2f} with the window full: window {limits.window} -> {grown.window}",
                memory=msgspec.structs.replace(m, probe="loosen", settle=SETTLE, before=raised, rate_before=rate),
            )
        return probe("drops", raised, why)

    # 3b. stale drops at the highest staleness allowed now (the hard bound, or a bar) while the trainer is
    # fed: fewer groups in flight waste less
    w_floor = bounds.min_window
    if m.window_floor and now < m.window_floor_until:
        w_floor = max(w_floor, m.window_floor + 1)
    if obs.stale_drops > WASTE * max(1, obs.trained) and not starved and limits.window > w_floor:
        new = msgspec.structs.replace(limits, window=max(w_floor, limits.window // 2))
        return probe(
            "waste", new,
            f"{obs.stale_drops} stale drop(s) at the highest staleness allowed now ({limits.staleness}), trainer idle "
            f"{obs.trainer_idle:.2f}: window {limits.window} -> {new.window}",
        )

    # 4. the trainer waits: loosen what limits generation
    if m.starved >= PERSIST:
        if obs.room_exhausted > MAJORITY and limits.staleness < s_ceiling:
            new = msgspec.structs.replace(limits, staleness=limits.staleness + 1)
            return probe(
                "loosen", new,
                f"trainer idle {obs.trainer_idle:.2f} while the staleness rule held admission back "
                f"{obs.room_exhausted:.0%} of the time: staleness {limits.staleness} -> {new.staleness}",
            )
        ceiling = _window_ceiling(bounds, m, now)
        if obs.window_full > MAJORITY and limits.window < ceiling:
            new = msgspec.structs.replace(limits, window=min(ceiling, 2 * limits.window))
            return probe(
                "loosen", new,
                f"trainer idle {obs.trainer_idle:.2f} with the window full {obs.window_full:.0%} of the time: "
                f"window {limits.window} -> {new.window}",
            )
        return Decision(limits=limits, reason=f"trainer idle {obs.trainer_idle:.2f}; generation saturated at these limits", memory=m)

    # 5. generation is ahead: tighten what costs nothing
    if m.fed >= CALM:
        if obs.queue_full > MAJORITY and limits.window > w_floor:
            new = msgspec.structs.replace(limits, window=max(w_floor, limits.window // 2))
            return probe(
                "tighten", new,
                f"queue full {obs.queue_full:.0%} of the time, trainer idle {obs.trainer_idle:.2f}: "
                f"window {limits.window} -> {new.window}",
            )
        s_floor = bounds.min_staleness
        if m.staleness_floor >= 0 and now < m.staleness_floor_until:
            s_floor = max(s_floor, m.staleness_floor + 1)
        if obs.stale_drops == 0 and limits.staleness > s_floor:
            new = msgspec.structs.replace(limits, staleness=limits.staleness - 1)
            if not math.isnan(obs.age_max) and obs.age_max < limits.staleness:
                return probe(
                    "tighten", new,
                    f"trainer fed (idle {obs.trainer_idle:.2f}), oldest sample {obs.age_max:g} < bound: "
                    f"staleness {limits.staleness} -> {new.staleness}",
                )
            if obs.behaviour_kl > SPREAD_KL:
                return probe(
                    "tighten", new,
                    f"trainer fed (idle {obs.trainer_idle:.2f}), importance weights spread (behaviour KL "
                    f"{obs.behaviour_kl:.2g}): fresher samples, if they cost no throughput: "
                    f"staleness {limits.staleness} -> {new.staleness}",
                )
    return Decision(limits=limits, reason="hold", memory=m)


def _window_ceiling(bounds: Bounds, m: Memory, now: int) -> int:
    """The widest window allowed now: the bound, or below a bar that has not expired."""
    if m.window_ceiling and now < m.window_ceiling_until:
        return min(bounds.max_window, m.window_ceiling - 1)
    return bounds.max_window


def _describe(before: Limits, after: Limits) -> str:
    parts = []
    if after.window != before.window:
        parts.append(f"window {before.window} -> {after.window}")
    if after.staleness != before.staleness:
        parts.append(f"staleness {before.staleness} -> {after.staleness}")
    return ", ".join(parts) or "no change"


def bounds_for(
    *, min_window: int, max_window: int, staleness_threshold: int, sync_every: int, initial_window: int
) -> tuple[Bounds, Limits]:
    """The bounds and the starting limits: the configured window (clipped to the bounds) and the
    staleness where the defaults put it (1, or the sync period's need), never above the hard bound.
    The floor is the sync period's need alone: 0 (on-policy) with a sync every step."""
    floor = min(staleness_threshold, sync_every - 1)
    bounds = Bounds(min_window=min_window, max_window=max_window, min_staleness=floor, max_staleness=staleness_threshold)
    start = Limits(window=min(max_window, max(min_window, initial_window)), staleness=min(staleness_threshold, max(1, floor)))
    return bounds, start
