#!/usr/bin/env bash
# Downloads, where PyPI is reachable, the wheels run.sh needs on the GPU machine (Python 3.12,
# manylinux x86_64; PyTorch, JAX with CUDA, pandas, pyarrow, numba, ... but no TensorFlow, no
# Keras, no network) into benchmarks/gpu/wheels/ (git-ignored), at the versions of
# requirements.lock, one version of each:
#
#     bash benchmarks/gpu/fetch_wheels.sh
#
# Only what the machine's image lacks (its package list in the device notes, KINDS.md, read
# 2026-11-17): Keras and its needs namex and optree; jsonschema and its needs (params validation);
# crc32c (TFRecord framing); google-crc32c (the fetch stage's checksums). Keras' other needs and the
# pipeline's other imports are there (MACHINE_HAS; carrying them too would be ~200 MB, over what a
# call to the machine takes along). Afterwards every wheel's Requires-Dist is checked against the
# wheels here and MACHINE_HAS, and what neither covers is listed (exit status 1).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
lock="$repo/requirements.lock"
dest="$here/wheels"
python="${PYTHON:-python3}"

MISSING_THERE=(keras namex optree jsonschema jsonschema-specifications referencing rpds-py crc32c google-crc32c)
# On the machine already (the ones the wheels above or our imports need).
MACHINE_HAS=(absl-py rich markdown-it-py mdurl pygments h5py ml-dtypes packaging typing-extensions attrs
             protobuf pyyaml numpy pandas pyarrow numba llvmlite scipy matplotlib aiohttp fsspec tqdm)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

# NAME==VERSION as requirements.lock pins it (names compared case- and -/_/.-insensitively).
pinned() {
    local wanted version
    wanted="$(echo "$1" | tr 'A-Z_.' 'a-z--')"
    version="$(awk -F'==' -v w="$wanted" '{n=tolower($1); gsub(/[_.]/, "-", n)} n == w {print $2}' "$lock")"
    [[ -n $version ]] || { echo "fetch_wheels.sh: $1 is not pinned in $lock" >&2; return 1; }
    echo "$1==$version"
}

requirements=()
for name in "${MISSING_THERE[@]}"; do requirements+=("$(pinned "$name")"); done

mkdir -p "$dest"
rm -f "$dest"/*.whl
platform_flags=()
for p in "${PLATFORMS[@]}"; do platform_flags+=(--platform "$p"); done
"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_flags[@]}" -d "$dest" "${requirements[@]}"

# Every Requires-Dist (extras left out, markers for CPython 3.12 on Linux) covered by a wheel here or the machine.
"$python" - "$dest" "${MACHINE_HAS[@]}" <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement

def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()

target = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
covered = {canonical(w.name.split("-")[0]) for w in wheels} | {canonical(n) for n in sys.argv[2:]}
uncovered = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(meta).decode().splitlines()
    for line in lines:
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            if requirement.marker and not requirement.marker.evaluate(target):
                continue
            if canonical(requirement.name) not in covered:
                uncovered.append(f"{wheel.name}: {requirement}")
size = sum(w.stat().st_size for w in wheels)
print(f"fetch_wheels.sh: {len(wheels)} wheels, {size / 1e6:.2f} MB in {sys.argv[1]}")
for w in wheels:
    print(f"  {w.name} ({w.stat().st_size / 1e3:.0f} kB)")
if uncovered:
    print("fetch_wheels.sh: needed but neither here nor on the machine:\n  " + "\n  ".join(uncovered))
    sys.exit(1)
print("fetch_wheels.sh: every requirement is covered")
EOF
