"""The stages and the messages between them: one process is a one-stage pipeline.

Rank 0 (stage 0) owns the requests; distributed/scheduler.py decides what runs when. It sends
the other ranks a session (SETUP: cache slots and their capacity), admissions (ADMIT: a sequence
takes a slot, with its prompt length and sampling parameters) and work units (UNIT: a range of
slots with a prefill chunk or a decode step each). Each stage runs its layers on a unit and
passes the activations on; the last stage samples every row that ends its prompt or decodes and
sends the token ids back to stage 0. With one stage the "ring" is a local queue.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from distributed.p2p import HEADER_LEN, INLINE_POSITIONS, MAX_STATS, STATS_AT, Kind, Links
from model.cache import RollingCache
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
    # Micro-batches once every prompt of a static batch is prefilled; None: num_microbatches.
    # 1 where all stages share one CPU host's memory (launch/runtime.py): each micro-batch makes a
    # stage read its weights again, and on one memory bus that costs more than idle stages.
    decode_microbatches: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"--max_tokens must be >= 0, got {self.max_tokens}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"--chunk_size must be >= 1, got {self.chunk_size}")
        if self.num_microbatches is not None and self.num_microbatches < 1:
            raise ValueError(f"--num_microbatches must be >= 1, got {self.num_microbatches}")
        if self.decode_microbatches is not None and self.decode_microbatches < 1:
            raise ValueError(f"decode_microbatches must be >= 1, got {self.decode_microbatches}")


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


def _f2i(x: float) -> int:
    return int(struct.unpack("<q", struct.pack("<d", x))[0])


def _i2f(x: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", x))[0])


@dataclass(frozen=True)
class Admission:
    """What every stage learns when a sequence takes a slot (the last stage samples with it)."""

    slot: int
    prompt_len: int
    seq_index: int  # mixed into the seeded draws: the index of the prompt in its request
    sampling: SamplingParams

    FIELDS = 6  # int64 fields when packed (floats bit-cast)

    def pack(self) -> list[int]:
        s = self.sampling
        return [self.slot, self.prompt_len, self.seq_index, s.seed, _f2i(s.temperature), _f2i(s.top_p)]

    @classmethod
    def unpack(cls, f: list[int]) -> Admission:
        return cls(f[0], f[1], f[2], SamplingParams(_i2f(f[4]), _i2f(f[5]), f[3]))


@dataclass
class Unit:
    rows: slice  # cache slots; rows without work are padding (positions -1)
    tokens: torch.Tensor  # [B, T] ids (padding 0)
    positions: torch.Tensor  # [B, T] absolute positions (padding -1)
    sample: bool  # some row ends its prompt or decodes: the last stage samples and answers


class Stage:
    """This process's share of the model and of the per-slot state."""

    def __init__(self, model: Transformer, device: torch.device) -> None:
        self.model, self.device = model, device
        self.dtype = next(model.parameters()).dtype
        self.cache: RollingCache | None = None
        self.busy = 0.0  # seconds spent in run(), cumulative

    def begin(self, batch: int, capacity: int, params: GenerationParams) -> None:
        """A session of `batch` slots of `capacity` cache positions each. Sampling parameters come
        per sequence at admission; `params` only keeps the signature wrappers (bench) rely on."""
        self.cache = self.model.make_cache(batch, capacity)
        if self.model.is_last:
            self.prompt_len = [0] * batch
            self.count = [0] * batch  # tokens sampled since admission: the draw's step
            self.seq_index = [0] * batch
            self.sampling = [SamplingParams()] * batch

    def admit(self, admissions: list[Admission]) -> None:
        assert self.cache is not None, "an admission arrived outside a session"
        for a in admissions:
            self.cache.pos[a.slot] = -1  # the slot's old keys are masked out from now on
            if self.model.is_last:
                self.prompt_len[a.slot], self.seq_index[a.slot] = a.prompt_len, a.seq_index
                self.count[a.slot], self.sampling[a.slot] = 0, a.sampling

    def end(self) -> None:
        self.cache = None

    @torch.inference_mode()
    def run(self, rows: slice, x: torch.Tensor, positions: torch.Tensor, sample_now: bool) -> torch.Tensor:
        """Activations [B, T, dim] for the next stage, or on the last stage the sampled ids [n]
        of the rows that end their prompt or decode in this unit (in row order)."""
        assert self.cache is not None, "a unit arrived outside a session"
        t0 = time.perf_counter()
        try:
            if not self.model.is_last:
                return self.model(x, positions, self.cache, rows)
            valid = positions >= 0  # [B, T]; valid tokens are a prefix of each row
            select = (valid.sum(1) - 1).clamp(min=0)
            logits = self.model(x, positions, self.cache, rows, select=select)  # [B, V]
            if not sample_now:
                return torch.empty(0, dtype=torch.long)
            last = positions.max(1).values.tolist()
            slots = [
                rows.start + i for i, p in enumerate(last) if p >= 0 and p >= self.prompt_len[rows.start + i] - 1
            ]
            if len(slots) < len(last):
                logits = logits[[s - rows.start for s in slots]]
            return self._sample(logits, slots)
        finally:
            self.busy += time.perf_counter() - t0

    def _sample(self, logits: torch.Tensor, slots: list[int]) -> torch.Tensor:
        # One draw per row with that sequence's own parameters: its tokens do not depend on
        # what else runs beside it.
        greedy = all(self.sampling[s].temperature == 0 for s in slots)
        if greedy:
            tokens = logits.argmax(dim=-1)
        else:
            tokens = torch.cat(
                [
                    sample(logits[i : i + 1], self.sampling[s], [self.seq_index[s]], [self.count[s]])
                    for i, s in enumerate(slots)
                ]
            )
        for s in slots:
            self.count[s] += 1
        return tokens


