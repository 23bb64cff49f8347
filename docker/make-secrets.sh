#!/bin/sh
# Create the secrets of docker/compose.yaml in docker/secrets/ (mode 0600), once.
# Existing files are kept, so running it again never rotates a live secret.
#   STUDY_USER=alice AUDITOR_USER=auditor ./make-secrets.sh
set -eu
cd "$(dirname "$0")"
umask 077
mkdir -p secrets

random() { python3 -c 'import secrets; print(secrets.token_urlsafe(24))'; }
put() {  # put NAME VALUE: write secrets/NAME unless it exists
    if [ -e "secrets/$1" ]; then echo "kept    secrets/$1"; else printf '%s\n' "$2" > "secrets/$1"; echo "created secrets/$1"; fi
}

put postgres_password "$(random)"
put mlflow_admin_password "$(random)"
put mlflow_flask_secret_key "$(random)"
put ray_auth_token "$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
put auditor_username "${AUDITOR_USER:-auditor}"
put auditor_password "$(random)"
put study_username "${STUDY_USER:-scientist}"
put study_password "$(random)"
echo "now create the two MLflow users with these passwords (docs/operations.md, 'Users')"
