"""config.py: every validation path, TOML loading, and file-vs-flag precedence."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from codream_secure.config import (
    DEFAULTS,
    FIELD_NAMES,
    MODEL_CHOICES,
    SimulationConfig,
    build_config,
    load_config,
)
from codream_secure.errors import ConfigError


def test_model_choices_mirror_the_model_zoo() -> None:
    from codream_secure.models import MODEL_NAMES

    assert MODEL_CHOICES == MODEL_NAMES


def test_defaults_are_valid_and_json_ready() -> None:
    config = SimulationConfig()
    data = config.to_dict()
    assert set(data) == set(FIELD_NAMES)
    assert json.loads(json.dumps(data)) == data
    assert data["models"] == ["smallcnn", "resnet8", "wrn16_1", "smallcnn"]
    with pytest.raises(FrozenInstanceError):
        config.clients = 5  # type: ignore[misc]


@pytest.mark.parametrize(("clients", "models", "expected"), [
    (4, ("resnet8",), ("resnet8",) * 4),
    (5, ("smallcnn", "resnet8"), ("smallcnn", "resnet8", "smallcnn", "resnet8", "smallcnn")),
    (2, ("smallcnn", "resnet8", "vgg11"), ("smallcnn", "resnet8")),
])
def test_client_models_cycle(clients: int, models: tuple, expected: tuple) -> None:
    assert SimulationConfig(clients=clients, models=models).client_models == expected


def test_normalisation_of_lists_strings_and_ints() -> None:
    config = SimulationConfig(models=["resnet8", "vgg11"], dropout_clients=[2], alpha=1,
                              baselines="isolated, centralized", out=Path("runs/x"))
    assert config.models == ("resnet8", "vgg11") and config.dropout_clients == (2,)
    assert isinstance(config.alpha, float) and config.alpha == 1.0
    assert config.baselines == ("isolated", "centralized") and config.out == "runs/x"
    assert SimulationConfig(baselines=[]).baselines == ()


BAD_VALUES = [
    # (overrides, field named in the message, a fragment of what is allowed)
    ({"dataset": "imagenet"}, "dataset", "digits"),
    ({"data_dir": "/no/such/folder", "dataset": "mnist"}, "data_dir", "does not exist"),
    ({"data_dir": "."}, "data_dir", "digits is embedded"),
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
    ({"aggregator": "rot13"}, "aggregator", "paillier"),
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
    ({"dropout_clients": (-1,)}, "dropout_clients", "[0, 3]"),
    ({"dropout_clients": (1, 1)}, "dropout_clients", "repeat"),
    ({"dropout_clients": (0, 1, 2)}, "dropout_clients", "needs at least 3"),
    ({"dropout_clients": (0, 1), "aggregator": "secagg+"}, "dropout_clients", "needs at least 3"),
    ({"baselines": ("isolated", "oracle")}, "baselines", "fedavg"),
    ({"baselines": ("isolated", "isolated")}, "baselines", "repeat"),
    ({"device": "tpu"}, "device", "cuda"),
    ({"precision": "fp8"}, "precision", "bf16"),
    ({"masking": "gpu"}, "masking", "device"),
    ({"train_cuda_graphs": "yes"}, "train_cuda_graphs", "on"),
    ({"dream_graph": "shared"}, "dream_graph", "per-client"),
    ({"seed": -1}, "seed", "in [0, 4294967295]"),
    ({"seed": 2**63}, "seed", "in [0, 4294967295]"),
    ({"threads": -2}, "threads", "in [0, "),
    ({"threads": 100_000}, "threads", "in [0, "),
    ({"paillier_bits": 2049}, "paillier_bits", "must be even"),
    ({"out": ""}, "out", "non-empty"),
]


@pytest.mark.parametrize(("overrides", "field", "allowed"), BAD_VALUES,
                         ids=[f"{f}={o[f]!r}" for o, f, _ in BAD_VALUES])
def test_each_bad_value_names_field_value_and_allowed(overrides: dict, field: str,
                                                      allowed: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SimulationConfig(**overrides)
    message = str(caught.value)
    assert message.startswith(f"{field}:"), message
    assert allowed in message, message


def test_every_field_has_a_validation_case() -> None:
    covered = {field for _, field, _ in BAD_VALUES} | {"device"}
    unchecked = {"max_test", "distill_epochs", "local_epochs", "batch_size", "adaptive_after"}
    assert set(FIELD_NAMES) - covered == unchecked
    for name in unchecked:  # same rule as a covered sibling; prove it is wired up anyway
        with pytest.raises(ConfigError, match=f"^{name}:"):
            SimulationConfig(**{name: -1})


def test_cuda_without_a_device_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^device: 'cuda' requested"):
        SimulationConfig(device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert SimulationConfig(device="cuda").device == "cuda"


@pytest.mark.parametrize(("field", "on", "off"), [("train_cuda_graphs", "on", "off"),
                                                   ("dream_graph", "one", "per-client")])
def test_cuda_graph_options_need_cuda_and_bf16(monkeypatch: pytest.MonkeyPatch, field: str,
                                               on: str, off: str) -> None:
    import torch

    from codream_secure.simulation import _settings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for overrides, found in [({"device": "cpu", "precision": "bf16"}, "no CUDA device"),
                             ({"device": "auto", "precision": "bf16"}, "no CUDA device")]:
        with pytest.raises(ConfigError, match=rf"^{field}: .*got {found}"):
            SimulationConfig(**{field: on}, **overrides)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=rf"^{field}: .*got precision 'fp32'"):
        SimulationConfig(**{field: on}, device="cuda")
    config = SimulationConfig(**{field: on}, device="auto", precision="bf16")
    assert getattr(_settings(config), field) == on  # reaches the federation
    assert getattr(_settings(SimulationConfig()), field) == off


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_toml_values_and_flag_precedence(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'clients = 6\nrounds = 3\nmodels = ["resnet8", "vgg11"]\n'
                           'dropout_clients = [5]\nalpha = 1\n')
    values = load_config(path)
    config = build_config(values, {"rounds": 7, "alpha": None, "seed": 3})
    assert config.clients == 6  # file value
    assert config.rounds == 7  # a flag overrides the file
    assert config.alpha == 1.0  # an unset (None) flag does not
    assert config.seed == 3  # a flag over the default
    assert config.models == ("resnet8", "vgg11") and config.dropout_clients == (5,)
    assert config.dream_steps == DEFAULTS["dream_steps"]


def test_unknown_toml_key_lists_valid_keys_and_suggests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_toml(tmp_path, "dream-steps = 5\n"))
    message = str(caught.value)
    assert "unknown key 'dream-steps'" in message and "did you mean 'dream_steps'" in message
    assert all(name in message for name in FIELD_NAMES)


def test_missing_and_malformed_toml_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as caught:
        load_config(tmp_path / "absent.toml")
    assert "absent.toml" in str(caught.value)
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_config(_toml(tmp_path, "clients = = 4\n"))
    assert "run.toml" in str(caught.value) and "line 1" in str(caught.value)


def test_bad_toml_value_is_reported_with_its_field(tmp_path: Path) -> None:
    values = load_config(_toml(tmp_path, 'rounds = "ten"\n'))
    with pytest.raises(ConfigError, match=r"^rounds: expected an integer, got 'ten'"):
        build_config(values, {})


def test_build_config_rejects_unknown_override_keys() -> None:
    with pytest.raises(ConfigError, match="unknown key 'roundz'"):
        build_config({}, {"roundz": 3})


def test_the_survivors_needed_follow_the_aggregator() -> None:
    # secagg(+): every included client needs t share holders among the others (t + 1 in all)
    assert SimulationConfig(clients=4).min_survivors() == 3
    assert SimulationConfig(clients=10).min_survivors() == 6
    for aggregator in ("plain", "paillier"):
        assert SimulationConfig(clients=4, aggregator=aggregator).min_survivors() == 2
        SimulationConfig(clients=4, aggregator=aggregator, dropout_clients=(0, 1))  # accepted
    # distributed DP under Paillier: the key holder's quorum, default_threshold(5) = 3
    dp = {"dp": "client", "dp_noise": 1.0, "aggregator": "paillier"}
    assert SimulationConfig(clients=5, **dp).min_survivors() == 3
    with pytest.raises(ConfigError, match="needs at least 3"):
        SimulationConfig(clients=5, dropout_clients=(0, 1, 2), **dp)


def test_distributed_noise_takes_only_the_rdp_accountant() -> None:
    for kind in ("skellam", "discrete_gaussian"):
        with pytest.raises(ConfigError, match="use --dp-accountant rdp, or --dp-mode central"):
            SimulationConfig(dp="client", dp_noise=1.0, dp_noise_kind=kind, dp_accountant="gdp")
    # what the message offers is accepted
    SimulationConfig(dp="client", dp_noise=1.0, dp_accountant="rdp")
    SimulationConfig(dp="client", dp_noise=1.0, dp_mode="central", dp_accountant="prv")


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_bytes(b"\xff\xfe rounds = 3")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(path)
