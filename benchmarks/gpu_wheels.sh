#!/usr/bin/env bash
# Fetch, on the workstation (which reaches PyPI), the Python 3.12 wheels that gpu_session.sh's `deps`
# part installs on the GPU box: what ltta imports there and the box's image lacks (its package list
# is in the device tool's KINDS.md). The versions are the workstation venv's, so both run the same code.
#
#   bash benchmarks/gpu_wheels.sh            # -> .wheels312/ (git-excluded), then carry it:
#   run(carry=[".wheels312", ".bench"], command="bash benchmarks/gpu_session.sh deps study-a ...")
#
# A new version here that pip cannot match to the box's platform needs another
# --platform manylinux_2_N_x86_64 (pip matches N exactly).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=".wheels312"
grep -qxF "/$dest/" .git/info/exclude 2>/dev/null || echo "/$dest/" >>.git/info/exclude
mkdir -p "$dest"
# optuna and its needs (search_policy); hydra-core and its needs (params composition); pydantic and
# its needs (the params schema). The box has numpy, pyyaml, tqdm, packaging and markupsafe.
pkgs=(
    optuna==5.1.0 alembic==1.20.1 sqlalchemy==2.1.9 colorlog==6.12.0 greenlet==3.5.6 mako==1.4.3
    hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0  # the box has it, maybe older than pydantic's >= 4.16
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
# antlr4-python3-runtime 4.9.3 is published as an sdist only: build its (pure-Python) wheel here.
python3 -m pip wheel --quiet --no-deps -w "$dest" antlr4-python3-runtime==4.9.3
wheels=()
for spec in "${pkgs[@]}"; do
    [ "${spec%%==*}" = antlr4-python3-runtime ] || wheels+=("$spec")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" "${wheels[@]}"
ls -1 "$dest"
du -sh "$dest"
