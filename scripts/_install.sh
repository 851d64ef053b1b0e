# Sourced by scripts/test and scripts/serve: make ./.venv and install torch, then Hooocus.
# Usage: install_hooocus EXTRAS   (EXTRAS: "" or "[dev]")
# pip takes its indexes from its own configuration: PyPI gives torch's CUDA build on Linux; for the
# smaller CPU build run with PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu (or set it in
# pip.conf). A torch 2.14.1 + torchvision 0.29.1 already in .venv (CPU or CUDA, installed by you) is kept
# as it is. torchvision comes with torch because spandrel (the upscaler architectures) imports it, and
# a torchvision must be built for the same torch build.
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
install_hooocus() {
  local py=${PYTHON:-python3}
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  if ! .venv/bin/python -c "import sys, torch, torchvision
sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION' or torchvision.__version__.split('+')[0] != '$TORCHVISION_VERSION')" \
      >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt \
      "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  fi
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".$1"
}
