"""Old home of the demo helpers, kept so that existing imports keep working.

New code imports from where each piece now lives:

* tiny models: :mod:`reft_kernels.models.tiny` (``tiny_llama``, ``build_word_tokenizer``, ``pretrain_base``);
* real models: :mod:`reft_kernels.models.real` (``fetch_model``);
* templates and the shipped data: :mod:`reft_kernels.jobs.prompts`;
* generation, ``reft_run.json``, loss curves: :mod:`reft_kernels.jobs.runs`;
* the demos: :mod:`reft_kernels.jobs.tiny_demo` and :mod:`reft_kernels.jobs.chat_demo`.
"""
from .jobs.prompts import (BUILTIN_DATA, DATA_DIR, PROMPT_TEMPLATE, PROMPT_TEMPLATE_INPUT,  # noqa: F401
                           format_prompt, load_builtin_instructions)
from .jobs.runs import RUN_INFO, generate_text, write_run_info  # noqa: F401
from .jobs.tiny_demo import DEMO_PROMPTS, demo_reft_setup, op_timings  # noqa: F401
from .jobs.tiny_demo import run_tiny_demo as run_demo  # noqa: F401
from .models.tiny import SPECIAL_TOKENS, build_word_tokenizer, pretrain_base, tiny_llama  # noqa: F401
