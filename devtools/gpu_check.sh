#!/usr/bin/env bash
# Issue 16's CUDA checks as one prepared run, for a GPU machine that has torch,
# numba, numpy, pandas, scipy, scikit-learn and pytest but neither compbias's
# install nor mlflow nor ray (the lent H200 of docs/performance.md, which also
# cannot reach the network). From the repository root:
#
#   bash devtools/gpu_check.sh wheels       # here, with network: the missing pure
#                                           # dependencies into .whl/ (git-ignored)
#   bash devtools/gpu_check.sh run [OUTDIR] # there: every check, logs in OUTDIR
#                                           # (default $OUT, else /tmp/compbias-gpu-check)
#
# `run` installs .whl/*.whl (pydantic, torch-pruning, torchao) into a private
# folder, puts the checkout on PYTHONPATH and runs, each under its own time limit:
#   1. env.log    the machine: GPU, driver, torch/numba/numpy versions
#   2. jobs.log   the jobs tests on CUDA (COMPBIAS_TEST_DEVICE=cuda, what
#                 `make test-gpu` runs for tests/jobs), with one test left out by
#                 name because it needs an MLflow store (printed)
#   3. train.log  benchmarks/train.py: fit vs the tuned loop on digits, on uint8
#                 crops/flips, on CelebA-shaped data (10,000 x 3 x 64 x 64, ResNet-18,
#                 batch 128: issue 16's measurement), 8 smallcnns batched with vmap,
#                 and 8 ResNet-20 seeds (CIFAR-shaped) as 8 processes on the GPU against
#                 one after another
#   4. probe.log  the gpus_per_task: auto probe (peak memory of one training step)
#                 and the share it gives, for digits' smallcnn and resnet20
# COMPBIAS_GPU_CHECK_DEVICE=cpu runs the same steps on the CPU with smaller sizes,
# to try the script where there is no GPU. It exits non-zero if a step failed,
# after running the others.
set -u
cd "$(dirname "$0")/.."

wheels() {
  # pydantic-core is compiled: fetch the build for the device's Python (3.12).
  local py=${GPU_CHECK_PYTHON_VERSION:-3.12}
  mkdir -p .whl
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    torch-pruning==1.6.1 torchao==0.18.0
  ls -l .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
}

run() {
  local out=${1:-${OUT:-/tmp/compbias-gpu-check}}
  local dev=${COMPBIAS_GPU_CHECK_DEVICE:-cuda}
  local py=${GPU_CHECK_PYTHON:-python3}
  mkdir -p "$out"
  local site=/tmp/compbias-gpu-check-site
  if compgen -G ".whl/*.whl" >/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
      || { echo "gpu_check: installing .whl/ failed" >&2; return 1; }
  fi
  export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
  export NUMBA_CACHE_DIR=/tmp/compbias-gpu-check-numba
  local failed=()

  {
    date -u
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $py - <<'EOF'
import os, platform, numba, numpy, torch
print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"numba {numba.__version__}, numpy {numpy.__version__}")
print("cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
  } 2>&1 | tee "$out/env.log"

  # 2. the jobs tests on the device
  local mlflow_test="tests/jobs/test_byo_models.py::test_a_baseline_from_an_mlflow_model_uri"
  echo "left out (needs an MLflow store): $mlflow_test" | tee "$out/jobs.log"
  COMPBIAS_TEST_DEVICE=$dev timeout "${GPU_CHECK_TESTS_S:-200}" $py -m pytest tests/jobs -q -p no:cacheprovider -ra \
    --deselect "$mlflow_test" --durations=10 2>&1 | tee -a "$out/jobs.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && echo "gpu_check: the jobs tests ran past ${GPU_CHECK_TESTS_S:-200} s" | tee -a "$out/jobs.log"
  [ "$rc" -eq 0 ] || failed+=(jobs)

  # 3. training speed
  local big=10000,3,64 cifar=50000,3,32 reps=3 k=8
  if [ "$dev" = cpu ]; then big=192,3,32; cifar=384,3,32; reps=1; k=2; fi
  bench() {  # LIMIT_S ARGS...: one benchmark run into train.log; says so when it ran out of time
    local limit=$1; shift
    timeout "$limit" $py benchmarks/train.py --device "$dev" "$@" 2>&1 | tee -a "$out/train.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && echo "gpu_check: benchmarks/train.py $* ran past ${limit} s" | tee -a "$out/train.log"
    [ "$rc" -eq 0 ] || failed+=("train $*")
  }
  : > "$out/train.log"
  bench 60 --arch smallcnn resnet20 --epochs 2 --repeats $reps --population 8
  bench 60 --arch smallcnn resnet20 --epochs 2 --repeats $reps --augment
  bench 90 --arch resnet18 --synthetic $big --classes 2 --batch 128 --epochs 1 --repeats $reps
  bench 120 --arch resnet20 --synthetic $cifar --classes 10 --batch 128 --epochs 1 --repeats 1 --processes $k --skip-compare

  # 4. the GPU-share probe
  timeout 60 $py - "$dev" <<'EOF' 2>&1 | tee "$out/probe.log"
import sys
from compbias.platform.config import load_study, parse_study
from compbias.platform.gpu_share import probe_training_memory, resolve_gpu_share
dev = sys.argv[1]
for arch in ("smallcnn", "resnet20"):
    data = load_study("configs/digits.yaml").resolved()
    data["model"] = {**data["model"], "arch": arch}
    data["resources"] = {**data["resources"], "gpus_per_task": "auto"}
    spec = parse_study(data, source=arch)
    probe = probe_training_memory(spec.resolved(), device=dev)
    print(f"{arch}: {probe}")
    # the platform's own decision on a one-GPU cluster (off CUDA: a warning and 1 GPU per task)
    decision = resolve_gpu_share(spec, 1.0, lambda: probe, log=lambda line: print(f"{arch}: {line}"))
    print(f"{arch}: share {decision.share:g}{'' if decision.error is None else ' (' + decision.error + ')'}")
EOF
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=(probe)

  if [ "${#failed[@]}" -gt 0 ]; then printf 'gpu_check: failed: %s\n' "${failed[@]}"; return 1; fi
  echo "gpu_check: every step ran"
}

case "${1:-}" in
  wheels) wheels ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash devtools/gpu_check.sh wheels | run [OUTDIR]" >&2; exit 2 ;;
esac
