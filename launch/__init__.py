"""Command line: `python -m launch {demo,interactive,generate,make-checkpoint,bench}`."""

import importlib


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
