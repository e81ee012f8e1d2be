"""Continuous batching on rank 0: the one generation loop, for a static batch and for a server.

The unit of scheduling is a sequence. Cache rows are slots, split into M lanes (contiguous slot
ranges); a sequence takes a free slot of the lane with most room when admitted and gives it back
when it finishes (EOS, max_tokens, a stop string from its callback) or is cancelled. Each step of
a lane sends up to two units into the ring: one decode token for each of its decoding sequences,
and prefill chunks of its waiting prompts up to a token budget, so new prompts enter without
stalling the others. A lane waits for its sampled tokens before its next step; with M >= P lanes
in flight every stage has work. Rank 0 alone decides when a sequence ends; the last stage only
samples, with the parameters it got at admission.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from distributed.pipeline import DEFAULT_CHUNK_NO_WINDOW, Admission, GenerationParams, Pipeline, Unit, split_rows
from model.args import first_line
from model.cache import cache_capacity
from model.sampling import SamplingParams


class StepCost:
    """What a unit costs the first stage, learnt as the server runs: seconds ~ fixed + per_token * n
    for a unit of n padded tokens (rows x longest row), a least-squares line over the units seen,
    older ones forgotten by `decay` per unit. Merging a step's decode rows into its prefill unit
    saves one fixed cost (a pass over the weights, the per-step dispatch) and pays per_token for
    every padded decode position: worth it on a small or overhead-bound model, not on one whose
    steps are compute-bound (mistral-mini in fp32: 16 rows x 16 tokens cost ~6x 16 + 16 alone)."""

    def __init__(self, decay: float = 0.98) -> None:
        self.decay = decay
        self.w = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def record(self, n: int, seconds: float) -> None:
        d = self.decay
        self.w, self.sx, self.sy = d * self.w + 1, d * self.sx + n, d * self.sy + seconds
        self.sxx, self.sxy = d * self.sxx + n * n, d * self.sxy + n * seconds

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per token), or None until units of clearly different sizes were seen."""
        spread = self.w * self.sxx - self.sx * self.sx  # w^2 x the variance of n
        if self.w < 3 or spread <= 0.01 * self.sxx * self.w:
            return None
        per_token = (self.w * self.sxy - self.sx * self.sy) / spread
        return max(0.0, (self.sy - per_token * self.sx) / self.w), max(0.0, per_token)

    def merge_pays(self, merged: int, apart: list[int]) -> bool:
        """One unit of `merged` padded tokens against len(apart) units of those sizes."""
        fit = self.fit()
        if fit is None:
            return True  # nothing learnt yet: merge (it was always done before this rule)
        fixed, per_token = fit
        return fixed + per_token * merged <= len(apart) * fixed + per_token * sum(apart)


def padded_tokens(work: list[tuple[Sequence, list[int], int]]) -> int:
    """Tokens a unit of this work computes: rows from the first slot to the last x the longest row."""
    slots = [s.slot for s, _, _ in work]
    return (max(slots) - min(slots) + 1) * max(len(ids) for _, ids, _ in work)


# A merged step's chunks are cut to budget / rows, but not below this many tokens.
MIN_MERGED_CHUNK = 16
# Under --itl_cap a step prefills at least this many prompt tokens. It is the cap's trade between even
# gaps and time to first token: on mistral-mini under Poisson arrivals at 70 %, ITL p99 / p50 was 1.1-1.6x
# at 16 (TTFT p50 1.3-1.65 s), 2.4-2.75x at 32 (0.51-0.74 s), 3.6x at 48 (0.55 s); 0.54-0.58 s uncapped.
MIN_CAPPED_CHUNK = 32


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_ids: tuple[int, ...] = ()
    seq_index: int = 0  # mixed into seeded draws (the prompt's index within its request)
    # Called on rank 0 for every new token; returning False ends the sequence (a stop string).
    on_token: Callable[[Sequence, int], bool] | None = None
    on_finish: Callable[[Sequence], None] | None = None  # once, with finish_reason set
    out: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # stop, length, cancelled, or "error: ..."
    cancelled: bool = False  # set from any thread: the client left
    slot: int = -1
    lane: int = -1
    prefilled: int = 0

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt)


