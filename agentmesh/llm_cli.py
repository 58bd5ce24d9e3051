"""The ``agentmesh llm`` command group (``agentmesh cluster`` is :mod:`agentmesh.cluster.cli`).

    agentmesh llm deploy --model M --replicas N [--gpus-per-replica K] [--backend B] ...
    agentmesh llm status [--model M] [--json]
    agentmesh llm remove (--model M | --all)

``llm`` commands find their cluster through its record (``--cluster NAME``, default ``default``) or
through ``--ray-address`` and ``--discovery`` given together. Exit codes: 0 done; 2 bad command
line, bad option or no such cluster; 3 the work failed (a replica did not start, a process would not
stop); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
from typing import Any

from agentmesh.cli_common import cluster_flags, guarded, print_json, say, where
from agentmesh.errors import ConfigError

__all__ = ["add_llm_commands"]

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
    ray_address, discovery_url = where(ns)
    if spec.backend in ("openai", "azure", "gemini"):
        key_env = spec.replica_options.get("api_key_env") or _default_key_env(spec.backend)
        if not os.environ.get(key_env):
            say(f"note: {key_env} is not set here; clients of {spec.model} need it in their environment")
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
        say=say,
        **options,
    )
    if ns.json:
        print_json(infos)
    return 0


def _default_key_env(backend: str) -> str:
    from agentmesh.llm_gateway.providers import PROVIDERS

    return str(PROVIDERS[backend].default_key_env)


def _llm_status(ns: argparse.Namespace) -> int:
    from agentmesh.llm_gateway.deploy import format_status, status

    ray_address, discovery_url = where(ns)
    rows = status(ray_address=ray_address, discovery_url=discovery_url, model=ns.model, sample_s=ns.sample_s)
    if ns.json:
        print_json([r.to_dict() for r in rows])
    else:
        print(format_status(rows))
    return 0


def _llm_gateway(ns: argparse.Namespace) -> int:
    import asyncio

    from agentmesh.llm_gateway.server import serve

    if ns.discovery is None:
        _, ns.discovery = where(ns)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(ns))


def _llm_remove(ns: argparse.Namespace) -> int:
    from agentmesh.llm_gateway.deploy import remove

    if not ns.all and not ns.model:
        raise ConfigError("say which replicas: --model M, or --all", key="--model")
    ray_address, _ = where(ns)
    names = remove(ray_address=ray_address, model=None if ns.all else ns.model, say=say)
    if not names:
        say("nothing to remove" + (f": {ns.model!r} is not deployed" if ns.model else ""))
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
    cluster_flags(dep)
    dep.set_defaults(func=guarded(_llm_deploy))

    st = sub.add_parser("status", help="replicas, state, health, in-flight requests, tokens/s")
    st.add_argument("--model", default=None, help="only this model's replicas")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--sample-s", type=float, default=1.0, help="tokens/s sampling window (0: no rate)")
    cluster_flags(st)
    st.set_defaults(func=guarded(_llm_status))

    gw = sub.add_parser(
        "gateway",
        help="serve the cluster's models over OpenAI-compatible HTTP and gRPC (until SIGTERM)",
        description="A standalone gateway for clients that cannot embed the client library: "
        "OpenAI-compatible HTTP (/v1/chat/completions, /v1/completions, /v1/models, streaming) and the "
        "gRPC LlmGateway service, balancing over the replicas in discovery. SIGTERM drains it.",
    )
    from agentmesh.llm_gateway.server import add_arguments as add_gateway_arguments

    add_gateway_arguments(gw, with_discovery=False)
    cluster_flags(gw)
    gw.set_defaults(func=guarded(_llm_gateway))

    rm = sub.add_parser("remove", help="stop and remove a model's replicas (or all)")
    group = rm.add_mutually_exclusive_group()
    group.add_argument("--model", default=None, help="the model whose replicas go")
    group.add_argument("--all", action="store_true", help="every deployed replica")
    cluster_flags(rm)
    rm.set_defaults(func=guarded(_llm_remove))
