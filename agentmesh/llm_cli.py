"""The ``agentmesh cluster`` and ``agentmesh llm`` command groups.

    agentmesh cluster up [--name NAME] [--num-cpus C] [--num-gpus G]
    agentmesh cluster status [--name NAME] [--json]
    agentmesh cluster down [--name NAME]
    agentmesh llm deploy --model M --replicas N [--gpus-per-replica K] [--backend B] ...
    agentmesh llm status [--model M] [--json]
    agentmesh llm remove (--model M | --all)

``llm`` commands find their cluster through its record (``--cluster NAME``, default ``default``) or
through ``--ray-address`` and ``--discovery`` given together. Exit codes: 0 done; 1 (``cluster
status``) the cluster is not healthy; 2 bad command line, bad option or no such cluster; 3 the work
failed (a replica did not start, a process would not stop); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable
from typing import Any

from agentmesh.errors import AgentMeshError, ConfigError

__all__ = ["add_cluster_commands", "add_llm_commands"]

LLM_EXAMPLES = """\
examples:
  agentmesh cluster up
  agentmesh llm deploy --model smollm2-135m-instruct --replicas 2 --backend vllm-cpu
  agentmesh llm deploy --model meta-llama/Llama-3.1-8B-Instruct --replicas 4 --gpus-per-replica 2
  agentmesh llm deploy --model sim-8b --replicas 8 --backend simulator --simulator-profile llama-3.1-8b-h100
  agentmesh llm deploy --model gpt-4o-mini --replicas 1 --backend openai      # key: $OPENAI_API_KEY
  agentmesh llm status
  agentmesh llm remove --model sim-8b
  agentmesh cluster down
