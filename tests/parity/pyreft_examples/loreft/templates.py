"""Prompt templates of the paper script (pyreft's examples/loreft/templates.py), those used here."""

alpaca_prompt_no_input_template = """Below is an instruction that describes a task. Write a response that appropriately completes the request.

### Instruction:
%s

### Response:
"""
