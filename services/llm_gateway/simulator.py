"""A vLLM-compatible SIMULATOR: stands in for GPU vLLM replicas in benchmarks and tests.

It is a simulator, not vLLM, and says so everywhere: the served model names start with ``sim/``,
``/v1/models`` carries ``"simulator": {...}`` with the profile, every response's
``system_fingerprint`` is ``agentmesh-simulator/<profile>``, and ``/metrics`` has
``agentmesh_sim_info{profile=...}``.

What it models (see DESIGN.md section 12 and :mod:`agentmesh.llm_gateway.sim_profiles`):

* Continuous batching: at most ``max_num_seqs`` sequences decode together, the rest wait FIFO. One
  engine loop per replica; each step takes ``a + b * batch`` seconds (plus the prefill of requests
  joining in that step, ``prompt_tokens / prefill_tokens_per_s``) and gives every running sequence
  one token. Time to first token is therefore queueing + the joining step (prefill included).
* Output length: the request's ``max_tokens``, or a seeded sample of ``params.output_len`` capped by
  ``max_tokens`` (``finish_reason`` is ``length`` when the cap cut it, else ``stop``).
* Tokens are counted by :func:`count_tokens`, a deterministic regex tokenizer: every run of word
  characters (``\\w+``) is one token and every other non-space character is one token. It is not a
  BPE tokenizer (it undercounts long or rare words, which BPE splits), but it is reproducible and
  the generated text re-tokenizes to exactly ``completion_tokens``. A chat prompt counts the tokens of
  every message's text plus 4 per message and 3 for the assistant header (a Llama-3-like template).
* Generated text is drawn from a small vocabulary with a per-request seed derived from the replica
  seed and the request's content (and its ``seed`` field), so identical runs give identical bytes.
  If the last user message (else any user or system message) lists multiple-choice options
  (``A) ...``, ``B) ...``), the text ends with ``Answer: X`` for a seeded choice; if the conversation
  already contains ``Answer: Y``, the choice repeats ``Y`` with probability ``mc_agree_prob`` (so a
  debate against the simulator converges).

Cost: per request, O(1) engine work plus one future; per step, O(joining + finishing) work, plus one
wake-up of each *streaming* request (non-streaming requests are woken once, when they finish).
Running and waiting counts, KV usage and token totals are maintained incrementally.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream`` with SSE,
``stream_options.include_usage``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (vLLM's
metric names: ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
``vllm:kv_cache_usage_perc`` and its older name ``vllm:gpu_cache_usage_perc``,
``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``, ``vllm:request_success_total``,
``vllm:time_to_first_token_seconds``, ``vllm:e2e_request_latency_seconds``; plus ``agentmesh_sim_*``:
requests received and rejected, busy seconds (>= 1 sequence running) and uptime, so that
utilisation = busy / uptime, batch slot seconds (step duration x batch size, so that batch occupancy =
slot seconds / (uptime x max_num_seqs)), and lag seconds: how far the simulator itself fell behind its
model); ``GET /sim/stats``: the same counters as one JSON object (:meth:`SimulatedReplica.stats`).
A non-streaming reply carries ``x-sim-service-time``: the seconds the replica spent on the request.

Run it: ``python -m agentmesh.llm_gateway.simulator --port 0 --profile llama-3.1-8b-h100`` prints
``SIMULATOR_READY http://127.0.0.1:PORT``. In process: :class:`SimulatedReplica` and :func:`run_many`.
Offline (virtual time, no asyncio): :func:`simulate_offline`.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import functools
import hashlib
import itertools
import json
import math
import random
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from agentmesh.errors import AgentMeshError, ConfigError
from agentmesh.llm_gateway.sim_profiles import (
    PROFILES,
    OutputLenDist,
    SimulatorParams,
    get_profile,
    profile_names,
)

__all__ = [
    "PROFILES",
    "SERVICE_TIME_HEADER",
    "BadRequest",
    "BatchingCore",
    "OfflineResult",
    "OutputLenDist",
    "SimEngine",
    "SimRequestPlan",
    "SimSequence",
    "SimulatedReplica",
    "SimulatorParams",
    "SimulatorStopped",
    "count_tokens",
    "get_profile",
    "main",
    "plan_chat",
    "plan_completion",
    "profile_names",
    "run_many",
    "simulate_offline",
]

READY_PREFIX: Final = "SIMULATOR_READY"
SERVICE_TIME_HEADER: Final = "x-sim-service-time"
"""Response header of a non-streaming reply: seconds the replica spent on the request (decimal)."""
# A step that ends this much later than modelled is not "caught up" by shortening the next one: the
# simulator's own CPU is the bottleneck then, and the excess is counted in agentmesh_sim_lag_seconds.
_MAX_CATCH_UP_S: Final = 0.05


class SimulatorStopped(AgentMeshError):
    """The simulated replica was stopped while the request was in flight."""


# --- Tokenizer and text --------------------------------------------------------------------------------

_TOKEN_RE: Final = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    """Deterministic token count: each ``\\w+`` run and each other non-space character is one token."""
    return len(_TOKEN_RE.findall(text))


# Pipelines resend the same system prompts and earlier turns on every call: count each text once.
_count_message_tokens: Final = functools.lru_cache(maxsize=16_384)(count_tokens)


# Each piece re-tokenizes to exactly one token, so the joined text has as many tokens as pieces.
_WORDS: Final = (
    "the of and to in is that it for as with was on be by this are from at or an which have not "
    "they but has one all their there been if more when will would who so no can model answer value "
    "first step because result each number reason given then therefore point option case example "
    "data consider check assume follow note since thus also other between same different true false "
    "hence clearly simple next"
).split()
_VOCAB_PIECES: Final = tuple([" " + w for w in _WORDS] + [".", ","])
_VOCAB_WEIGHTS: Final = tuple([1.0] * len(_WORDS) + [5.0, 3.0])
_VOCAB_CUM: Final = tuple(itertools.accumulate(_VOCAB_WEIGHTS))

_MC_LINE_RE: Final = re.compile(r"(?m)^\s*\(?([A-J])[).:]\s+\S")
_MC_INLINE_RE: Final = re.compile(r"(?<!\w)\(?([A-J])\)\s+\S")
_PRIOR_ANSWER_RE: Final = re.compile(r"Answer:\s*\(?([A-J])\b")


def _mc_letters(text: str) -> list[str]:
    if "A)" not in text and "A." not in text and "A:" not in text:
        return []  # cheap filter: option lists start at A; skips two regex scans of long prompts
    letters = set(_MC_LINE_RE.findall(text)) | set(_MC_INLINE_RE.findall(text))
    return sorted(letters) if len(letters) >= 2 else []


# Text is a seeded slice of one fixed pseudo-random corpus: one RNG call per request instead of one per
# token (a 256-token answer costs ~2 us instead of ~35 us), and still a pure function of the seed.
_CORPUS: Final = tuple(random.Random(0x5EED).choices(_VOCAB_PIECES, cum_weights=_VOCAB_CUM, k=1 << 16))


def _generate_pieces(n: int, rng: random.Random, mc_choice: str | None) -> list[str]:
    """``n`` text pieces (one token each); with ``mc_choice`` the text ends with ``Answer: X``."""
    tail = [" Answer", ":", " " + mc_choice][-n:] if mc_choice else []
    k = n - len(tail)
    if k < len(_CORPUS):
        start = rng.randrange(len(_CORPUS) - k + 1)
        body = list(_CORPUS[start : start + k])
    else:
        body = rng.choices(_VOCAB_PIECES, cum_weights=_VOCAB_CUM, k=k)
    pieces = body + tail
    if pieces:
        pieces[0] = pieces[0].lstrip()
    return pieces


# Streaming serialises every piece; the vocabulary is small, so serialise each piece once.
_json_piece: Final = {
    p: json.dumps(p) for p in (*_VOCAB_PIECES, *(w.lstrip() for w in _VOCAB_PIECES), " Answer", ":")
}


# --- Request planning (pure: from a request body to prompt tokens, output tokens and text) ---------------


class BadRequest(AgentMeshError):
    """The request body is invalid; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        self.param = param
        self.status = status
        super().__init__(message)


