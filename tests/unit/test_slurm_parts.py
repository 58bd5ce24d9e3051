"""Slurm cluster parts without daemons: --slurm parsing, templates, squeue output, the CLI's errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentmesh.cluster.cli import main
from agentmesh.cluster.local import ClusterRecord
from agentmesh.cluster.slurm import (
    job_names,
    parse_slurm_options,
    parse_squeue,
    render_job_script,
    sbatch_directives,
)
from agentmesh.cluster.templates import render, render_file
from agentmesh.errors import ConfigError


def test_slurm_options_pairs_commas_and_dashes() -> None:
    opts = parse_slurm_options(["partition=gpu,time=2:00:00", "mem-per-cpu=4G", "gres=gpu:a100:2,nic:1"])
    assert opts == {"partition": "gpu", "time": "2:00:00", "mem_per_cpu": "4G", "gres": "gpu:a100:2,nic:1"}


@pytest.mark.parametrize(
    ("item", "key", "fragment"),
    [
        ("partitoin=gpu", "--slurm partitoin", "unknown Slurm option 'partitoin'"),
        ("partition", "--slurm", "expected KEY=VALUE"),
        ("time=soon", "--slurm time", "expected MINUTES"),
        ("cpus_per_task=0", "--slurm cpus_per_task", "positive integer"),
        ("account=a b", "--slurm account", "bad value"),
        ("account=$(rm -rf /)", "--slurm account", "bad value"),
    ],
)
def test_slurm_options_errors_name_the_key(item: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_slurm_options([item])
    assert err.value.key == key and fragment in str(err.value)


def test_slurm_option_given_twice_differently() -> None:
    with pytest.raises(ConfigError, match="given twice"):
        parse_slurm_options(["qos=a", "qos=b"])


def test_directives_leave_cpus_per_task_to_the_template() -> None:
    text = sbatch_directives({"time": "10", "partition": "p", "cpus_per_task": "4"})
    assert text.splitlines() == ["#SBATCH --partition=p", "#SBATCH --time=10"]
    assert sbatch_directives({}).startswith("#")


def test_render_is_strict_both_ways() -> None:
    assert render("a=@A@ b=${B}", {"A": "1"}) == "a=1 b=${B}"
    with pytest.raises(ConfigError, match="no value for placeholder"):
        render("@A@ @B@", {"A": "1"})
    with pytest.raises(ConfigError, match="no placeholder for value"):
        render("@A@", {"A": "1", "C": "2"})
    with pytest.raises(ConfigError, match="spans lines"):
        render("@A@", {"A": "1\n2"})
    assert render("@A@", {"A": "1\n2"}, multiline=frozenset({"A"})) == "1\n2"
    with pytest.raises(ConfigError, match="not found"):
        render_file("nope.in", {}, directory=Path("/nonexistent"))


def _record(tmp_path: Path) -> ClusterRecord:
    return ClusterRecord(
        name="c1", ray_address="", discovery_url="", temp_dir="", ray_session=0, ray_pids=[], etcd_pid=0,
        etcd_keeper_pid=0, num_cpus=0, num_gpus=1, kind="slurm", cluster_id="0123456789abcdef" * 2,
        state_dir=str(tmp_path), slurm_options={"partition": "p", "time": "10", "cpus_per_task": "3"},
        worker_cpus=0.5,
    )  # fmt: skip


def test_job_scripts_render(tmp_path: Path) -> None:
    record = _record(tmp_path)
    head = render_job_script("head", record=record, python="/py", object_store_mb=64)
    worker = render_job_script("worker", record=record, python="/py", object_store_mb=64)
    head_name, worker_name = job_names("c1", record.cluster_id)
    assert f"#SBATCH --job-name={head_name}" in head and f"#SBATCH --job-name={worker_name}" in worker
    assert "#SBATCH --requeue" in worker and "--requeue" not in head
    assert "#SBATCH --partition=p" in head and "#SBATCH --partition=p" in worker
    assert "#SBATCH --time=10" in head and "#SBATCH --time=10" in worker  # several options, a line each
    assert "#SBATCH --cpus-per-task=1" in head and "#SBATCH --cpus-per-task=3" in worker
    assert "--num-cpus 0 --num-gpus 0" in head and "--num-cpus 0.5 --num-gpus 1" in worker
    assert f"export AGENTMESH_CLUSTER_ID={record.cluster_id}" in worker
    assert "@" not in head.replace("%", "")  # every placeholder filled
    assert head_name != worker_name and record.cluster_id[:8] in head_name


def test_parse_squeue() -> None:
    text = "12|am-a-head|RUNNING|None\n13|am-a-worker|PENDING|BeginTime\n\ngarbage\n14|x|COMPLETING\n"
    jobs = parse_squeue(text)
    assert sorted(jobs) == ["12", "13", "14"]
    assert jobs["13"].state == "PENDING" and jobs["13"].reason == "BeginTime"
    assert jobs["14"].reason == ""


def test_record_reads_old_local_records_and_keeps_slurm_fields(tmp_path: Path) -> None:
    record = _record(tmp_path)
    record.worker_job_ids = ["5", "6"]
    again = ClusterRecord.from_json(record.to_json())
    assert again == record
    old = '{"name": "x", "ray_address": "a", "discovery_url": "d", "temp_dir": "t", "ray_session": 1,'
    old += ' "ray_pids": [1], "etcd_pid": 2, "etcd_keeper_pid": 3, "num_cpus": 1, "num_gpus": 0}'
    local = ClusterRecord.from_json(old)
    assert local.kind == "local" and local.worker_job_ids == [] and local.all_pids() == [1, 2, 3]


def test_cli_bad_slurm_option_exits_2_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AGENTMESH_HOME", str(tmp_path))
    assert main(["up", "--name", "x", "--slurm", "walltime=1"]) == 2
    err = capsys.readouterr().err
    assert "--slurm walltime" in err and "unknown Slurm option" in err
    assert main(["status", "--name", "nothing"]) == 2
    assert "no cluster 'nothing'" in capsys.readouterr().err
