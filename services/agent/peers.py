"""Forwarding to peers: pick a replica of the next role and deliver the Orchestrator to it.

Membership comes from the watch-fed :class:`EndpointCache` (no discovery call per message).
Choice is power of two random choices on each replica's load, as the replica itself last
reported it (every Deliver reply and every rejection carries it) plus what this sender has in
flight to it; a report older than ``load_stale_s`` counts as unknown (zero) so a replica that
drained its queue is not shunned forever.

A full replica (RESOURCE_EXHAUSTED) updates its load and we pick again after a short backoff; an
unreachable or draining one (UNAVAILABLE, deadline) is put aside for ``unavailable_cooldown_s``
and its channel closed; INVALID_ARGUMENT is not retried (the message itself is wrong).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from agentmesh.discovery import Endpoint, EndpointCache
from agentmesh.errors import InvalidArgument, RpcError, Unavailable
from agentmesh.tracing import traced_call_metadata
from agentmesh.v1 import agent_pb2 as apb
from agentmesh.v1 import agent_pb2_grpc
from agentmesh.v1 import orchestrator_pb2 as pb

__all__ = [
    "LOAD_METADATA_KEY",
    "PeerRouter",
    "agent_service",
    "channel_options",
    "decode_load",
    "encode_load",
    "server_options",
]

log = logging.getLogger(__name__)

LOAD_METADATA_KEY = "agentmesh-load"


def agent_service(run_id: str, role: str) -> str:
    """The discovery service name of a role's replicas in a run."""
    return f"agent.{run_id}.{role}".lower()


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Options of every agentmesh gRPC server. grpc cancels calls once more than 3,000 are pending
    on a server by default; a replica bounds its work with its inbox (RESOURCE_EXHAUSTED) instead,
    so that limit is lifted far above any inbox."""
    return [
        *channel_options(max_message_bytes),
        ("grpc.server.max_pending_requests", 1 << 20),
        ("grpc.server.max_pending_requests_hard_limit", 1 << 20),
    ]


def encode_load(load: apb.LoadReport) -> str:
    return f"{load.queued},{load.in_progress},{load.capacity},{load.concurrency},{int(load.draining)}"


def decode_load(value: str) -> tuple[int, int, int, int] | None:
    try:
        q, p, cap, conc, _ = (int(x) for x in value.split(","))
        return q, p, cap, conc
    except ValueError:
        return None


@dataclass
class _PeerState:
    endpoint: Endpoint
    channel: grpc.aio.Channel
    stub: agent_pb2_grpc.AgentServiceStub
    reported: float = 0.0  # (queued + in_progress) / concurrency, as last reported
    reported_at: float = 0.0
    outstanding: int = 0  # our calls to it that have not returned yet
    dropped: bool = False  # forgotten: close the channel when the last call returns
    unavailable_until: float = 0.0


class PeerRouter:
    """Delivers Orchestrators to replicas of a role, chosen by power of two choices."""

    def __init__(
        self,
        cache: EndpointCache,
        run_id: str,
        *,
        max_message_bytes: int = 16 * 1024 * 1024,
        rpc_timeout_s: float = 10.0,
        load_stale_s: float = 1.0,
        unavailable_cooldown_s: float = 2.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cache = cache
        self._run_id = run_id
        self._max_message_bytes = max_message_bytes
        self._rpc_timeout_s = rpc_timeout_s
        self._load_stale_s = load_stale_s
        self._cooldown_s = unavailable_cooldown_s
        self._rng = rng or random.Random()
        self._clock = clock
        self._peers: dict[str, _PeerState] = {}  # by address
        cache.add_listener(self._on_membership)

    async def subscribe(self, roles: Iterable[str]) -> None:
        for role in roles:
            await self._cache.subscribe(agent_service(self._run_id, role))

    def _on_membership(self, service: str, endpoints: tuple[Endpoint, ...]) -> None:
        if not service.startswith(f"agent.{self._run_id}."):
            return
        live = {ep.address for ep in endpoints}
        for addr, peer in list(self._peers.items()):
            if peer.endpoint.service == service and addr not in live:
                self._drop(addr)

    def _drop(self, address: str) -> None:
        """Forget a peer. Its channel closes once no call of ours is using it: closing a grpc.aio
        channel under a call makes that call raise CancelledError in its caller."""
        peer = self._peers.pop(address, None)
        if peer is not None:
            peer.dropped = True
            if peer.outstanding == 0:
                asyncio.get_running_loop().create_task(peer.channel.close())

    def _release(self, peer: _PeerState) -> None:
        peer.outstanding -= 1
        if peer.dropped and peer.outstanding == 0:
            asyncio.get_running_loop().create_task(peer.channel.close())

    async def _call(self, peer: _PeerState, rpc: Callable[[], Awaitable[Any]]) -> Any:
        """One RPC to ``peer``; a CancelledError that is not our own cancellation (the channel went
        away under the call) becomes UNAVAILABLE."""
        peer.outstanding += 1
        try:
            return await rpc()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise Unavailable(
                grpc.StatusCode.UNAVAILABLE, f"{peer.endpoint.id}: channel closed during the call"
            ) from None
        finally:
            self._release(peer)

    def forget(self, address: str) -> None:
        """Close the channel to ``address`` (the replica is gone for good)."""
        self._drop(address)

    def _peer(self, ep: Endpoint) -> _PeerState:
        peer = self._peers.get(ep.address)
        if peer is None or peer.endpoint.id != ep.id:
            channel = grpc.aio.insecure_channel(ep.address, options=channel_options(self._max_message_bytes))
            peer = _PeerState(ep, channel, agent_pb2_grpc.AgentServiceStub(channel))
            self._peers[ep.address] = peer
        return peer

    def _score(self, peer: _PeerState, now: float) -> float:
        reported = peer.reported if now - peer.reported_at <= self._load_stale_s else 0.0
        return reported + peer.outstanding

    def _choose(self, endpoints: tuple[Endpoint, ...], now: float) -> _PeerState | None:
        if len(endpoints) <= 2:
            candidates = [self._peer(ep) for ep in endpoints]
        else:  # the common case touches two entries, not the whole membership
            candidates = [self._peer(ep) for ep in self._rng.sample(endpoints, 2)]
            if any(p.unavailable_until > now for p in candidates):
                candidates = [self._peer(ep) for ep in endpoints]
        ready = [p for p in candidates if p.unavailable_until <= now] or candidates
        if not ready:
            return None
        if len(ready) == 1:
            return ready[0]
        a, b = self._rng.sample(ready, 2)
        return a if self._score(a, now) <= self._score(b, now) else b

    def _note_load(self, peer: _PeerState, queued: int, in_progress: int, concurrency: int) -> None:
        peer.reported = (queued + in_progress) / max(concurrency, 1)
        peer.reported_at = self._clock()

    async def deliver(self, role: str, orch: pb.Orchestrator, *, deadline: float | None = None) -> str:
        """Deliver ``orch`` to a replica of ``role``; returns the replica id that took it.

        Retries on full or unavailable replicas until ``deadline`` (a ``time.monotonic()`` value;
        default: six times ``rpc_timeout_s`` from now). Raises :class:`InvalidArgument` at once if the
        replica refuses the message itself, :class:`Unavailable` when the deadline passes.
        """
        service = agent_service(self._run_id, role)
        deadline = deadline if deadline is not None else time.monotonic() + self._rpc_timeout_s * 6
        backoff = 0.005
        last_error = "no replica registered"
        # the hop's trace context in the call's metadata (what a client interceptor would add, without
        # the cost grpc.aio's interceptor machinery puts on every call of the mesh's busiest RPC)
        metadata = traced_call_metadata()
        while True:
            endpoints = self._cache.get(service)
            if not endpoints:
                with contextlib.suppress(Exception):
                    await self._cache.wait_for(
                        service, bool, timeout_s=max(0.05, min(1.0, deadline - time.monotonic()))
                    )
                endpoints = self._cache.get(service)
            peer = self._choose(endpoints, self._clock()) if endpoints else None
            if peer is not None:
                try:
                    timeout = max(0.05, min(self._rpc_timeout_s, deadline - time.monotonic()))
                    reply = await self._call(
                        peer, functools.partial(peer.stub.Deliver, orch, timeout=timeout, metadata=metadata)
                    )
                    load = reply.load
                    self._note_load(peer, load.queued, load.in_progress, load.concurrency)
                    return peer.endpoint.id
                except grpc.aio.AioRpcError as err:
                    code = err.code()
                    last_error = f"{peer.endpoint.id}: {code.name}: {err.details()}"
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        for key, value in err.trailing_metadata() or ():
                            if key == LOAD_METADATA_KEY:
                                parsed = decode_load(str(value))
                                if parsed:
                                    self._note_load(peer, parsed[0], parsed[1], parsed[3])
                        if "larger than max" in (err.details() or ""):
                            raise InvalidArgument(code, last_error) from None
                    elif code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                        raise InvalidArgument(code, last_error) from None
                    else:  # UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, ...: put it aside
                        peer.unavailable_until = self._clock() + self._cooldown_s
                        if code == grpc.StatusCode.UNAVAILABLE:
                            self._drop(peer.endpoint.address)
                except Unavailable as err:
                    last_error = str(err)
                    peer.unavailable_until = self._clock() + self._cooldown_s
            if time.monotonic() >= deadline:
                raise Unavailable(
                    grpc.StatusCode.UNAVAILABLE, f"could not deliver to role {role!r}: {last_error}"
                )
            await asyncio.sleep(backoff * (0.5 + self._rng.random()))
            backoff = min(backoff * 2, 0.5)

    async def load(self, endpoint: Endpoint, timeout_s: float = 1.0) -> apb.LoadReport:
        peer = self._peer(endpoint)
        try:
            report: apb.LoadReport = await self._call(
                peer, lambda: peer.stub.Load(apb.LoadRequest(), timeout=timeout_s)
            )
            return report
        except grpc.aio.AioRpcError as err:
            raise RpcError(err.code(), err.details() or "") from None

    async def held_tasks(self, endpoint: Endpoint, timeout_s: float = 2.0) -> list[str]:
        peer = self._peer(endpoint)
        try:
            reply = await self._call(
                peer, lambda: peer.stub.HeldTasks(apb.HeldTasksRequest(), timeout=timeout_s)
            )
        except grpc.aio.AioRpcError as err:
            raise RpcError(err.code(), err.details() or "") from None
        return list(reply.task_ids)

    async def close(self) -> None:
        peers, self._peers = self._peers, {}
        for peer in peers.values():
            await peer.channel.close()
