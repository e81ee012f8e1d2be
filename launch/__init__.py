"""Command line: `python -m launch {demo,interactive,generate,make-checkpoint,bench}`."""

import importlib
import os

# Weights (and KV caches) in 2 MiB pages: PyTorch's CPU allocator advises the kernel to back every
# allocation of 2 MiB or more with transparent huge pages when THP_MEM_ALLOC_ENABLE is set. Decode
# streams all weights once per token; with 4 KiB pages every 4 KiB of a stream costs a TLB miss
# and the read runs 10-15 % slower on this kind of machine (docs/benchmarks.md, "Huge pages").
# The allocator reads the variable once, at its first allocation, so it is set before anything
# imports torch; THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _check_own_packages() -> None:
    # `model` and `distributed` are generic top-level names (Dask installs `distributed`). Make a
    # shadowing copy a clear error instead of an AttributeError deep inside a run.
    for name in ("model", "distributed"):
        mod = importlib.import_module(name)
        if not getattr(mod, "__mistral_pipeline__", False):
            raise ImportError(
                f"the package '{name}' imported from {getattr(mod, '__file__', '?')} is not this project's: "
                "run from the repository root (python -m launch ...) or `pip install -e .` this project "
                f"in a virtual environment without another '{name}' package"
            )


_check_own_packages()
