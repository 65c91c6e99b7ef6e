#!/usr/bin/env bash
# The oldest supported transformers (4.45.1, pyreft 0.1.0's pin), in its own venv:
#  1. the tests that touch transformers internals (generation, patcher, checkpoints, trainer,
#     model families) run again here, so both ends of the supported range are tested;
#  2. the pyreft parity suite: pyreft and reft_kernels side by side (checkpoints both ways,
#     outputs, training curves).
# The main environment (.ci/run) has the newest transformers.
#   REFT_PARITY_VENV   where the venv lives (default /tmp/reft-parity-venv; kept between runs
#                      and reused when its stamp matches this script's pins)
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/venv_lib.sh
VENV="${REFT_PARITY_VENV:-/tmp/reft-parity-venv}"
parity_packages() {  # after torch
  # transformers 4.45.1 needs tokenizers<0.21 and huggingface-hub<1.0; pyvene imports
  # matplotlib and networkx at module load, pyreft imports datasets (<4 keeps hub<1.0).
  pipi transformers==4.45.1 "huggingface-hub<1.0" "datasets<4" \
    matplotlib networkx safetensors pytest pytest-timeout hypothesis "accelerate>=0.26" triton ninja
  # pyreft/pyvene declare heavy, unneeded deps (wandb, jupyter, seaborn, ...): --no-deps.
  pipi --no-deps pyvene==0.1.8 pyreft==0.1.0
}
venv_ensure .reft-parity-stamp "torch==2.13.0 transformers==4.45.1 pyvene==0.1.8 pyreft==0.1.0 v3" parity_packages
pipi --no-deps -e .
"$VENV/bin/python" -c "import transformers; assert transformers.__version__ == '4.45.1', transformers.__version__"
echo "== oldest supported transformers (4.45.1): the tests that touch transformers internals =="
"$VENV/bin/python" -m pytest $(cat .ci/transformers_sensitive_tests) -q -p no:cacheprovider
# The parity checks are about formats and math, not kernels: use the plain torch backend.
echo "== pyreft 0.1.0 parity =="
REFT_KERNELS_BACKEND=torch "$VENV/bin/python" -m pytest tests/parity -q -p no:cacheprovider