@dataclass(slots=True)
class SimRequestPlan:
    """What the simulator will do with one request, decided before it is queued."""

    prompt_tokens: int
    output_tokens: int
    finish_reason: str
    pieces: list[str]
    """The generated text, one piece per output token (streaming sends one piece per chunk)."""

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def _int_field(body: dict[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadRequest(f"'{name}' must be an integer >= {minimum}, got {value!r}", name)
    return value


def _request_seed(params: SimulatorParams, content: str, body: dict[str, Any]) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{params.seed}|{body.get('seed')}|{body.get('max_tokens')}|".encode())
    h.update(content.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest(), "little")


def _plan(
    params: SimulatorParams,
    body: dict[str, Any],
    prompt_tokens: int,
    content: str,
    mc_text: str | None,
    history: str,
) -> SimRequestPlan:
    if body.get("n", 1) != 1:
        raise BadRequest("the simulator serves n=1 only", "n")
    max_tokens = _int_field(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int_field(body, "max_tokens", 1)
    min_tokens = _int_field(body, "min_tokens", 0) or 0
    room = params.max_model_len - prompt_tokens
    if room < 1 or (max_tokens is not None and max_tokens > room):
        raise BadRequest(
            f"This model's maximum context length is {params.max_model_len} tokens. However, you requested "
            f"{prompt_tokens + (max_tokens or 1)} tokens ({prompt_tokens} in the messages, "
            f"{max_tokens or 1} in the completion).",
            "max_tokens",
        )
    rng = random.Random(_request_seed(params, content, body))
    dist = params.output_len
    if dist is None or body.get("ignore_eos"):
        n = max_tokens if max_tokens is not None else min(params.default_max_tokens, room)
        reason = "length"
    else:
        sample = dist.mean if dist.kind == "fixed" else rng.lognormvariate(dist.mu, dist.sigma)
        n = max(dist.min_tokens, min(dist.max_tokens, round(sample)), min_tokens)
        cap = max_tokens if max_tokens is not None else room
        reason = "length" if n >= cap else "stop"
        n = min(n, cap)
    choice: str | None = None
    if mc_text is not None:
        letters = _mc_letters(mc_text)
        if letters:
            prior = _PRIOR_ANSWER_RE.findall(history)
            if prior and prior[-1] in letters and rng.random() < params.mc_agree_prob:
                choice = prior[-1]
            else:
                choice = rng.choice(letters)
    return SimRequestPlan(prompt_tokens, n, reason, _generate_pieces(n, rng, choice))


def _message_text(message: Any, index: int) -> tuple[str, str]:
    if not isinstance(message, dict):
        raise BadRequest(f"messages[{index}] must be an object", f"messages[{index}]")
    role = message.get("role")
    if not isinstance(role, str):
        raise BadRequest(f"messages[{index}].role must be a string", f"messages[{index}].role")
    content = message.get("content")
    if content is None:
        return role, ""
    if isinstance(content, str):
        return role, content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return role, "\n".join(str(p) for p in parts)
    raise BadRequest(
        f"messages[{index}].content must be a string or a list of parts", f"messages[{index}].content"
    )


def plan_chat(params: SimulatorParams, body: dict[str, Any]) -> SimRequestPlan:
    """Plan a ``/v1/chat/completions`` body (raises :class:`BadRequest` naming the bad field)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    texts = [_message_text(m, i) for i, m in enumerate(messages)]
    prompt_tokens = sum(_count_message_tokens(t) + 4 for _, t in texts) + 3
    content = "\x1e".join(f"{r}\x1f{t}" for r, t in texts)
    last_user = next((t for r, t in reversed(texts) if r == "user"), None)
    mc_text = last_user
    if last_user is not None and not _mc_letters(last_user):
        # A later debate turn ("your peer said B, reconsider") often omits the options: use the thread's.
        mc_text = "\n".join(t for r, t in texts if r in ("user", "system"))
    history = "\n".join(t for _, t in texts) if last_user is not None and "Answer:" in content else ""
    return _plan(params, body, prompt_tokens, content, mc_text, history)


def plan_completion(params: SimulatorParams, body: dict[str, Any]) -> SimRequestPlan:
    """Plan a ``/v1/completions`` body: ``prompt`` is a string, a one-string list, or token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return _plan(
            params, body, count_tokens(prompt), prompt, prompt, prompt if "Answer:" in prompt else ""
        )
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return _plan(params, body, len(prompt), ",".join(map(str, prompt)), None, "")
    raise BadRequest("'prompt' must be a string, a list with one string, or a list of token ids", "prompt")


# --- The batching model (pure, clock-free) ---------------------------------------------------------------

_WAITING, _RUNNING, _FINISHED, _ABORTED = 0, 1, 2, 3


class SimSequence:
    """One request inside the engine."""

    __slots__ = (
        "arrival",
        "done",
        "finish_reason",
        "finish_step",
        "finished_at",
        "first_token_at",
        "join_step",
        "output_tokens",
        "prompt_tokens",
        "state",
    )

    def __init__(
        self, prompt_tokens: int, output_tokens: int, arrival: float, finish_reason: str = "length"
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.output_tokens = max(1, output_tokens)
        self.arrival = arrival
        self.finish_reason = finish_reason
        self.join_step = -1
        self.finish_step = -1
        self.first_token_at = math.nan
        self.finished_at = math.nan
        self.state = _WAITING
        self.done: asyncio.Future[None] | None = None


class _Histogram:
    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = list(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


# Bucket bounds as vLLM uses them for these two histograms.
_TTFT_BUCKETS: Final = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_E2E_BUCKETS: Final = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class BatchingCore:
    """Continuous batching as a pure state machine; the caller owns time.

    Drive it with ``d = begin_step()`` (admit waiting sequences FIFO up to ``max_num_seqs``; returns the
    step's duration), then ``end_step(now)`` once ``d`` seconds have passed. Sequences finish in the step
    ``join_step + output_tokens - 1``; finishing sequences are found through a dict keyed by step, so a
    step costs O(joining + finishing), not O(batch).
    """

    def __init__(self, params: SimulatorParams) -> None:
        params.validate()
        self.params = params
        self.slowdown = params.slowdown
        self.waiting: deque[SimSequence] = deque()
        self._aborted_waiting = 0
        self._finishing: dict[int, list[SimSequence]] = {}
        self._joiners: list[SimSequence] = []
        self._step_batch = 0
        self._step_dur = 0.0
        self.step_no = 0
        """Number of completed steps."""
        self.num_running = 0
        self._running_prompt = 0
        self._running_join_sum = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.busy_s = 0.0
        self.slot_busy_s = 0.0
        """Sequence-seconds of batch slots occupied (modelled): a step of duration d with b running
        sequences adds d * b. Batch occupancy over a window = delta / (window * max_num_seqs)."""
        self.success: dict[str, int] = {"stop": 0, "length": 0, "abort": 0}
        self.ttft = _Histogram(_TTFT_BUCKETS)
        self.e2e = _Histogram(_E2E_BUCKETS)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) - self._aborted_waiting

    def has_work(self) -> bool:
        return self.num_running > 0 or self.num_waiting > 0

    def add(self, seq: SimSequence) -> None:
        seq.state = _WAITING
        self.waiting.append(seq)

    def abort(self, seq: SimSequence) -> None:
        """Drop a sequence (client went away). Safe to call in any state."""
        if seq.state == _WAITING:
            self._aborted_waiting += 1
        elif seq.state == _RUNNING:
            self._release(seq)
        else:
            return
        seq.state = _ABORTED
        self.success["abort"] += 1

    def _release(self, seq: SimSequence) -> None:
        self.num_running -= 1
        self._running_prompt -= seq.prompt_tokens
        self._running_join_sum -= seq.join_step

    def step_duration(self, batch: int, prefill_tokens: int) -> float:
        p = self.params
        prefill = prefill_tokens / p.prefill_tokens_per_s if prefill_tokens else 0.0
        return (p.step_base_s + p.step_per_seq_s * batch + prefill) * self.slowdown

    def begin_step(self) -> float:
        """Admit waiting sequences and return the duration of the step about to run."""
        cap = self.params.max_num_seqs
        joiners: list[SimSequence] = []
        prefill = 0
        step = self.step_no
        while self.waiting and self.num_running < cap:
            seq = self.waiting.popleft()
            if seq.state == _ABORTED:
                self._aborted_waiting -= 1
                continue
            seq.state = _RUNNING
            seq.join_step = step
            seq.finish_step = step + seq.output_tokens - 1
            bucket = self._finishing.get(seq.finish_step)
            if bucket is None:
                self._finishing[seq.finish_step] = [seq]
            else:
                bucket.append(seq)
            self.num_running += 1
            self._running_prompt += seq.prompt_tokens
            self._running_join_sum += step
            prefill += seq.prompt_tokens
            joiners.append(seq)
        self._joiners = joiners
        self.prompt_tokens_total += prefill
        self._step_batch = self.num_running
        self._step_dur = self.step_duration(self.num_running, prefill) if self.num_running else 0.0
        return self._step_dur

    def end_step(self, now: float) -> list[SimSequence]:
        """Complete the step begun last; returns the sequences that finished in it."""
        self.generation_tokens_total += self._step_batch
        if self._step_batch:
            self.busy_s += self._step_dur
            self.slot_busy_s += self._step_dur * self._step_batch
        for seq in self._joiners:
            if seq.state == _RUNNING:
                seq.first_token_at = now
                self.ttft.observe(now - seq.arrival)
        self._joiners = []
        finished: list[SimSequence] = []
        for seq in self._finishing.pop(self.step_no, ()):
            if seq.state != _RUNNING:
                continue
            self._release(seq)
            seq.state = _FINISHED
            seq.finished_at = now
            self.success[seq.finish_reason] = self.success.get(seq.finish_reason, 0) + 1
            self.e2e.observe(now - seq.arrival)
            finished.append(seq)
        self.step_no += 1
        return finished

    def live(self) -> list[SimSequence]:
        """Every waiting and running sequence (O(n): for shutdown, not for the hot path)."""
        waiting = [s for s in self.waiting if s.state == _WAITING]
        return waiting + [s for b in self._finishing.values() for s in b if s.state == _RUNNING]

    def tokens_done(self, seq: SimSequence) -> int:
        """Tokens generated so far for ``seq``."""
        if seq.join_step < 0:
            return 0
        return min(self.step_no - seq.join_step, seq.output_tokens)

    def kv_cache_usage(self) -> float:
        generated = self.num_running * self.step_no - self._running_join_sum
        return min(1.0, (self._running_prompt + generated) / self.params.kv_cache_tokens)


@dataclass(frozen=True, slots=True)
class OfflineResult:
    """One request's life in :func:`simulate_offline` (virtual seconds)."""

    arrival: float
    first_token_at: float
    finished_at: float
    prompt_tokens: int
    output_tokens: int

    @property
    def ttft_s(self) -> float:
        return self.first_token_at - self.arrival

    @property
    def latency_s(self) -> float:
        return self.finished_at - self.arrival


def simulate_offline(
    params: SimulatorParams, requests: Sequence[tuple[float, int, int]]
) -> tuple[list[OfflineResult], BatchingCore]:
    """Run the batching model in virtual time: ``requests`` are ``(arrival_s, prompt, output)`` tokens.

    Exactly the model the served replicas use, without a clock, sockets or asyncio: for unit tests and
    for computing what a backend can do at best. Returns results in input order and the final core.
    """
    core = BatchingCore(params)
    order = sorted(range(len(requests)), key=lambda i: requests[i][0])
    seqs = [SimSequence(p, o, a) for a, p, o in requests]
    t = 0.0
    i = 0
    while i < len(order) or core.has_work():
        if not core.has_work():
            t = max(t, requests[order[i]][0])
        while i < len(order) and requests[order[i]][0] <= t:
            core.add(seqs[order[i]])
            i += 1
        t += core.begin_step()
        core.end_step(t)
    results = [
        OfflineResult(s.arrival, s.first_token_at, s.finished_at, s.prompt_tokens, s.output_tokens)
        for s in seqs
    ]
    return results, core


# --- The engine loop (asyncio) ----------------------------------------------------------------------------


class SimEngine:
    """One replica's engine: a single task steps a :class:`BatchingCore` on the event loop's clock."""

    def __init__(self, params: SimulatorParams) -> None:
        self.core = BatchingCore(params)
        self.params = params
        self.lag_s = 0.0
        self.step_event = asyncio.Event()
        """Set (and at once cleared) after every step; streaming requests wait on it."""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.started_at = math.nan

    @property
    def slowdown(self) -> float:
        return self.core.slowdown

    @slowdown.setter
    def slowdown(self, value: float) -> None:
        if not value > 0:
            raise ConfigError(f"expected > 0, got {value!r}", key="slowdown")
        self.core.slowdown = value

    def start(self) -> None:
        if self._task is None:
            self.started_at = asyncio.get_running_loop().time()
            self._task = asyncio.create_task(self._run(), name=f"sim-engine-{self.params.profile}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        core = self.core
        for seq in core.live():
            core.abort(seq)
            if seq.done is not None and not seq.done.done():
                seq.done.set_exception(SimulatorStopped("the simulated replica stopped"))
        self.step_event.set()

    @property
    def running(self) -> bool:
        return self._task is not None

    def submit(self, prompt_tokens: int, output_tokens: int, finish_reason: str = "length") -> SimSequence:
        """Queue a request; ``await seq.done`` resolves when its last token is out."""
        if self._task is None:
            raise SimulatorStopped("the simulated replica is not running")
        loop = asyncio.get_running_loop()
        seq = SimSequence(prompt_tokens, output_tokens, loop.time(), finish_reason)
        seq.done = loop.create_future()
        self.core.add(seq)
        self._wake.set()
        return seq

    def abort(self, seq: SimSequence) -> None:
        self.core.abort(seq)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        core = self.core
        next_start = loop.time()
        while True:
            if not core.has_work():
                self._wake.clear()
                await self._wake.wait()
                next_start = loop.time()
            duration = core.begin_step()
            deadline = next_start + duration
            delay = deadline - loop.time()
            await asyncio.sleep(delay if delay > 0 else 0)
            now = loop.time()
            late = now - deadline
            if late > _MAX_CATCH_UP_S:
                self.lag_s += late
                next_start = now
            else:
                # Start the next step at the modelled time, absorbing timer jitter instead of drifting.
                next_start = deadline
            for seq in core.end_step(now):
                if seq.done is not None and not seq.done.done():
                    seq.done.set_result(None)
            self.step_event.set()
            self.step_event.clear()


# --- HTTP ---------------------------------------------------------------------------------------------------


def _error(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    kind = {
        400: "BadRequestError",
        404: "NotFoundError",
        429: "RateLimitError",
        503: "ServiceUnavailableError",
    }
    body = {
        "object": "error",
        "message": message,
        "type": kind.get(status, "Error"),
        "param": param,
        "code": status,
    }
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/json", headers=headers
    )


class SimulatedReplica:
    """One simulated vLLM replica: an engine plus an aiohttp server on loopback (or ``host``)."""

    def __init__(self, params: SimulatorParams, *, index: int = 0) -> None:
        params.validate()
        self.params = params
        self.index = index
        self.engine: SimEngine | None = None
        self.requests_total = 0
        self.rejected_total = 0
        self._counter = 0
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self._fingerprint = f"agentmesh-simulator/{params.profile}"
        self._label = f'model_name="{_esc(params.model)}",engine="{index}"'

    # lifecycle
    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completion)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/sim/stats", self._stats)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start the engine and the server; returns the base URL (``http://host:port``)."""
        if self._runner is not None:
            return self.base_url
        self.engine = SimEngine(self.params)
        self.engine.start()
        runner = web.AppRunner(self.build_app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
        await site.start()
        self._runner = runner
        real_port = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{shown}:{real_port}"
        return self.base_url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if self.engine is not None:
            await self.engine.stop()
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> SimulatedReplica:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def set_slowdown(self, factor: float) -> None:
        """Make this replica slower (>1) or faster (<1) from now on: a degraded-replica scenario."""
        assert self.engine is not None, "start() first"
        self.engine.slowdown = factor

    def stats(self) -> dict[str, float]:
        """Counters for benchmarks (same numbers as ``/metrics``)."""
        engine = self.engine
        if engine is None:
            return {}
        core = engine.core
        uptime = asyncio.get_running_loop().time() - engine.started_at
        return {
            "requests_total": self.requests_total,
            "rejected_total": self.rejected_total,
            "running": core.num_running,
            "waiting": core.num_waiting,
            "busy_s": core.busy_s,
            "slot_busy_s": core.slot_busy_s,
            "max_num_seqs": self.params.max_num_seqs,
            "uptime_s": uptime,
            "utilisation": core.busy_s / uptime if uptime > 0 else 0.0,
            "lag_s": engine.lag_s,
            "steps": core.step_no,
            "prompt_tokens": core.prompt_tokens_total,
            "generation_tokens": core.generation_tokens_total,
            "success": sum(v for k, v in core.success.items() if k != "abort"),
        }

    # handlers
    async def _health(self, request: web.Request) -> web.Response:
        if self.engine is None or not self.engine.running:
            return web.Response(status=503)
        return web.Response(status=200)

    async def _models(self, request: web.Request) -> web.Response:
        p = self.params
        card = {
            "id": p.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "agentmesh-simulator",
            "root": p.model,
            "parent": None,
            "max_model_len": p.max_model_len,
            "simulator": {
                "profile": p.profile,
                "source": p.source,
                "step_base_s": p.step_base_s,
                "step_per_seq_s": p.step_per_seq_s,
                "max_num_seqs": p.max_num_seqs,
                "prefill_tokens_per_s": None
                if math.isinf(p.prefill_tokens_per_s)
                else p.prefill_tokens_per_s,
                "max_decode_tokens_per_s": _finite(p.max_decode_tokens_per_s()),
                "seed": p.seed,
                "slowdown": self.engine.slowdown if self.engine else p.slowdown,
                **p.extra,
            },
        }
        return web.json_response({"object": "list", "data": [card]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def _stats(self, request: web.Request) -> web.Response:
        # JSON twin of /metrics' counters, cheap enough for a benchmark to sample several times a second.
        return web.json_response(self.stats())

    async def _serve(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        self.requests_total += 1
        t_in = time.perf_counter()
        engine = self.engine
        if engine is None or not engine.running:
            return _error(503, "the simulated replica is stopping")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.params.model:
            return _error(404, f"The model `{model}` does not exist.", "model")
        core = engine.core
        limit = self.params.reject_when_waiting_over
        # Reject when accepting would leave more than `limit` requests waiting after the next admission.
        free = max(0, self.params.max_num_seqs - core.num_running)
        if limit is not None and core.num_waiting + 1 - free > limit:
            self.rejected_total += 1
            headers = {"x-sim-num-waiting": str(core.num_waiting), "x-sim-num-running": str(core.num_running)}
            return _error(
                429, f"the simulated replica has {core.num_waiting} requests waiting", None, headers
            )
        try:
            plan = plan_chat(self.params, body) if chat else plan_completion(self.params, body)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise BadRequest("'stream' must be a boolean", "stream")
            options = body.get("stream_options") or {}
            if not isinstance(options, dict):
                raise BadRequest("'stream_options' must be an object", "stream_options")
        except BadRequest as exc:
            return _error(exc.status, str(exc), exc.param)
        self._counter += 1
        rid = f"{'chatcmpl' if chat else 'cmpl'}-sim{self.index}x{self._counter:x}"
        seq = engine.submit(plan.prompt_tokens, plan.output_tokens, plan.finish_reason)
        if stream:
            return await self._stream(
                request, engine, seq, plan, rid, chat, bool(options.get("include_usage"))
            )
        assert seq.done is not None
        try:
            await seq.done
        except asyncio.CancelledError:
            engine.abort(seq)
            raise
        except SimulatorStopped as exc:
            return _error(503, str(exc))
        usage = _usage(plan)
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": plan.text},
                "logprobs": None,
                "finish_reason": plan.finish_reason,
            }
        else:
            choice = {"index": 0, "text": plan.text, "logprobs": None, "finish_reason": plan.finish_reason}
        out = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.params.model,
            "choices": [choice],
            "usage": usage,
            "system_fingerprint": self._fingerprint,
        }
        # The replica's own time for this request (handler entry to reply built, queueing included),
        # so that a client can tell the time spent outside the replica: its own and any proxy's.
        headers = {SERVICE_TIME_HEADER: f"{time.perf_counter() - t_in:.6f}"}
        return web.Response(text=json.dumps(out), content_type="application/json", headers=headers)

    async def _stream(
        self,
        request: web.Request,
        engine: SimEngine,
        seq: SimSequence,
        plan: SimRequestPlan,
        rid: str,
        chat: bool,
        include_usage: bool,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = json.dumps(
            {"id": rid, "object": obj, "created": created, "model": self.params.model}, separators=(",", ":")
        )[:-1]
        usage_null = ',"usage":null' if include_usage else ""
        # Chunks are built from pre-serialised halves: one json.dumps per token would dominate the cost.
        if chat:
            tok_pre = f'data: {head},"choices":[{{"index":0,"delta":{{"content":'
            tok_post = f'}},"logprobs":null,"finish_reason":null}}]{usage_null}}}\n\n'
        else:
            tok_pre = f'data: {head},"choices":[{{"index":0,"text":'
            tok_post = f',"logprobs":null,"finish_reason":null}}]{usage_null}}}\n\n'
        core = engine.core
        pieces = plan.pieces
        sent = 0
        try:
            await resp.prepare(request)
            if chat:
                first = (
                    f'data: {head},"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},'
                    f'"logprobs":null,"finish_reason":null}}]{usage_null}}}\n\n'
                )
                await resp.write(first.encode())
            while True:
                n = core.tokens_done(seq)
                if n > sent:
                    enc = _json_piece
                    out = "".join(
                        tok_pre + (enc.get(piece) or json.dumps(piece)) + tok_post for piece in pieces[sent:n]
                    )
                    sent = n
                    await resp.write(out.encode())
                if sent >= seq.output_tokens or seq.state == _ABORTED:
                    break
                await engine.step_event.wait()
            if seq.state == _ABORTED:  # the replica stopped under us
                return resp
            reason = json.dumps(plan.finish_reason)
            if chat:
                tail = f'data: {head},"choices":[{{"index":0,"delta":{{}},'
            else:
                tail = f'data: {head},"choices":[{{"index":0,"text":"",'
            tail += f'"logprobs":null,"finish_reason":{reason}}}]'
            tail += f"{usage_null}}}\n\n"
            if include_usage:
                tail += f'data: {head},"choices":[],"usage":{json.dumps(_usage(plan))}}}\n\n'
            tail += "data: [DONE]\n\n"
            await resp.write(tail.encode())
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            engine.abort(seq)
            raise
        return resp

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics_text(), content_type="text/plain", charset="utf-8")

    def metrics_text(self) -> str:
        """The ``/metrics`` page (Prometheus text format 0.0.4)."""
        engine = self.engine
        if engine is None:
            return ""
        core = engine.core
        lb = self._label
        loop_now = asyncio.get_running_loop().time()
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{{{labels}}} {_fmt(v)}" for labels, v in samples)

        kv = core.kv_cache_usage()
        success: list[tuple[str, float]] = [
            (f'{lb},finished_reason="{r}"', v) for r, v in sorted(core.success.items()) if r != "abort"
        ]
        # vLLM's names, so dashboards and routers written for vLLM read the simulator unchanged.
        vllm_metrics: list[tuple[str, str, str, list[tuple[str, float]]]] = [
            ("num_requests_running", "gauge", "Requests in the decode batch", [(lb, core.num_running)]),
            ("num_requests_waiting", "gauge", "Requests waiting to be processed", [(lb, core.num_waiting)]),
            ("kv_cache_usage_perc", "gauge", "KV-cache usage, 1 means 100 percent", [(lb, kv)]),
            ("gpu_cache_usage_perc", "gauge", "KV-cache usage (vLLM v0 name)", [(lb, kv)]),
            ("prompt_tokens_total", "counter", "Prefill tokens processed", [(lb, core.prompt_tokens_total)]),
            ("generation_tokens_total", "counter", "Tokens generated", [(lb, core.generation_tokens_total)]),
            ("request_success_total", "counter", "Requests finished, by finish reason", success),
        ]
        for name, kind, help_, samples in vllm_metrics:
            metric(f"vllm:{name}", kind, f"{help_} (simulated).", samples)
        for name, help_, hist in (
            ("time_to_first_token_seconds", "Time to first token in seconds", core.ttft),
            ("e2e_request_latency_seconds", "End to end request latency in seconds", core.e2e),
        ):
            name = f"vllm:{name}"
            lines.append(f"# HELP {name} {help_} (simulated).")
            lines.append(f"# TYPE {name} histogram")
            cum = 0
            for bound, c in zip([*hist.bounds, math.inf], hist.counts, strict=True):
                cum += c
                lines.append(f'{name}_bucket{{{lb},le="{_fmt(bound)}"}} {cum}')
            lines.append(f"{name}_count{{{lb}}} {hist.count}")
            lines.append(f"{name}_sum{{{lb}}} {_fmt(hist.sum)}")
        p = self.params
        sl = f'{lb},profile="{_esc(p.profile)}"'
        info = f'{sl},max_num_seqs="{p.max_num_seqs}",seed="{p.seed}"'
        ceiling = _finite(p.max_decode_tokens_per_s()) or 0.0
        sim_metrics: list[tuple[str, str, str, list[tuple[str, float]]]] = [
            ("info", "gauge", "This server is the agentmesh vLLM SIMULATOR, not vLLM", [(info, 1)]),
            (
                "requests_total",
                "counter",
                "Completion requests received (incl. rejected)",
                [(sl, self.requests_total)],
            ),
            ("requests_rejected_total", "counter", "Requests answered 429", [(sl, self.rejected_total)]),
            (
                "requests_aborted_total",
                "counter",
                "Requests dropped: client left",
                [(sl, core.success["abort"])],
            ),
            (
                "busy_seconds_total",
                "counter",
                "Modelled seconds with >= 1 request running",
                [(sl, core.busy_s)],
            ),
            (
                "batch_slot_seconds_total",
                "counter",
                "Modelled sequence-seconds of batch slots occupied (step duration x batch size)",
                [(sl, core.slot_busy_s)],
            ),
            (
                "uptime_seconds",
                "gauge",
                "Seconds since the engine started",
                [(sl, loop_now - engine.started_at)],
            ),
            (
                "lag_seconds_total",
                "counter",
                "Seconds the simulator fell behind its model",
                [(sl, engine.lag_s)],
            ),
            ("steps_total", "counter", "Engine steps run", [(sl, core.step_no)]),
            (
                "max_decode_tokens_per_second",
                "gauge",
                "Decode ceiling: full batch, no prefill",
                [(sl, ceiling)],
            ),
            ("slowdown", "gauge", "Current slowdown factor", [(sl, engine.slowdown)]),
        ]
        for name, kind, help_, samples in sim_metrics:
            metric(f"agentmesh_sim_{name}", kind, f"{help_}.", samples)
        lines.append("")
        return "\n".join(lines)


def _usage(plan: SimRequestPlan) -> dict[str, int]:
    return {
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": plan.output_tokens,
        "total_tokens": plan.prompt_tokens + plan.output_tokens,
    }


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _finite(value: float) -> float | None:
    return None if math.isinf(value) else value


async def run_many(
    n: int,
    params: SimulatorParams | Sequence[SimulatorParams],
    *,
    host: str = "127.0.0.1",
    base_port: int = 0,
) -> list[SimulatedReplica]:
    """Start ``n`` replicas in this process. One ``params`` is reused with seeds ``seed + i``; a
    sequence gives each replica its own (heterogeneous fleets). Stop them with ``await r.stop()``."""
    if isinstance(params, SimulatorParams):
        plist = [params.replace(seed=params.seed + i) for i in range(n)]
    else:
        plist = list(params)
        if len(plist) != n:
            raise ConfigError(f"expected {n} parameter sets, got {len(plist)}", key="params")
    replicas = [SimulatedReplica(p, index=i) for i, p in enumerate(plist)]
    started: list[SimulatedReplica] = []
    try:
        for i, r in enumerate(replicas):
            await r.start(host, base_port + i if base_port else 0)
            started.append(r)
    except BaseException:
        for r in started:
            await r.stop()
        raise
    return replicas


# --- Command line -------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m agentmesh.llm_gateway.simulator",
        description="vLLM-compatible SIMULATOR (not vLLM): OpenAI endpoints over continuous batching.",
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument(
        "--port", type=int, default=0, help="0 = ephemeral; with --replicas N, ports PORT..PORT+N-1"
    )
    ap.add_argument("--profile", default="llama-3.1-8b-h100", choices=profile_names())
    ap.add_argument("--model", default=None, help="served model name (default: the profile's)")
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--replicas", type=int, default=1, help="replicas served by this one process")
    ap.add_argument("--reject-when-waiting-over", type=int, default=None)
    ap.add_argument("--slowdown", type=float, default=None)
    ap.add_argument(
        "--output-len-mean", type=float, default=None, help="lognormal mean (sigma from the profile)"
    )
    ap.add_argument("--fixed-output-len", action="store_true", help="ignore the distribution, use max_tokens")
    return ap.parse_args(argv)


def _params_from_args(args: argparse.Namespace) -> SimulatorParams:
    overrides: dict[str, Any] = {}
    for name in ("model", "max_num_seqs", "seed", "reject_when_waiting_over", "slowdown"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    base = get_profile(args.profile)
    if args.fixed_output_len:
        overrides["output_len"] = None
    elif args.output_len_mean is not None:
        dist = base.output_len or OutputLenDist()
        overrides["output_len"] = OutputLenDist(
            dist.kind, args.output_len_mean, dist.sigma, dist.min_tokens, dist.max_tokens
        )
    return base.replace(**overrides) if overrides else base


async def _serve_forever(args: argparse.Namespace) -> None:
    params = _params_from_args(args)
    replicas = await run_many(args.replicas, params, host=args.host, base_port=args.port)
    for r in replicas:
        print(f"{READY_PREFIX} {r.base_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for r in replicas:
            await r.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        asyncio.run(_serve_forever(args))
    except ConfigError as exc:
        print(f"simulator: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
