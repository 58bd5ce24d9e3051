"""`agentmesh llm deploy|status|remove` and `agentmesh cluster`: everything that needs no cluster.

Argument checks, the placement-group and actor specs, env forwarding, metric parsing, the status
table, the external backends' discovery metadata, the GPU vLLM command line, cluster records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agentmesh.cli import main
from agentmesh.cluster import ClusterRecord, NoClusterError, load_record, resolve_cluster
from agentmesh.discovery.memory import MemoryDiscovery
from agentmesh.errors import ConfigError
from agentmesh.llm_gateway.deploy import (
    NAMESPACE,
    ReplicaStatus,
    actor_name,
    actor_options,
    format_status,
    forwarded_env,
    make_spec,
    parse_actor_name,
    parse_metrics,
    placement_bundle,
)
from agentmesh.llm_gateway.replica import LlmReplica
from agentmesh.llm_gateway.vllm_gpu import VllmServer, find_vllm_binary


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AGENTMESH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# -- arguments -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"replicas": 0, "backend": "simulator"}, "replicas"),
        ({"replicas": True, "backend": "simulator"}, "replicas"),
        ({"replicas": 1, "backend": "tgi"}, "backend"),
        ({"replicas": 1, "backend": "vllm"}, "gpus_per_replica"),
        ({"replicas": 1, "backend": "vllm-cpu", "gpus_per_replica": 1}, "gpus_per_replica"),
        ({"replicas": 1, "backend": "openai", "gpus_per_replica": 1}, "gpus_per_replica"),
        ({"replicas": 1, "gpus_per_replica": -1}, "gpus_per_replica"),
        ({"replicas": 1, "backend": "simulator", "num_cpus": 0}, "num_cpus"),
        ({"replicas": 1, "backend": "azure", "base_url": "https://x.openai.azure.com"}, "api_version"),
        ({"replicas": 1, "backend": "azure", "api_version": "2024-10-21"}, "base_url"),
        ({"replicas": 1, "backend": "openai", "base_url": "ftp://x"}, "base_url"),
    ],
)
def test_make_spec_rejects_bad_requests_naming_the_option(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_spec("m", **kwargs)
    assert info.value.key == key


def test_make_spec_rejects_an_empty_model() -> None:
    with pytest.raises(ConfigError) as info:
        make_spec("  ", 1, backend="simulator")
    assert info.value.key == "model"


def test_make_spec_defaults_backend_and_cpus_by_gpus() -> None:
    gpu = make_spec("Org/Llama-3.1-8B", 2, gpus_per_replica=2)
    assert (gpu.backend, gpu.num_cpus, gpu.service) == ("vllm", 1.0, "llm.org-llama-3.1-8b")
    assert gpu.replica_options["tensor_parallel_size"] == 2
    assert gpu.replica_options["max_num_seqs"] == 256
    cpu = make_spec("m", 1)
    assert (cpu.backend, cpu.num_cpus, cpu.gpus_per_replica) == ("vllm-cpu", 0.1, 0)
    assert "tensor_parallel_size" not in cpu.replica_options
    assert make_spec("m", 1, backend="simulator", gpus_per_replica=1).gpus_per_replica == 1


def test_replica_ids_are_stable_per_index() -> None:
    spec = make_spec("Org/M", 2, backend="simulator")
    assert [spec.replica_id(i) for i in range(2)] == ["org-m-0", "org-m-1"]


# -- placement and actor options ---------------------------------------------------------------------


def test_placement_bundle_only_for_gpu_replicas() -> None:
    assert placement_bundle(make_spec("m", 1, backend="simulator")) is None
    spec = make_spec("m", 3, gpus_per_replica=4, num_cpus=2)
    assert placement_bundle(spec) == {"GPU": 4.0, "CPU": 2.0}


def test_actor_options_detached_named_restartable() -> None:
    spec = make_spec("Org/M", 2, backend="simulator")
    opts = actor_options(spec, 1, env={"AGENTMESH_X": "1"})
    assert opts == {
        "name": "llm:llm.org-m:1",
        "namespace": NAMESPACE,
        "lifetime": "detached",
        "max_restarts": -1,
        "max_task_retries": 0,
        "num_cpus": 0.1,
        "runtime_env": {"env_vars": {"AGENTMESH_X": "1"}},
    }


def test_actor_options_schedule_gpu_replicas_into_their_group() -> None:
    spec = make_spec("m", 1, gpus_per_replica=2)
    group = object()  # stands in for a PlacementGroup: the strategy only holds it
    opts = actor_options(spec, 0, placement_group=group)
    assert opts["num_gpus"] == 2
    strategy = opts["scheduling_strategy"]
    assert strategy.placement_group is group
    assert strategy.placement_group_bundle_index == 0


def test_actor_names_round_trip() -> None:
    assert parse_actor_name(actor_name("llm.a:b", 3)) == ("llm.a:b", 3)
    for other in ("agentmesh-llm-x-0", "llm:x", "llm::1", "llm:x:y"):
        assert parse_actor_name(other) is None


def test_forwarded_env_never_carries_secrets_or_gpu_assignment() -> None:
    env = {
        "AGENTMESH_VLLM_BIN": "/opt/vllm",
        "AGENTMESH_API_KEY": "s3cret",
        "VLLM_LOGGING_LEVEL": "INFO",
        "HF_HOME": "/hf",
        "HF_TOKEN": "hf_s3cret",
        "OPENAI_API_KEY": "sk-s3cret",
        "CUDA_VISIBLE_DEVICES": "0",
        "PATH": "/bin",
    }
    assert forwarded_env(env) == {
        "AGENTMESH_VLLM_BIN": "/opt/vllm",
        "VLLM_LOGGING_LEVEL": "INFO",
        "HF_HOME": "/hf",
    }


# -- status ------------------------------------------------------------------------------------------

METRICS = """\
# HELP vllm:num_requests_running Number of requests running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="a"} 3.0
vllm:num_requests_running{model_name="b"} 2.0
vllm:num_requests_waiting{model_name="a"} 7
vllm:generation_tokens_total{model_name="a b"} 1234.5
vllm:generation_tokens_created{model_name="a"} 1.7e9
agentmesh_sim_info{profile="x"} 1
"""


def test_parse_metrics_sums_label_sets() -> None:
    got = parse_metrics(
        METRICS, ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:generation_tokens_total"]
    )
    assert got == {
        "vllm:num_requests_running": 5.0,
        "vllm:num_requests_waiting": 7.0,
        "vllm:generation_tokens_total": 1234.5,
    }
    assert parse_metrics("garbage line\nvllm:x nan-ish", ["vllm:x"]) == {}


def test_status_table() -> None:
    rows = [
        ReplicaStatus("llm.m", 1, "llm:llm.m:1", "RESTARTING", restarts=2, model="m", backend="vllm", gpus=2),
        ReplicaStatus(
            "llm.m",
            0,
            "llm:llm.m:0",
            "ALIVE",
            restarts=0,
            model="m",
            backend="vllm",
            gpus=2,
            address="10.0.0.1:8000",
            registered=True,
            health="ok",
            running=3,
            waiting=1,
            tokens_per_s=812.44,
        ),
    ]
    lines = format_status(rows).splitlines()
    assert lines[0].split() == [
        "MODEL", "REPLICA", "BACKEND", "STATE", "RESTARTS", "REGISTERED", "HEALTH", "RUNNING",
        "WAITING", "TOK/S", "GPUS", "ADDRESS",
    ]  # fmt: skip
    assert lines[1].split() == [
        "m",
        "0",
        "vllm",
        "ALIVE",
        "0",
        "yes",
        "ok",
        "3",
        "1",
        "812.4",
        "2",
        "10.0.0.1:8000",
    ]
    assert lines[2].split() == ["m", "1", "vllm", "RESTARTING", "2", "no", "unknown", "-", "-", "-", "2", "-"]
    # columns line up: every row's ADDRESS starts where the header's does
    col = lines[0].index("ADDRESS")
    assert lines[1][col:].startswith("10.0.0.1")
    assert format_status([]) == "no LLM replicas deployed"


# -- backends ----------------------------------------------------------------------------------------


async def test_external_backends_register_the_key_name_never_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-s3cret")
    monkeypatch.setenv("MY_GEMINI_KEY", "gemini-s3cret")
    discovery = MemoryDiscovery()
    azure = LlmReplica(
        "gpt-4o", discovery=discovery, backend="azure", base_url="https://res.openai.azure.com/",
        api_version="2024-10-21", replica_id="az",
    )  # fmt: skip
    gemini = LlmReplica(
        "gemini-2.0-flash", discovery=discovery, backend="gemini", api_key_env="MY_GEMINI_KEY"
    )
    try:
        az, gm = await azure.start(), await gemini.start()
    finally:
        await azure.stop()
        await gemini.stop()
    assert az.address == "res.openai.azure.com"
    assert az.metadata == {
        "backend": "azure", "provider": "azure", "scheme": "https", "model": "gpt-4o",
        "base_url": "https://res.openai.azure.com", "api_key_env": "AZURE_OPENAI_API_KEY",
        "deployment": "gpt-4o", "api_version": "2024-10-21", "probe": "none",
    }  # fmt: skip
    assert gm.metadata["base_url"] == "https://generativelanguage.googleapis.com/v1beta/openai"
    assert gm.metadata["api_key_env"] == "MY_GEMINI_KEY"
    values = " ".join([*az.metadata.values(), *gm.metadata.values()])
    assert "s3cret" not in values


def test_vllm_gpu_command_line(tmp_path: Path) -> None:
    binary = tmp_path / "vllm"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    server = VllmServer(
        "meta-llama/Llama-3.1-8B-Instruct", served_model_name="llama", tensor_parallel_size=4,
        port=8123, vllm_bin=binary, extra_args=["--dtype", "bfloat16"],
    )  # fmt: skip
    argv = server.command()
    serve = argv[argv.index(str(binary)) :]
    assert serve == [
        str(binary), "serve", "meta-llama/Llama-3.1-8B-Instruct", "--served-model-name", "llama",
        "--host", "127.0.0.1", "--port", "8123", "--tensor-parallel-size", "4", "--max-num-seqs", "256",
        "--dtype", "bfloat16",
    ]  # fmt: skip


def test_find_vllm_binary_errors_name_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTMESH_VLLM_BIN", str(tmp_path / "missing"))
    with pytest.raises(ConfigError) as info:
        find_vllm_binary()
    assert info.value.key == "AGENTMESH_VLLM_BIN"
    monkeypatch.delenv("AGENTMESH_VLLM_BIN")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="no `vllm` executable on PATH"):
        find_vllm_binary()


# -- cluster records and the command line ------------------------------------------------------------


def test_no_cluster_is_one_clear_error(_home: Path) -> None:
    with pytest.raises(NoClusterError, match=r"no cluster 'default': start one with `agentmesh cluster up`"):
        load_record()
    with pytest.raises(NoClusterError, match="--name lab"):
        load_record("lab")
    with pytest.raises(ConfigError):
        load_record("../etc")
    # both flags: no record needed
    assert resolve_cluster(ray_address="10.0.0.1:6379", discovery_url="etcd://x:1") == (
        "10.0.0.1:6379",
        "etcd://x:1",
    )


def test_record_round_trip_and_resolution(_home: Path) -> None:
    record = ClusterRecord(
        name="lab", ray_address="127.0.0.1:1234", discovery_url="etcd://127.0.0.1:2379", temp_dir="/tmp/x",
        ray_session=10, ray_pids=[10, 11], etcd_pid=20, etcd_keeper_pid=19, num_cpus=2, num_gpus=2,
        ports={"port": 1234},
    )  # fmt: skip
    record.path.parent.mkdir(parents=True)
    record.path.write_text(record.to_json())
    assert load_record("lab") == record
    assert record.all_pids() == [10, 11, 19, 20]
    assert resolve_cluster("lab") == ("127.0.0.1:1234", "etcd://127.0.0.1:2379")
    assert resolve_cluster("lab", discovery_url="etcd://other:1") == ("127.0.0.1:1234", "etcd://other:1")
    assert json.loads(record.path.read_text())["kind"] == "local"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["llm", "status"], "no cluster 'default': start one with `agentmesh cluster up`"),
        (["llm", "remove"], "--model M, or --all"),
        (["llm", "deploy", "--model", "m", "--replicas", "0", "--backend", "simulator"], "replicas"),
        (
            ["llm", "deploy", "--model", "m", "--replicas", "1", "--backend", "vllm"],
            "--gpus-per-replica >= 1",
        ),
        (
            ["llm", "deploy", "--model", "m", "--replicas", "1", "--backend", "simulator", "--env", "X"],
            "KEY=VALUE",
        ),
        (["cluster", "down", "--name", "nope"], "no cluster 'nope'"),
        (["cluster", "up", "--name", "a/b"], "name"),
    ],
)
def test_cli_errors_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
