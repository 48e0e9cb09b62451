#!/usr/bin/env bash
# Create Stemma's work pools and deployments on the Prefect server in PREFECT_API_URL.
#
#   stemma             process pool: the compose stack's worker runs flows in its container
#   stemma-kubernetes  kubernetes pool: each flow run is a Kubernetes Job with one GPU
#                      (base job template infra/k8s/gpu-job-template.json)
#
# Then every deployment of infra/prefect.yaml, with its schedules and event triggers.
# Running it again updates pools and deployments in place. The compose stack runs it as
# its `deploy` service; tests/infra/test_native_stack.py runs it against a native stack.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server, e.g. http://127.0.0.1:4200/api}"
prefect="${PREFECT:-prefect}"

"$prefect" work-pool create stemma --type process --overwrite
"$prefect" work-pool create stemma-kubernetes --type kubernetes \
    --base-job-template "$here/k8s/gpu-job-template.json" --overwrite
cd "$here/.."
"$prefect" --no-prompt deploy --all --prefect-file "$here/prefect.yaml"
