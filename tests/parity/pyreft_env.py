"""The parity environment (.ci/pyreft_parity.sh: pyreft 0.1.0, pyvene 0.1.8, transformers 4.45.1):
the parity tests skip, with the reason, wherever pyreft is not importable (the main environment)."""
import os

import pytest

PARITY_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(PARITY_DIR))


def require_pyreft():
    """pyreft, or a module-level skip naming why it did not import."""
    try:
        import pyreft
    except Exception as e:  # noqa: BLE001 - any import failure means "not the parity env"
        pytest.skip(f"pyreft not importable ({type(e).__name__}: {e}); run .ci/pyreft_parity.sh",
                    allow_module_level=True)
    return pyreft
