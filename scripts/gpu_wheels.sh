#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels scripts/gpu_check.sh installs on a GPU machine that
# has PyTorch but no internet: xformers, and the engine's dependencies a bare PyTorch image lacks.
# Versions are those this repository was tested with; the GPU image's Python is 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl \
    xformers==0.0.35 simple-parsing==0.1.9 docstring_parser==0.18.0 gguf==0.19.0 \
    fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 \
    typing-inspection==0.4.2 typing_extensions==4.16.0 opentelemetry-api==1.45.2 uvicorn==0.54.0
ls -la .whl
