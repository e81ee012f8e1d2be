"""Rolling-buffer KV cache for the layers one process owns.

For each owned layer K and V are [batch, W + 1, n_kv_heads, head_dim]; the token at absolute
position p lives in slot p % W, keys stored after rotary. Slot W is a write-only bin where
padding tokens (and chunk tokens overwritten later in the same chunk) are scattered, so writes
never need a data-dependent branch or a host sync. `pos[b, s]` is the absolute position held in
slot s of sequence b (-1: empty). One rule then gives every mask: query q may attend key k iff
0 <= k <= q and k > q - sliding_window.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def mask_rule(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """q_pos [B, T], k_pos [B, K] (-1 = none) -> bool [B, T, K]: may query t attend key k."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    allowed = (k >= 0) & (k <= q)
    if sliding_window is not None:
        allowed &= k > q - sliding_window
    return allowed


def cache_capacity(sliding_window: int | None, max_seq_len: int) -> int:
    """W: slots per sequence. Bounded by the window, never larger than the longest sequence."""
    return max_seq_len if sliding_window is None else max(1, min(sliding_window, max_seq_len))


class RollingCache:
    def __init__(
        self,
        layers: Sequence[int],
        batch_size: int,
        capacity: int,
        sliding_window: int | None,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.capacity, self.sliding_window = capacity, sliding_window
        shape = (batch_size, capacity + 1, n_kv_heads, head_dim)
        # Zero-filled so that masked-out (never valid) slots can not inject NaN/inf into attention.
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.pos = torch.full((batch_size, capacity + 1), -1, dtype=torch.long, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))

    def step(self, rows: slice, positions: torch.Tensor) -> StepContext:
        return StepContext(self, rows, positions)


def used_prefix(held: torch.Tensor) -> int:
    """held [B, W]: which slots rows hold -> the length of the prefix of slots that covers them all."""
    cols = held.any(dim=0).nonzero()
    return int(cols.max()) + 1 if cols.numel() else 0


class StepContext:
    """Everything the layers of one stage need for one (micro-batch, chunk) step.

    positions [B, T]: absolute position of every token of the step, -1 for padding. Built once
    per step and shared by all layers; `commit()` records the new positions after the last layer.
    """

    def __init__(self, cache: RollingCache, rows: slice, positions: torch.Tensor) -> None:
        self.cache, self.rows, self.positions = cache, rows, positions
        w = cache.capacity
        last = positions.max(dim=1, keepdim=True).values  # [B, 1]
        # A token is stored unless it is padding or a later token of this chunk takes its slot.
        keep = (positions >= 0) & (positions > last - w)
        self.write_index = torch.where(keep, positions.remainder(w), torch.full_like(positions, w))  # [B, T]
        # The same slots as rows of the layer's cache flattened to [batch * (W + 1), Hkv, D]: one
        # index_copy_ writes them (scatter_ along dim 1 costs time in proportion to the whole cache
        # row on CPU: 1.3 ms per call at W = 4096 against 5 us; several tokens of a row may go to the
        # write-only bin W, which no mask lets anyone read).
        first = rows.start or 0
        row_ids = torch.arange(first, first + positions.shape[0], device=positions.device)[:, None]
        self.flat_index = (row_ids * (w + 1) + self.write_index).reshape(-1)
        old_pos = cache.pos[rows]  # [B, W+1]
        new_pos = old_pos.scatter(1, self.write_index, positions)
        new_pos[:, w] = -1
        self._new_pos = new_pos
        # Single-token steps write first and attend over the W slots (the slot overwritten held
        # position p - W, outside the query's window). Longer steps attend over the W old slots
        # plus the T new keys, then write, because a later chunk token may overwrite a key an
        # earlier query of the same chunk still needs.
        self.write_first = positions.shape[1] == 1
        # Attend over the slots in use only: a row fills its slots from 0 up until it wraps (and
        # from 0 again after a new admission), so the slots any row of the step holds are a prefix;
        # the rest are masked anyway. A server's rows have the whole window as capacity (4096 for
        # Mistral): short sequences would otherwise read and mask every slot at every step. Compiled
        # steps keep all W (a fixed shape, no host sync).
        held = (new_pos if self.write_first else old_pos)[:, :w] >= 0
        if not torch.compiler.is_compiling():
            w = used_prefix(held)
        self.width = w
        key_pos = new_pos[:, :w] if self.write_first else torch.cat([old_pos[:, :w], positions], dim=1)
        allowed = mask_rule(positions, key_pos, cache.sliding_window)  # [B, T, K]
        # Padding queries see every key so that softmax rows are never empty (their outputs are
        # discarded); this avoids NaN without a branch.
        allowed |= (positions < 0)[:, :, None]
        self.key_positions = key_pos
        self.rope: torch.Tensor  # complex rotations for `positions` [B, T, 1, D/2], set by the model
        self.mask = allowed[:, None]  # [B, 1, T, K]

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        ck.view(-1, *ck.shape[2:]).index_copy_(0, self.flat_index, k.reshape(-1, *k.shape[2:]))
        cv.view(-1, *cv.shape[2:]).index_copy_(0, self.flat_index, v.reshape(-1, *v.shape[2:]))

    def kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values [B, T, Hkv, D]; return the keys/values to attend over [B, K, Hkv, D]."""
        w = self.width
        ck, cv = self.cache.k[layer][self.rows], self.cache.v[layer][self.rows]
        if self.write_first:
            self._write(layer, k, v)
            return ck[:, :w], cv[:, :w]
        k_all, v_all = torch.cat([ck[:, :w], k], dim=1), torch.cat([cv[:, :w], v], dim=1)
        self._write(layer, k, v)
        return k_all, v_all

    def commit(self) -> None:
        self.cache.pos[self.rows] = self._new_pos
