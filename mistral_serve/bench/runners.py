"""One class per engine under test. Each loads its model once, warms up on a slice of the
workload, then runs timed passes in which every request arrives at t=0."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mistral_serve.bench.measure import RunResult
from mistral_serve.bench.workload import Workload

WARMUP_REQUESTS = 8
# ``bench engine --decoding``: what every request of a pass samples with (EOS ignored), as
# SamplingParams keyword arguments that vLLM's SamplingParams takes under the same names.
# "sampled" is what chat clients send (vLLM bench serve's --temperature/--top-p defaults for
# chat); "penalties" adds the repetition and frequency penalties some clients set.
DECODINGS = {
    "greedy": {"temperature": 0.0, "top_p": 1.0},
    "sampled": {"temperature": 0.8, "top_p": 0.95},
    "penalties": {"temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.1, "frequency_penalty": 0.5},
}


def _pass_requests(workload: Workload, warmup: bool) -> Workload:
    """What one pass submits: a short head of the workload to warm up, else all of it. Every runner
    counts completions against this slice, never against a constant, so a workload shorter than the
    warm-up size cannot leave a runner waiting for requests it never sent."""
    return workload.head(WARMUP_REQUESTS) if warmup else workload


class OursRunner:
    name = "mistral-serve"
    notes = "continuous batching, paged KV, chunked prefill"

    def __init__(self, model_dir: Path, engine_args: dict, decoding: str = "greedy") -> None:
        from mistral_serve import LLM

        self.llm = LLM(str(model_dir), **engine_args)
        self.decoding = DECODINGS[decoding]

    def run(self, workload: Workload, warmup: bool = False) -> RunResult:
        from mistral_serve import SamplingParams

        requests = _pass_requests(workload, warmup)
        prompts, max_tokens = requests.prompt_token_ids, requests.max_tokens
        params = [SamplingParams(max_tokens=m, ignore_eos=True, **self.decoding) for m in max_tokens]
        self.llm.reset_prefix_cache()  # every pass starts cold: sharing happens within a pass only
        start = time.perf_counter()
        outs = self.llm.generate(prompts, params)
        wall = time.perf_counter() - start
        return RunResult(
            wall_s=wall,
            output_tokens=sum(len(o.outputs[0].token_ids) for o in outs),
            prompt_tokens=sum(len(p) for p in prompts),
            ttft_s=[o.metrics.ttft for o in outs],
            itl_s=[gap for o in outs for gap in o.metrics.inter_token_latencies],
        )


def _hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa").eval()


class HFStaticRunner:
    """transformers ``generate`` on static batches of 16, left padding, EOS ignored; each batch
    runs to its longest request (min_new_tokens = max_new_tokens), and only each request's own
    max_tokens are credited."""

    name = "hf-static"
    notes = "transformers generate, static batches of 16, left padding"
    batch_size = 16

    def __init__(self, model_dir: Path) -> None:
        self.model = _hf_model(model_dir)

    def run(self, workload: Workload, warmup: bool = False) -> RunResult:
        from transformers import LogitsProcessor, LogitsProcessorList

        requests = _pass_requests(workload, warmup)
        n, prompts, max_tokens = len(requests), requests.prompt_token_ids, requests.max_tokens
        step_times: list[float] = []

        class StepClock(LogitsProcessor):
            def __call__(self, input_ids, scores):
                step_times.append(time.perf_counter())
                return scores

        ttft, itl, generated = [], [], 0
        start = time.perf_counter()
        for b in range(0, n, self.batch_size):
            batch, lens = prompts[b : b + self.batch_size], max_tokens[b : b + self.batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            new = max(lens)
            step_times.clear()
            with torch.no_grad():
                self.model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                    eos_token_id=None, pad_token_id=0, logits_processor=LogitsProcessorList([StepClock()]))
            generated += new * len(batch)
            for length in lens:
                ttft.append(step_times[0] - start)
                itl.extend(b2 - a for a, b2 in zip(step_times[: length - 1], step_times[1:length]))
        wall = time.perf_counter() - start
        return RunResult(wall, sum(max_tokens), sum(len(p) for p in prompts), ttft, itl, generated)


class HFContinuousRunner:
    """transformers' own continuous batching (the manager behind ``generate_batch``), with each
    request's own max_new_tokens and per-token timestamps."""

    name = "hf-cb"
    notes = "transformers continuous batching (sdpa, 160 blocks, 1024 batch tokens)"
    stall_timeout_s = 120.0  # a benchmark fails loudly rather than waiting forever on a stuck manager

    def __init__(self, model_dir: Path) -> None:
        self.model = _hf_model(model_dir)

    def run(self, workload: Workload, warmup: bool = False) -> RunResult:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        requests = _pass_requests(workload, warmup)
        n, prompts, max_tokens = len(requests), requests.prompt_token_ids, requests.max_tokens
        gen_config = GenerationConfig(do_sample=False, max_new_tokens=max(max_tokens), eos_token_id=-1)
        # Explicit sizes: the defaults size the cache from free RAM and build a ~4 GB dense mask on CPU.
        cb_config = ContinuousBatchingConfig(num_blocks=160, max_batch_tokens=1024)
        results = {}
        start = time.perf_counter()
        with self.model.continuous_batching_context_manager(
            generation_config=gen_config, continuous_batching_config=cb_config, block=True, timeout=5, warmup=False
        ) as manager:
            for i, (p, m) in enumerate(zip(prompts, max_tokens)):
                manager.add_request(p, request_id=str(i), max_new_tokens=m, record_timestamps=True)
            last_progress = time.perf_counter()
            while len(results) < n:
                out = manager.get_result(timeout=1)
                if out is not None:
                    last_progress = time.perf_counter()
                    if out.is_finished():
                        results[out.request_id] = out
                elif not manager.is_running():
                    raise RuntimeError("transformers continuous batching stopped before finishing")
                elif time.perf_counter() - last_progress > self.stall_timeout_s:
                    raise RuntimeError(f"transformers continuous batching made no progress for {self.stall_timeout_s} s")
        wall = time.perf_counter() - start
        outs = [results[str(i)] for i in range(n)]
        for o, m in zip(outs, max_tokens):
            if len(o.generated_tokens) != m:
                raise RuntimeError(f"hf-cb produced {len(o.generated_tokens)} tokens, expected {m}")
        ttft = [o.timestamps[0] - start for o in outs]
        itl = [b - a for o in outs for a, b in zip(o.timestamps, o.timestamps[1:])]
        return RunResult(wall, sum(len(o.generated_tokens) for o in outs), sum(len(p) for p in prompts), ttft, itl)
