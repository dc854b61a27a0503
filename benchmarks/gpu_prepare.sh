#!/usr/bin/env bash
# Prepare the two ignored folders benchmarks/gpu_session.sh carries to the device machine:
# .whl (the wheels its image lacks: MLflow and what MLflow needs there) and .fmnist (the
# Fashion-MNIST IDX files). Run from the repository root on this machine; needs
# ../shared/gpu/fetch-wheels.sh and the Debian dataset-fashion-mnist package.
set -euo pipefail
cd "$(dirname "$0")/.."
fetch=../shared/gpu/fetch-wheels.sh
[ -x "$fetch" ] || { echo "error: $fetch not found; it lists what the device image has" >&2; exit 1; }
rm -rf .whl
"$fetch" .whl mlflow-skinny==3.17.2 sqlalchemy alembic
data=/usr/share/datasets/fashion-mnist
[ -f "$data/train-images-idx3-ubyte.gz" ] || {
    echo "error: no Fashion-MNIST in $data; apt-get install dataset-fashion-mnist" >&2; exit 1; }
mkdir -p .fmnist && cp "$data"/*.gz .fmnist/
for folder in /.whl/ /.fmnist/; do
    grep -qxF "$folder" .git/info/exclude || echo "$folder" >> .git/info/exclude
done
du -sh .whl .fmnist
