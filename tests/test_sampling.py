"""Sampling parameters: seeded reproducibility, filters, penalties, stops, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from hf_reference import hf_logits, random_prompts
from mistral_serve import LLM, SamplingParams
from mistral_serve.engine.sampler import _top_k_top_p


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir))


def tokens(out) -> list[int]:
    return out.outputs[0].token_ids


def test_seeded_sampling_is_reproducible_across_batch_mixes(llm):
    prompt = random_prompts(1, 12, 12, seed=10)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=30, ignore_eos=True)
    alone = tokens(llm.generate([prompt], params)[0])
    others = random_prompts(7, 5, 80, seed=11)
    mixed_params = [SamplingParams(temperature=0.7, max_tokens=40, ignore_eos=True)] * 7
    mixed = llm.generate(others[:3] + [prompt] + others[3:], mixed_params[:3] + [params] + mixed_params[3:])
    assert tokens(mixed[3]) == alone
    different_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=30, ignore_eos=True)
    assert tokens(llm.generate([prompt], different_seed)[0]) != alone


def test_seeded_sampling_survives_preemption(tiny_model_dir):
    from mistral_serve.model.config import ModelConfig

    prompts = random_prompts(6, 10, 30, seed=12)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=40, ignore_eos=True) for i in range(6)]
    roomy = LLM(str(tiny_model_dir)).generate(prompts, params)
    block = ModelConfig.from_dir(tiny_model_dir).kv_bytes_per_token(4) * 8
    tight_llm = LLM(str(tiny_model_dir), block_size=8, kv_cache_memory_bytes=10 * block)
    tight = tight_llm.generate(prompts, params)
    assert tight_llm.engine.stats.num_preemptions > 0
    assert [tokens(o) for o in tight] == [tokens(o) for o in roomy]


def test_top_k_one_is_greedy(llm):
    prompt = random_prompts(1, 20, 20, seed=13)[0]
    greedy = tokens(llm.generate([prompt], SamplingParams(temperature=0, max_tokens=15, ignore_eos=True))[0])
    top1 = tokens(llm.generate([prompt], SamplingParams(temperature=1.5, top_k=1, max_tokens=15, ignore_eos=True))[0])
    assert top1 == greedy


def test_top_k_top_p_mask():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    masked = _top_k_top_p(logits.clone(), top_k=[0, 2], top_p=[0.7, 1.0])
    kept = torch.isfinite(masked)
    # row 0: nucleus 0.7 keeps 0.5 and 0.3 (0.5 < 0.7, 0.8 >= 0.7 stops after); row 1: top-2.
    assert kept.tolist() == [[True, True, False, False], [True, True, False, False]]


def test_min_p_and_temperature_sample_only_plausible_tokens(llm, tiny_model_dir):
    prompt = random_prompts(1, 25, 25, seed=14)[0]
    probs = torch.softmax(hf_logits(tiny_model_dir, prompt)[-1], dim=-1)
    allowed = set((probs >= 0.5 * probs.max()).nonzero().flatten().tolist())
    for seed in range(10):
        out = llm.generate([prompt], SamplingParams(temperature=1.0, min_p=0.5, seed=seed, max_tokens=1,
                                                    ignore_eos=True))[0]
        assert tokens(out)[0] in allowed


def test_logprobs_match_reference(llm, tiny_model_dir):
    prompt = random_prompts(1, 30, 30, seed=15)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logprobs=5, ignore_eos=True))[0]
    ref = torch.log_softmax(hf_logits(tiny_model_dir, prompt)[-1], dim=-1)
    entry = out.outputs[0].logprobs[0]
    chosen = tokens(out)[0]
    assert chosen in entry and len(entry) == 5  # the chosen (greedy) token is one of the top 5
    top_ids = ref.topk(5).indices.tolist()
    assert sorted(entry) == sorted(top_ids)
    for tid, lp in entry.items():
        assert math.isclose(lp, float(ref[tid]), abs_tol=1e-4)


def test_repetition_penalty_changes_repetitive_greedy_output(llm):
    prompt = random_prompts(1, 10, 10, seed=16)[0]
    plain = tokens(llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0])
    assert len(set(plain)) < 30  # random tiny models loop; the penalty must break that
    penalised = tokens(llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                             repetition_penalty=5.0))[0])
    assert len(set(penalised)) > len(set(plain))
    freq = tokens(llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                        frequency_penalty=2.0))[0])
    assert len(set(freq)) > len(set(plain))
    presence = tokens(llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                            presence_penalty=2.0))[0])
    assert len(set(presence)) > len(set(plain))


def test_stop_token_ids_min_tokens_and_max_tokens(llm):
    prompt = random_prompts(1, 10, 10, seed=17)[0]
    free = tokens(llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0])
    stop_id = free[5]
    first = free.index(stop_id)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id]))[0]
    assert tokens(out) == free[: first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_id
    # min_tokens: the stop id is suppressed before min_tokens tokens, so the output changes.
    late = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, min_tokens=first + 2,
                                                 stop_token_ids=[stop_id]))[0]
    assert len(tokens(late)) >= first + 2
    capped = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))[0]
    assert tokens(capped) == free[:7] and capped.outputs[0].finish_reason == "length"


def test_stop_strings_truncate_text(llm):
    prompt = "Once upon a time"
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    text = full.outputs[0].text
    assert len(text) > 10
    stop = text[6:9]
    cut = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, stop=[stop]))[0]
    assert cut.outputs[0].text == text[: text.index(stop)]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop
    kept = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, stop=[stop],
                                                 include_stop_str_in_output=True))[0]
    assert kept.outputs[0].text == text[: text.index(stop) + len(stop)]


def test_eos_stops_unless_ignored(llm, tiny_model_dir, tmp_path):
    """The checkpoint's eos_token_id ends generation (finish_reason stop) unless ignore_eos."""
    import json
    import shutil

    prompt = random_prompts(1, 10, 10, seed=18)[0]
    free = tokens(llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0])
    eos = free[3]
    model = tmp_path / "eos"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (model / "config.json").write_text(json.dumps(cfg))
    eos_llm = LLM(str(model))
    stopped = eos_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20))[0]
    assert tokens(stopped) == free[: free.index(eos) + 1]
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason is None
    ignored = eos_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    assert tokens(ignored) == free


@pytest.mark.parametrize("bad", [
    dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
    dict(min_p=2), dict(max_tokens=0), dict(presence_penalty=3), dict(frequency_penalty=float("inf")),
    dict(repetition_penalty=0), dict(logprobs=21), dict(stop=["x"] * 17), dict(stop=[""]),
    dict(min_tokens=5, max_tokens=2), dict(seed=-1),
])
def test_invalid_params_raise_clear_errors(bad):
    with pytest.raises(ValueError) as err:
        SamplingParams(**bad)
    assert str(err.value)