class Scheduler:
    """Drives one session of the pipeline: `slots` cache rows of `capacity` positions in `lanes`."""

    def __init__(
        self,
        pipeline: Pipeline,
        slots: int,
        lanes: int,
        capacity: int,
        chunk: int,
        token_budget: int | None,
        static: bool = False,
        merge: bool = False,
        decode_lanes: int | None = None,
        learn_merge: bool = True,
        itl_cap: float = 0.0,
    ) -> None:
        self.pipeline, self.capacity, self.chunk = pipeline, capacity, chunk
        # static: admit only into an empty engine (one static batch at a time: a benchmark baseline)
        self.static = static
        # merge: decode rows ride in the step's prefill unit (one pass; a decode row's sums then run
        # over a padded key set, so its last bits may differ from a decode-only step)
        self.merge = merge
        self.learn_merge = learn_merge  # merge only where StepCost says it pays (else always)
        self.token_budget = token_budget or math.inf
        # itl_cap: a step that prefills besides decoding may cost at most this many decode-only steps
        # (StepCost's prediction), so decoding sequences see even gaps; 0: the token budget alone
        self.itl_cap = itl_cap
        self.capped_steps = 0  # steps whose prefill the cap cut below the token budget
        # decode_lanes: once nothing waits and every sequence decodes, re-cut the slots into this
        # many lanes (a static batch: prefill pipelined over `lanes`, decode in `decode_lanes`).
        self.decode_lanes = decode_lanes if decode_lanes not in (None, lanes) else None
        self.slots = slots
        self.lanes = split_rows(slots, lanes)
        self.free = [list(range(r.start, r.stop)) for r in self.lanes]  # per lane, lowest first
        self.running: list[list[Sequence]] = [[] for _ in self.lanes]
        self.waiting: deque[tuple[Sequence, int | None]] = deque()  # (sequence, fixed slot)
        self.expected: deque[tuple[int, list[Sequence]]] = deque()  # (lane, sequences sampled)
        self.in_flight = [0] * len(self.lanes)  # sampling units of each lane not answered yet
        self.busy_seconds = [0.0] * pipeline.n_stages
        self.cost = StepCost()  # the first stage's time per unit, for the merge choice
        self.merged_steps = self.split_steps = 0  # steps with decode and prefill work, merged or not
        self.cut_units = 0  # prefill units cut at gaps of empty rows (_runs)
        pipeline.setup(slots, capacity)

    # -- the loop -----------------------------------------------------------------------------
    def submit(self, seq: Sequence, slot: int | None = None) -> None:
        if seq.max_tokens == 0:
            self._finish(seq, "length")
        else:
            self.waiting.append((seq, slot))

    @property
    def active(self) -> bool:
        return bool(self.waiting or self.expected or any(self.running))

    @property
    def n_running(self) -> int:
        return sum(len(r) for r in self.running)

    def step(self) -> None:
        """Admit what fits, give every lane that is not waiting its next step, then take one answer."""
        self._reap_cancelled()
        self._admit()
        if self.decode_lanes is not None and not self.waiting and all(s.decoding for r in self.running for s in r):
            if self.expected:
                self._receive()  # let the ring drain before the rows are re-cut
                return
            self._relane(self.decode_lanes)
        for lane in range(len(self.lanes)):
            if self.in_flight[lane] == 0:
                for unit, sampled in self._lane_step(lane):
                    t0 = self.pipeline.stage.busy  # rank 0 runs the first stage inside dispatch
                    self.pipeline.dispatch(unit)
                    self.cost.record(unit.tokens.numel(), self.pipeline.stage.busy - t0)
                    if unit.sample:
                        self.expected.append((lane, sampled))
                        self.in_flight[lane] += 1
        if self.expected:
            self._receive()

    def close(self) -> None:
        self.pipeline.end()

    def _relane(self, lanes: int) -> None:
        """Cut the slots into `lanes` lanes again (nothing in flight); sequences keep their slots."""
        assert not self.expected and not any(self.in_flight)
        seqs = [s for r in self.running for s in r]
        self.decode_lanes = None
        self.lanes = split_rows(self.slots, lanes)
        self.running = [[] for _ in self.lanes]
        self.free = [list(range(r.start, r.stop)) for r in self.lanes]
        self.in_flight = [0] * len(self.lanes)
        for seq in sorted(seqs, key=lambda s: s.slot):
            seq.lane = next(i for i, r in enumerate(self.lanes) if r.start <= seq.slot < r.stop)
            self.running[seq.lane].append(seq)
            self.free[seq.lane].remove(seq.slot)

    def fail(self, reason: str) -> None:
        """End every sequence (the pipeline is gone)."""
        for seq in [s for lane in self.running for s in lane] + [s for s, _ in self.waiting]:
            self._finish(seq, reason)
        self.waiting.clear()

    # -- admission and release ----------------------------------------------------------------
    def _admit(self) -> None:
        admitted: list[Admission] = []
        if self.static and any(self.running):
            return
        while self.waiting:
            seq, fixed = self.waiting[0]
            if seq.cancelled:
                self.waiting.popleft()
                self._finish(seq, "cancelled")
                continue
            if fixed is not None:
                lane = next(i for i, r in enumerate(self.lanes) if r.start <= fixed < r.stop)
                if fixed not in self.free[lane]:
                    break
                slot = fixed
            else:
                lane = max(range(len(self.lanes)), key=lambda i: len(self.free[i]))
                if not self.free[lane]:
                    break  # first come, first served: nobody overtakes the head of the queue
                slot = self.free[lane][0]
            self.waiting.popleft()
            self.free[lane].remove(slot)
            seq.slot, seq.lane, seq.prefilled = slot, lane, 0
            self.running[lane].append(seq)
            admitted.append(Admission(slot, len(seq.prompt), seq.seq_index, seq.sampling))
        if admitted:
            self.pipeline.admit(admitted)

    def _reap_cancelled(self) -> None:
        # A lane with answers outstanding may still sample a cancelled sequence's slot: its
        # release then waits for that answer.
        for lane, seqs in enumerate(self.running):
            if self.in_flight[lane] == 0:
                for seq in [s for s in seqs if s.cancelled]:
                    self._finish(seq, "cancelled")

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        if seq.slot >= 0 and seq in self.running[seq.lane]:
            self.running[seq.lane].remove(seq)
            self.free[seq.lane].append(seq.slot)
            self.free[seq.lane].sort()
        if seq.on_finish is not None:
            seq.on_finish(seq)

    # -- units ----------------------------------------------------------------------------------
    def _lane_step(self, lane: int) -> list[tuple[Unit, list[Sequence]]]:
        seqs = self.running[lane]
        units = []
        decoders = sorted((s for s in seqs if s.decoding), key=lambda s: s.slot)
        # The j-th generated token (0-based) sits at position len(prompt) + j.
        work = [(s, [s.out[-1]], len(s.prompt) + len(s.out) - 1) for s in decoders]
        # The prompt tokens this step may take: the token budget, and under --itl_cap what keeps the
        # step within itl_cap decode-only steps (a merged unit and a separate prefill unit cost
        # differently, so each has its own allowance), counted in padded tokens.
        cap = self._cap()
        fit = self.cost.fit() if work and cap > 0 else None
        merged_budget = split_budget = self.token_budget
        if fit is not None:
            decode_tokens = padded_tokens(work)
            merged_budget = self._allowance(fit, decode_tokens, cap, merged=True)
            split_budget = self._allowance(fit, decode_tokens, cap, merged=False)
        if fit is None:
            plan = self._plan(seqs, merged_budget, bool(self.merge and decoders))
        else:
            plan = self._plan_unit(seqs, merged_budget, [s.slot for s in decoders]) if self.merge else []
        chunks = self._take(plan)
        if self.merge and work and chunks:
            # One pass for the whole step (decode rows padded to the chunk length): every weight is
            # read once per step instead of twice, where the padding costs less than that pass.
            both = sorted(work + chunks, key=lambda c: c[0].slot)
            if not self.learn_merge or self.cost.merge_pays(
                padded_tokens(both), [padded_tokens(work), padded_tokens(chunks)]
            ):
                self.merged_steps += 1
                self.capped_steps += merged_budget < self.token_budget
                self._advance(plan)
                finishing = [s for s, _, _ in chunks if s.decoding]
                return [(self._unit(both, sample=True), sorted(decoders + finishing, key=lambda s: s.slot))]
            self.split_steps += 1
        if fit is not None:
            plan = self._plan_unit(seqs, split_budget)
            chunks = self._take(plan)
        self.capped_steps += bool(plan) and split_budget < self.token_budget
        self._advance(plan)
        if work:
            units.append((self._unit(work, sample=True), decoders))
        if chunks:
            chunks.sort(key=lambda c: c[0].slot)
            for group in self._runs(chunks):
                ending = [s for s, _, _ in group if s.decoding]
                units.append((self._unit(group, sample=bool(ending)), ending))
        return units

    def _cap(self) -> float:
        """The --itl_cap this step works to: as set, or lifted (0) once every slot is taken. A saturated
        server prefills in full steps: capped, admitted prompts wait longer to decode, fewer rows
        decode a step and throughput drops (mistral-mini, 16 clients on 16 slots: 0.80x a static
        batch with the cap always on, the same tokens/s as uncapped with it lifted)."""
        taken = self.n_running + len(self.waiting)
        if self.itl_cap <= 0 or taken >= self.slots:
            return 0.0
        return self.itl_cap

    def _allowance(self, fit: tuple[float, float], decode_tokens: int, cap: float, merged: bool) -> float:
        """Under --itl_cap: the prompt tokens a step may take beside a decode unit of `decode_tokens`
        padded tokens, so that it costs at most `cap` decode-only steps (StepCost's line): merged,
        one unit of that many padded tokens; apart, a second unit of its own fixed cost. Never below
        MIN_CAPPED_CHUNK (new prompts advance) nor above the token budget."""
        fixed, per_token = fit
        if per_token <= 0:
            return self.token_budget
        decode = fixed + per_token * decode_tokens
        extra = cap * decode - fixed if merged else (cap - 1) * decode - fixed
        return min(self.token_budget, max(MIN_CAPPED_CHUNK, int(extra / per_token)))

    def _plan(self, seqs: list[Sequence], budget: float, merging: bool) -> list[tuple[Sequence, int]]:
        """(sequence, prompt tokens it prefills this step), in admission order, within `budget`.
        Merging, every row of the unit is padded to its longest chunk: the budget then bounds the
        padded tokens (rows x chunk length), so that a long-window model does not merge a 256-token
        chunk with 16 decode rows into 16 x 256 tokens; never below MIN_MERGED_CHUNK (short windows
        keep their chunks, and prompts still advance by whole chunks)."""
        longest = self.chunk
        if merging:
            rows = [s.slot for s in seqs if s.decoding or s.prefilled < len(s.prompt)]
            per_row = budget // (max(rows) - min(rows) + 1)
            longest = int(min(self.chunk, max(MIN_MERGED_CHUNK, per_row)))
        plan = []
        for s in seqs:
            n = int(min(longest, len(s.prompt) - s.prefilled, budget))
            if s.decoding or n <= 0:
                continue
            plan.append((s, n))
            budget -= n
        return plan

    def _plan_unit(self, seqs: list[Sequence], budget: float, decoding: list[int] | None = None
                   ) -> list[tuple[Sequence, int]]:
        """Under --itl_cap, the prompts of one unit, in admission order while the unit's padded size
        (rows from its first slot to its last x the first prompt's chunk) stays within `budget`, so
        that a burst of arrivals is prefilled a few prompts a step, not all in one long step.
        `decoding`: the slots of decode rows the unit also carries (a merged step); none fitting
        means no merge. A unit of its own always takes its first prompt, at least MIN_CAPPED_CHUNK
        tokens of it (new prompts always advance)."""
        plan: list[tuple[Sequence, int]] = []
        slots = list(decoding or [])
        width = 0
        for s in seqs:
            left = len(s.prompt) - s.prefilled
            if s.decoding or left <= 0:
                continue
            span = max([*slots, s.slot]) - min([*slots, s.slot]) + 1
            if not plan:
                width = int(min(self.chunk, left, max(MIN_CAPPED_CHUNK, budget // span)))
                if decoding and span * width > budget:
                    break
            elif span * width > budget:
                break  # first come, first served
            plan.append((s, min(width, left)))
            slots.append(s.slot)
        return plan

    @staticmethod
    def _take(plan: list[tuple[Sequence, int]]) -> list[tuple[Sequence, list[int], int]]:
        """The plan's work items (sequence, its tokens, position of the first)."""
        return [(s, s.prompt[s.prefilled : s.prefilled + n], s.prefilled) for s, n in plan]

    @staticmethod
    def _advance(plan: list[tuple[Sequence, int]]) -> None:
        """The plan's sequences move past the prompt tokens it gave them (once its units are built)."""
        for s, n in plan:
            s.prefilled += n

    def _runs(self, work: list[tuple[Sequence, list[int], int]]) -> list[list[tuple[Sequence, list[int], int]]]:
        """work (sorted by slot) cut into units at gaps of empty rows whose padding would cost the first
        stage more than a unit's fixed cost (StepCost); one unit while nothing is learnt."""
        fit = self.cost.fit() if self.merge and self.learn_merge else None
        if fit is None or len(work) < 2:
            return [work]
        fixed, per_token = fit
        width = max(len(ids) for _, ids, _ in work)
        groups = [[work[0]]]
        for prev, cur in zip(work, work[1:], strict=False):
            gap = cur[0].slot - prev[0].slot - 1
            if per_token * gap * width > fixed:
                groups.append([cur])
            else:
                groups[-1].append(cur)
        self.cut_units += len(groups) - 1
        return groups

    @staticmethod
    def _unit(work: list[tuple[Sequence, list[int], int]], sample: bool) -> Unit:
        """work: (sequence, its tokens, position of the first), sorted by slot. Rows between the
        first and last slot that have no work are padding."""
        first, last = work[0][0].slot, work[-1][0].slot
        t = max(len(ids) for _, ids, _ in work)
        tokens = [[0] * t for _ in range(last - first + 1)]
        positions = [[-1] * t for _ in range(last - first + 1)]
        for s, ids, start in work:
            tokens[s.slot - first][: len(ids)] = ids
            positions[s.slot - first][: len(ids)] = range(start, start + len(ids))
        return Unit(slice(first, last + 1), torch.tensor(tokens), torch.tensor(positions), sample)

    def _receive(self) -> None:
        lane, sampled = self.expected.popleft()
        tokens, self.busy_seconds = self.pipeline.result(len(sampled))
        self.in_flight[lane] -= 1
        for seq, tok in zip(sampled, tokens, strict=True):
            if seq.finish_reason is not None:
                continue
            if seq.cancelled:
                self._finish(seq, "cancelled")
            elif tok in seq.eos_ids:
                self._finish(seq, "stop")
            else:
                seq.out.append(tok)
                keep = seq.on_token(seq, tok) if seq.on_token is not None else True
                if not keep:
                    self._finish(seq, "stop")
                elif len(seq.out) >= seq.max_tokens:
                    self._finish(seq, "length")


def generate_batch(
    pipeline: Pipeline,
    prompts: list[list[int]],
    params: GenerationParams,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """A static batch through the scheduler: prompt b takes slot b, lanes are the M micro-batches
    (params.decode_microbatches of them once every prompt is prefilled), and every prompt is
    prefilled one chunk per step without a budget."""
    args = pipeline.stage.model.args
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty; give at least one token (e.g. BOS)")
        bad = [t for t in p if not 0 <= t < args.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {args.vocab_size})")
    if not prompts or params.max_tokens == 0:
        return [[] for _ in prompts]
    capacity = cache_capacity(args.sliding_window, max(map(len, prompts)) + params.max_tokens)
    chunk = params.chunk_size or args.sliding_window or DEFAULT_CHUNK_NO_WINDOW
    lanes = params.num_microbatches or pipeline.n_stages
    decode_lanes = params.decode_microbatches or lanes
    sched = Scheduler(pipeline, len(prompts), lanes, capacity, chunk, token_budget=None, decode_lanes=decode_lanes)

    def tell(seq: Sequence, tok: int) -> bool:
        if on_token is not None:
            on_token(seq.seq_index, tok)
        return True

    seqs = [Sequence(p, params.max_tokens, params.sampling, params.eos_ids, b, tell) for b, p in enumerate(prompts)]
    for b, seq in enumerate(seqs):
        sched.submit(seq, slot=b)
    while sched.active:
        sched.step()
    sched.close()
    return [s.out for s in seqs]


class Engine:
    """Rank 0's serving loop: runs the scheduler while requests arrive from other threads.

    submit(), request_stop() and the sequences' `cancelled` flags are what other threads touch.
    When the pipeline fails (a stage is lost) every open sequence ends with "error: ...",
    `error` is set, and run() re-raises after `grace_s` (time for the errors to reach clients)."""

    def __init__(self, scheduler: Scheduler, keepalive_s: float, grace_s: float = 1.0) -> None:
        self.scheduler, self.keepalive_s, self.grace_s = scheduler, keepalive_s, grace_s
        self.inbox: queue.Queue[Sequence | None] = queue.Queue()
        self.error: str | None = None
        self.on_step: Callable[[Scheduler], None] | None = None  # metrics, after every step
        self._stopping = False
        self._lock = threading.Lock()

    def submit(self, seq: Sequence) -> None:
        with self._lock:  # against fail(): nothing submitted after it is left waiting
            if self.error is None:
                self.inbox.put(seq)
                return
        seq.finish_reason = f"error: {self.error}"
        if seq.on_finish is not None:
            seq.on_finish(seq)

    def request_stop(self) -> None:
        self._stopping = True
        self.inbox.put(None)

    @property
    def queue_depth(self) -> int:
        return self.inbox.qsize() + len(self.scheduler.waiting)

    def run(self) -> None:
        """Serve until request_stop(); the session stays open (the caller ends it)."""
        sched, last_sent = self.scheduler, time.monotonic()
        try:
            while not self._stopping:
                block = not sched.active
                try:
                    while True:
                        item = self.inbox.get(block=block, timeout=self.keepalive_s if block else None)
                        block = False
                        if item is not None:
                            sched.submit(item)
                except queue.Empty:
                    pass
                if self._stopping:
                    break
                if sched.active:
                    sched.step()
                    last_sent = time.monotonic()
                elif time.monotonic() - last_sent >= self.keepalive_s:
                    sched.pipeline.keepalive()  # the other ranks stay inside their timeout
                    last_sent = time.monotonic()
                if self.on_step is not None:
                    self.on_step(sched)
        except Exception as e:  # a lost stage (PeerLost): nobody can be served any more
            with self._lock:
                self.error = first_line(e)
            sched.fail(f"error: {self.error}")
            while not self.inbox.empty():
                item = self.inbox.get_nowait()
                if item is not None:
                    self.submit(item)
            if self.on_step is not None:
                self.on_step(sched)  # the errors reach the clients
            time.sleep(self.grace_s)
            raise
