#!/usr/bin/env bash
# The GPU check in one command, for a bare GPU machine without network:
#
#     bash benchmarks/gpu/run.sh [--tiny] [--out DIR] [other gpu_check.py options]
#
# Installs the wheels of benchmarks/gpu/wheels/ (made by fetch_wheels.sh) into a temporary
# folder, only those whose distribution the Python here lacks (a second version of a package the
# machine's JAX or PyTorch was built against could break them), puts that folder and src/ on
# PYTHONPATH, sets KERAS_BACKEND=jax and runs gpu_check.py (results in --out, default
# benchmarks/results/gpu/). PYTHON picks the interpreter (default python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3}"
wheels="$here/wheels"

site="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")"
trap 'rm -rf "$site"' EXIT

# The wheels whose distribution is not installed: printed as "install <file>" or "present <name>".
sort_wheels() {
    "$python" - "$wheels" <<'EOF'
import re, sys
from importlib import metadata
from pathlib import Path

for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name = wheel.name.split("-")[0]
    try:
        metadata.version(re.sub(r"[-_.]+", "-", name))
        print("present", name)
    except metadata.PackageNotFoundError:
        print("install", wheel)
EOF
}

installed=() present=()
if compgen -G "$wheels/*.whl" >/dev/null; then
    while read -r what item; do
        if [[ $what == install ]]; then installed+=("$item"); else present+=("$item"); fi
    done < <(sort_wheels)
    if ((${#installed[@]})); then
        echo "run.sh: installing ${#installed[@]} wheels into $site"
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${installed[@]}"
    fi
    echo "run.sh: already installed here, not carried over: ${present[*]:-none}"
else
    echo "run.sh: no wheels in $wheels (run benchmarks/gpu/fetch_wheels.sh where PyPI is reachable)"
fi

export GPU_CHECK_WHEELS_INSTALLED="$(for w in "${installed[@]}"; do basename "$w"; done | tr '\n' ' ')"
export GPU_CHECK_WHEELS_PRESENT="${present[*]:-}"
export PYTHONPATH="$site:$repo/src${PYTHONPATH:+:$PYTHONPATH}"
export KERAS_BACKEND=jax
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch share the GPU
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1

cd "$repo"
"$python" "$here/gpu_check.py" "$@"
