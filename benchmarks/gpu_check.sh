#!/usr/bin/env bash
# The GPU check: install, correctness tests on the GPU, op/model/launch benchmarks.
#
#   bash benchmarks/gpu_check.sh                # on a machine with one NVIDIA GPU
#   bash benchmarks/gpu_check.sh --quick        # fewer tests, shapes and repeats
# (time budgets after the install and the one-time native CUDA build: 7 min, quick 3 min;
#  not yet run on a GPU: docs/gpu_check.md)
#   bash benchmarks/gpu_check.sh --dry-run      # on CPU, tiny, no install: proves the script works
#   bash benchmarks/gpu_check.sh --no-install   # use the python environment as it is
#   bash benchmarks/gpu_check.sh --vllm         # also: vLLM 0.32 (the plain CUDA wheel) in its own venv,
#        the plugin == HF equality tests (tests/vllm_plugin, V1 model runner) and a throughput line
#        (benchmarks/bench_serving.py --engine vllm: stock vLLM eager and with CUDA graphs, plugin, hf
#        engine) -> $OUT/serving_vllm*
#
# Results: $OUT (default ./gpu_results): gpu_check.json, gpu_check.md, gpu_check.log, pytest.xml,
# ops.json, model.json, launch.json. Exit status: 0 passed, 1 a correctness test failed,
# 2 only benchmark errors, 3 no usable GPU (see benchmarks/gpu/gpu_check.py).
# Environment: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0, the project's pin;
# empty: keep the installed torch), INSTALL_TIMEOUT (seconds per pip call, default 180).
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=() INSTALL=1 VLLM=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) MODE+=(--dry-run); INSTALL=0 ;;
    --quick) MODE+=(--quick) ;;
    --no-install) INSTALL=0 ;;
    --skip-bench) MODE+=(--skip-bench) ;;
    --vllm) VLLM=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (use --dry-run, --quick, --no-install, --skip-bench, --vllm)" >&2; exit 64 ;;
  esac
done
OUT="${OUT:-./gpu_results}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC-torch==2.13.0}"
INSTALL_TIMEOUT="${INSTALL_TIMEOUT:-180}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

if [[ " ${MODE[*]:-} " == *" --dry-run "* ]]; then
  export TRITON_INTERPRET=1
else
  unset TRITON_INTERPRET                       # compiled Triton on the GPU, never the interpreter
  [ -x /usr/local/nvidia/bin/nvidia-smi ] && export PATH="$PATH:/usr/local/nvidia/bin"
fi

if [ "$INSTALL" = 1 ]; then
  start=$SECONDS
  pip_install() {   # a failed install is reported, not fatal: the check says what it could not do
    say "pip install $*"
    timeout "$INSTALL_TIMEOUT" "$PYTHON" -m pip install -q --retries 2 --timeout 30 "$@" 2>&1 | tee -a "$LOG" \
      || say "WARNING: 'pip install $*' failed or timed out; going on with what is installed"
  }
  # The package index's plain torch wheel for Linux x86_64 is the CUDA build.
  if [ -n "$TORCH_SPEC" ]; then pip_install "$TORCH_SPEC" triton; else pip_install triton; fi
  pip_install -e ".[test]"
  # nvcc for the native CUDA backend: the machine's, or NVIDIA's wheels matching torch's CUDA.
  if home=$("$PYTHON" benchmarks/gpu/gpu_env.py ensure-nvcc 2> >(tee -a "$LOG" >&2)); then
    export CUDA_HOME="$home" PATH="$home/bin:$PATH"
    say "CUDA_HOME=$CUDA_HOME"
  else
    say "WARNING: no nvcc: the native CUDA backend cannot build (the check will report it)"
  fi
  say "install step took $((SECONDS - start)) s"
elif [ -z "${CUDA_HOME:-}" ] && [[ " ${MODE[*]:-} " != *" --dry-run "* ]]; then
  home=$("$PYTHON" benchmarks/gpu/gpu_env.py ensure-nvcc --no-install 2>>"$LOG") && export CUDA_HOME="$home"
fi

"$PYTHON" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch
ok = torch.cuda.is_available()
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); torch.cuda.is_available() = {ok}"
      + (f"; {torch.cuda.get_device_name()}" if ok else ""))
if not ok and torch.version.cuda is None:
    print("NOTE: this torch is a CPU build (on a GPU machine: the index served a CPU wheel)")
EOF

"$PYTHON" benchmarks/gpu/gpu_check.py --out "$OUT" ${MODE[@]+"${MODE[@]}"} 2>&1 | tee -a "$LOG"
code=${PIPESTATUS[0]}

if [ "$VLLM" = 1 ] && [[ " ${MODE[*]:-} " == *" --dry-run "* ]]; then
  say "vLLM section: skipped in --dry-run (on CPU it is bash .ci/vllm_venv.sh --test)"
elif [ "$VLLM" = 1 ]; then
  VENV="$OUT/vllm-venv"
  say "vLLM section: vllm==0.32.0 in $VENV"
  "$PYTHON" -m venv "$VENV" && timeout 900 "$VENV/bin/pip" install -q vllm==0.32.0 pytest 2>&1 | tee -a "$LOG"
  "$VENV/bin/pip" install -q --no-deps -e . 2>&1 | tee -a "$LOG"
  # the plugin reads the V1 runner's logits-processor interface; vLLM picks V2 on CUDA by default
  export VLLM_USE_V2_MODEL_RUNNER=0
  "$VENV/bin/python" -m pytest tests/vllm_plugin -q -p no:cacheprovider 2>&1 | tee "$OUT/vllm_pytest.log" | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" = 0 ] || { say "vLLM plugin tests FAILED (see $OUT/vllm_pytest.log)"; code=1; }
  "$VENV/bin/python" benchmarks/bench_serving.py --engine vllm --engines stock_graphs,stock,plugin,hf \
    --requests 16 --adapters 16 --out "$OUT/serving_vllm" 2>&1 | tee -a "$LOG" || say "WARNING: the vLLM benchmark failed"
fi
say "exit $code; results in $OUT (gpu_check.md, gpu_check.json, gpu_check.log)"
exit "$code"
