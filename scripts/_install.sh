# Sourced by scripts/test and scripts/serve: make ./.venv and install torch, then Hooocus.
# Usage: install_hooocus EXTRAS   (EXTRAS: "" or "[dev]")
# pip takes its indexes from its own configuration: PyPI gives torch's CUDA build on Linux; for the
# smaller CPU build run with PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu (or set it in
# pip.conf). A torch 2.13.0 already in .venv (CPU or CUDA, installed by you) is kept as it is.
TORCH_VERSION=2.13.0
install_hooocus() {
  local py=${PYTHON:-python3}
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  if ! .venv/bin/python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" \
      >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt "torch==$TORCH_VERSION"
  fi
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".$1"
}
