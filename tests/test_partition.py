from __future__ import annotations

import pytest

from distributed.partition import balanced_split, parse_layer_split, stage_layers
from model.args import ConfigError

pytestmark = pytest.mark.timeout(30)


def covers_all_once(split: list[list[int]], n_layers: int) -> bool:
    flat = [i for stage in split for i in stage]
    return flat == list(range(n_layers)) and all(stage for stage in split)


@pytest.mark.parametrize("n_layers,n_stages", [(4, 1), (4, 2), (5, 2), (32, 3), (32, 4), (8, 8), (56, 7)])
def test_balanced_split_is_contiguous_and_complete(n_layers: int, n_stages: int) -> None:
    split = balanced_split(n_layers, n_stages)
    assert len(split) == n_stages and covers_all_once(split, n_layers)


def test_even_split_counts_embedding_and_head() -> None:
    # 32 layers + embedding + head = 34 units on 4 stages: the best max stage cost is 9,
    # so the end stages (which carry the embedding / head) get fewer layers than the middle.
    split = balanced_split(32, 4)
    costs = [len(s) + (i == 0) + (i == 3) for i, s in enumerate(split)]
    assert max(costs) == 9 and len(split[1]) == 9
    # 6 layers on 2 stages: each end carries one extra unit, so an even 3/3 split is best.
    assert [len(s) for s in balanced_split(6, 2)] == [3, 3]
    # 7 layers on 3 stages: 9 units, 3 each: 2 + 1, 3, 2 + 1.
    assert [len(s) for s in balanced_split(7, 3)] == [2, 3, 2]


def test_one_layer_per_stage() -> None:
    assert balanced_split(4, 4) == [[0], [1], [2], [3]]


def test_more_stages_than_layers_is_refused() -> None:
    with pytest.raises(ConfigError, match="at most 4 stages"):
        balanced_split(4, 5)


def test_override() -> None:
    assert parse_layer_split("3,1", 4, 2) == [[0, 1, 2], [3]]
    assert stage_layers(4, 2, "1,3") == [[0], [1, 2, 3]]
    assert stage_layers(4, 2, None) == balanced_split(4, 2)


@pytest.mark.parametrize(
    "spec,msg",
    [("3,3", "covers 6 layers"), ("4", "1 entries"), ("4,0", "at least one layer"), ("a,b", "comma-separated"),
     ("1,1,2", "3 entries")],
)
def test_override_validated(spec: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        parse_layer_split(spec, 4, 2)
