"""``python -m reft_kernels.serving`` == ``reft-kernels serve``."""
import sys

from .server import main

sys.exit(main())
