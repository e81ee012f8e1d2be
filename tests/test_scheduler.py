"""The continuous-batching scheduler's merge choice (distributed/scheduler.py StepCost): decode rows
ride in a step's prefill unit only where the padding costs less than the pass it saves."""

from __future__ import annotations

import pytest
import torch
from common import prompts, random_model

from distributed.pipeline import GenerationParams, Pipeline
from distributed.scheduler import MIN_CAPPED_CHUNK, Scheduler, Sequence, StepCost
from model.transformer import Transformer


def test_step_cost_learns_the_line_and_decides() -> None:
    cost = StepCost()
    assert cost.fit() is None and cost.merge_pays(256, [16, 16])  # nothing learnt: merge, as before
    for n in (16, 16, 16):
        cost.record(n, 0.01)
    assert cost.fit() is None  # one size only: no slope to learn
    # Overhead-bound (tiny): 1 ms a unit, 1 us a token -> merging 16 rows x 16 tokens pays.
    cost = StepCost()
    for n in (16, 256, 32, 128) * 5:
        cost.record(n, 1e-3 + 1e-6 * n)
    fixed, per_token = cost.fit() or (0, 0)
    assert fixed == pytest.approx(1e-3, rel=0.3) and per_token == pytest.approx(1e-6, rel=0.3)
    assert cost.merge_pays(256, [16, 16])
    # Compute-bound (mistral-mini fp32): 20 ms a unit, 4 ms a token -> 256 padded tokens do not pay.
    heavy = StepCost()
    for n in (16, 256, 32, 128) * 5:
        heavy.record(n, 0.02 + 4e-3 * n)
    assert not heavy.merge_pays(256, [16, 16]) and heavy.merge_pays(17, [16, 1])


