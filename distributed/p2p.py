"""Point-to-point messages between neighbour stages, and the token messages back to stage 0.

Every send is an isend whose handle is kept (with its tensor) until it completes; nobody ever
relies on a blocking send being buffered. Every receive is an irecv waited on under the process
group's timeout, so a dead or wedged peer turns into a PeerLost error, never a hang.
"""

from __future__ import annotations

from enum import IntEnum

import torch
import torch.distributed as dist

from model.args import first_line

HEADER_LEN = 8  # int64 fields: kind and what the receiver needs to know the shapes
# A unit's positions ride in the header message when they fit (every decode step does), which
# saves one message per hop: on CPU each gloo message costs a wake-up of the receiving thread.
INLINE_POSITIONS = 120
# Every stage writes its cumulative compute time (microseconds) into the header it forwards; the
# last stage returns them with the tokens, so rank 0 knows how busy each stage is (first 16 stages).
MAX_STATS = 16
STATS_AT = HEADER_LEN + INLINE_POSITIONS
MESSAGE_LEN = STATS_AT + MAX_STATS


class Kind(IntEnum):
    STOP = 0  # no more requests: every rank leaves its serve loop
    SETUP = 1  # a session starts: cache slots (rows) and capacity per slot
    UNIT = 2  # one (rows, prefill chunk or decode step) of activations
    END = 3  # the session is over: caches can go
    KEEPALIVE = 4  # rank 0 is waiting for work; keeps the others inside their timeout
    ADMIT = 5  # sequences take slots: positions reset, prompt lengths and sampling parameters


class PeerLost(RuntimeError):
    """A neighbour stage died, hung past the timeout, or closed its connection."""


class Links:
    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self.last = world_size - 1
        self._pending: list[tuple[dist.Work, torch.Tensor, int, str]] = []

    # -- plumbing ---------------------------------------------------------------------------
    def _wait(self, work: dist.Work, peer: int, what: str) -> None:
        try:
            work.wait()
        except Exception as e:  # gloo/NCCL raise RuntimeError subclasses with long messages
            raise PeerLost(
                f"rank {self.rank} lost contact with rank {peer} (stage {peer}) while {what}: {first_line(e)}"
            ) from e

    def _isend(self, t: torch.Tensor, dst: int, what: str) -> None:
        t = t.contiguous()
        try:
            work = dist.isend(t, dst)
        except Exception as e:  # gloo raises at once when the connection is already gone
            raise PeerLost(
                f"rank {self.rank} lost contact with rank {dst} (stage {dst}) while {what}: {first_line(e)}"
            ) from e
        assert work is not None
        self._pending.append((work, t, dst, what))
        self._reap()

    def _reap(self) -> None:
        still = []
        for work, t, peer, what in self._pending:
            if work.is_completed():
                self._wait(work, peer, what)  # surfaces a failed send
            else:
                still.append((work, t, peer, what))
        self._pending = still

    def _recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, what: str) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        try:
            work = dist.irecv(t, src)
        except Exception as e:
            raise PeerLost(
                f"rank {self.rank} lost contact with rank {src} (stage {src}) while {what}: {first_line(e)}"
            ) from e
        assert work is not None
        self._wait(work, src, what)
        return t

    def flush(self) -> None:
        """Wait for every send still in flight."""
        for work, _, peer, what in self._pending:
            self._wait(work, peer, what)
        self._pending = []

    # -- the messages -------------------------------------------------------------------------
    def send_header(
        self, fields: list[int], inline: torch.Tensor | None = None, stats: list[int] | None = None
    ) -> None:
        """fields, `inline` (positions [B, T] or admissions; the caller checks they fit) and the
        stages' busy counters so far."""
        h = torch.zeros(MESSAGE_LEN, dtype=torch.long)
        h[: len(fields)] = torch.tensor(fields, dtype=torch.long)
        if inline is not None:
            h[HEADER_LEN : HEADER_LEN + inline.numel()] = inline.flatten()
        if stats:
            h[STATS_AT : STATS_AT + len(stats)] = torch.tensor(stats[:MAX_STATS], dtype=torch.long)
        self.forward_header(h.to(self.device))

    def forward_header(self, raw: torch.Tensor) -> None:
        self._isend(raw, self.rank + 1, "sending a header")

    def recv_header(self) -> tuple[list[int], torch.Tensor]:
        """The fields, and the raw message (to forward as is, or to read inline positions from)."""
        raw = self._recv((MESSAGE_LEN,), torch.long, self.rank - 1, "waiting for the next message")
        return raw[:HEADER_LEN].tolist(), raw

    def send_tensor(self, t: torch.Tensor) -> None:
        self._isend(t, self.rank + 1, f"sending {tuple(t.shape)} activations")

    def recv_tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._recv(shape, dtype, self.rank - 1, f"receiving {shape} activations")

    def send_tokens(self, tokens_stats: torch.Tensor) -> None:
        """[n] sampled ids followed by the stages' busy counters [world_size]."""
        self._isend(tokens_stats, 0, "sending sampled tokens to stage 0")

    def recv_tokens(self, n: int) -> torch.Tensor:
        return self._recv((n + self.world_size,), torch.long, self.last, "waiting for sampled tokens")
