"""The micro-batch schedule: one generation loop for one process or a pipeline of P stages.

Rank 0 (stage 0) owns the requests: it cuts a batch into M micro-batches and every prompt into
chunks, and feeds work units into the ring. A unit is (micro-batch, prefill chunk) or
(micro-batch, decode step). Each stage runs its layers on a unit and passes the activations on;
the last stage samples and sends token ids + finished flags back to stage 0, which turns them
into the micro-batch's next decode unit. With M >= P every stage has a unit to work on.
With one stage the "ring" is a local queue; the loop is the same.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from distributed.p2p import HEADER_LEN, INLINE_POSITIONS, Kind, Links
from model.cache import RollingCache, cache_capacity
from model.sampling import SamplingParams, sample
from model.transformer import Transformer

# Chunk size for models without a sliding window (the window is the default otherwise).
DEFAULT_CHUNK_NO_WINDOW = 1024

TokenCallback = Callable[[int, int], None]  # (sequence index in the request, token id)


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 32
    sampling: SamplingParams = field(default_factory=SamplingParams)
    chunk_size: int | None = None  # None: the sliding window (or DEFAULT_CHUNK_NO_WINDOW)
    num_microbatches: int | None = None  # None: the number of stages
    eos_ids: tuple[int, ...] = (2,)  # any of these ends a sequence (not included in the output)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"--max_tokens must be >= 0, got {self.max_tokens}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"--chunk_size must be >= 1, got {self.chunk_size}")
        if self.num_microbatches is not None and self.num_microbatches < 1:
            raise ValueError(f"--num_microbatches must be >= 1, got {self.num_microbatches}")


def split_rows(batch: int, parts: int) -> list[slice]:
    """Contiguous, as even as possible, never empty: 5 rows in 2 parts -> [0:3], [3:5]."""
    parts = max(1, min(parts, batch))
    base, extra = divmod(batch, parts)
    out, start = [], 0
    for i in range(parts):
        n = base + (i < extra)
        out.append(slice(start, start + n))
        start += n
    return out


@dataclass
class Unit:
    mb: int
    tokens: torch.Tensor  # [B_mb, T] ids (padding 0)
    positions: torch.Tensor  # [B_mb, T] absolute positions (padding -1)
    sample: bool  # the last stage samples after this unit


class Stage:
    """This process's share of the model and of the per-request state."""

    def __init__(self, model: Transformer, device: torch.device) -> None:
        self.model, self.device = model, device
        self.dtype = next(model.parameters()).dtype
        self.cache: RollingCache | None = None

    def begin(self, batch: int, capacity: int, params: GenerationParams) -> None:
        self.cache = self.model.make_cache(batch, capacity)
        self.params = params
        if self.model.is_last:
            self.logits = torch.zeros(batch, self.model.args.vocab_size, device=self.device)
            self.count = torch.zeros(batch, dtype=torch.long, device=self.device)
            self.done = torch.zeros(batch, dtype=torch.bool, device=self.device)

    def end(self) -> None:
        self.cache = None
        self.logits = self.count = self.done = torch.empty(0)

    @torch.inference_mode()
    def run(self, rows: slice, x: torch.Tensor, positions: torch.Tensor, sample_now: bool) -> torch.Tensor:
        """Activations [B, T, dim] for the next stage, or on the last stage [2, B]: token ids
        (-1: none produced) and finished flags, once `sample_now`."""
        assert self.cache is not None, "a unit arrived outside a request"
        if not self.model.is_last:
            return self.model(x, positions, self.cache, rows)
        valid = positions >= 0  # [B, T]; valid tokens are a prefix of each row
        select = (valid.sum(1) - 1).clamp(min=0)
        logits = self.model(x, positions, self.cache, rows, select=select)  # [B, V]
        has = valid.any(1)
        # A short prompt ends in an earlier chunk than the longest one: keep its last logits.
        self.logits[rows] = torch.where(has[:, None], logits, self.logits[rows])
        if not sample_now:
            return torch.empty(0)
        p = self.params
        steps = self.count[rows].tolist() if p.sampling.temperature > 0 else [0] * (rows.stop - rows.start)
        tokens = sample(self.logits[rows], p.sampling, list(range(rows.start, rows.stop)), steps)
        done_before = self.done[rows].clone()  # a copy: self.done[rows] is overwritten below
        count = self.count[rows] + (~done_before).long()
        if p.eos_ids:
            eos_t = torch.tensor(p.eos_ids, dtype=tokens.dtype, device=tokens.device)
            eos = ~done_before & torch.isin(tokens, eos_t)
        else:
            eos = torch.zeros_like(done_before)
        done = done_before | eos | (count >= p.max_tokens)
        self.count[rows], self.done[rows] = count, done
        tokens = torch.where(done_before | eos, torch.full_like(tokens, -1), tokens)
        return torch.stack([tokens, done.long()])


