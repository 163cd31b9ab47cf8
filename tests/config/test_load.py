"""Config loading: presets/files, --set overrides, type coercion, all-problems-at-once errors, semantic checks."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import yaml

from fedsim.config.load import config_to_dict, dump_config, known_keys, list_presets
from fedsim.config.schema import Config, FederationConfig
from fedsim.errors import ConfigError, UserError
from fedsim.validation import config_from_dict, load_config, validate


def _problems(source: str | None = "tiny", overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(source, overrides)
    return info.value.problems


def _needs(module: str, func: str):
    """The cross-package check ``module.func``, or skip when that package is not written yet."""
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError):
        pytest.skip(f"{module}.{func} not available")


@pytest.fixture(scope="module")
def tiny() -> Config:
    return load_config("tiny")[0]


def test_known_keys_are_the_schema_leaves():
    keys = known_keys()
    assert "data.partition.alpha" in keys and "federation.clients" in keys
    assert len(keys) == len(set(keys))
    cfg = Config()
    for key in keys:  # every key resolves to a non-section value
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        assert not dataclasses.is_dataclass(value), key
    assert "data.partition" not in keys and "data" not in keys


def test_default_source_is_quickstart():
    cfg, label = load_config()
    assert label == "quickstart"
    assert cfg == load_config("quickstart")[0]


def test_overrides_parse_yaml_types():
    cfg, label = load_config(
        "tiny",
        [
            "federation.rounds=7",
            "federation.lr=0.25",
            "lora.alpha=4",  # int into a float field
            "lora.train_head=false",
            "lora.targets=[query,value]",
            "data.max_examples=null",
            "federation.rounds=9",  # later overrides win
        ],
    )
    assert label == "tiny"
    assert cfg.federation.rounds == 9 and type(cfg.federation.rounds) is int
    assert cfg.federation.lr == 0.25
    assert cfg.lora.alpha == 4.0 and type(cfg.lora.alpha) is float
    assert cfg.lora.train_head is False
    assert cfg.lora.targets == ["query", "value"]
    assert cfg.data.max_examples is None


def test_comma_string_list_and_scientific_float():
    cfg, _ = load_config("tiny", ["lora.targets=q_proj, v_proj", "federation.lr=5e-4"])
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.federation.lr == pytest.approx(5e-4)


def test_integral_float_is_accepted_for_int_fields():
    assert load_config("tiny", ["federation.rounds=4.0"])[0].federation.rounds == 4


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("federation.clients=ten", "federation.clients: expected an integer, got 'ten'"),
        ("federation.clients=2.5", "federation.clients: expected an integer, got 2.5"),
        ("federation.clients=true", "federation.clients: expected an integer, got true"),
        ("lora.dropout=abc", "lora.dropout: expected a number, got 'abc'"),
        ("lora.train_head=maybe", "lora.train_head: expected true or false, got 'maybe'"),
        ("lora.train_head=1", "lora.train_head: expected true or false, got 1"),
        ("lora.targets=[1, 2]", "lora.targets[0]: expected a string, got 1"),
        ("data.partition.proportions=[[0.5, x]]", "data.partition.proportions[0][1]: expected a number, got 'x'"),
        ("data.partition.proportions=3", "data.partition.proportions: expected a list of lists of numbers or null"),
        ("data.max_examples=all", "data.max_examples: expected an integer or null, got 'all'"),
        ("data.partition=iid", "data.partition: expected a mapping of keys, got 'iid'"),
    ],
)
def test_wrong_types(override, expected):
    problems = _problems("tiny", (override,))
    assert any(p.startswith(expected) for p in problems), problems


def test_unknown_key_suggests_the_close_key():
    (problem,) = _problems("tiny", ("federation.clinets=3",))
    assert "federation.clinets" in problem
    assert "did you mean 'federation.clients'" in problem


def test_leaf_at_top_level_suggests_its_section():
    (problem,) = _problems("tiny", ("rounds=3",))
    assert "did you mean 'federation.rounds'" in problem


def test_misspelt_section_suggests_the_section():
    (problem,) = _problems("tiny", ("federaton.clients=3",))
    assert "did you mean 'federation'" in problem


def test_several_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(
            "tiny",
            [
                "federation.clinets=3",
                "lora.dropout=abc",
                "federation.optimizer=adam",
                "data.partition.alpha=0",
                "federation.clients_per_round=99",
                "nonsense",
            ],
        )
    problems = info.value.problems
    assert len(problems) == 6
    message = str(info.value)
    for fragment in (
        "did you mean 'federation.clients'",
        "lora.dropout: expected a number",
        "federation.optimizer: 'adam' is not one of sgd, adamw",
        "data.partition.alpha must be > 0",
        "federation.clients_per_round must be between 1 and federation.clients",
        "--set 'nonsense'",
    ):
        assert fragment in message
    assert isinstance(info.value, UserError)


def test_clients_per_round_above_clients_names_both_keys_and_fix():
    (problem,) = _problems("tiny", ("federation.clients=4", "federation.clients_per_round=5"))
    assert "federation.clients_per_round" in problem and "federation.clients " in problem
    assert "clients_per_round=5" in problem and "clients=4" in problem
    assert "at most 4" in problem
    assert load_config("tiny", ["federation.clients=4", "federation.clients_per_round=4"])[0].federation.clients == 4


@pytest.mark.parametrize("alpha", ["0", "-1"])
def test_partition_alpha_must_be_positive(alpha):
    (problem,) = _problems("tiny", (f"data.partition.alpha={alpha}",))
    assert problem == (
        f"data.partition.alpha must be > 0 (got {float(alpha)}); "
        "smaller values mean more heterogeneous clients, e.g. 0.5"
    )


def test_bad_choice_lists_allowed_values_with_suggestion():
    (problem,) = _problems("tiny", ("data.partition.kind=dirichlett",))
    assert problem.startswith("data.partition.kind: 'dirichlett' is not one of iid, dirichlet, label_proportions")
    assert "did you mean 'dirichlet'" in problem


def test_type_problem_suppresses_checks_that_would_judge_the_default():
    # clients could not be read, so clients_per_round cannot be judged against it
    problems = _problems("tiny", ("federation.clients=ten", "federation.clients_per_round=99"))
    assert len(problems) == 1 and problems[0].startswith("federation.clients:")


@pytest.mark.parametrize("bad", ["federation.rounds", "=3", "a..b=1", " =x"])
def test_bad_set_syntax(bad):
    (problem,) = _problems("tiny", (bad,))
    assert problem.startswith("--set") and "key.path=value" in problem


def test_set_into_a_value_is_reported():
    (problem,) = _problems("tiny", ("seed.x=1",))
    assert "'seed' is a value, not a section" in problem


def test_unknown_preset_lists_presets():
    (problem,) = _problems("tinny")
    assert "unknown preset 'tinny'" in problem and "did you mean 'tiny'" in problem
    for name, _ in list_presets():
        assert name in problem


def test_missing_file(tmp_path):
    (problem,) = _problems(str(tmp_path / "nope.yaml"))
    assert "not found" in problem and "nope.yaml" in problem


def test_invalid_yaml_and_non_mapping_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: [1, 2\n")
    assert "not valid YAML" in _problems(str(bad))[0]
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    assert "expected a mapping of sections" in _problems(str(lst))[0]


def test_file_with_dotted_keys_and_empty_sections(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("federation.rounds: 4\nfederation:\n  clients: 3\n  clients_per_round: 2\nlora:\n")
    cfg, label = load_config(str(path))
    assert label == "mine"
    assert (cfg.federation.rounds, cfg.federation.clients, cfg.federation.clients_per_round) == (4, 3, 2)
    assert cfg.lora == Config().lora


def test_dict_round_trip_and_yaml_dump(tmp_path, tiny):
    d = config_to_dict(tiny)
    assert d["data"]["partition"]["alpha"] == tiny.data.partition.alpha
    assert config_from_dict(d) == tiny
    path = tmp_path / "out" / "resolved.yaml"
    dump_config(tiny, path)
    assert yaml.safe_load(path.read_text()) == d
    cfg, label = load_config(str(path))
    assert cfg == tiny and label == "resolved"


def test_config_from_dict_raises_all_problems():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"federation": {"clients": 0, "lr": 0}, "bogus": 1})
    text = str(info.value)
    assert "bogus: unknown key" in text
    assert "federation.clients must be >= 1" in text
    assert "federation.lr must be > 0" in text


def test_label_proportions_need_valid_rows():
    (problem,) = _problems("tiny", ("data.partition.kind=label_proportions",))
    assert problem.startswith("data.partition.proportions: required")
    problems = _problems("tiny", ("data.partition.kind=label_proportions", "data.partition.proportions=[[1, -1], []]"))
    assert any(p.startswith("data.partition.proportions[0]") for p in problems)
    assert any(p.startswith("data.partition.proportions[1]") for p in problems)
    zero = _problems("tiny", ("data.partition.kind=label_proportions", "data.partition.proportions=[[0, 0]]"))
    assert zero[0].startswith("data.partition.proportions[0]")
    ok, _ = load_config("tiny", ["data.partition.kind=label_proportions", "data.partition.proportions=[[0.9, 0.1]]"])
    assert ok.data.partition.proportions == [[0.9, 0.1]]


@pytest.mark.parametrize(
    "override",
    [
        "seed=-1",
        "lora.r=0",
        "lora.alpha=0",
        "lora.dropout=1",
        "lora.dropout=-0.1",
        "lora.targets=[]",
        "data.max_length=7",
        "data.test_fraction=0",
        "data.test_fraction=1",
        "data.personal_fraction=1",
        "data.personal_fraction=-0.1",
        "federation.clients=0",
        "federation.rounds=0",
        "federation.local_steps=0",
        "federation.batch_size=0",
        "federation.lr=0",
        "federation.lr=.nan",
        "federation.eval_every=0",
        "privacy.clip=0",
        "privacy.noise_multiplier=-0.5",
        "runtime.workers=0",
        "runtime.cpus_per_worker=0",
        "runtime.gpus_per_worker=-1",
        "runtime.eval_batch_size=0",
    ],
)
def test_range_checks_name_the_key(override):
    key = override.split("=")[0]
    problems = _problems("tiny", (override,))
    assert any(p.startswith(key) for p in problems), problems


@pytest.mark.parametrize(
    "override",
    [
        "lora.dropout=0",
        "data.personal_fraction=0",
        "privacy.noise_multiplier=0",
        "runtime.gpus_per_worker=0.25",
        "federation.clients_per_round=1",
        "data.max_length=8",
    ],
)
def test_boundary_values_are_accepted(override):
    cfg, _ = load_config("tiny", [override])
    assert validate(cfg) == []


def test_validate_reports_wrong_types_in_a_constructed_config(tiny):
    bad = dataclasses.replace(tiny, federation=FederationConfig(clients="ten"))  # type: ignore[arg-type]
    problems = validate(bad)
    assert problems == ["federation.clients: expected an integer, got 'ten'"]


def test_unknown_method_lists_known_methods():
    available = _needs("fedsim.methods.base", "available_methods")
    known = available()
    problems = _problems("tiny", ("method.name=nope",))
    (problem,) = [p for p in problems if p.startswith("method.name")]
    for name in known:
        assert name in problem
    if "fedavg_lora" in known:
        (close,) = [p for p in _problems("tiny", ("method.name=fedavg_lroa",)) if p.startswith("method.name")]
        assert "did you mean 'fedavg_lora'" in close


def test_nonexistent_data_path_is_reported(tmp_path):
    _needs("fedsim.data.registry", "source_path_problem")
    missing = tmp_path / "nonexistent.csv"
    problems = _problems("tiny", (f"data.source=csv:{missing}",))
    assert any(p.startswith("data.source") for p in problems), problems


def test_unknown_model_is_reported(tmp_path):
    _needs("fedsim.model.registry", "model_name_problem")
    problems = _problems("tiny", (f"model.name={tmp_path / 'no-such-model'}",))
    assert any(p.startswith("model.name") for p in problems), problems
