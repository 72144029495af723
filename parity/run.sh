#!/usr/bin/env bash
# Parity with the reference implementations (LAION-CLAP, Microsoft CLAP, transformers 4's
# ClapModel) in their own virtualenv: they pin numpy<2 and transformers<5, which the project's
# venv does not have. Usage: bash parity/run.sh [pytest args, e.g. parity/test_hf.py -x]
# `bash parity/run.sh parity/test_mteb.py` runs MTEB's test in a virtualenv of its own
# (MTEB_VENV, default .venv-mteb: mteb 2 wants transformers 5), without the references' conftest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = parity/test_mteb.py ]; then
  venv=${MTEB_VENV:-.venv-mteb}
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  if ! cmp -s parity/requirements-mteb.txt "$venv/.requirements"; then
    "$venv/bin/pip" install -q -r parity/requirements-mteb.txt
    cp parity/requirements-mteb.txt "$venv/.requirements"
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  exec "$venv/bin/python" -m pytest -q -p no:cacheprovider --noconftest "$@"
fi
venv=${PARITY_VENV:-.venv-parity}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
stamp="$venv/.requirements"
if ! cat parity/requirements.txt parity/requirements-nodeps.txt | cmp -s - "$stamp"; then
  "$venv/bin/pip" install -q -r parity/requirements.txt
  "$venv/bin/pip" install -q --no-deps -r parity/requirements-nodeps.txt
  cat parity/requirements.txt parity/requirements-nodeps.txt > "$stamp"
fi
# The shards LAION-CLAP's own loader reads (test_laion.py): a build of the bundled clips by the
# project's venv (CI's README step already made ./out), unless PARITY_SHARDS names one.
if [ -z "${PARITY_SHARDS:-}" ]; then
  if [ -f out/stats.json ]; then
    PARITY_SHARDS=out
  else
    PARITY_SHARDS=.parity-shards
    [ -f "$PARITY_SHARDS/stats.json" ] || PYTHONPATH="$PWD" "${PROJECT_VENV:-.venv}/bin/python" -m audio_dataset.cli \
      build --source local --input tests/data/real-audio --out "$PARITY_SHARDS" >/dev/null
  fi
fi
export PARITY_SHARDS
# Our code from this checkout (not installed: its dependencies are the project venv's).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
case "${1:-}" in parity*) ;; *) set -- parity "$@" ;; esac  # the whole folder unless a file is named
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
