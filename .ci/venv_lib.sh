# Sourced by .ci/pyreft_parity.sh and .ci/vllm_venv.sh: a pinned venv at $VENV, reused while its
# stamp file holds the script's pins. The caller sets VENV, defines a function installing what
# follows torch, then:  venv_ensure STAMP_FILE "PINS" that_function
export PIP_DISABLE_PIP_VERSION_CHECK=1

pipi() {  # pip install, without the noise of this machine's local-index warnings
  "$VENV/bin/pip" install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file" || true; }
  return "${PIPESTATUS[0]}"
}

venv_ensure() {  # venv_ensure STAMP_FILE PINS BUILD: (re)build $VENV unless its stamp holds PINS
  if [ "$(cat "$VENV/$1" 2>/dev/null)" != "$2" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    # torch first and alone, exactly pinned: the CPU build on local disk (never a CUDA one).
    pipi torch==2.13.0
    "$3"
    echo "$2" > "$VENV/$1"
  fi
}
