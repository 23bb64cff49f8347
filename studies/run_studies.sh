#!/usr/bin/env bash
# Run (or resume) the real-data studies of docs/results.md, then audit them.
# Re-running resumes: finished, registered models are reused, not retrained.
#
#   studies/run_studies.sh celeba            # CelebA (studies 1 and 3)
#   studies/run_studies.sh cifar             # both Simon Says studies
#   studies/run_studies.sh celeba-ft4        # follow-up: 4 fine-tuning epochs
#   studies/run_studies.sh cifar-biased50    # follow-up: classes kept at 50%
#   studies/run_studies.sh cifar-biased-ft4  # follow-up: 4 fine-tuning epochs
#   studies/run_studies.sh cifar-mixed       # follow-up: classes kept at 10/20/50%
#   SEEDS=5 studies/run_studies.sh celeba    # grow the population
#
# Environment (defaults in brackets): DATA [/tmp/data] (the extracted archives
# celeba-10k.zip and cifar10-jpg.zip), STUDIES [$TMPDIR/compbias-studies] (MLflow stores,
# artifacts, logs; outside the repository), SEEDS [as in the study file],
# AUDIT [1] (0: studies only).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
DATA="${DATA:-/tmp/data}"
STUDIES="${STUDIES:-${TMPDIR:-/tmp}/compbias-studies}"
AUDIT="${AUDIT:-1}"
mkdir -p "$STUDIES/logs" "$STUDIES/cache" "$STUDIES/mlartifacts" "$STUDIES/audit"
export COMPBIAS_ARTIFACT_ROOT="$STUDIES/mlartifacts"
export COMPBIAS_CACHE_DIR="$STUDIES/cache"
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$here/.cache/numba}"
export MPLBACKEND=Agg
cb="$here/.venv/bin/compbias"
seeds=()
[ -n "${SEEDS:-}" ] && seeds=(--seeds "$SEEDS")

run() {  # run <db name> <config> <data root> <study name>
  local db="$1" config="$2" root="$3" name="$4"
  export MLFLOW_TRACKING_URI="sqlite:///$STUDIES/mlflow-$db.db"
  # The study file with dataset.root filled in, kept outside the repository.
  # Not `--data-root`: the study logs the file as given (study.yaml), and the
  # audit loads the dataset for SVCCA/CKA and the CIE gallery from that file,
  # so a root given only on the command line leaves both out of the audit.
  local resolved="$STUDIES/configs/$config.yaml"
  mkdir -p "$STUDIES/configs"
  sed -E "s|^(  root:) null|\1 $root|" "$here/configs/$config.yaml" > "$resolved"
  grep -q "^  root: $root" "$resolved" || { echo "no 'root: null' line in configs/$config.yaml" >&2; exit 2; }
  echo "$(date -u +%FT%TZ) study $resolved ($MLFLOW_TRACKING_URI)"
  nice -n 19 "$cb" study "$resolved" "${seeds[@]}"
  if [ "$AUDIT" = 1 ]; then
    echo "$(date -u +%FT%TZ) audit $name"
    nice -n 19 "$cb" audit --study "$name" --force --output-dir "$STUDIES/audit/$name" --json \
      > "$STUDIES/audit/$name.json"
  fi
  echo "$(date -u +%FT%TZ) done $config"
}

case "${1:-}" in
  celeba) run celeba celeba "$DATA/celeba" celeba-blond ;;
  celeba-ft4) run celeba celeba-ft4 "$DATA/celeba" celeba-blond-ft4 ;;
  cifar-biased50) run cifar cifar10-simonsays-biased50 "$DATA/cifar10" cifar10-simonsays-biased50 ;;
  cifar-biased-ft4) run cifar cifar10-simonsays-biased-ft4 "$DATA/cifar10" cifar10-simonsays-biased-ft4 ;;
  cifar-mixed) run cifar cifar10-simonsays-mixed "$DATA/cifar10" cifar10-simonsays-mixed ;;
  cifar)
    run cifar cifar10-simonsays-biased "$DATA/cifar10" cifar10-simonsays-biased
    run cifar cifar10-simonsays "$DATA/cifar10" cifar10-simonsays ;;
  *) echo "usage: $0 celeba|celeba-ft4|cifar|cifar-biased50|cifar-biased-ft4|cifar-mixed" >&2; exit 2 ;;
esac
