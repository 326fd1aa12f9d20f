"""The run's config, one section per TOML table: data, models, codream, aggregation, privacy,
device, run. Each section validates itself; SimulationConfig composes them and checks what spans
sections. docs/configuration.md lists every key."""

from codream_secure.config.aggregation import AggregationConfig
from codream_secure.config.checks import max_threads
from codream_secure.config.codream import DREAM_MODES, SOFT_LABELS, CoDreamConfig
from codream_secure.config.data import DataConfig
from codream_secure.config.device import (
    DEVICES,
    DREAM_GRAPHS,
    MASKINGS,
    PRECISIONS,
    TRAIN_CUDA_GRAPHS,
    DeviceConfig,
)
from codream_secure.config.files import build_config, check_tables, load_config
from codream_secure.config.models import MODEL_CHOICES, ModelsConfig
from codream_secure.config.privacy import (
    DP_ACCOUNTANTS,
    DP_MODES,
    DP_NOISE_KINDS,
    DP_UNITS,
    PrivacyConfig,
)
from codream_secure.config.run import BASELINES, MAX_SEED, RunConfig
from codream_secure.config.section import Section
from codream_secure.config.simulation import KEY_SECTION, SECTIONS, SimulationConfig

__all__ = [
    "BASELINES", "DEVICES", "DP_ACCOUNTANTS", "DP_MODES", "DP_NOISE_KINDS", "DP_UNITS",
    "DREAM_GRAPHS", "DREAM_MODES", "KEY_SECTION", "MASKINGS", "MAX_SEED", "MODEL_CHOICES",
    "PRECISIONS", "SECTIONS", "SOFT_LABELS", "TRAIN_CUDA_GRAPHS", "AggregationConfig",
    "CoDreamConfig", "DataConfig", "DeviceConfig", "ModelsConfig", "PrivacyConfig", "RunConfig",
    "Section", "SimulationConfig", "build_config", "check_tables", "load_config", "max_threads",
]
