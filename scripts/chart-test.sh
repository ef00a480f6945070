#!/usr/bin/env bash
# Renders the Helm chart (deploy/helm/embedfleet) with the real Helm engine for every values file
# in its tests/values/, validates every object against the Kubernetes schemas
# (kubernetes-validate --strict) and the ScaledObjects against KEDA's CRD, and checks what the
# rendered objects say (scripts/chart_test.py). No cluster and no helm binary are needed: Helm v4
# runs as a library from the PyPI wheel helm-python-sdk.
#
# The tools go into a venv under target/ (git-ignored, kept between runs; ~400 MB, one pip
# install of a few seconds when pip's cache is warm). Pinned so a new release cannot change what
# CI checks without a commit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=${EMBEDFLEET_CHART_VENV:-target/chart-venv}
python=${PYTHON:-python3}
requirements=(
  "helm-python-sdk==0.2.2"
  "kubernetes-validate==1.37.0"
  "jsonschema==4.26.0"
  "PyYAML==6.0.4"
)
stamp="$venv/.requirements"
if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "${requirements[*]}" ]]; then
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}"
  echo "${requirements[*]}" >"$stamp"
fi
exec "$venv/bin/python" scripts/chart_test.py "$@"
