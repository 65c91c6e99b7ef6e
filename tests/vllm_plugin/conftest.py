"""The vLLM plugin tests run in the vLLM venv (bash .ci/vllm_venv.sh --test); elsewhere they are not collected."""
try:
    import vllm  # noqa: F401
except ImportError:
    collect_ignore_glob = ["test_*.py"]
