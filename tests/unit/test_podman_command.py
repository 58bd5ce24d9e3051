"""The podman backend's command lines: what a sandbox's container is started with and how an exec
enters it. Pure functions; no podman, runc or process is run."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentmesh.container.backends.podman import (
    INIT_UID,
    PODMAN_GLOBAL_OPTIONS,
    container_name,
    podman_exec_command,
    run_command,
    runc_exec_command,
)
from agentmesh.container.sandbox import Limits, SandboxError

MIB = 1024 * 1024


def _run(limits: Limits | None = None, env: dict[str, str] | None = None) -> list[str]:
    return run_command(
        "/usr/bin/podman",
        "agentmesh-sb1",
        "agentmesh-sandbox:bookworm",
        limits or Limits(cpu_time_s=2.5, memory_bytes=128 * MIB, max_processes=32),
        init="/usr/bin/catatonit",
        uid=300007,
        work_dir=Path("/srv/sbx/sb1/work"),
        tmp_dir=Path("/srv/sbx/sb1/tmp"),
        env=env or {},
    )


def _values(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


def test_run_global_options_and_image_last() -> None:
    cmd = _run()
    assert cmd[: 1 + len(PODMAN_GLOBAL_OPTIONS)] == ["/usr/bin/podman", *PODMAN_GLOBAL_OPTIONS]
    assert cmd[1 + len(PODMAN_GLOBAL_OPTIONS)] == "run"
    # the image, then the init's pause-mode flag: nothing after the image is a podman option
    assert cmd[-2:] == ["agentmesh-sandbox:bookworm", "-P"]
    assert "--detach" in cmd and "--rm=false" in cmd and "--pull=never" in cmd
    assert _values(cmd, "--name") == ["agentmesh-sb1"]
    assert _values(cmd, "--runtime") == ["runc"]


def test_run_isolation_options() -> None:
    cmd = _run()
    assert _values(cmd, "--network") == ["none"]
    assert "--read-only" in cmd and "--read-only-tmpfs=false" in cmd
    assert _values(cmd, "--cap-drop") == ["ALL"]
    assert _values(cmd, "--security-opt") == ["no-new-privileges"]
    # pid 1 is nobody with the sandbox's gid; execs run as the sandbox's uid (see the exec tests)
    assert _values(cmd, "--user") == [f"{INIT_UID}:300007"]
    assert _values(cmd, "--entrypoint") == ["/run/agentmesh-init"]
    assert sorted(_values(cmd, "--volume")) == sorted(
        [
            "/usr/bin/catatonit:/run/agentmesh-init:ro",
            "/srv/sbx/sb1/work:/work:rw",
            "/srv/sbx/sb1/tmp:/tmp:rw",
        ]
    )
    assert "--unsetenv-all" in cmd and "--http-proxy=false" in cmd


def test_run_network_limit_shares_host_network() -> None:
    assert _values(_run(Limits(network=True)), "--network") == ["host"]


def test_run_limits() -> None:
    cmd = _run()
    assert _values(cmd, "--memory") == [str(128 * MIB)]
    assert _values(cmd, "--memory-swap") == [str(128 * MIB)]
    assert _values(cmd, "--pids-limit") == ["34"]  # 32 + pid 1 + the exec's own process
    ulimits = dict(u.split("=", 1) for u in _values(cmd, "--ulimit"))
    assert ulimits == {"cpu": "3:4", "nofile": "20000:20000", "nproc": "34:34", "core": "0:0"}


def test_run_environment_is_base_plus_spec() -> None:
    env = dict(e.split("=", 1) for e in _values(_run(env={"TOKEN": "x=y", "HOME": "/work/h"}), "--env"))
    assert env == {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/work/h", "LANG": "C.UTF-8",
                   "TMPDIR": "/tmp", "TOKEN": "x=y"}  # fmt: skip


def test_podman_exec_command() -> None:
    cmd = podman_exec_command(
        "/usr/bin/podman",
        "agentmesh-sb1",
        ["sh", "-c", "echo $A"],
        uid=300007,
        env={"A": "1"},
        cwd="/work/sub",
    )
    assert cmd == [
        "/usr/bin/podman",
        *PODMAN_GLOBAL_OPTIONS,
        "exec",
        "--interactive",
        "--user",
        "300007:300007",
        "--workdir",
        "/work/sub",
        "--env",
        "A=1",
        "agentmesh-sb1",
        "sh",
        "-c",
        "echo $A",
    ]


def test_runc_exec_command() -> None:
    cmd = runc_exec_command(
        "/usr/bin/runc", "abc123", ["python3", "-V"], uid=300007, env={"A": "1", "B": ""}, cwd="/tmp",
        pid_file="/srv/sbx/sb1/exec-1.pid",
    )  # fmt: skip
    assert cmd == [
        "/usr/bin/runc",
        "--root",
        "/run/runc",
        "exec",
        "--user",
        "300007:300007",
        "--cwd",
        "/tmp",
        "--pid-file",
        "/srv/sbx/sb1/exec-1.pid",
        "--env",
        "A=1",
        "--env",
        "B=",
        "abc123",
        "python3",
        "-V",
    ]
    # argv that looks like options stays after the container id, where runc passes it on
    cmd = runc_exec_command("/usr/bin/runc", "abc123", ["--help"], uid=1, env={}, cwd="/work")
    assert cmd[-2:] == ["abc123", "--help"]


@pytest.mark.parametrize("bad", ["", "a/b", "-x", "a b", "x" * 129, "../up"])
def test_container_name_rejects_unusable_ids(bad: str) -> None:
    with pytest.raises(SandboxError, match="sandbox_id"):
        container_name(bad)


def test_container_name_prefix() -> None:
    assert container_name("t0123abcd") == "agentmesh-t0123abcd"
