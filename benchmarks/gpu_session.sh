#!/usr/bin/env bash
# The GPU figures of issues 3, 5 and 8 in one device call (about 9 minutes of commands,
# so that it fits a 15-minute device lease with the machine's start).
#
# Prepare on this machine first (once per checkout; see benchmarks/gpu_prepare.sh):
#     bash benchmarks/gpu_prepare.sh
# then call the device tool's `run` with
#     command:   bash benchmarks/gpu_session.sh
#     carry:     [".whl", ".fmnist"]
#     timeout_s: 600
# Everything comes back as $OUT/summary.txt (each step's exit status, seconds and table)
# and $OUT/gpu-session.tar.gz (each step's log, and the JSON the benchmarks wrote).
#
# Steps, most important first, each under its own time limit and all under one deadline
# (BUDGET, 540 s from the start: a step that would pass it is cut to what is left, or
# skipped, so that the logs are packed before the device call's 600 s end it):
#   issue3   `anomaly-flow train` on the 60,000 Fashion-MNIST training images as PNG files,
#            preset fashion-mnist (the B1 architecture, bf16), one epoch: images/s and
#            validation bits/dim, logged to a real sqlite MLflow store
#   gpu-tests  the test suite's CUDA tests (`pytest -m gpu`): bf16 autocast on, a NaN step
#            skipped on the device, pinned-memory scoring equal to the CPU's
#   b1-fp32  B1 as the public implementations run it (float32, eager)
#   b1-bf16  B1 with the preset's bf16 autocast
#   b2       B2: scoring 50,000 PNG files to CSV vs decoding them, 16 workers
#   b1-profile  train() under torch.profiler in that mode: the kernel table the speed
#            pass starts from (NOTES.md's plan)
#   batch-invariance  whether a file scored alone gets the bits it gets in a large batch
#            on the GPU (the README claims it for x86 CPUs only)
#   b2-bf16  B2 with bf16 scoring, if time is left
#   b1-bf16-compile   B1 with bf16 and torch.compile (compiling the reference model takes
#            minutes: it gets what is left, last, so that a cut costs no other step)
# B3 (15 minutes of training) and B4 (ten models) do not fit one lease beside these;
# PART=quality runs them instead, shortened to fit a device session of their own (another
# task's: one session's 15 minutes hold one of the two parts; trends, not the protocols'
# figures):
#   b3       B3 with 4 minutes of bf16 training (the protocol: 15), test bits/dim, curve
#            logged to a sqlite MLflow store
#   b4       B4 with 15 s of bf16 training per class, every score against 5-NN and
#            IsolationForest on raw pixels
#
# SMOKE=1 DEVICE=cpu runs every step with tiny sizes on the CPU, to check the wiring here.
set -u
out=${OUT:-/tmp/gpu-session}
device=${DEVICE:-cuda}
smoke=${SMOKE:-0}
part=${PART:-speed}
work=$(mktemp -d)
touch "$work/started"
mkdir -p "$out/logs"
summary=$out/summary.txt
: > "$summary"
deadline=$((SECONDS + ${BUDGET:-540}))

# finish: the JSON the benchmarks wrote, the MLflow database (runs, metrics, curves'
# numbers; not the weights) and every log, into one tarball; run on any exit
finish() {
    find benchmarks/results -type f -newer "$work/started" -exec cp {} "$out/logs/" \; 2>/dev/null
    [ -f "$work/mlruns/mlflow.db" ] && cp "$work/mlruns/mlflow.db" "$out/logs/"
    tar -czf "$out/gpu-session.tar.gz" -C "$out" logs && rm -rf "$out/logs"
    rm -rf "$work"
}
trap finish EXIT