def run(model: Transformer, ps: list[list[int]], cost: StepCost, slots: list[int]) -> tuple[list[list[int]], Scheduler]:
    """Arrivals two at a time (prompt i into slots[i], every 3 steps) through a merging scheduler of
    12 slots, greedy; `cost` is what the scheduler believes a unit costs (frozen)."""
    pipe = Pipeline(model, 0, 1, torch.device("cpu"), None)
    sched = Scheduler(pipe, 12, 1, 64, 8, token_budget=256, merge=True)
    cost.record = lambda n, s: None  # type: ignore[method-assign]
    sched.cost = cost
    seqs = [Sequence(p, 10) for p in ps]
    step = 0
    while step < 3 * len(seqs) or sched.active:
        if step % 3 == 0:
            for i in range(step // 3 * 2, min(len(seqs), step // 3 * 2 + 2)):
                sched.submit(seqs[i], slot=slots[i])
        if sched.active:
            sched.step()
        step += 1
    sched.close()
    return [s.out for s in seqs], sched


@pytest.mark.timeout(120)
def test_merged_split_or_cut_steps_give_each_prompt_its_tokens_alone() -> None:
    model = random_model("dense")
    # Equal lengths arriving together finish their prompts in the same unit; slots out of admission
    # order (11 before 0) and far apart (gaps of empty rows).
    ps = prompts(n=6, lengths=(5, 5, 19, 19, 33, 12))
    params = GenerationParams(max_tokens=10, eos_ids=())
    alone = [Pipeline(model, 0, 1, torch.device("cpu"), None).generate([p], params)[0] for p in ps]
    slots = [11, 0, 6, 2, 9, 4]
    cheap, heavy = StepCost(), StepCost()
    for n in (16, 256, 32, 128) * 5:
        cheap.record(n, 1e-3 + 1e-6 * n)
        heavy.record(n, 0.02 + 4e-3 * n)
    got, sched = run(model, ps, cheap, slots)
    assert got == alone and sched.merged_steps > 0 and sched.split_steps == 0 and sched.cut_units == 0
    got, sched = run(model, ps, heavy, slots)
    assert got == alone and sched.split_steps > 0  # (a short chunk beside one decode row still merges)
    assert sched.cut_units > 0  # prefill units cut at gaps of empty rows


def capped_run(model: Transformer, ps: list[list[int]], itl_cap: float, slots: int = 8, late: int = 1
               ) -> tuple[list[list[int]], Scheduler, int, list[tuple[int, int]]]:
    """Short prompts start decoding, then the last `late` prompts arrive together; the scheduler
    believes a unit costs 20 ms + 1 ms a token (frozen). Returns the tokens, the scheduler, the most
    prompt tokens one late prompt prefilled in a step while others were decoding, and the shape
    (rows, tokens) of every unit dispatched after the late arrivals."""
    pipe = Pipeline(model, 0, 1, torch.device("cpu"), None)
    sched = Scheduler(pipe, slots, 1, 128, 64, token_budget=256, merge=True, itl_cap=itl_cap)
    cost = StepCost()
    for n in (4, 64, 16, 32) * 5:
        cost.record(n, 0.02 + 1e-3 * n)
    cost.record = lambda n, s: None  # type: ignore[method-assign]
    sched.cost = cost
    seqs = [Sequence(p, 12) for p in ps]
    early = seqs[: len(seqs) - late]
    for s in early:
        sched.submit(s)
    while not all(s.decoding for s in early):
        sched.step()
    shapes: list[tuple[int, int]] = []
    dispatch = pipe.dispatch
    pipe.dispatch = lambda unit: (shapes.append(tuple(unit.tokens.shape)), dispatch(unit))[1]  # type: ignore
    for s in seqs[len(early):]:
        sched.submit(s)
    most = 0
    while sched.active:
        before = [s.prefilled for s in seqs[len(early):]]
        sched.step()
        most = max(most, *(s.prefilled - b for s, b in zip(seqs[len(early):], before, strict=True)))
    sched.close()
    return [s.out for s in seqs], sched, most, shapes


@pytest.mark.timeout(120)
def test_itl_cap_bounds_the_prefill_beside_decoding() -> None:
    """--itl_cap: with 4 rows decoding, a step may cost at most 2 decode-only steps (24 ms: 28 tokens
    merged), so the long prompt goes in the floor's chunks (MIN_CAPPED_CHUNK, 32), not 51-token ones;
    every prompt still gets the tokens it gets alone prefilled in chunks of that size. With every slot
    taken the cap is lifted."""
    model = random_model("moe_nowindow")
    ps = prompts(n=5, lengths=(4, 5, 6, 7, 60))
    params = GenerationParams(max_tokens=12, eos_ids=(), chunk_size=16)
    alone = [Pipeline(model, 0, 1, torch.device("cpu"), None).generate([p], params)[0] for p in ps]
    got, sched, most, _ = capped_run(model, ps, itl_cap=2.0)
    assert got == alone
    assert MIN_CAPPED_CHUNK < 256 // 5 and most == MIN_CAPPED_CHUNK and sched.capped_steps >= 1
    _, free, most_free, _ = capped_run(model, ps, itl_cap=0.0)
    # without the cap: 51 tokens (the merged unit's 256-token budget over 5 rows) in one step
    assert most_free == 256 // 5 and free.capped_steps == 0
    # five sequences in five slots: saturated, so the cap gives way to throughput
    got, full, most_full, _ = capped_run(model, ps, itl_cap=2.0, slots=5)
    assert got == alone and most_full == 256 // 5 and full.capped_steps == 0


@pytest.mark.timeout(120)
def test_itl_cap_prefills_a_burst_a_prompt_a_step() -> None:
    """Three long prompts arrive at once beside 3 decoding rows: under the cap every prefill unit's
    padded size (rows x longest chunk) stays within the allowance (the floor, MIN_CAPPED_CHUNK), where
    without the cap all three go in one unit; the tokens are still each prompt's alone."""
    model = random_model("moe_nowindow")
    ps = prompts(n=6, lengths=(4, 5, 6, 40, 41, 42))
    params = GenerationParams(max_tokens=12, eos_ids=(), chunk_size=16)
    alone = [Pipeline(model, 0, 1, torch.device("cpu"), None).generate([p], params)[0] for p in ps]
    got, _, _, shapes = capped_run(model, ps, itl_cap=2.0, late=3)
    assert got == alone
    prefill = [sh for sh in shapes if sh[1] > 1]
    assert prefill and all(r * t <= MIN_CAPPED_CHUNK for r, t in prefill), prefill
    got, _, _, free = capped_run(model, ps, itl_cap=0.0, late=3)
    assert got == alone and max(r for r, t in free if t > 1) >= 3
