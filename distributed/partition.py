"""Which layers each pipeline stage owns: pure functions, data not code."""

from __future__ import annotations

from model.args import ConfigError

# The embedding (stage 0) and the norm + output head (last stage) each count as one layer.
EXTRA_COST = 1.0


def balanced_split(n_layers: int, n_stages: int) -> list[list[int]]:
    """Contiguous layer ranges minimising the most expensive stage (ties: the most even split)."""
    check_stage_count(n_layers, n_stages)

    def cost(stage: int, count: int) -> float:
        extra = (stage == 0) * EXTRA_COST + (stage == n_stages - 1) * EXTRA_COST
        return count + extra

    # best[s][i]: (max cost, sum of squared costs, counts) for the first i layers on stages 0..s-1.
    inf = (float("inf"), float("inf"), ())
    best: list[list[tuple[float, float, tuple[int, ...]]]] = [[inf] * (n_layers + 1) for _ in range(n_stages + 1)]
    best[0][0] = (0.0, 0.0, ())
    for s in range(1, n_stages + 1):
        for i in range(s, n_layers - (n_stages - s) + 1):
            for count in range(1, i - (s - 1) + 1):
                prev = best[s - 1][i - count]
                if prev[0] == float("inf"):
                    continue
                c = cost(s - 1, count)
                cand = (max(prev[0], c), prev[1] + c * c, (*prev[2], count))
                if cand[:2] < best[s][i][:2]:
                    best[s][i] = cand
    return counts_to_layers(list(best[n_stages][n_layers][2]))


def counts_to_layers(counts: list[int]) -> list[list[int]]:
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def check_stage_count(n_layers: int, n_stages: int) -> None:
    if n_stages < 1:
        raise ConfigError(f"--num_pipeline_ranks must be >= 1, got {n_stages}")
    if n_stages > n_layers:
        raise ConfigError(
            f"--num_pipeline_ranks={n_stages} is more than the model's {n_layers} layers; use at most {n_layers} stages"
        )


def parse_layer_split(spec: str, n_layers: int, n_stages: int) -> list[list[int]]:
    """'3,4,4,3' -> layers per stage; every layer exactly once, at least one per stage."""
    check_stage_count(n_layers, n_stages)
    try:
        counts = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ConfigError(f"--layer_split must be comma-separated layer counts like 3,4,4,3, got {spec!r}") from None
    if len(counts) != n_stages:
        raise ConfigError(f"--layer_split has {len(counts)} entries but there are {n_stages} pipeline stages")
    if any(c < 1 for c in counts):
        raise ConfigError(f"--layer_split {spec!r}: every stage needs at least one layer")
    if sum(counts) != n_layers:
        raise ConfigError(f"--layer_split {spec!r} covers {sum(counts)} layers but the model has {n_layers}")
    return counts_to_layers(counts)


def stage_layers(n_layers: int, n_stages: int, layer_split: str | None = None) -> list[list[int]]:
    if layer_split:
        return parse_layer_split(layer_split, n_layers, n_stages)
    return balanced_split(n_layers, n_stages)
