"""The continuous-batching scheduler's merge choice (distributed/scheduler.py StepCost): decode rows
ride in a step's prefill unit only where the padding costs less than the pass it saves."""

from __future__ import annotations

import pytest
import torch
from common import CONFIGS, prompts, random_state

from distributed.pipeline import GenerationParams, Pipeline
from distributed.scheduler import Scheduler, Sequence, StepCost
from model.args import ModelArgs
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


def run(model: Transformer, ps: list[list[int]], cost: StepCost | None) -> tuple[list[list[int]], Scheduler]:
    """Staggered arrivals (one new prompt every 3 steps) through a merging scheduler, greedy."""
    pipe = Pipeline(model, 0, 1, torch.device("cpu"), None)
    sched = Scheduler(pipe, len(ps), 1, 64, 8, token_budget=256, merge=True)
    if cost is not None:
        sched.cost = cost
    seqs = [Sequence(p, 10) for p in ps]
    step = 0
    while step < 3 * len(seqs) or sched.active:
        if step % 3 == 0 and step // 3 < len(seqs):
            sched.submit(seqs[step // 3])
        if sched.active:
            sched.step()
        step += 1
    sched.close()
    return [s.out for s in seqs], sched


@pytest.mark.timeout(120)
def test_merged_or_split_steps_give_each_prompt_its_tokens_alone() -> None:
    model = Transformer(ModelArgs.from_dict(CONFIGS["dense"]))
    model.load_state_dict(random_state(CONFIGS["dense"]))
    model.eval()
    ps = prompts(n=4, lengths=(5, 19, 33, 12))
    alone = [Pipeline(model, 0, 1, torch.device("cpu"), None).generate([p], GenerationParams(max_tokens=10, eos_ids=()))[0]
             for p in ps]  # fmt: skip
    cheap, heavy = StepCost(), StepCost()
    for n in (16, 256, 32, 128) * 5:
        cheap.record(n, 1e-3 + 1e-6 * n)
        heavy.record(n, 0.02 + 4e-3 * n)
    heavy.record = lambda n, s: None  # type: ignore[method-assign]  # keep the compute-bound line
    cheap.record = lambda n, s: None  # type: ignore[method-assign]
    got, sched = run(model, ps, cheap)
    assert got == alone and sched.merged_steps > 0 and sched.split_steps == 0
    got, sched = run(model, ps, heavy)
    assert got == alone and sched.split_steps > 0  # (a short chunk beside one decode row still merges)
