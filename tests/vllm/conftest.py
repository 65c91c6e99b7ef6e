"""The vLLM plugin tests run in the vLLM venv (bash .ci/vllm_venv.sh --test); elsewhere they are not collected."""
import importlib.util

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]
