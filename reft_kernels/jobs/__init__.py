"""Ready-made jobs behind the ``reft-kernels`` command, the examples and the benchmarks.

* :mod:`.prompts` -- the instruction template, the chat template helper, the shipped instructions;
* :mod:`.runs` -- greedy generation with/without the adapter, the loss curve PNG (``reft_run.json``:
  :mod:`reft_kernels.artifacts`);
* :mod:`.tiny_demo` -- ``reft-kernels demo --tiny``: a LoReFT on a tiny Llama in seconds (CI);
* :mod:`.chat_demo` -- ``reft-kernels demo``: a LoReFT that gives a real chat model a new reply
  style (pyreft's emoji-chatbot quick start on SmolLM2-135M-Instruct).
"""
