#!/usr/bin/env bash
# Create the databases of Stemma's stack, one per server: Prefect and MLflow each keep
# their schema version in a table named alembic_version, so they cannot share one.
#
# The postgres image runs this once, on an empty data directory
# (/docker-entrypoint-initdb.d). Any psql connection settings work too (PGHOST, PGPORT,
# PGPASSWORD), which is how tests/infra/test_native_stack.py runs it. Running it again
# is harmless.
set -euo pipefail

owner="${POSTGRES_USER:?POSTGRES_USER names the owner of the databases}"
databases="${STEMMA_DATABASES:-prefect mlflow}"

run_psql() {
    psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$owner" --dbname "${POSTGRES_DB:-postgres}" "$@"
}

for database in $databases; do
    exists="$(run_psql -tAc "SELECT 1 FROM pg_database WHERE datname = '${database}'")"
    if [ "$exists" != "1" ]; then
        run_psql -c "CREATE DATABASE \"${database}\" OWNER \"${owner}\""
        echo "created database ${database}"
    fi
done
