"""Single-device Mistral / Mixtral model code. Knows nothing about ranks."""

# Sentinel checked by launch/ so that a different top-level package named `model`
# (shadowing this one on sys.path) is reported clearly instead of failing strangely.
__mistral_pipeline__ = True