class Pipeline:
    """Rank 0 drives it through distributed/scheduler.py (generate() for a static batch); the
    other ranks call serve()."""

    def __init__(
        self, model: Transformer, stage: int, n_stages: int, device: torch.device, links: Links | None
    ) -> None:
        assert (links is None) == (n_stages == 1)
        self.stage = Stage(model, device)
        self.index, self.n_stages, self.device, self.links = stage, n_stages, device, links
        self.dim = model.args.dim
        self._local: deque[torch.Tensor] = deque()  # the one-stage "ring"

    @property
    def is_last(self) -> bool:
        return self.index == self.n_stages - 1

    # -- rank 0 ---------------------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]], params: GenerationParams, on_token: TokenCallback | None = None
    ) -> list[list[int]]:
        """Generate for a batch of token-id prompts; returns the new ids per prompt (no EOS)."""
        from distributed.scheduler import generate_batch

        assert self.index == 0, "generate() runs on stage 0; the other ranks serve()"
        return generate_batch(self, prompts, params, on_token)

    def setup(self, slots: int, capacity: int) -> None:
        self.stage.begin(slots, capacity, GenerationParams())
        if self.links is not None:
            self.links.send_header([Kind.SETUP, slots, capacity])

    def admit(self, admissions: list[Admission]) -> None:
        self.stage.admit(admissions)
        if self.links is None:
            return
        per = INLINE_POSITIONS // Admission.FIELDS
        for i in range(0, len(admissions), per):
            part = admissions[i : i + per]
            packed = torch.tensor([f for a in part for f in a.pack()], dtype=torch.long)
            self.links.send_header([Kind.ADMIT, len(part)], packed)

    def dispatch(self, unit: Unit) -> None:
        tokens, positions = unit.tokens.to(self.device), unit.positions.to(self.device)
        out = self.stage.run(unit.rows, tokens, positions, unit.sample)
        if self.links is None:
            if unit.sample:
                self._local.append(torch.cat([out, torch.tensor([self._busy_us()], device=out.device)]))
            return
        b, t = positions.shape
        inline = b * t <= INLINE_POSITIONS
        fields = [Kind.UNIT, b, t, unit.rows.start, int(unit.sample)]
        self.links.send_header(fields, unit.positions if inline else None, [self._busy_us()])
        if not inline:
            self.links.send_tensor(positions)
        self.links.send_tensor(out)

    def result(self, n: int) -> tuple[list[int], list[float]]:
        """The next answer of the last stage: n sampled ids, and each stage's busy seconds so far."""
        msg = (self._local.popleft() if self.links is None else self.links.recv_tokens(n)).tolist()
        return msg[:n], [us / 1e6 for us in msg[n:]]

    def end(self) -> None:
        self.stage.end()
        if self.links is not None:
            self.links.send_header([Kind.END])
            self.links.flush()

    def _busy_us(self) -> int:
        return int(self.stage.busy * 1e6)

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
                b, t, row0, sample_now = h[1:5]
                inline = b * t <= INLINE_POSITIONS
                if inline:
                    positions = raw[HEADER_LEN : HEADER_LEN + b * t].view(b, t)
                else:
                    positions = links.recv_tensor((b, t), torch.long)
                x = links.recv_tensor((b, t, self.dim), self.stage.dtype)
                out = self.stage.run(slice(row0, row0 + b), x, positions, bool(sample_now))
                if self.index < MAX_STATS:
                    raw[STATS_AT + self.index] = self._busy_us()
                if not self.is_last:
                    links.forward_header(raw)
                    if not inline:
                        links.send_tensor(positions)
                    links.send_tensor(out)
                elif sample_now:
                    stats = raw[STATS_AT : STATS_AT + min(self.n_stages, MAX_STATS)]
                    pad = torch.zeros(max(0, self.n_stages - MAX_STATS), dtype=torch.long, device=raw.device)
                    links.send_tokens(torch.cat([out.to(raw.device), stats, pad]))
                continue
            if kind == Kind.SETUP:
                self.stage.begin(h[1], h[2], GenerationParams())
            elif kind == Kind.ADMIT:
                n = h[1]
                f = raw[HEADER_LEN : HEADER_LEN + n * Admission.FIELDS].tolist()
                self.stage.admit([Admission.unpack(f[i : i + Admission.FIELDS]) for i in range(0, len(f), 6)])
            elif kind == Kind.END:
                self.stage.end()
            if not self.is_last:
                links.forward_header(raw)
            if kind in (Kind.END, Kind.STOP):
                links.flush()
            if kind == Kind.STOP:
                return
