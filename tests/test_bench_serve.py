"""``mistral-serve bench serve``: its scenarios follow vLLM's random-dataset recipe, and the
side-by-side ratios compare the right figures."""

from __future__ import annotations

from mistral_serve.bench.serve import SCENARIOS, _cpu_ms_per_request, _ratios


def test_scenarios_follow_the_random_dataset_recipe() -> None:
    burst = SCENARIOS["burst"]
    reqs = burst.requests(seed=1)
    assert reqs == burst.requests(seed=1) and reqs != burst.requests(seed=2)  # deterministic by seed
    assert len(reqs) == 128
    assert all(64 <= len(ids) <= 192 and 32 <= n <= 96 for ids, n in reqs)
    prefix = SCENARIOS["prefix"].requests(seed=1)
    shared = prefix[0][0][:768]
    assert all(ids[:768] == shared and 768 + 64 <= len(ids) <= 768 + 192 for ids, _ in prefix)
    args = SCENARIOS["poisson"].vllm_args()
    assert args[args.index("--request-rate") + 1] == "8.0" and "--max-concurrency" not in args


def test_ratios_and_cpu_per_request() -> None:
    ours = {"burst": {"our_client": {"output_tok_per_s": 600.0, "ttft_p99_s": 1.0},
                      "vllm_client": {"output_throughput": 550.0, "p99_ttft_ms": 900.0}}}
    peer = {"burst": {"our_client": {"output_tok_per_s": 500.0, "ttft_p99_s": 2.0},
                      "vllm_client": {"output_throughput": 500.0, "p99_ttft_ms": 1000.0}}}
    r = _ratios(ours, peer)["burst"]
    assert r == {"our_client_tok_per_s": 1.2, "our_client_ttft_p99": 0.5,
                 "vllm_client_tok_per_s": 1.1, "vllm_client_ttft_p99": 0.9}
    before = {1: ("router", 10.0), 2: ("proxy", 5.0), 3: ("replica", 1.0), 5: ("ray_system", 2.0)}
    after = {1: ("router", 10.3), 2: ("proxy", 5.5), 4: ("replica", 9.0), 5: ("ray_system", 2.1)}  # pid 3 gone, 4 new: not counted
    assert _cpu_ms_per_request(before, after, 100) == {"proxy": 5.0, "router": 3.0, "replica": 0.0, "engine_core": 0.0,
                                                       "ray_system": 1.0}
