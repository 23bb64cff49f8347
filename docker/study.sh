#!/bin/sh
# Run a study driver inside a Ray cluster: join it as a node with no CPUs and no
# GPUs (a Ray driver must run on a node of its cluster), then run
# `compbias study ARGS...`, whose tasks go to the cluster's workers.
#
#   study.sh configs/digits.yaml
#   study.sh configs/celeba.yaml --data-root /data/celeba
#
# Needs RAY_ADDRESS (head's host:port), RAY_AUTH_MODE=token and RAY_AUTH_TOKEN,
# and MLFLOW_TRACKING_URI with the tracking credentials (see entrypoint.sh).
set -eu
: "${RAY_ADDRESS:?set RAY_ADDRESS to the head node (host:port)}"
[ "$#" -ge 1 ] || { echo "usage: study.sh CONFIG [compbias study options]" >&2; exit 2; }

ray start --address="$RAY_ADDRESS" --num-cpus=0 --num-gpus=0 --disable-usage-stats
exec compbias study "$@"
