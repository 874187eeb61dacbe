#!/usr/bin/env bash
# Snakemake runs this once, inside the freshly created conda env, from the
# workflow's working directory (the repository root). It installs spinedet
# itself without dependencies: the env's conda packages are this stage's
# dependencies, and pip must not pull torch & co. from PyPI into every env.
# (A `pip: [-e ../]` entry in the env file cannot work: snakemake copies the
# env file to .snakemake/conda/ before conda reads it.)
set -euo pipefail
if ! grep -qs '^name = "spinedet"' pyproject.toml; then
  echo "spinedet post-deploy: no spinedet pyproject.toml in $PWD;" \
       "run snakemake from the repository root" >&2
  exit 1
fi
python -m pip install --quiet --no-deps --no-build-isolation -e .
