#!/bin/sh
# The tracking server of a compbias deployment: PostgreSQL backend, artifacts
# proxied into a directory (a volume), MLflow's basic-auth app.
#
# Settings (environment; *_FILE variants are resolved by entrypoint.sh):
#   POSTGRES_HOST, POSTGRES_PORT, POSTGRES_DB, POSTGRES_USER, POSTGRES_PASSWORD
#   MLFLOW_ARTIFACTS_DESTINATION   default /mlartifacts
#   MLFLOW_AUTH_CONFIG_PATH        basic-auth settings (users database, default permission)
#   MLFLOW_AUTH_ADMIN_PASSWORD     admin password, used only when the users database is new
#   MLFLOW_ALLOWED_HOSTS           Host headers accepted (default: mlflow,localhost)
#   MLFLOW_WORKERS                 uvicorn workers (default 4)
#   MLFLOW_HOST, MLFLOW_PORT       where to listen (default 0.0.0.0:5000, inside the container)
# The database password goes into the backend URI inside this process only; it
# is never printed.
set -eu

: "${POSTGRES_HOST:=postgres}" "${POSTGRES_PORT:=5432}" "${POSTGRES_DB:=mlflow}" "${POSTGRES_USER:=mlflow}"
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD or MLFLOW_AUTH_ADMIN_PASSWORD_FILE}"
: "${MLFLOW_ARTIFACTS_DESTINATION:=/mlartifacts}" "${MLFLOW_WORKERS:=4}"
: "${MLFLOW_HOST:=0.0.0.0}" "${MLFLOW_PORT:=5000}"
: "${MLFLOW_ALLOWED_HOSTS:=mlflow,mlflow:5000,localhost,localhost:5000}"
export MLFLOW_AUTH_ADMIN_PASSWORD

password=$(python -c 'import os, urllib.parse; print(urllib.parse.quote(os.environ["POSTGRES_PASSWORD"], safe=""))')
exec mlflow server \
    --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" \
    --backend-store-uri "postgresql+psycopg2://${POSTGRES_USER}:${password}@${POSTGRES_HOST}:${POSTGRES_PORT}/${POSTGRES_DB}" \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --allowed-hosts "$MLFLOW_ALLOWED_HOSTS" \
    --app-name basic-auth \
    "$@"
