#!/bin/sh
# Entry point of the compbias images.
#
# Secrets arrive as files (compose/Swarm/Kubernetes secrets), never on the
# command line or in the image: for each variable NAME below, when NAME_FILE is
# set, NAME is exported with that file's content (trailing newline removed), e.g.
#   MLFLOW_TRACKING_PASSWORD_FILE=/run/secrets/auditor_password
#   RAY_AUTH_TOKEN_FILE=/run/secrets/ray_auth_token
# Then the command replaces this shell (so signals reach it directly).
set -eu

SECRET_VARIABLES="
POSTGRES_PASSWORD
MLFLOW_AUTH_ADMIN_PASSWORD
MLFLOW_FLASK_SERVER_SECRET_KEY
MLFLOW_TRACKING_USERNAME
MLFLOW_TRACKING_PASSWORD
RAY_AUTH_TOKEN
"

for name in $SECRET_VARIABLES; do
    eval "file=\${${name}_FILE:-}"
    [ -n "$file" ] || continue
    if [ ! -r "$file" ]; then
        echo "entrypoint: ${name}_FILE names $file, which is not a readable file" >&2
        exit 2
    fi
    value=$(cat "$file")
    export "$name=$value"
    unset "${name}_FILE"
done

exec "$@"
