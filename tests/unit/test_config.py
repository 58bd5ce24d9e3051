"""Run config: Hydra composition, overrides, validation errors that name file/key/expected, datasets."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentmesh.config import (
    DatasetConfig,
    LlmConfig,
    ProgramConfig,
    RunConfig,
    TransitionConfig,
    iter_dataset,
    load_config,
    resolve_package_path,
)
from agentmesh.errors import ConfigError

DATA = Path(__file__).parent / "data"
RUN = DATA / "config" / "run.yaml"

BASE: dict[str, Any] = {
    "name": "t",
    "dataset": {"path": "rows.jsonl"},
    "llms": {"sim": {"backend": "simulator"}},
    "roles": {
        "a": {"class": "m.roles:A", "llm": "sim"},
        "b": {"class": "m.roles:B"},
    },
    "routing": {"program": "p", "programs": {"p": {"kind": "sequential", "order": ["a", "b"]}}},
}


def write(tmp_path: Path, data: dict[str, Any], name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def mutate(**changes: Any) -> dict[str, Any]:
    """BASE with dotted-key changes; a value of ... deletes the key."""
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        if value is ...:
            node.pop(last, None)
        else:
            node[last] = value
    return data


def error_of(path: Path | str, overrides: list[str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides or [])
    return info.value


# -- a valid composed config


def test_composed_config_with_defaults_and_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(RUN, ["dataset.limit=3", "roles.student.replicas=5", "+roles.student.params.t=0.1"])

    assert cfg.name == "debate" and cfg.seed == 7
    assert cfg.source_file == str(RUN)
    # dataset/small.yaml composed in; relative paths resolved against the cwd, not the file.
    assert cfg.dataset == DatasetConfig(path=str(tmp_path / "questions.jsonl"), limit=3, trials=2)
    assert cfg.output.dir == str(tmp_path / "out" / "debate")
    assert cfg.output.formats == ("jsonl",) and cfg.output.flush_every == 64
    # llm/sim.yaml is packaged at llms.sim by its header.
    assert cfg.llms == {
        "sim": LlmConfig(name="sim", backend="simulator", simulator_profile="smollm2-cpu", replicas=2)
    }
    teacher = cfg.roles["teacher"]
    assert teacher.cls == "agentmesh.pipelines.collab_reasoning.roles:Teacher"
    assert teacher.replicas == 2 and teacher.concurrency == 8 and teacher.params == {"temperature": 0.7}
    assert cfg.roles["student"].replicas == 5 and cfg.roles["student"].params == {"t": 0.1}
    assert cfg.routing.program == "debate"
    assert cfg.routing.programs["debate"] == ProgramConfig(
        name="debate",
        kind="loop_until",
        body=("teacher", "student"),
        until="agentmesh.pipelines.collab_reasoning.predicates:agreed",
        max_turns=4,
        then=("extractor",),
    )
    machine = cfg.routing.programs["machine"]
    assert machine.transitions[1] == TransitionConfig(src="student", dst="sink", when={"agree": "true"})
    assert cfg.limits.max_in_flight == 32 and cfg.limits.max_attempts == 3
    assert cfg.discovery.url is None and cfg.ray.address is None and cfg.tracing.sample_ratio == 1.0


def test_group_override_and_round_trip(tmp_path: Path) -> None:
    cfg = load_config(RUN, ["dataset=small", "+ray.num_cpus=2", "output.compression=zstd"])
    assert cfg.ray.num_cpus == 2 and cfg.output.compression == "zstd"
    plain = cfg.to_dict()
    text = json.dumps(plain)  # JSON-able, for Ray actors and run.json
    assert RunConfig.from_dict(json.loads(text)) == cfg
    assert plain["roles"]["teacher"]["class"] == cfg.roles["teacher"].cls
    assert plain["routing"]["programs"]["machine"]["transitions"][0] == {
        "from": "teacher",
        "to": "student",
        "when": {},
        "when_fn": None,
    }
    # The dict is in the YAML's shape: it loads back as a config file too.
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in plain.items() if k != "source_file"}))
    again = load_config(path)
    assert again.roles == cfg.roles and again.routing == cfg.routing and again.dataset == cfg.dataset


def test_from_dict_validates_too() -> None:
    bad = mutate(roles__a__replicas=0)
    with pytest.raises(ConfigError, match=r"<dict>: roles\.a\.replicas: expected a value >= 1, got int 0"):
        RunConfig.from_dict(bad)


# -- errors name the file, the key and what was expected


def test_unknown_key_names_file_key_and_allowed_keys() -> None:
    err = error_of(DATA / "config" / "typo.yaml")
    text = str(err)
    assert err.file == str(DATA / "config" / "typo.yaml") and err.key == "roles.teacher.replica"
    assert text.startswith(
        f"{DATA / 'config' / 'typo.yaml'}: roles.teacher.replica: unknown key; expected one of"
    )
    assert "class, replicas, concurrency" in text and "did you mean 'replicas'?" in text


def test_unknown_top_level_key(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, mutate(datset={"path": "x"})))
    assert err.key == "datset" and "expected one of name, seed, dataset" in str(err)
    assert "did you mean 'dataset'?" in str(err)


@pytest.mark.parametrize(
    ("changes", "key", "expected"),
    [
        ({"roles__a__replicas": "two"}, "roles.a.replicas", "expected an int, got str 'two'"),
        ({"roles__a__replicas": True}, "roles.a.replicas", "expected an int, got bool True"),
        ({"roles__a__num_cpus": "x"}, "roles.a.num_cpus", "expected a number, got str 'x'"),
        ({"seed": 1.5}, "seed", "expected an int, got float 1.5"),
        ({"tracing": {"console": "yes"}}, "tracing.console", "expected a bool (true/false), got str 'yes'"),
        ({"output": {"formats": "jsonl"}}, "output.formats", "expected a list of strings, got str 'jsonl'"),
        (
            {"output": {"formats": ["csv"]}},
            "output.formats[0]",
            "expected one of jsonl, parquet, got str 'csv'",
        ),
        ({"roles__a__params": [1]}, "roles.a.params", "expected a mapping, got list [1]"),
        ({"name": 5}, "name", "expected a string, got int 5 (quote it in YAML"),
        ({"roles__a__class": "not a ref"}, "roles.a.class", "expected 'package.module:ClassName', got str"),
        ({"roles__a__concurrency": 0}, "roles.a.concurrency", "expected a value >= 1, got int 0"),
        (
            {"llms__sim__backend": "gpt"},
            "llms.sim.backend",
            "expected one of vllm-cpu, simulator, openai-compatible",
        ),
        (
            {"llms__sim__api_key_env": "sk-abc123"},
            "llms.sim.api_key_env",
            "the NAME of an environment variable",
        ),
        ({"llms__sim__backend": "openai-compatible"}, "llms.sim.base_url", "expected a URL"),
        ({"dataset__trials": 0}, "dataset.trials", "expected a value >= 1"),
        ({"tracing": {"sample_ratio": 2}}, "tracing.sample_ratio", "expected a value <= 1"),
        ({"discovery": {"url": "zk://h:1"}}, "discovery.url", "expected etcd://, consul:// or memory://"),
        ({"dataset__path": ...}, "dataset.path", "expected a string (required), got nothing"),
        ({"dataset": ...}, "dataset.path", "expected a string (required), got nothing"),
        ({"roles": {}}, "roles", "expected at least one role"),
        ({"roles__sink": {"class": "m:S"}}, "roles.sink", "reserved"),
        ({"roles__a__llm": "gpt4"}, "roles.a.llm", "expected a key of llms (sim), got 'gpt4'"),
        ({"routing__program": "q"}, "routing.program", "expected a key of routing.programs (p), got 'q'"),
        (
            {"routing__programs": {"p": {"kind": "sequential", "order": ["a", "c"]}}},
            "routing.programs.p.order[1]",
            "expected a role of roles (a, b), got 'c'",
        ),
        (
            {"routing__programs": {"p": {"kind": "sequential", "order": ["a", "sink"]}}},
            "routing.programs.p.order[1]",
            "the sink follows",
        ),
        (
            {"routing__programs": {"p": {"kind": "loop_until", "body": ["a"], "then": ["zz"]}}},
            "routing.programs.p.then[0]",
            "got 'zz'",
        ),
        (
            {
                "routing__programs": {
                    "p": {"kind": "state_machine", "start": "a", "transitions": [{"from": "a"}]}
                }
            },
            "routing.programs.p.transitions[0].to",
            "expected a string (required), got nothing",
        ),
        (
            {
                "routing__programs": {
                    "p": {"kind": "state_machine", "start": "a", "transitions": [{"from": "a", "to": "nope"}]}
                }
            },
            "routing.programs.p.transitions[0].to",
            "expected a role of roles (a, b) or 'sink', got 'nope'",
        ),
        (
            {"routing__programs": {"p": {"kind": "sequential", "order": ["a"], "body": ["b"]}}},
            "routing.programs.p.body",
            "expected only order for a sequential program, got 'body' (a loop_until field)",
        ),
        (
            {"routing__programs": {"p": {"kind": "loop_until", "body": ["a"], "until": "nocolon"}}},
            "routing.programs.p.until",
            "expected 'package.module:function'",
        ),
        (
            {"routing__programs": {"p": {"kind": "dag"}}},
            "routing.programs.p.kind",
            "expected one of sequential",
        ),
        (
            {"limits": {"retry_backoff_s": 2.0, "retry_backoff_max_s": 1.0}},
            "limits.retry_backoff_max_s",
            "expected a value >= limits.retry_backoff_s",
        ),
    ],
)
def test_validation_errors(tmp_path: Path, changes: dict[str, Any], key: str, expected: str) -> None:
    path = write(tmp_path, mutate(**changes))
    err = error_of(path)
    assert err.key == key
    assert err.file == str(path)
    assert str(err).startswith(f"{path}: {key}: ")
    assert expected in str(err)


def test_missing_required_key_in_group_file_names_the_group_file() -> None:
    err = error_of(RUN, ["dataset=nopath"])
    assert err.key == "dataset.path"
    assert err.file == str(DATA / "config" / "dataset" / "nopath.yaml")
    assert "expected a string (required), got nothing" in str(err)


def test_wrong_type_set_by_override_says_so() -> None:
    err = error_of(RUN, ["roles.teacher.replicas=many"])
    assert err.key == "roles.teacher.replicas"
    assert "expected an int, got str 'many' (set by override 'roles.teacher.replicas=many')" in str(err)


def test_error_in_group_file_names_it(tmp_path: Path) -> None:
    write(tmp_path, {"path": "x.jsonl", "trials": "3"}, "dataset/bad.yaml")
    path = write(tmp_path, {"defaults": ["_self_", {"dataset": "bad"}], **mutate(dataset=...)})
    err = error_of(path)
    assert err.file == str(tmp_path / "dataset" / "bad.yaml") and err.key == "dataset.trials"
    assert "expected an int, got str '3'" in str(err)


@pytest.mark.parametrize(
    ("override", "key"),
    [("roles.a.replicas", "roles.a.replicas"), ("a b==", "a b"), ("x=[1,2", "x")],
)
def test_bad_override_syntax(override: str, key: str) -> None:
    err = error_of(RUN, [override])
    assert err.file == str(RUN) and err.key == key
    assert f"expected an override KEY=VALUE, +KEY=VALUE or ~KEY, got {override!r}" in str(err)


@pytest.mark.parametrize("override", ["roles.teacher.replica=3", "+roles.teacher.replica=3"])
def test_override_of_unknown_key(override: str) -> None:
    err = error_of(RUN, [override])
    assert err.key == "roles.teacher.replica" and "did you mean 'replicas'?" in str(err)
    assert f"(set by override {override!r})" in str(err)


def test_override_that_does_not_apply() -> None:
    err = error_of(RUN, ["+name=other"])  # + adds; name exists already
    assert err.key == "name" and "expected an override that applies" in str(err)
    err = error_of(RUN, ["~tracing"])  # nothing to delete
    assert err.key == "tracing" and "expected an override that applies" in str(err)


def test_missing_group_option() -> None:
    err = error_of(RUN, ["dataset=huge"])
    assert err.key == "dataset" and err.file == str(RUN)
    assert "expected one of nopath, small (files in dataset/), got 'huge'" in str(err)
    assert "(set by override 'dataset=huge')" in str(err)


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "broken.yaml").write_text("path: [a, b\n")
    path = write(tmp_path, {"defaults": ["_self_", {"dataset": "broken"}], **mutate(dataset=...)})
    err = error_of(path)
    assert err.file == str(tmp_path / "dataset" / "broken.yaml")
    assert "expected valid YAML, got a syntax error" in str(err) and "line 2" in str(err)


def test_missing_mandatory_and_bad_interpolation(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, mutate(dataset={"path": "???"})))
    assert err.key == "dataset.path" and "expected a value, got ???" in str(err)
    err = error_of(write(tmp_path, mutate(name="${nope.x}"), "b.yaml"))
    assert err.key == "name" and "expected a resolvable value" in str(err)


def test_missing_file_and_wrong_suffix(tmp_path: Path) -> None:
    assert "expected an existing YAML file" in str(error_of(tmp_path / "none.yaml"))
    (tmp_path / "c.yml").write_text("name: x\n")
    assert "expected a .yaml file" in str(error_of(tmp_path / "c.yml"))


# -- packages


def test_pkg_path_and_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(DATA))
    cfg = load_config("pkg://cfgpkg_am/config.yaml", ["dataset.trials=2"])
    assert cfg.name == "from-package"
    assert cfg.source_file == str(DATA / "cfgpkg_am" / "config.yaml")
    assert cfg.dataset.path == str(DATA / "cfgpkg_am" / "rows.jsonl")
    assert list(iter_dataset(cfg.dataset)) == [
        ("a#t0", 0, {"id": "a", "q": 1}),
        ("a#t1", 1, {"id": "a", "q": 1}),
        ("b#t0", 0, {"id": "b", "q": 2}),
        ("b#t1", 1, {"id": "b", "q": 2}),
    ]
    assert resolve_package_path("agentmesh/errors.py").is_file()


def test_pkg_errors(tmp_path: Path) -> None:
    err = error_of("pkg://no_such_package_xyz/config.yaml")
    assert "expected an importable package, got 'no_such_package_xyz'" in str(err)
    err = error_of(write(tmp_path, mutate(dataset={"path": "${pkg:no_such_package_xyz/a.jsonl}"})))
    assert err.key == "dataset.path" and "no_such_package_xyz" in str(err)


# -- datasets


def test_iter_dataset_is_lazy_with_trials_limit_and_generated_ids(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "x", "v": 1}\n\n{"v": 2}\n{"id": 7}\n{"id": "y"}\nNOT JSON\n')
    it = iter_dataset(DatasetConfig(path=str(path), trials=2))
    # Lazy: the bad last line is not read until it is reached.
    assert [next(it) for _ in range(6)] == [
        ("x#t0", 0, {"id": "x", "v": 1}),
        ("x#t1", 1, {"id": "x", "v": 1}),
        ("row-1#t0", 0, {"v": 2}),
        ("row-1#t1", 1, {"v": 2}),
        ("7#t0", 0, {"id": 7}),
        ("7#t1", 1, {"id": 7}),
    ]
    with pytest.raises(ConfigError, match=r"rows\.jsonl: line 6: expected a JSON object, got invalid JSON"):
        list(it)
    assert [t for t, _, _ in iter_dataset(DatasetConfig(path=str(path), limit=2))] == ["x", "row-1"]


def test_iter_dataset_streams_a_large_file(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    with open(path, "w") as fh:
        for i in range(50_000):
            fh.write(json.dumps({"id": f"r{i}", "text": "x" * 100}) + "\n")
    it = iter_dataset(DatasetConfig(path=str(path)))
    assert next(it)[0] == "r0"
    assert sum(1 for _ in it) == 49_999


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"id": "a"}\n{"id": "a"}\n', "line 2: expected unique ids in field 'id', got 'a' again"),
        ('{"id": "a"}\n[1, 2]\n', "line 2: expected a JSON object, got list [1, 2]"),
        ('{"id": [1]}\n', "line 1: expected 'id' to be a non-empty string or an int, got list [1]"),
    ],
)
def test_iter_dataset_errors(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        list(iter_dataset(DatasetConfig(path=str(path))))
    assert str(info.value) == f"{path}: {expected}"


def test_iter_dataset_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dataset\.path: expected an existing JSONL file"):
        list(iter_dataset(DatasetConfig(path=str(tmp_path / "nope.jsonl"))))


def test_load_config_leaves_cwd_and_hydra_alone(tmp_path: Path) -> None:
    from hydra.core.global_hydra import GlobalHydra

    before = os.getcwd()
    load_config(RUN)
    assert os.getcwd() == before
    assert not GlobalHydra.instance().is_initialized()


# -- external LLM backends (openai, azure, gemini) ---------------------------------------------


def test_external_llm_backends_load(tmp_path: Path) -> None:
    llms = {
        "gpt": {"backend": "openai", "model": "gpt-4o-mini"},
        "az": {
            "backend": "azure",
            "model": "gpt-4o",
            "base_url": "https://myres.openai.azure.com",
            "deployment": "gpt4o-prod",
            "api_version": "2024-10-21",
            "api_key_env": "MY_AZURE_KEY",
        },
        "gem": {"backend": "gemini", "model": "gemini-2.0-flash"},
        "local": {"backend": "openai-compatible", "base_url": "http://127.0.0.1:8000/v1"},
        "sim": {"backend": "simulator"},
    }
    cfg = load_config(write(tmp_path, mutate(llms=llms)))
    assert cfg.llms["az"] == LlmConfig(
        name="az",
        backend="azure",
        model="gpt-4o",
        base_url="https://myres.openai.azure.com",
        deployment="gpt4o-prod",
        api_version="2024-10-21",
        api_key_env="MY_AZURE_KEY",
    )
    assert cfg.llms["gpt"].base_url is None and cfg.llms["gpt"].api_key_env is None
    assert cfg.llms["gem"].backend == "gemini"
    # to_dict round-trips the new fields (actors rebuild the config from it)
    again = RunConfig.from_dict(cfg.to_dict())
    assert again.llms == cfg.llms


_AZURE = {
    "backend": "azure",
    "base_url": "https://myres.openai.azure.com",
    "deployment": "d1",
    "api_version": "2024-10-21",
}


@pytest.mark.parametrize(
    ("llm", "key", "expected"),
    [
        ({**_AZURE, "base_url": ...}, "llms.sim.base_url", "expected a URL for the azure backend (required)"),
        (
            {**_AZURE, "deployment": ...},
            "llms.sim.deployment",
            "expected a deployment name for the azure backend",
        ),
        (
            {**_AZURE, "api_version": ...},
            "llms.sim.api_version",
            "expected an api_version for the azure backend (required), got nothing",
        ),
        ({**_AZURE, "deployment": "a b"}, "llms.sim.deployment", "expected an Azure deployment name"),
        ({**_AZURE, "api_version": "2024&x=1"}, "llms.sim.api_version", "expected an api-version"),
        ({"backend": "openai", "deployment": "d1"}, "llms.sim.deployment", "it is for azure only"),
        ({"backend": "gemini", "api_version": "v1"}, "llms.sim.api_version", "it is for azure only"),
        (
            {"backend": "openai", "base_url": "api.openai.com/v1"},
            "llms.sim.base_url",
            "an http:// or https://",
        ),
        (
            {"backend": "gemini", "api_key_env": "AIza-not-a-name"},
            "llms.sim.api_key_env",
            "NAME of an environment",
        ),
        ({"backend": "anthropic"}, "llms.sim.backend", "openai-compatible, openai, azure, gemini"),
    ],
)
def test_external_llm_errors_name_the_key(
    tmp_path: Path, llm: dict[str, Any], key: str, expected: str
) -> None:
    llm = {k: v for k, v in llm.items() if v is not ...}
    err = error_of(write(tmp_path, mutate(llms={"sim": llm})))
    assert err.key == key, str(err)
    assert expected in str(err)