if [ -d .whl ] && [ "$smoke" != 1 ]; then  # the smoke run uses this machine's environment
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        > "$out/logs/pip.log" 2>&1 || { echo "pip install failed" >> "$summary"; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .fmnist ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    mkdir -p /usr/share/datasets/fashion-mnist && cp .fmnist/*.gz /usr/share/datasets/fashion-mnist/
fi
command -v nvidia-smi > /dev/null && nvidia-smi > "$out/logs/nvidia-smi.txt" 2>&1
python3 -c "import torch, sys; print(sys.version); print(torch.__version__, torch.cuda.is_available())" \
    > "$out/logs/python.txt" 2>&1
# what every step needs, checked before the minutes go: MLflow from the carried wheels
python3 -c "import mlflow, sqlalchemy, alembic, anomaly_flow.tracking; print('mlflow', mlflow.__version__)" \
    >> "$summary" 2>&1 || echo "imports failed: the steps that log to MLflow will fail" >> "$summary"

# step NAME SECONDS COMMAND...: run under a time limit (cut to the deadline, with 15 s
# for a stopped step to be killed), log to logs/NAME.log, one summary line
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((deadline - SECONDS - 15))
    if [ "$left" -lt 20 ]; then
        echo "$name skipped: $((deadline - SECONDS)) s left before the deadline" | tee -a "$summary"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local start=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" > "$out/logs/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - start)) limit=$limit" | tee -a "$summary"
    grep -E "^\|" "$out/logs/$name.log" | tail -24 >> "$summary"
}

if [ "$part" = quality ]; then
    if [ "$smoke" = 1 ]; then
        b3=(--minutes 0.2 --train-images 600 --val-images 100 --check-every 5)
        b4=(--classes 0,7 --train-images 300 --minutes-per-class 0.05)
    else
        # B3 three and a half minutes, so that B4's ten classes fit what is left
        b3=(--minutes 3.5 --bf16); b4=(--minutes-per-class 0.25 --bf16)
    fi
    step b3 300 python3 benchmarks/density.py --device "$device" "${b3[@]}" \
        --mlruns "$work/mlruns" --out "$out/logs/b3.json"
    step b4 260 python3 benchmarks/oneclass_fmnist.py --device "$device" "${b4[@]}" \
        --out "$out/logs/b4.json"
    exit 0
fi

if [ "$smoke" = 1 ]; then
    n_train=600; preset=tiny; b1=(--tiny --steps 3 --warmup 1 --eval-images 200); n_score=300; workers=2
    b1_profile=(--tiny --steps 3 --warmup 1); invariance=(--threads 1 --images 32 --sizes 1 16)
else
    n_train=60000; preset=fashion-mnist; b1=(--steps 30 --warmup 5 --eval-images 2000); n_score=50000; workers=16
    # few profiled steps: the profiler's own processing of the events takes longer
    b1_profile=(--steps 3 --warmup 2); invariance=()
fi

# The PNG folders of issue3 and b2, written by all cores (one process writes ~1,200/s).
python3 - "$work" "$n_train" "$n_score" > "$out/logs/write-pngs.log" 2>&1 <<'EOF'
import os, sys, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
import numpy as np
from anomaly_flow.data import write_image_folder
from anomaly_flow.fashion_mnist import load_fashion_mnist
from benchmarks.score_throughput import fashion_mnist

def write(images, folder, prefix):
    chunks = np.array_split(images, os.cpu_count() or 1)
    with ProcessPoolExecutor() as pool:
        list(pool.map(write_image_folder, chunks, [folder] * len(chunks),
                      [f"{prefix}{k:03d}-" for k in range(len(chunks))]))

start = time.perf_counter()
work, n_train, n_score = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
write(load_fashion_mnist("train")[0][:n_train], work / "fmnist-train", "train")
write(fashion_mnist(n_score)[0], work / "b2-pngs", "fmnist")
print(f"wrote {n_train} + {n_score} PNG files in {time.perf_counter() - start:.1f} s")
EOF
echo "write-pngs rc=$? $(tail -1 "$out/logs/write-pngs.log")" >> "$summary"

step issue3 130 python3 -m anomaly_flow train "$work/fmnist-train" --name fmnist-gpu \
    --preset "$preset" --epochs 1 --device "$device" --mlruns "$work/mlruns"
grep -E "registered|run_id|model_uri" "$out/logs/issue3.log" | tail -4 >> "$summary"
python3 - "$work/mlruns" >> "$summary" 2>> "$out/logs/issue3.log" <<'EOF'
import sys
import mlflow
from anomaly_flow import tracking
tracking.configure(sys.argv[1])
for run in mlflow.search_runs(experiment_names=["fmnist-gpu"], output_format="list"):
    m = run.data.metrics
    keys = ("images_per_sec_epoch", "train_bpd_epoch", "val_bpd", "final_val_bpd", "steps")
    print("issue3 metrics: " + ", ".join(f"{k}={m[k]:.4f}" for k in keys if k in m))
EOF
step gpu-tests 40 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_train.py
tail -3 "$out/logs/gpu-tests.log" >> "$summary"
step b1-fp32 50 python3 benchmarks/train_throughput.py --device "$device" "${b1[@]}" \
    --out "$out/logs/b1-fp32.json"
step b1-bf16 50 python3 benchmarks/train_throughput.py --device "$device" "${b1[@]}" --bf16 \
    --out "$out/logs/b1-bf16.json"
step b2 90 python3 benchmarks/score_throughput.py --device "$device" --n "$n_score" \
    --workers "$workers" --preset "$preset" --data "$work/b2-pngs"
tail -7 "$out/logs/b2.log" >> "$summary"
step b1-profile 90 python3 benchmarks/train_throughput.py --device "$device" "${b1_profile[@]}" \
    --bf16 --profile --out "$out/logs/b1-profile.json"
step batch-invariance 25 python3 benchmarks/batch_invariance.py --device "$device" "${invariance[@]}"
step b2-bf16 60 python3 benchmarks/score_throughput.py --device "$device" --n "$n_score" \
    --workers "$workers" --preset "$preset" --data "$work/b2-pngs" --precision bf16
tail -7 "$out/logs/b2-bf16.log" >> "$summary" 2>/dev/null || true
step b1-bf16-compile 240 python3 benchmarks/train_throughput.py --device "$device" "${b1[@]}" \
    --bf16 --compile --out "$out/logs/b1-bf16-compile.json"
