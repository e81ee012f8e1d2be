"""Ranks, partitions, point-to-point messages and the pipeline schedule."""

# Sentinel: Dask also installs a top-level package named `distributed`; launch/ checks this.
__mistral_pipeline__ = True