class Pipeline:
    """Runs generation; rank 0 calls generate()/shutdown(), the other ranks call serve()."""

    def __init__(
        self, model: Transformer, stage: int, n_stages: int, device: torch.device, links: Links | None
    ) -> None:
        assert (links is None) == (n_stages == 1)
        self.stage = Stage(model, device)
        self.index, self.n_stages, self.device, self.links = stage, n_stages, device, links
        self.dim = model.args.dim
        self._local: deque[torch.Tensor] = deque()  # the one-stage "ring"
        self._groups: list[slice] = []

    @property
    def is_last(self) -> bool:
        return self.index == self.n_stages - 1

    # -- rank 0 ---------------------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]], params: GenerationParams, on_token: TokenCallback | None = None
    ) -> list[list[int]]:
        """Generate for a batch of token-id prompts; returns the new ids per prompt (no EOS)."""
        assert self.index == 0, "generate() runs on stage 0; the other ranks serve()"
        args = self.stage.model.args
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty; give at least one token (e.g. BOS)")
            bad = [t for t in p if not 0 <= t < args.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {args.vocab_size})")
        out: list[list[int]] = [[] for _ in prompts]
        if not prompts or params.max_tokens == 0:
            return out
        lens = [len(p) for p in prompts]
        capacity = cache_capacity(args.sliding_window, max(lens) + params.max_tokens)
        chunk = params.chunk_size or args.sliding_window or DEFAULT_CHUNK_NO_WINDOW
        groups = split_rows(len(prompts), params.num_microbatches or self.n_stages)
        self._begin(len(prompts), len(groups), capacity, params)

        work: deque[Unit] = deque()
        for m, rows in enumerate(groups):
            for start in range(0, max(lens[rows]), chunk):
                work.append(
                    self._prefill_unit(m, prompts[rows], start, chunk, is_last_chunk=start + chunk >= max(lens[rows]))
                )
        expected: deque[int] = deque()  # micro-batches whose token message comes next, in order
        done = [False] * len(prompts)
        active = len(groups)
        while active:
            if work:
                unit = work.popleft()
                self._dispatch(unit)
                if unit.sample:
                    expected.append(unit.mb)
                continue
            m = expected.popleft()
            rows = groups[m]
            msg = self._result(rows.stop - rows.start).tolist()
            for j, (tok, fin) in enumerate(zip(*msg, strict=True)):
                b = rows.start + j
                if tok >= 0:
                    out[b].append(tok)
                    if on_token is not None:
                        on_token(b, tok)
                done[b] = bool(fin)
            if all(done[rows]):
                active -= 1
            else:
                work.append(self._decode_unit(m, rows, lens, out, done))
        self._end()
        return out

    def _prefill_unit(self, mb: int, prompts: list[list[int]], start: int, chunk: int, is_last_chunk: bool) -> Unit:
        pieces = [p[start : start + chunk] for p in prompts]
        t = max(len(x) for x in pieces)
        tokens = torch.zeros(len(prompts), t, dtype=torch.long)
        positions = torch.full((len(prompts), t), -1, dtype=torch.long)
        for i, x in enumerate(pieces):
            tokens[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            positions[i, : len(x)] = torch.arange(start, start + len(x))
        return Unit(mb, tokens, positions, sample=is_last_chunk)

    def _decode_unit(self, mb: int, rows: slice, lens: list[int], out: list[list[int]], done: list[bool]) -> Unit:
        # The j-th generated token (0-based) of sequence b sits at position lens[b] + j.
        ids = range(rows.start, rows.stop)
        tokens = torch.tensor([[0 if done[b] else out[b][-1]] for b in ids], dtype=torch.long)
        positions = torch.tensor([[-1 if done[b] else lens[b] + len(out[b]) - 1] for b in ids], dtype=torch.long)
        return Unit(mb, tokens, positions, sample=True)

    def _begin(self, batch: int, n_groups: int, capacity: int, params: GenerationParams) -> None:
        self._groups = split_rows(batch, n_groups)
        self.stage.begin(batch, capacity, params)
        if self.links is not None:
            s = params.sampling
            n_eos = len(params.eos_ids)
            self.links.send_header([Kind.BEGIN, batch, n_groups, capacity, params.max_tokens, n_eos, s.seed])
            # Sampling parameters and EOS ids (exact in float64) in one message.
            floats = [s.temperature, s.top_p, *map(float, params.eos_ids)]
            self.links.send_tensor(torch.tensor(floats, dtype=torch.float64, device=self.device))

    def _end(self) -> None:
        self.stage.end()
        if self.links is not None:
            self.links.send_header([Kind.END])
            self.links.flush()

    def _dispatch(self, unit: Unit) -> None:
        rows = self._groups[unit.mb]
        tokens, positions = unit.tokens.to(self.device), unit.positions.to(self.device)
        out = self.stage.run(rows, tokens, positions, unit.sample)
        if self.links is None:
            if unit.sample:
                self._local.append(out)
            return
        b, t = positions.shape
        inline = b * t <= INLINE_POSITIONS
        self.links.send_header([Kind.UNIT, unit.mb, b, t, int(unit.sample)], unit.positions if inline else None)
        if not inline:
            self.links.send_tensor(positions)
        self.links.send_tensor(out)

    def _result(self, batch: int) -> torch.Tensor:
        if self.links is None:
            return self._local.popleft()
        return self.links.recv_tokens(batch)

    def keepalive(self) -> None:
        if self.links is not None:
            self.links.send_header([Kind.KEEPALIVE])

    def shutdown(self) -> None:
        if self.links is not None:
            self.links.send_header([Kind.STOP])
            self.links.flush()

    # -- ranks 1 .. P-1 -------------------------------------------------------------------------
    def serve(self) -> None:
        """Follow rank 0's messages until STOP."""
        assert self.links is not None and self.index > 0
        links = self.links
        while True:
            h, raw = links.recv_header()
            kind = Kind(h[0])
            if kind == Kind.UNIT:
                mb, b, t, sample_now = h[1:5]
                inline = b * t <= INLINE_POSITIONS
                if inline:
                    positions = raw[HEADER_LEN : HEADER_LEN + b * t].view(b, t)
                else:
                    positions = links.recv_tensor((b, t), torch.long)
                x = links.recv_tensor((b, t, self.dim), self.stage.dtype)
                out = self.stage.run(self._groups[mb], x, positions, bool(sample_now))
                if not self.is_last:
                    links.forward_header(raw)
                    if not inline:
                        links.send_tensor(positions)
                    links.send_tensor(out)
                elif sample_now:
                    links.send_tokens(out)
                continue
            if kind == Kind.BEGIN:
                batch, n_groups, capacity, max_tokens, n_eos, seed = h[1:7]
                floats = links.recv_tensor((2 + n_eos,), torch.float64)
                temperature, top_p, *eos = floats.tolist()
                params = GenerationParams(
                    max_tokens=max_tokens,
                    sampling=SamplingParams(temperature, top_p, seed),
                    eos_ids=tuple(int(e) for e in eos),
                )
                self._groups = split_rows(batch, n_groups)
                self.stage.begin(batch, capacity, params)
            elif kind == Kind.END:
                self.stage.end()
            if not self.is_last:
                links.forward_header(raw)
                if kind == Kind.BEGIN:
                    links.send_tensor(floats)
            if kind in (Kind.END, Kind.STOP):
                links.flush()
            if kind == Kind.STOP:
                return
