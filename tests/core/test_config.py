"""config/: every validation path, section by section, TOML and JSON loading, flag precedence."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from codream_secure.config import (
    KEY_SECTION,
    MODEL_CHOICES,
    SECTIONS,
    CoDreamConfig,
    DataConfig,
    SimulationConfig,
    build_config,
    load_config,
)
from codream_secure.errors import ConfigError
from tests.core.tiny_runs import TINY


def test_model_choices_mirror_the_model_zoo() -> None:
    from codream_secure.models import MODEL_NAMES

    assert MODEL_CHOICES == MODEL_NAMES


def test_defaults_are_valid_sectioned_and_json_ready() -> None:
    config = SimulationConfig()
    data = config.to_dict()
    assert list(data) == ["data", "models", "codream", "aggregation", "privacy", "device", "run"]
    assert {key for table in data.values() for key in table} == set(KEY_SECTION)
    assert all(key in data[table] for key, table in KEY_SECTION.items())
    assert json.loads(json.dumps(data)) == data
    assert data["models"]["models"] == ["smallcnn", "resnet8", "wrn16_1", "smallcnn"]
    assert SimulationConfig.from_dict(data) == config  # the dict is the TOML's shape
    with pytest.raises(FrozenInstanceError):
        config.data.clients = 5  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        config.data = DataConfig()  # type: ignore[misc]


def test_keys_route_to_their_sections() -> None:
    config = SimulationConfig.from_keys(dream_steps=7, clients=5, masking="host", seed=3)
    assert config.codream.dream_steps == 7 and config.data.clients == 5
    assert config.device.masking == "host" and config.run.seed == 3
    again = config.replace(dream_steps=9)
    assert again.codream.dream_steps == 9 and config.codream.dream_steps == 7
    assert again.data == config.data and again.codream.rounds == config.codream.rounds
    assert SimulationConfig.from_keys() == SimulationConfig()


@pytest.mark.parametrize(("clients", "models", "expected"), [
    (4, ("resnet8",), ("resnet8",) * 4),
    (5, ("smallcnn", "resnet8"), ("smallcnn", "resnet8", "smallcnn", "resnet8", "smallcnn")),
    (2, ("smallcnn", "resnet8", "vgg11"), ("smallcnn", "resnet8")),
])
def test_client_models_cycle(clients: int, models: tuple, expected: tuple) -> None:
    config = SimulationConfig.from_keys(clients=clients, models=models)
    assert config.client_models == expected == config.models.client_models(clients)


def test_normalisation_of_lists_strings_and_ints() -> None:
    config = SimulationConfig.from_keys(models=["resnet8", "vgg11"], dropout_clients=[2],
                                        alpha=1, baselines="isolated, centralized",
                                        out=Path("runs/x"))
    assert config.models.models == ("resnet8", "vgg11")
    assert config.aggregation.dropout_clients == (2,)
    assert isinstance(config.data.alpha, float) and config.data.alpha == 1.0
    assert config.run.baselines == ("isolated", "centralized") and config.run.out == "runs/x"
    assert SimulationConfig.from_keys(baselines=[]).run.baselines == ()
    with pytest.raises(ConfigError, match=r"^\[models\] models: expected a list, got 3"):
        SimulationConfig.from_keys(models=3)


BAD_VALUES = [
    # (overrides, key named in the message, a fragment of what is allowed)
    ({"dataset": "imagenet"}, "dataset", "digits"),
    ({"data_dir": "/no/such/folder", "dataset": "mnist"}, "data_dir", "does not exist"),
    ({"data_dir": "."}, "data_dir", "digits is embedded"),
    ({"data_dir": "", "dataset": "mnist"}, "data_dir", "non-empty"),
    ({"max_train": 0}, "max_train", "at least 1"),
    ({"data_mean": (0.5,), "data_std": ()}, "data_std", "as many values as data_mean"),
    ({"data_mean": (0.5,), "data_std": (0.0,)}, "data_std", "> 0"),
    ({"data_mean": (float("nan"),), "data_std": (1.0,)}, "data_mean", "finite"),
    ({"clients": 1}, "clients", "at least 2"),
    ({"clients": "4"}, "clients", "integer"),
    ({"clients": True}, "clients", "integer"),
    ({"models": ("smallcnn", "gpt")}, "models", "resnet8"),
    ({"models": ()}, "models", "at least one"),
    ({"server_model": "bert"}, "server_model", "wrn16_1"),
    ({"partition": "shards"}, "partition", "balanced-dirichlet"),
    ({"alpha": 0.0}, "alpha", "> 0"),
    ({"alpha": -1.0}, "alpha", "> 0"),
    ({"alpha": float("inf")}, "alpha", "finite"),
    ({"val_fraction": 0.0}, "val_fraction", "(0, 1)"),
    ({"val_fraction": 1.0}, "val_fraction", "(0, 1)"),
    ({"rounds": 0}, "rounds", "at least 1"),
    ({"dream_steps": -3}, "dream_steps", "at least 1"),
    ({"dream_batch": 0}, "dream_batch", "at least 1"),
    ({"warmup_epochs": -1}, "warmup_epochs", "at least 0"),
    ({"dream_lr": 0.0}, "dream_lr", "> 0"),
    ({"local_lr": -0.1}, "local_lr", "> 0"),
    ({"distill_lr": "fast"}, "distill_lr", "number"),
    ({"kd_temperature": 0.0}, "kd_temperature", "> 0"),
    ({"buffer_size": 10, "dream_batch": 64}, "buffer_size", "at least 64"),
    ({"soft_labels": "hard"}, "soft_labels", "logits"),
    ({"adaptive_weight": -1.0}, "adaptive_weight", ">= 0"),
    ({"dream_objective": "sharp"}, "dream_objective", "label"),
    ({"dream_pred_weight": -1.0}, "dream_pred_weight", ">= 0"),
    ({"dream_bn_weight": float("nan")}, "dream_bn_weight", "finite"),
    ({"teacher": "oracle"}, "teacher", "class-aware"),
    ({"teacher": "class-aware", "dp": "client", "dp_noise": 1.0}, "teacher", "uniform"),
    ({"teacher": "class-aware", "soft_labels": "logits"}, "teacher", "probs"),
    ({"teacher": "uniform", "dream_objective": "label"}, "dream_objective", "class-aware"),
    ({"distill_bn": "train"}, "distill_bn", "frozen"),
    ({"kd_gate": "on"}, "kd_gate", "validation"),
    ({"round_order": "random"}, "round_order", "joint"),
    ({"round_order": "joint", "dp": "sample", "dp_noise": 1.0}, "round_order", "outside DP-SGD"),
    ({"round_order": "joint", "kd_weight": -1.0}, "kd_weight", ">= 0"),
    ({"kd_weight": 2.0}, "kd_weight", "no effect with round_order = 'distill-last'"),
    ({"bn_statistics": "fresh"}, "bn_statistics", "recalibrated"),
    ({"dream_mode": "latent"}, "dream_mode", "generator"),
    ({"dream_mode": "generator", "dp": "client", "dp_noise": 1.0}, "dream_mode",
     "client-level DP"),
    ({"generator_batches": 0}, "generator_batches", "at least 1"),
    ({"generator_local_steps": 0}, "generator_local_steps", "at least 1"),
    ({"generator_lr": 0.0}, "generator_lr", "> 0"),
    ({"generator_meta_lr": 1.5}, "generator_meta_lr", "(0, 1]"),
    ({"generator_meta_lr": 0.0}, "generator_meta_lr", "> 0"),
    ({"generator_latent_dim": 0}, "generator_latent_dim", "at least 1"),
    ({"generator_clip": -1.0}, "generator_clip", "> 0"),
    ({"aggregator": "rot13"}, "aggregator", "paillier"),
    ({"threat_model": "malicious"}, "threat_model", "semi-honest"),
    ({"paillier_bits": 1024}, "paillier_bits", "at least 2048"),
    ({"dp": "on"}, "dp", "client"),
    ({"dp_mode": "local"}, "dp_mode", "distributed"),
    ({"dp": "client", "dp_noise": 0.0}, "dp_noise", "> 0"),
    ({"dp": "client", "dp_epsilon": -1.0}, "dp_epsilon", "> 0"),
    ({"dp_delta": 0.0}, "dp_delta", "(0, 1)"),
    ({"dp_clip": 0.0}, "dp_clip", "> 0"),
    ({"dp_label_clip": -1.0}, "dp_label_clip", "> 0"),
    ({"dp_noise_kind": "laplace"}, "dp_noise_kind", "skellam"),
    ({"dp_accountant": "moments"}, "dp_accountant", "prv"),
    ({"grad_clip": 0.0}, "grad_clip", "> 0"),
    ({"label_clip": -1.0}, "label_clip", "> 0"),
    ({"ring_bits": 4}, "ring_bits", "[8, 64]"),
    ({"ring_bits": 128}, "ring_bits", "[8, 64]"),
    ({"dropout_rate": 1.0}, "dropout_rate", "[0, 1)"),
    ({"dropout_rate": -0.1}, "dropout_rate", "[0, 1)"),
    ({"dropout_clients": (4,)}, "dropout_clients", "[0, 3]"),
    ({"dropout_clients": (-1,)}, "dropout_clients", "at least 0"),
    ({"dropout_clients": (1, 1)}, "dropout_clients", "repeat"),
    ({"dropout_clients": (0, 1, 2)}, "dropout_clients", "needs at least 3"),
    ({"dropout_clients": (0, 1), "aggregator": "secagg+"}, "dropout_clients", "needs at least 3"),
    ({"baselines": ("isolated", "oracle")}, "baselines", "fedavg"),
    ({"baselines": ("isolated", "isolated")}, "baselines", "repeat"),
    ({"device": "tpu"}, "device", "cuda"),
    ({"precision": "fp8"}, "precision", "bf16"),
    ({"masking": "gpu"}, "masking", "device"),
    ({"masking": "device", "aggregator": "plain"}, "masking", "has none"),
    ({"masking": "device", "dp": "client", "dp_noise": 1.0}, "masking", "client-level DP"),
    ({"train_cuda_graphs": "yes"}, "train_cuda_graphs", "on"),
    ({"dream_graph": "shared"}, "dream_graph", "per-client"),
    ({"seed": -1}, "seed", "in [0, 4294967295]"),
    ({"seed": 2**63}, "seed", "in [0, 4294967295]"),
    ({"threads": -2}, "threads", "in [0, "),
    ({"threads": 100_000}, "threads", "in [0, "),
    ({"paillier_bits": 2049}, "paillier_bits", "must be even"),
    ({"out": ""}, "out", "non-empty"),
]


@pytest.mark.parametrize(("overrides", "key", "allowed"), BAD_VALUES,
                         ids=[f"{k}={o[k]!r}" for o, k, _ in BAD_VALUES])
def test_each_bad_value_names_section_key_value_and_allowed(overrides: dict, key: str,
                                                            allowed: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SimulationConfig.from_keys(**overrides)
    message = str(caught.value)
    assert message.startswith(f"[{KEY_SECTION[key]}] {key}:"), message
    assert allowed in message, message


def test_every_key_has_a_validation_case() -> None:
    covered = {key for _, key, _ in BAD_VALUES}
    unchecked = {"max_test", "distill_epochs", "local_epochs", "batch_size", "adaptive_after"}
    assert set(KEY_SECTION) - covered == unchecked
    for key in unchecked:  # same rule as a covered sibling; prove it is wired up anyway
        with pytest.raises(ConfigError, match=rf"^\[{KEY_SECTION[key]}\] {key}:"):
            SimulationConfig.from_keys(**{key: -1})


def test_each_section_validates_on_its_own() -> None:
    for name, section in SECTIONS.items():
        assert name == section.SECTION and section().to_dict() == SimulationConfig().to_dict()[name]
    with pytest.raises(ConfigError, match=r"^\[codream\] dream_steps: .* at least 1, got 0"):
        CoDreamConfig(dream_steps=0)
    with pytest.raises(ConfigError, match=r"^\[data\] clients: "):
        DataConfig(clients=1)
    with pytest.raises(ConfigError, match=r"^\[codream\]: expected a CoDreamConfig"):
        SimulationConfig(codream=DataConfig())  # type: ignore[arg-type]


def test_cuda_without_a_device_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^\[device\] device: 'cuda' requested"):
        SimulationConfig.from_keys(device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert SimulationConfig.from_keys(device="cuda").device.device == "cuda"


class _Captured(Exception):
    """Raised by a stand-in CoDreamFederation with the keyword arguments simulate gave it."""


@pytest.mark.parametrize(("key", "on", "off"), [("train_cuda_graphs", "on", "off"),
                                                 ("dream_graph", "one", "per-client")])
def test_cuda_graph_options_need_cuda_and_bf16(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               key: str, on: str, off: str) -> None:
    import torch

    from codream_secure import simulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for overrides, found in [({"device": "cpu", "precision": "bf16"}, "no CUDA device"),
                             ({"device": "auto", "precision": "bf16"}, "no CUDA device")]:
        with pytest.raises(ConfigError, match=rf"^\[device\] {key}: .*got {found}"):
            SimulationConfig.from_keys(**{key: on}, **overrides)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=rf"^\[device\] {key}: .*got precision 'fp32'"):
        SimulationConfig.from_keys(**{key: on}, device="cuda")
    config = SimulationConfig.from_keys(**{**TINY, key: on, "precision": "bf16",
                                           "out": str(tmp_path / "on")})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the run stays on the CPU

    def federation(*args, **kwargs):
        raise _Captured(kwargs)

    monkeypatch.setattr(simulation, "CoDreamFederation", federation)
    for run, expected in ((config, on), (config.replace(**{key: off}), off)):
        with pytest.raises(_Captured) as caught:
            simulation.run_simulation(run)
        assert getattr(caught.value.args[0]["device_options"], key) == expected  # reaches it


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_toml_tables_and_flag_precedence(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[data]\nclients = 6\nalpha = 1\n[codream]\nrounds = 3\n'
                           '[models]\nmodels = ["resnet8", "vgg11"]\n'
                           '[aggregation]\ndropout_clients = [5]\n')
    values = load_config(path)
    config = build_config(values, {"rounds": 7, "alpha": None, "seed": 3})
    assert config.data.clients == 6  # file value
    assert config.codream.rounds == 7  # a flag overrides the file
    assert config.data.alpha == 1.0  # an unset (None) flag does not
    assert config.run.seed == 3  # a flag over the default
    assert config.models.models == ("resnet8", "vgg11")
    assert config.aggregation.dropout_clients == (5,)
    assert config.codream.dream_steps == CoDreamConfig().dream_steps


def test_flat_keys_of_the_old_format_name_their_new_tables(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_toml(tmp_path, 'dream_steps = 5\nmodels = ["resnet8"]\n[device]\n'
                                    'threads = 1\n'))
    message = str(caught.value)
    assert "`dream_steps` is now `[codream] dream_steps`" in message
    assert "`models` is now `[models] models`" in message
    assert "device" not in message.replace("[device]", "")  # a table, not a flat key


@pytest.mark.parametrize(("text", "fragments"), [
    ("dream-steps = 5\n", ["unknown key 'dream-steps'", "`[codream] dream_steps`"]),
    ("[codream]\ndream-steps = 5\n",
     ["[codream] unknown key 'dream-steps'", "did you mean 'dream_steps'", "buffer_size"]),
    ("[codream]\nmasking = 'host'\n", ["[codream] masking", "belongs in the [device] table"]),
    ("[dreams]\nsteps = 5\n", ["unknown table [dreams]", "codream"]),
    ("codream = 5\n", ["[codream] must be a table of keys"]),
])
def test_unknown_keys_and_tables_are_named(tmp_path: Path, text: str, fragments: list) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_toml(tmp_path, text))
    assert all(fragment in str(caught.value) for fragment in fragments), str(caught.value)


def test_missing_and_malformed_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as caught:
        load_config(tmp_path / "absent.toml")
    assert "absent.toml" in str(caught.value)
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_config(_toml(tmp_path, "[data]\nclients = = 4\n"))
    assert "run.toml" in str(caught.value) and "line 2" in str(caught.value)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match=r"bad\.json' is not valid JSON"):
        load_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="object of config tables"):
        load_config(bad)


def test_bad_toml_value_is_reported_with_its_section_and_key(tmp_path: Path) -> None:
    values = load_config(_toml(tmp_path, '[codream]\nrounds = "ten"\n'))
    with pytest.raises(ConfigError, match=r"^\[codream\] rounds: expected an integer, got 'ten'"):
        build_config(values, {})


def test_a_report_config_feeds_back_as_a_config_file(tmp_path: Path) -> None:
    config = SimulationConfig.from_keys(clients=5, rounds=2, dream_steps=3, dp="client",
                                        dp_epsilon=4.0, dropout_clients=(4,), baselines=())
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"schema_version": 1, "config": config.to_dict(), "rounds": []}))
    assert build_config(load_config(path), {}) == config  # nulls (data_dir...) included
    path.write_text(json.dumps(config.to_dict()))  # the config block alone
    assert build_config(load_config(path), {"out": "elsewhere"}) == config.replace(out="elsewhere")


def test_build_config_rejects_unknown_override_keys() -> None:
    with pytest.raises(ConfigError, match="unknown key 'roundz'"):
        build_config({}, {"roundz": 3})
    with pytest.raises(ConfigError, match="unknown key 'roundz'"):
        SimulationConfig.from_keys(roundz=3)


def test_the_survivors_needed_follow_the_aggregator() -> None:
    # secagg(+): every included client needs t share holders among the others (t + 1 in all)
    assert SimulationConfig.from_keys(clients=4).min_survivors() == 3
    assert SimulationConfig.from_keys(clients=10).min_survivors() == 6
    for aggregator in ("plain", "paillier"):
        plain = SimulationConfig.from_keys(clients=4, aggregator=aggregator)
        assert plain.min_survivors() == 2
        plain.replace(dropout_clients=(0, 1))  # accepted
    # distributed DP under Paillier: the key holder's quorum, majority_threshold(5) = 3
    dp = {"dp": "client", "dp_noise": 1.0, "aggregator": "paillier"}
    assert SimulationConfig.from_keys(clients=5, **dp).min_survivors() == 3
    with pytest.raises(ConfigError, match="needs at least 3"):
        SimulationConfig.from_keys(clients=5, dropout_clients=(0, 1, 2), **dp)


def test_distributed_noise_takes_only_the_rdp_accountant() -> None:
    for kind in ("skellam", "discrete_gaussian"):
        with pytest.raises(ConfigError, match='set dp_accountant = "rdp", or dp_mode = "central"'):
            SimulationConfig.from_keys(dp="client", dp_noise=1.0, dp_noise_kind=kind,
                                       dp_accountant="gdp")
    # what the message offers is accepted
    SimulationConfig.from_keys(dp="client", dp_noise=1.0, dp_accountant="rdp")
    SimulationConfig.from_keys(dp="client", dp_noise=1.0, dp_mode="central", dp_accountant="prv")


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_bytes(b"\xff\xfe rounds = 3")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(path)


def test_the_configuration_page_lists_every_key_with_its_default_and_flag() -> None:
    from codream_secure.cli_options import FLAGS

    page = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    rows: dict[str, tuple[str, list[str]]] = {}
    table = None
    for line in page.splitlines():
        if line.startswith("## `["):
            table = line[5:line.index("]")]
        elif table and line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = (table, cells)
    assert set(rows) == set(KEY_SECTION)
    for key, (table, cells) in rows.items():
        assert table == KEY_SECTION[key], key
        default = getattr(SECTIONS[table](), key)
        shown = "none" if default is None else (
            f"`{json.dumps(list(default) if isinstance(default, tuple) else default)}`")
        assert cells[1].startswith(shown), (key, cells[1])
        assert (cells[2] == "flag") == (key in FLAGS), key
        assert cells[2] in ("flag", "file", "expert") and cells[3], key


@pytest.mark.parametrize("keys", [
    {},
    {"dream_mode": "generator", "models": ("smallcnn", "resnet8"), "rounds": 3,
     "dream_lr": 0.125, "aggregator": "secagg+", "baselines": ()},
    {"dataset": "fashion-mnist", "data_dir": 'a "quoted"\\ dir\twith\ntabs'},
    {"dp": "client", "dp_epsilon": 3.0, "aggregator": "secagg"},
])
def test_a_config_written_as_toml_reads_back_equal(keys, tmp_path):
    from codream_secure.config.files import build_config, config_toml, parse_toml

    if "data_dir" in keys:  # a folder whose name needs every escape TOML has
        keys = {**keys, "data_dir": str(tmp_path / keys["data_dir"])}
        (tmp_path / keys["data_dir"]).mkdir()
    config = SimulationConfig.from_keys(**keys)
    assert build_config(parse_toml(config_toml(config).encode(), "text"), {}) == config
