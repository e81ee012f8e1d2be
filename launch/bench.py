"""Placeholder: the benchmark command is built in the benchmarks issue."""

from __future__ import annotations

from typing import Any


def add_bench_parser(sub: Any) -> None:
    return None


def run_bench(opts: Any) -> None:
    raise NotImplementedError
