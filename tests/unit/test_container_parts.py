"""Pure parts of the sandbox layer: limits, wire conversions and checks, uid claims, pool flags,
the confining command line, and the run config's containers section."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agentmesh.container.sandbox import Limits, SandboxError
from agentmesh.container.uids import UidPool
from agentmesh.container.wire import limits_from_pb, limits_to_pb, validate_exec
from agentmesh.container_cli import parse_pools
from agentmesh.errors import ConfigError
from agentmesh.v1 import container_pb2 as cpb


def test_limits_reject_bad_values_by_name() -> None:
    with pytest.raises(SandboxError, match=r"limits\.memory_bytes"):
        Limits(memory_bytes=0)
    with pytest.raises(SandboxError, match=r"limits\.cpu_time_s"):
        Limits(cpu_time_s=True)  # type: ignore[arg-type]
    with pytest.raises(SandboxError, match="unknown key"):
        Limits.from_mapping({"cpu": 1})
    assert Limits.from_mapping({"wall_time_s": 3}).wall_time_s == 3
    assert Limits.from_mapping(None) == Limits()


def test_limits_round_trip_and_zero_means_default() -> None:
    base = Limits(cpu_time_s=7, memory_bytes=1 << 28)
    custom = Limits(
        cpu_time_s=2, memory_bytes=1 << 26, max_processes=9, wall_time_s=4, output_bytes=99, network=True
    )
    assert limits_from_pb(limits_to_pb(custom), base) == custom
    assert limits_from_pb(cpb.SandboxLimits(), base) == base
    assert limits_from_pb(cpb.SandboxLimits(max_processes=5), base) == Limits(
        cpu_time_s=7, memory_bytes=1 << 28, max_processes=5
    )


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (cpb.ExecRequest(argv=["true"]), "container_id"),
        (cpb.ExecRequest(container_id="c"), "argv"),
        (cpb.ExecRequest(container_id="c", argv=["a\x00b"]), "argv"),
        (cpb.ExecRequest(container_id="c", argv=["true"], cwd="work"), "cwd"),
        (cpb.ExecRequest(container_id="c", argv=["true"], timeout_s=-1), "timeout_s"),
        (cpb.ExecRequest(container_id="c", argv=["true"], env={"A=B": "x"}), "env"),
    ],
)
def test_exec_requests_are_checked_field_by_field(req: cpb.ExecRequest, field: str) -> None:
    problem = validate_exec(req)
    assert problem is not None and problem.startswith(field)


def test_good_exec_request_passes() -> None:
    assert (
        validate_exec(cpb.ExecRequest(container_id="c", argv=["sh", "-c", "x"], cwd="/work", env={"K": "v"}))
        is None
    )


def test_uid_pool_claims_distinct_frees_and_takes_over_dead_claims(tmp_path: Path) -> None:
    pool = UidPool(tmp_path / "uids", first=5000, count=3)
    a, b, c = pool.claim(), pool.claim(), pool.claim()
    assert len({a, b, c}) == 3 and {a, b, c} <= {5000, 5001, 5002}
    with pytest.raises(SandboxError, match="no free sandbox uid"):
        pool.claim()
    pool.free(b)
    assert pool.claim() == b
    # another process's claim on a uid, by a pid that no longer exists, is taken over
    other = UidPool(tmp_path / "uids2", first=7000, count=1)
    (tmp_path / "uids2" / "7000").write_text("999999999")
    assert other.claim() == 7000
    # a live process's claim is respected
    live = UidPool(tmp_path / "uids3", first=8000, count=1)
    (tmp_path / "uids3" / "8000").write_text(str(os.getppid()))
    with pytest.raises(SandboxError):
        live.claim()


def test_pool_flags() -> None:
    assert parse_pools(["bubblewrap=4", "podman:img:1=2"]) == {
        ("bubblewrap", "default"): 4,
        ("podman", "img:1"): 2,
    }
    with pytest.raises(ConfigError, match="--pool"):
        parse_pools(["bubblewrap"])
    with pytest.raises(ConfigError, match="--pool"):
        parse_pools(["=3"])


def test_confinement_command_line(tmp_path: Path) -> None:
    from agentmesh.container.backends.local import LocalSandbox
    from agentmesh.container.cgroups import Cgroup
    from agentmesh.container.sandbox import SandboxSpec

    sb = LocalSandbox.__new__(LocalSandbox)
    sb.spec = SandboxSpec(limits=Limits(cpu_time_s=2.5, max_processes=10, memory_bytes=1 << 27))
    sb.uid = 200123
    sb.cgroup = None
    argv = sb.wrap(["bwrap", "--", "true"])
    assert argv[0].endswith("prlimit")
    assert "--cpu=3:4" in argv and "--nproc=13" in argv and f"--as={1 << 27}" in argv  # no cgroup: RLIMIT_AS
    i = next(i for i, a in enumerate(argv) if a.endswith("setpriv"))
    assert argv[i + 1 : i + 4] == ["--reuid=200123", "--regid=200123", "--clear-groups"]
    assert argv[-3:] == ["bwrap", "--", "true"]
    sb.cgroup = Cgroup.__new__(Cgroup)
    sb.cgroup.procs_files = ["/cg/pids/x/cgroup.procs", "/cg/memory/x/cgroup.procs"]
    argv = sb.wrap(["true"])
    assert argv[:2] == ["/bin/sh", "-c"] and '"/cg/pids/x/cgroup.procs"' in argv[2]
    assert not any(a.startswith("--as=") for a in argv)  # memory is the cgroup's to enforce


def test_run_config_containers_section(tmp_path: Path) -> None:
    from agentmesh.config import load_config

    examples = Path(__file__).resolve().parents[2] / "examples" / "collab_reasoning" / "sim.yaml"
    cfg = load_config(examples, ["containers.pool=3", "+containers.limits.wall_time_s=5"])
    assert cfg.containers.pool == 3 and cfg.containers.limits == {"wall_time_s": 5}
    with pytest.raises(ConfigError, match=r"containers\.limits.*unknown key"):
        load_config(examples, ["+containers.limits.walltime=5"])
    with pytest.raises(ConfigError, match=r"containers\.backend"):
        load_config(examples, ["containers.backend=docker"])
    with pytest.raises(ConfigError, match=r"containers\.pool"):
        load_config(examples, ["containers.pool=-1"])
