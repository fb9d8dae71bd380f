#!/usr/bin/env bash
# Installs, in a Ray image, torch from the given index and then this repository's dependencies
# (read from its pyproject.toml, so the image cannot drift from the package) with torch and Ray
# held at their versions: `pip install -e .` on a node then finds every dependency satisfied and
# downloads nothing but the build backend.
#
# Usage: install-deps.sh PYPROJECT TORCH_INDEX_URL TORCH_VERSION RAY_VERSION
set -euo pipefail
pyproject=$1
torch_index_url=$2
torch_version=$3
ray_version=$4
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

pip install --no-cache-dir --index-url "$torch_index_url" "torch==${torch_version}"

python - "$pyproject" > "$work/requirements.txt" <<'PY'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
PY
# "torch==X" also matches X+cpu: == ignores a local version label that it does not name.
printf 'torch==%s\nray==%s\n' "$torch_version" "$ray_version" > "$work/constraints.txt"
# boto3: the autoscaler on the head launches and terminates instances with it.
pip install --no-cache-dir -r "$work/requirements.txt" -c "$work/constraints.txt" "boto3>=1.26"

# Fail the build, not the cluster, if a dependency moved torch or Ray.
python - "$torch_version" "$ray_version" <<'PY'
import sys

import ray
import torch

torch_version, ray_version = sys.argv[1:]
assert torch.__version__.split("+")[0] == torch_version, torch.__version__
assert ray.__version__ == ray_version, ray.__version__
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), ray {ray.__version__}")
PY
