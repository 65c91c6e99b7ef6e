"""Task table of the paper script (pyreft's examples/loreft/task_config.py), cut to the tasks the
parity test runs: commonsense and gsm8k (generation), glue (classification)."""

task_config = {
    "commonsense": {
        "train_datasets": ["commonsense_170k"],
        "eval_datasets": ["boolq"],
        "task_prompt_template": "%s\n",
        "trigger_tokens": "the correct answer is ",
        "generation_args": {"max_new_tokens": 6, "do_sample": False},
    },
    "gsm8k": {
        "train_datasets": ["gsm8k"],
        "eval_datasets": ["gsm8k"],
        "task_prompt_template": "%s\nQuestion: %s\n",
        "trigger_tokens": "First think step by step and then answer the final number.\n",
        "generation_args": {"max_new_tokens": 8, "do_sample": False},
    },
    "glue": {"train_datasets": None, "eval_datasets": None, "task_prompt_template": None,
             "trigger_tokens": None},
}
