"""Parameters of the vLLM-compatible simulator, and named profiles calibrated from published numbers.

The simulator (``agentmesh.llm_gateway.simulator``) stands in for GPU vLLM replicas in benchmarks.
A replica is described by one :class:`SimulatorParams`; :data:`PROFILES` holds named, calibrated
sets of parameters. Every result produced against the simulator should carry the profile name (the
simulator reports it in ``/v1/models``, ``/metrics`` and in each response's ``system_fingerprint``).

The decode model is ``step_s = step_base_s + step_per_seq_s * batch``: one engine step produces one
token for every running sequence, so throughput ``batch / step_s`` grows with concurrency until
``max_num_seqs`` caps the batch. Prefill adds ``prompt_tokens / prefill_tokens_per_s`` to the step in
which a request joins the batch (it stalls the whole batch, as a prefill does on a real engine).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from agentmesh.errors import ConfigError

__all__ = [
    "PROFILES",
    "OutputLenDist",
    "SimulatorParams",
    "get_profile",
    "profile_names",
]


@dataclass(frozen=True, slots=True)
class OutputLenDist:
    """How many tokens a simulated response has when the model "stops on its own".

    A request's ``max_tokens`` still caps the sampled length (the response then ends with
    ``finish_reason="length"``). Heavy tails are what make batch barriers hurt, hence lognormal.
    """

    kind: Literal["fixed", "lognormal"] = "lognormal"
    """``fixed``: always ``mean``; ``lognormal``: mean ``mean`` and log-space sigma ``sigma``."""
    mean: float = 256.0
    """Mean output length in tokens (the arithmetic mean, not the median)."""
    sigma: float = 0.8
    """Standard deviation of ``log(length)`` for ``lognormal``; larger is heavier-tailed."""
    min_tokens: int = 1
    """Lower clamp of a sampled length."""
    max_tokens: int = 4096
    """Upper clamp of a sampled length (the tail is cut here)."""

    def validate(self, prefix: str = "output_len") -> None:
        if self.kind not in ("fixed", "lognormal"):
            raise ConfigError(f"expected 'fixed' or 'lognormal', got {self.kind!r}", key=f"{prefix}.kind")
        if not self.mean >= 1:
            raise ConfigError(f"expected >= 1, got {self.mean!r}", key=f"{prefix}.mean")
        if not self.sigma >= 0:
            raise ConfigError(f"expected >= 0, got {self.sigma!r}", key=f"{prefix}.sigma")
        if self.min_tokens < 1 or self.max_tokens < self.min_tokens:
            raise ConfigError(
                f"expected 1 <= min_tokens <= max_tokens, got {self.min_tokens}..{self.max_tokens}",
                key=f"{prefix}.min_tokens",
            )

    @property
    def mu(self) -> float:
        """Log-space location chosen so that the (unclamped) arithmetic mean equals ``mean``."""
        return math.log(self.mean) - self.sigma * self.sigma / 2.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OutputLenDist:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(
                f"unknown keys {sorted(unknown)}; expected some of {sorted(names)}", key="output_len"
            )
        dist = cls(**data)
        dist.validate()
        return dist


@dataclass(frozen=True, slots=True)
class SimulatorParams:
    """Everything that defines one simulated replica. Replicas may differ (heterogeneous fleets)."""

    profile: str = "custom"
    """Name of the calibrated profile these parameters come from; reported with every result."""
    model: str = "sim/llama-3.1-8b-instruct"
    """Served model name (``/v1/models``, the ``model`` field of responses, ``model_name`` label)."""
    step_base_s: float = 0.0062
    """``a`` in ``step_s = a + b * batch``: the cost of one decode step at batch size 0."""
    step_per_seq_s: float = 0.000056
    """``b`` in ``step_s = a + b * batch``: extra step time per running sequence."""
    max_num_seqs: int = 256
    """At most this many sequences decode together; the rest wait FIFO (vLLM's ``--max-num-seqs``)."""
    prefill_tokens_per_s: float = 20_000.0
    """Prompt tokens prefilled per second; a joining request adds ``prompt/rate`` to its first step."""
    output_len: OutputLenDist | None = None
    """If set, response lengths are sampled from it (capped by ``max_tokens``); else ``max_tokens``."""
    default_max_tokens: int = 256
    """Length used when a request gives no ``max_tokens`` and ``output_len`` is unset."""
    max_model_len: int = 8192
    """Prompt plus output may not exceed this (HTTP 400, as vLLM does)."""
    kv_cache_tokens: int = 450_000
    """KV-cache capacity in tokens; only used to report ``vllm:kv_cache_usage_perc`` (no preemption)."""
    seed: int = 0
    """Replica seed; each request's seed is derived from it and the request's content."""
    reject_when_waiting_over: int | None = None
    """If set, answer HTTP 429 when accepting a request would leave more than this many waiting."""
    slowdown: float = 1.0
    """Multiplies every step duration (a degraded or slower replica); can be changed at runtime."""
    mc_agree_prob: float = 0.6
    """For multiple-choice prompts that quote an earlier ``Answer: X``, chance to repeat that answer."""
    source: str = ""
    """Where the numbers come from (free text; reported in ``/v1/models``)."""
    extra: dict[str, str] = field(default_factory=dict)
    """Free-form labels carried into ``/v1/models`` (e.g. the GPU named by the profile)."""

    def step_s(self, batch: int) -> float:
        """Duration of one decode step with ``batch`` running sequences (before prefill)."""
        return (self.step_base_s + self.step_per_seq_s * batch) * self.slowdown

    def max_decode_tokens_per_s(self) -> float:
        """Decode throughput ceiling: a full batch, no prefill. Use it as "100% of the backend"."""
        step = self.step_s(self.max_num_seqs)
        return math.inf if step <= 0 else self.max_num_seqs / step

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        checks: list[tuple[str, bool, str]] = [
            ("model", bool(self.model), "a non-empty model name"),
            ("step_base_s", self.step_base_s >= 0, ">= 0"),
            ("step_per_seq_s", self.step_per_seq_s >= 0, ">= 0"),
            ("max_num_seqs", self.max_num_seqs >= 1, ">= 1"),
            ("prefill_tokens_per_s", self.prefill_tokens_per_s > 0, "> 0 (use math.inf for free prefill)"),
            ("default_max_tokens", self.default_max_tokens >= 1, ">= 1"),
            ("max_model_len", self.max_model_len >= 2, ">= 2"),
            ("kv_cache_tokens", self.kv_cache_tokens >= 1, ">= 1"),
            ("slowdown", self.slowdown > 0, "> 0"),
            ("mc_agree_prob", 0.0 <= self.mc_agree_prob <= 1.0, "between 0 and 1"),
            (
                "reject_when_waiting_over",
                self.reject_when_waiting_over is None or self.reject_when_waiting_over >= 0,
                "None or >= 0",
            ),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"expected {expected}, got {getattr(self, name)!r}", key=name)
        if self.output_len is not None:
            self.output_len.validate()

    def replace(self, **changes: Any) -> SimulatorParams:
        """A copy with ``changes`` applied and validated (unknown names raise ``ConfigError``)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise ConfigError(f"unknown simulator parameters {sorted(unknown)}", key=sorted(unknown)[0])
        if isinstance(changes.get("output_len"), dict):
            changes["output_len"] = OutputLenDist.from_dict(changes["output_len"])
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new


# --- Calibration -------------------------------------------------------------------------------------
#
# llama-3.1-8b-h100 — meta-llama/Llama-3.1-8B-Instruct, BF16, one H100 SXM 80 GB, vLLM >= 0.6.
#   Exact per-step timings were not found in a citable table; the numbers below combine published
#   anchors with stated assumptions:
#   * Single-stream decode: johnmusgrave.com/p/vllm-throughput-latency-sweep-on (vLLM, Llama-3.1-8B,
#     A100-40GB) measures ~75 tok/s at one request, "roughly 77% of the memory-bandwidth ceiling", and a
#     6.6x throughput gain at 8 concurrent requests. ASSUMPTION: the same 77% efficiency on H100 SXM
#     (3.35 TB/s; 16 GB of BF16 weights => 4.8 ms roofline per step) gives ~6.2 ms per step at batch 1
#     (~160 tok/s one stream)  =>  a = 6.2 ms.
#   * Saturated throughput: morphllm.com/vllm-benchmarks lists ~12,500 output tok/s for Llama 3.1 8B
#     BF16 on 1x H100 80GB. ASSUMPTION: reached at vLLM's long-standing default max_num_seqs = 256,
#     i.e. a 20.5 ms step at batch 256  =>  b = (20.5 - 6.2) / 256 ~= 0.056 ms per sequence.
#     Check: batch 8 => 6.65 ms/step, 1,200 tok/s = 7.5x one stream (the A100 sweep saw 6.6x).
#   * vLLM's v0.6.0 blog (blog.vllm.ai/2024/09/05/perf-update.html) benchmarks the same model on 1x H100
#     (ShareGPT) and is the reason to assume >= 0.6 scheduling overheads (CPU time hidden).
#   * Prefill: ASSUMPTION ~20k prompt tok/s (H100 ~990 dense BF16 TFLOPS, ~16 GFLOP per token for 8B,
#     at ~30% MFU including attention and scheduling).
#   * KV cache: 32 layers x 8 KV heads x 128 dims x 2 (K,V) x 2 bytes = 128 KiB per token; ~56 GB free
#     at gpu_memory_utilization 0.9 after weights  =>  ~450k tokens.
#   * Output lengths: ASSUMPTION lognormal, mean 256, sigma 0.8 (chat-like, heavy tail), cut at 2048.
#
# smollm2-135m-cpu — SmolLM2-135M-Instruct, float32, vLLM CPU 0.32 on this project's 2-core machine.
#   Measured here (shared/ENVIRONMENT.md): ~20 tok/s one stream, ~110 tok/s at 16 streams
#   =>  a = 50 ms, b = (16/110 - 0.05) / 16 ~= 5.9 ms. Prefill ASSUMPTION 400 tok/s.
#
# instant — no modelled latency at all: measures the simulator's own overhead (its request ceiling).
# fast-test — small, quick numbers for tests (a 1 ms step, batch cap 8).

_LLAMA_8B_H100 = SimulatorParams(
    profile="llama-3.1-8b-h100",
    model="sim/llama-3.1-8b-instruct",
    step_base_s=0.0062,
    step_per_seq_s=0.000056,
    max_num_seqs=256,
    prefill_tokens_per_s=20_000.0,
    output_len=OutputLenDist(kind="lognormal", mean=256.0, sigma=0.8, min_tokens=1, max_tokens=2048),
    default_max_tokens=256,
    max_model_len=8192,
    kv_cache_tokens=450_000,
    source=(
        "Llama-3.1-8B-Instruct BF16 on 1x H100 SXM; a from a 77%-of-roofline single-stream assumption "
        "(A100 sweep, johnmusgrave.com), b from ~12.5k tok/s at batch 256 (morphllm.com/vllm-benchmarks)"
    ),
    extra={"gpu": "1x NVIDIA H100 SXM 80GB", "hf_model": "meta-llama/Llama-3.1-8B-Instruct"},
)

PROFILES: dict[str, SimulatorParams] = {
    p.profile: p
    for p in (
        _LLAMA_8B_H100,
        SimulatorParams(
            profile="smollm2-135m-cpu",
            model="sim/smollm2-135m-instruct",
            step_base_s=0.050,
            step_per_seq_s=0.0059,
            max_num_seqs=16,
            prefill_tokens_per_s=400.0,
            output_len=OutputLenDist(kind="lognormal", mean=64.0, sigma=0.6, min_tokens=1, max_tokens=512),
            default_max_tokens=64,
            max_model_len=2048,
            kv_cache_tokens=32_768,
            source="vLLM CPU 0.32, SmolLM2-135M fp32, 2 cores: ~20 tok/s x1, ~110 tok/s x16 (ENVIRONMENT.md)",
            extra={"gpu": "none (2-core CPU)", "hf_model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        ),
        SimulatorParams(
            profile="instant",
            model="sim/instant",
            step_base_s=0.0,
            step_per_seq_s=0.0,
            max_num_seqs=100_000,
            prefill_tokens_per_s=math.inf,
            output_len=None,
            default_max_tokens=16,
            max_model_len=1_000_000,
            kv_cache_tokens=1_000_000_000,
            source="no modelled latency: measures the simulator's own overhead",
        ),
        SimulatorParams(
            profile="fast-test",
            model="sim/fast-test",
            step_base_s=0.001,
            step_per_seq_s=0.0001,
            max_num_seqs=8,
            prefill_tokens_per_s=1_000_000.0,
            output_len=None,
            default_max_tokens=8,
            max_model_len=4096,
            kv_cache_tokens=65_536,
            source="quick numbers for tests",
        ),
    )
}
"""Named, calibrated profiles. See the calibration notes above for sources and assumptions."""


def profile_names() -> list[str]:
    return sorted(PROFILES)


def get_profile(name: str, **overrides: Any) -> SimulatorParams:
    """The profile ``name`` with ``overrides`` applied (e.g. ``max_num_seqs=64, seed=3``)."""
    try:
        base = PROFILES[name]
    except KeyError:
        raise ConfigError(
            f"unknown simulator profile {name!r}; expected one of {profile_names()}", key="profile"
        ) from None
    return base.replace(**overrides) if overrides else base
