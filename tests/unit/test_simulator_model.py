"""Unit tests of the vLLM simulator's model: batching in virtual time, planning, tokenizer, params.

No sockets: the batching core is driven with a virtual clock (``simulate_offline`` or by hand), and
the asyncio engine is exercised directly with fast parameters.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import statistics

import pytest

from agentmesh.errors import ConfigError
from agentmesh.llm_gateway.sim_profiles import PROFILES, OutputLenDist, SimulatorParams, get_profile
from agentmesh.llm_gateway.simulator import (
    BadRequest,
    BatchingCore,
    SimEngine,
    SimSequence,
    count_tokens,
    plan_chat,
    plan_completion,
    simulate_offline,
)

# a = 10 ms, b = 1 ms per sequence, prefill 1000 tok/s: round numbers for exact arithmetic.
P = SimulatorParams(
    profile="unit",
    model="sim/unit",
    step_base_s=0.010,
    step_per_seq_s=0.001,
    max_num_seqs=4,
    prefill_tokens_per_s=1000.0,
    output_len=None,
    default_max_tokens=8,
)


def drive(core: BatchingCore, t: float = 0.0) -> tuple[float, list[int]]:
    """Run ``core`` to idle in virtual time; returns the end time and the batch size of every step."""
    batches = []
    while core.has_work():
        t += core.begin_step()
        batches.append(core.num_running)
        core.end_step(t)
    return t, batches


# --- batching ---------------------------------------------------------------------------------------------


def test_batch_cap_is_respected_and_the_rest_wait() -> None:
    core = BatchingCore(P)
    seqs = [SimSequence(0, 5, 0.0) for _ in range(10)]
    for s in seqs:
        core.add(s)
    core.begin_step()
    assert core.num_running == 4
    assert core.num_waiting == 6
    _, batches = drive(core)
    assert max(batches) == 4
    assert all(math.isfinite(s.finished_at) for s in seqs)
    assert core.generation_tokens_total == 50


def test_waiting_queue_is_fifo_even_when_later_requests_are_shorter() -> None:
    # Request 0 is long; 1..5 are short. With one slot, each must start only after its predecessor.
    params = P.replace(max_num_seqs=1, prefill_tokens_per_s=math.inf)
    reqs = [(0.0, 0, 20)] + [(0.0001 * i, 0, 1 + (5 - i)) for i in range(1, 6)]
    results, _ = simulate_offline(params, reqs)
    starts = [r.first_token_at for r in results]
    assert starts == sorted(starts)
    for prev, cur in itertools.pairwise(results):
        assert cur.first_token_at > prev.finished_at  # joined only after the previous one left


def test_step_time_grows_with_batch_but_sublinearly() -> None:
    core = BatchingCore(P)
    assert core.step_duration(1, 0) == pytest.approx(0.011)
    assert core.step_duration(4, 0) == pytest.approx(0.014)
    # Per-token cost falls with batch: that is why batching pays.
    assert core.step_duration(4, 0) / 4 < core.step_duration(1, 0)
    # Prefill of joining requests is added to the step they join.
    assert core.step_duration(1, 500) == pytest.approx(0.011 + 0.5)


def test_ttft_includes_queueing_and_prefill() -> None:
    params = P.replace(max_num_seqs=1)
    (r0, r1), _ = simulate_offline(params, [(0.0, 100, 3), (0.0, 200, 2)])
    # r0: joins at 0; first step = a + b + 100/1000 = 0.111; then 2 steps of 0.011.
    assert r0.ttft_s == pytest.approx(0.111)
    assert r0.finished_at == pytest.approx(0.133)
    # r1 waits for r0, then its own first step carries its 0.2 s prefill.
    assert r1.ttft_s == pytest.approx(0.133 + 0.011 + 0.2)
    assert r1.ttft_s > r0.latency_s  # queueing is part of TTFT
    assert r1.finished_at == pytest.approx(0.133 + 0.211 + 0.011)


def test_a_request_arriving_mid_step_joins_the_next_step() -> None:
    params = P.replace(prefill_tokens_per_s=math.inf)
    (r0, r1), _ = simulate_offline(params, [(0.0, 0, 5), (0.005, 0, 1)])
    assert r0.first_token_at == pytest.approx(0.011)
    assert r1.first_token_at == pytest.approx(0.011 + 0.012)  # joins step 2, batch of 2


def tokens_per_s(params: SimulatorParams, concurrency: int, length: int = 64) -> float:
    results, core = simulate_offline(params, [(0.0, 0, length)] * concurrency)
    return core.generation_tokens_total / max(r.finished_at for r in results)


def test_tokens_per_second_rises_with_concurrency_up_to_the_cap() -> None:
    params = get_profile("llama-3.1-8b-h100", max_num_seqs=64, prefill_tokens_per_s=math.inf)
    rates = {c: tokens_per_s(params, c) for c in (1, 2, 8, 32, 64, 128, 256)}
    assert rates[1] < rates[2] < rates[8] < rates[32] < rates[64]
    assert rates[1] == pytest.approx(1 / params.step_s(1))
    assert rates[64] == pytest.approx(params.max_decode_tokens_per_s())
    # Past the cap more clients only queue: no more tokens per second.
    assert rates[128] == pytest.approx(rates[64], rel=0.01)
    assert rates[256] == pytest.approx(rates[64], rel=0.01)


def test_llama_profile_matches_its_calibration_anchors() -> None:
    p = get_profile("llama-3.1-8b-h100")
    assert 1 / p.step_s(1) == pytest.approx(160, rel=0.05)  # ~160 tok/s one stream
    assert p.max_decode_tokens_per_s() == pytest.approx(12_500, rel=0.05)  # ~12.5k tok/s at 256


def test_slowdown_scales_step_time() -> None:
    core = BatchingCore(P)
    base = core.step_duration(2, 0)
    core.slowdown = 3.0
    assert core.step_duration(2, 0) == pytest.approx(3 * base)


def test_abort_frees_a_running_slot_and_skips_a_waiting_one() -> None:
    core = BatchingCore(P.replace(max_num_seqs=1))
    a, b, c = SimSequence(0, 100, 0.0), SimSequence(0, 2, 0.0), SimSequence(0, 2, 0.0)
    for s in (a, b, c):
        core.add(s)
    core.begin_step()
    core.end_step(0.011)
    core.abort(b)  # waiting
    assert core.num_waiting == 1
    core.abort(a)  # running
    assert core.num_running == 0
    drive(core, 0.011)
    assert math.isfinite(c.finished_at)
    assert math.isnan(a.finished_at) and math.isnan(b.finished_at)
    assert core.success["abort"] == 2 and core.success["length"] == 1


def test_kv_cache_usage_is_tracked_incrementally() -> None:
    core = BatchingCore(P.replace(kv_cache_tokens=1000))
    seqs = [SimSequence(100, 10, 0.0), SimSequence(50, 3, 0.0)]
    for s in seqs:
        core.add(s)
    for _ in range(4):
        core.begin_step()
        core.end_step(0.0)
        live = [s for s in seqs if math.isnan(s.finished_at)]
        expected = sum(s.prompt_tokens + core.tokens_done(s) for s in live) / 1000
        assert core.kv_cache_usage() == pytest.approx(expected)
    assert core.kv_cache_usage() == pytest.approx((100 + 4) / 1000)


# --- planning: tokenizer, lengths, text -----------------------------------------------------------------


def test_tokenizer_is_a_documented_regex_split() -> None:
    assert count_tokens("") == 0
    assert count_tokens("Hello, world!") == 4
    assert count_tokens("  it's   3.14 ") == 6  # it ' s 3 . 14


def chat(content: str, **extra: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": content}], **extra}


def test_plans_are_deterministic_and_text_retokenizes_to_completion_tokens() -> None:
    params = get_profile("llama-3.1-8b-h100")
    for i in range(200):
        body = chat(f"question number {i}: what now?", max_tokens=1 + i % 40)
        p1, p2 = plan_chat(params, body), plan_chat(params, body)
        assert (p1.text, p1.output_tokens, p1.prompt_tokens) == (p2.text, p2.output_tokens, p2.prompt_tokens)
        assert count_tokens(p1.text) == p1.output_tokens
        assert len(p1.pieces) == p1.output_tokens
    # prompt tokens: content tokens + 4 per message + 3.
    assert plan_chat(params, chat("one two three")).prompt_tokens == 3 + 4 + 3


def test_seed_changes_the_text_but_not_the_prompt_count() -> None:
    body = chat("tell me something", max_tokens=30)
    a = plan_chat(get_profile("fast-test", seed=1), body)
    b = plan_chat(get_profile("fast-test", seed=2), body)
    assert a.text != b.text
    assert a.prompt_tokens == b.prompt_tokens
    assert a.text != plan_chat(get_profile("fast-test", seed=1), {**body, "seed": 7}).text


def test_max_tokens_without_a_distribution_is_exact() -> None:
    plan = plan_completion(get_profile("fast-test"), {"prompt": "hi", "max_tokens": 17})
    assert plan.output_tokens == 17 and plan.finish_reason == "length"
    assert plan_completion(get_profile("fast-test"), {"prompt": [1, 2, 3]}).prompt_tokens == 3


def test_output_length_distribution_is_heavy_tailed_and_capped() -> None:
    dist = OutputLenDist(kind="lognormal", mean=200.0, sigma=0.8, max_tokens=3000)
    params = get_profile("fast-test", output_len=dist)
    lengths = [plan_chat(params, chat(f"q{i}")).output_tokens for i in range(3000)]
    assert statistics.mean(lengths) == pytest.approx(200, rel=0.1)
    assert max(lengths) > 3 * statistics.median(lengths)
    capped = [plan_chat(params, chat(f"q{i}", max_tokens=100)) for i in range(300)]
    assert max(p.output_tokens for p in capped) == 100
    assert {p.finish_reason for p in capped} == {"stop", "length"}
    assert all((p.output_tokens == 100) == (p.finish_reason == "length") for p in capped)
    forced = plan_chat(params, chat("q", max_tokens=50, ignore_eos=True))
    assert forced.output_tokens == 50


def test_multiple_choice_prompts_end_with_a_seeded_answer() -> None:
    params = get_profile("fast-test")
    q = "Which planet is largest?\nA) Mars\nB) Jupiter\nC) Venus\nD) Earth"
    answers = set()
    for i in range(40):
        plan = plan_chat(params, chat(f"{q}\n(round {i})", max_tokens=12))
        assert re.search(r"Answer: [ABCD]$", plan.text), plan.text
        answers.add(plan.text[-1])
    assert len(answers) > 1  # seeded, not constant


def test_multiple_choice_follows_an_earlier_answer_when_asked_to_agree() -> None:
    params = get_profile("fast-test", mc_agree_prob=1.0)
    body = {
        "messages": [
            {"role": "user", "content": "Pick one: A) red B) green C) blue"},
            {"role": "assistant", "content": "I think so. Answer: C"},
            {"role": "user", "content": "Your peer said Answer: C. Options again: A) red B) green C) blue"},
        ],
        "max_tokens": 9,
    }
    assert plan_chat(params, body).text.endswith("Answer: C")


def test_multiple_choice_options_are_found_in_earlier_turns() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "Question: 2+2?\nA) 3\nB) 4"},
            {"role": "user", "content": "Debate it and give your final answer."},
        ],
        "max_tokens": 8,
    }
    assert re.search(r"Answer: [AB]$", plan_chat(get_profile("fast-test"), body).text)
    plain = plan_chat(get_profile("fast-test"), chat("no options here", max_tokens=8))
    assert "Answer:" not in plain.text


def test_bad_requests_name_the_field() -> None:
    params = get_profile("fast-test")
    cases = [
        ({"messages": []}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        (chat("x", max_tokens=0), "max_tokens"),
        (chat("x", max_tokens="9"), "max_tokens"),
        (chat("x", n=2), "n"),
        (chat("x", max_tokens=10_000), "max_tokens"),  # over max_model_len
    ]
    for body, param in cases:
        with pytest.raises(BadRequest) as info:
            plan_chat(params, body)
        assert info.value.param == param
    with pytest.raises(BadRequest) as info:
        plan_completion(params, {"prompt": {"x": 1}})
    assert info.value.param == "prompt"


# --- params and profiles -------------------------------------------------------------------------------


def test_profiles_validate_and_name_themselves() -> None:
    for name, params in PROFILES.items():
        params.validate()
        assert params.profile == name
        assert params.model.startswith("sim/")  # never passed off as a real model server


def test_bad_params_raise_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="max_num_seqs"):
        get_profile("fast-test", max_num_seqs=0)
    with pytest.raises(ConfigError, match="profile"):
        get_profile("no-such-profile")
    with pytest.raises(ConfigError, match="bogus"):
        get_profile("fast-test", bogus=1)
    with pytest.raises(ConfigError, match=r"output_len\.sigma"):
        get_profile("fast-test", output_len={"kind": "lognormal", "mean": 10, "sigma": -1})


# --- the asyncio engine (real loop clock, fast parameters, no sockets) ---------------------------------


async def test_engine_serves_a_burst_within_the_batch_cap() -> None:
    params = get_profile("fast-test", max_num_seqs=4)  # 1 ms + 0.1 ms per sequence
    engine = SimEngine(params)
    engine.start()
    try:
        seqs = [engine.submit(0, 5) for _ in range(10)]
        assert engine.core.num_waiting == 10
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                await engine.step_event.wait()
                peak = max(peak, engine.core.num_running)

        watcher = asyncio.create_task(watch())
        await asyncio.wait_for(asyncio.gather(*(s.done for s in seqs if s.done)), timeout=5)
        watcher.cancel()
        assert peak == 4
        assert engine.core.generation_tokens_total == 50
        assert [engine.core.tokens_done(s) for s in seqs] == [5] * 10
        # FIFO: the first four finish together, before any of the rest.
        assert max(s.finished_at for s in seqs[:4]) < min(s.finished_at for s in seqs[4:])
        # 3 rounds of 5 steps: modelled busy time is what the replica would have spent.
        assert engine.core.busy_s == pytest.approx(10 * 0.0014 + 5 * 0.0012)
    finally:
        await engine.stop()


async def test_engine_stop_fails_pending_requests() -> None:
    engine = SimEngine(get_profile("fast-test", step_base_s=1.0))
    engine.start()
    seq = engine.submit(0, 100)
    await asyncio.sleep(0)
    await engine.stop()
    assert seq.done is not None
    with pytest.raises(Exception, match="stopped"):
        await seq.done