"""


def _say(msg: str) -> None:
    print(f"agentmesh: {msg}", file=sys.stderr, flush=True)


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """One line and an exit code for every failure; the traceback only with ``-v``."""
    from agentmesh.cluster import NoClusterError

    def run(ns: argparse.Namespace) -> int:
        from agentmesh.launcher import RAY_ENV

        # Before anything imports Ray: it reads some of these once, at import (a loopback cluster
        # address is only left alone with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0).
        for k, v in RAY_ENV.items():
            os.environ.setdefault(k, v)
        try:
            return fn(ns)
        except (ConfigError, NoClusterError) as exc:
            print(f"agentmesh: {exc}", file=sys.stderr)
            return 2
        except AgentMeshError as exc:
            print(f"agentmesh: {exc}", file=sys.stderr)
            return 3
        except KeyboardInterrupt:
            print("agentmesh: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # a bug or an environment failure
            logging.getLogger("agentmesh").debug("command failed", exc_info=True)
            print(
                f"agentmesh: failed: {type(exc).__name__}: {exc} (re-run with -v for the traceback)",
                file=sys.stderr,
            )
            return 3

    return run


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# -- cluster ---------------------------------------------------------------------------------------


def _cluster_up(ns: argparse.Namespace) -> int:
    from agentmesh.cluster import cluster_up

    record = cluster_up(ns.name, num_cpus=ns.num_cpus, num_gpus=ns.num_gpus, say=_say)
    _say(f"cluster {record.name!r} up: ray {record.ray_address}, discovery {record.discovery_url}")
    _say(f"record {record.path}; stop it with `agentmesh cluster down" + _name_flag(ns.name) + "`")
    return 0


def _name_flag(name: str) -> str:
    from agentmesh.cluster import DEFAULT_CLUSTER

    return "" if name == DEFAULT_CLUSTER else f" --name {name}"


def _cluster_status(ns: argparse.Namespace) -> int:
    from agentmesh.cluster import cluster_status

    st = cluster_status(ns.name)
    if ns.json:
        _print_json({**st.to_dict(), "healthy": st.healthy})
    else:
        r = st.record
        print(f"cluster {r.name!r} ({r.kind}): {'healthy' if st.healthy else 'NOT healthy'}")
        ray_state = "up" if st.ray_up else "DOWN"
        print(f"  ray head   {r.ray_address}  {ray_state}  ({r.num_cpus} CPUs, {r.num_gpus} GPUs)")
        print(f"  discovery  {r.discovery_url}  {'up' if st.etcd_up else 'DOWN'}")
        print(f"  processes  {len(st.live_pids)} live; temp dir {r.temp_dir}")
    return 0 if st.healthy else 1


def _cluster_down(ns: argparse.Namespace) -> int:
    from agentmesh.cluster import cluster_down

    cluster_down(ns.name, say=_say)
    return 0


def add_cluster_commands(subparsers: Any) -> None:
    """Add ``agentmesh cluster up|status|down`` to the top-level subparsers."""
    from agentmesh.cluster import DEFAULT_CLUSTER

    cluster = subparsers.add_parser(
        "cluster",
        help="start, inspect and stop a local cluster (Ray head + etcd) that outlives one command",
        description="A local cluster: a Ray head and an etcd, found by later commands through a record "
        "under $AGENTMESH_HOME/clusters/NAME.json.",
    )
    sub = cluster.add_subparsers(dest="cluster_command", metavar="COMMAND", required=True)

    def named(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--name", default=DEFAULT_CLUSTER, help=f"cluster name (default {DEFAULT_CLUSTER!r})")
        return p

    up = named(sub.add_parser("up", help="start a Ray head and an etcd on this machine"))
    up.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may schedule (default: all cores)")
    up.add_argument(
        "--num-gpus", type=int, default=0, help="GPUs Ray may schedule (logical ones where there are none)"
    )
    up.set_defaults(func=_guarded(_cluster_up))
    status = named(sub.add_parser("status", help="is the cluster up; where are its Ray and etcd"))
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_guarded(_cluster_status))
    down = named(sub.add_parser("down", help="stop every process of the cluster and remove its record"))
    down.set_defaults(func=_guarded(_cluster_down))


# -- llm -------------------------------------------------------------------------------------------


def _cluster_flags(p: argparse.ArgumentParser) -> None:
    from agentmesh.cluster import DEFAULT_CLUSTER

    p.add_argument("--cluster", default=DEFAULT_CLUSTER, help=f"cluster name (default {DEFAULT_CLUSTER!r})")
    p.add_argument("--ray-address", default=None, help="Ray address (with --discovery: no record needed)")
    p.add_argument("--discovery", default=None, help="discovery URL, e.g. etcd://127.0.0.1:2379")


def _where(ns: argparse.Namespace) -> tuple[str, str]:
    from agentmesh.cluster import resolve_cluster

    return resolve_cluster(ns.cluster, ray_address=ns.ray_address, discovery_url=ns.discovery)


def _parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected KEY=VALUE, got {item!r}", key="--env")
        env[key] = value
    return env


def _llm_deploy(ns: argparse.Namespace) -> int:
    from agentmesh.llm_gateway.deploy import deploy, make_spec

    options = {
        "model_dir": ns.model_dir,
        "max_num_seqs": ns.max_num_seqs,
        "simulator_profile": ns.simulator_profile,
        "base_url": ns.base_url,
        "api_key_env": ns.api_key_env,
        "deployment": ns.deployment,
        "api_version": ns.api_version,
        "vllm_extra_args": tuple(shlex.split(ns.vllm_args)) if ns.vllm_args else None,
    }
    # Check the request before looking for a cluster: a typo is reported as such, even without one.
    spec = make_spec(
        ns.model,
        ns.replicas,
        backend=ns.backend,
        gpus_per_replica=ns.gpus_per_replica,
        num_cpus=ns.num_cpus,
        **options,
    )
    env = _parse_env(ns.env)
    ray_address, discovery_url = _where(ns)
    if spec.backend in ("openai", "azure", "gemini"):
        key_env = spec.replica_options.get("api_key_env") or _default_key_env(spec.backend)
        if not os.environ.get(key_env):
            _say(f"note: {key_env} is not set here; clients of {spec.model} need it in their environment")
    infos = deploy(
        ns.model,
        ns.replicas,
        ray_address=ray_address,
        discovery_url=discovery_url,
        backend=ns.backend,
        gpus_per_replica=ns.gpus_per_replica,
        num_cpus=ns.num_cpus,
        timeout_s=ns.timeout,
        env=env,
        say=_say,
        **options,
    )
    if ns.json:
        _print_json(infos)
    return 0


def _default_key_env(backend: str) -> str:
    from agentmesh.llm_gateway.providers import PROVIDERS

    return str(PROVIDERS[backend].default_key_env)


def _llm_status(ns: argparse.Namespace) -> int:
    from agentmesh.llm_gateway.deploy import format_status, status

    ray_address, discovery_url = _where(ns)
    rows = status(ray_address=ray_address, discovery_url=discovery_url, model=ns.model, sample_s=ns.sample_s)
    if ns.json:
        _print_json([r.to_dict() for r in rows])
    else:
        print(format_status(rows))
    return 0


def _llm_gateway(ns: argparse.Namespace) -> int:
    import asyncio

    from agentmesh.llm_gateway.server import serve

    if ns.discovery is None:
        _, ns.discovery = _where(ns)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(ns))


def _llm_remove(ns: argparse.Namespace) -> int:
    from agentmesh.llm_gateway.deploy import remove

    if not ns.all and not ns.model:
        raise ConfigError("say which replicas: --model M, or --all", key="--model")
    ray_address, _ = _where(ns)
    names = remove(ray_address=ray_address, model=None if ns.all else ns.model, say=_say)
    if not names:
        _say("nothing to remove" + (f": {ns.model!r} is not deployed" if ns.model else ""))
    return 0


def add_llm_commands(subparsers: Any) -> None:
    """Add ``agentmesh llm deploy|status|remove`` to the top-level subparsers."""
    from agentmesh.llm_gateway.constants import VLLM_STARTUP_TIMEOUT_S

    llm = subparsers.add_parser(
        "llm",
        help="deploy LLM replicas on a cluster, show them, remove them",
        description="LLM replicas as Ray actors: started, registered in discovery, restarted when they die.",
        epilog=LLM_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = llm.add_subparsers(dest="llm_command", metavar="COMMAND", required=True)

    dep = sub.add_parser(
        "deploy",
        help="start N replicas of a model and wait until they serve",
        epilog=LLM_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dep.add_argument("--model", required=True, help="model name (vLLM: a Hugging Face id or a folder)")
    dep.add_argument("--replicas", type=int, required=True, help="number of replicas")
    dep.add_argument(
        "--gpus-per-replica", type=int, default=0, help="GPUs per replica (vLLM tensor parallel)"
    )
    dep.add_argument(
        "--backend",
        choices=("vllm", "vllm-cpu", "simulator", "openai", "azure", "gemini"),
        default=None,
        help="default: vllm with --gpus-per-replica, else vllm-cpu",
    )
    dep.add_argument("--num-cpus", type=float, default=None, help="CPUs Ray reserves per replica")
    dep.add_argument("--model-dir", default=None, help="vllm-cpu: the Hugging Face folder to serve")
    dep.add_argument("--max-num-seqs", type=int, default=None, help="vLLM: sequences decoded together")
    dep.add_argument("--vllm-args", default=None, help='extra vLLM flags, one string: "--dtype bfloat16"')
    dep.add_argument("--simulator-profile", default=None, help="simulator: speed profile (default fast-test)")
    dep.add_argument("--base-url", default=None, help="openai/azure/gemini: the API root")
    dep.add_argument("--api-key-env", default=None, help="openai/azure/gemini: NAME of the key's variable")
    dep.add_argument("--deployment", default=None, help="azure: the deployment (default: the model)")
    dep.add_argument("--api-version", default=None, help="azure: the api-version, e.g. 2024-10-21")
    dep.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="a variable for the replica processes"
    )
    dep.add_argument(
        "--timeout", type=float, default=VLLM_STARTUP_TIMEOUT_S + 60, help="seconds to wait for every replica"
    )
    dep.add_argument("--json", action="store_true", help="print the replicas' info as JSON")
    _cluster_flags(dep)
    dep.set_defaults(func=_guarded(_llm_deploy))

    st = sub.add_parser("status", help="replicas, state, health, in-flight requests, tokens/s")
    st.add_argument("--model", default=None, help="only this model's replicas")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--sample-s", type=float, default=1.0, help="tokens/s sampling window (0: no rate)")
    _cluster_flags(st)
    st.set_defaults(func=_guarded(_llm_status))

    gw = sub.add_parser(
        "gateway",
        help="serve the cluster's models over OpenAI-compatible HTTP and gRPC (until SIGTERM)",
        description="A standalone gateway for clients that cannot embed the client library: "
        "OpenAI-compatible HTTP (/v1/chat/completions, /v1/completions, /v1/models, streaming) and the "
        "gRPC LlmGateway service, balancing over the replicas in discovery. SIGTERM drains it.",
    )
    from agentmesh.llm_gateway.server import add_arguments as add_gateway_arguments

    add_gateway_arguments(gw, with_discovery=False)
    _cluster_flags(gw)
    gw.set_defaults(func=_guarded(_llm_gateway))

    rm = sub.add_parser("remove", help="stop and remove a model's replicas (or all)")
    group = rm.add_mutually_exclusive_group()
    group.add_argument("--model", default=None, help="the model whose replicas go")
    group.add_argument("--all", action="store_true", help="every deployed replica")
    _cluster_flags(rm)
    rm.set_defaults(func=_guarded(_llm_remove))
