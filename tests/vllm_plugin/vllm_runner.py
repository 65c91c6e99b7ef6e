"""Run one vLLM engine configuration and print its greedy outputs as JSON (used by the tests).

argv[1] is a JSON spec: model, adapters ({name: {path, positions}}), engine (LLM keywords),
batches (a list of request lists; each request {ids, adapter, salt[, generated]}), max_tokens.
Batches run one after another (so earlier ones fill the prefix cache for later ones).
"""
import json
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from reft_kernels.vllm_plugin import REFT_LOGITS_PROCESSOR
    engine = dict(dtype="float32", enforce_eager=True, max_model_len=256, kv_cache_memory_bytes=1 << 28,
                  max_num_seqs=16, seed=0)
    engine.update(spec.get("engine", {}))
    llm = LLM(spec["model"], hf_overrides={"reft_adapters": spec["adapters"]},
              logits_processors=[REFT_LOGITS_PROCESSOR], **engine)
    results = []
    for batch in spec["batches"]:
        prompts, params = [], []
        for r in batch:
            prompt = {"prompt_token_ids": r["ids"]}
            if r.get("salt"):
                prompt["cache_salt"] = r["salt"]
            prompts.append(prompt)
            extra = {"reft_adapter": r["adapter"]} if r.get("adapter") else None
            if r.get("generated") is not None:
                extra["reft_generated_positions"] = r["generated"]
            params.append(SamplingParams(max_tokens=spec["max_tokens"], min_tokens=spec["max_tokens"], temperature=0.0,
                                         extra_args=extra))
        outs = llm.generate(prompts, params, use_tqdm=False)
        results.append([list(o.outputs[0].token_ids) for o in outs])
    print("RESULT " + json.dumps({"outputs": results}), flush=True)


if __name__ == "__main__":
    main()
