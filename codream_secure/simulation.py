"""`codream-secure simulate` as a library call: data, clients, CoDream rounds, baselines, report.

A run is prepared first (config, data, models, DP and aggregation plans, a --resume checkpoint:
every check, no write) and only then writes into --out."""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from protocols import registry

from . import __version__
from .baselines import client_seed, run_centralized, run_fedavg, run_isolated, seeded_model
from .checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from .checkpoint_file import partial_path
from .config import (
    AggregationConfig,
    CoDreamConfig,
    DataConfig,
    DeviceConfig,
    PrivacyConfig,
    RunConfig,
    SimulationConfig,
)
from .data import LoadedDataset, label_histogram, load_dataset, partition, split_validation
from .dp_plan import privacy_report
from .errors import ConfigError
from .federation import AggregationChannel, CoDreamFederation, derived_seed
from .generator_dreams import GeneratorDreamer, GeneratorSettings
from .out_folder import check_output_folder, make_output_folder
from .preflight import check_models_train, check_ring
from .progress import NullProgress, Progress
from .report import REPORT_FILES
from .results import ClientData, MethodResult

if TYPE_CHECKING:  # opacus loads only for runs with DP
    from .dp_plan import ClientDP
    from .sample_dp import SampleLevelTrainer

@dataclass
class SimulationOutcome:
    """What a run produced: the report dict and the final dreams (normalised input space)."""

    report: dict
    dreams: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; 'cuda' without a GPU is a configuration error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but torch sees no CUDA device")
    return torch.device(name)


def resolve_masking(masking: str, aggregator: str, dp: str, device: torch.device) -> str:
    """Where dream gradients are masked ([device] masking): 'auto' is the device on CUDA with
    SecAgg (and no client-level DP), else host."""
    if masking != "auto":
        return masking
    secagg = registry.get(aggregator).pairwise_masks and dp != "client"
    return "device" if secagg and device.type == "cuda" else "host"


def load_run_data(section: DataConfig, seed: int) -> LoadedDataset:
    """The [data] section's data set, sampled down to its max_train / max_test."""
    return load_dataset(section.dataset, section.data_dir, max_train=section.max_train,
                        max_test=section.max_test, seed=seed,
                        normalization=(section.data_mean, section.data_std)
                        if section.data_mean else None)


def split_clients(data: LoadedDataset, section: DataConfig, seed: int, device: torch.device
                   ) -> tuple[list[ClientData], list[np.ndarray]]:
    """Hold out one stratified validation set, then partition the rest among the clients.

    The validation set follows the global distribution: a client's own non-IID slice would
    select the round where it knows its few classes best, not where it generalises. It is kept
    out of every client's training data and every method selects on it; the test set selects
    nothing.
    """
    everything = np.arange(len(data.y_train))
    pool, val = split_validation(everything, data.y_train, fraction=section.val_fraction,
                                 seed=seed)
    parts = [pool[p] for p in partition(data.y_train[pool], section.clients,
                                        scheme=section.partition, alpha=section.alpha,
                                        seed=seed)]
    x_val = torch.from_numpy(data.x_train[val]).to(device)
    y_val = torch.from_numpy(data.y_train[val]).to(device)
    clients = [ClientData(torch.from_numpy(data.x_train[idx]).to(device),
                          torch.from_numpy(data.y_train[idx]).to(device), x_val, y_val)
               for idx in parts]
    return clients, parts


def _baselines(run: RunConfig, codream: CoDreamConfig, models: tuple[str, ...],
               clients: list[ClientData], data: LoadedDataset, x_test: torch.Tensor,
               y_test: torch.Tensor, progress: Progress
               ) -> tuple[dict[str, MethodResult], dict[str, float]]:
    """The [run] baselines, trained as [codream]'s local training trains, on the same split,
    and the seconds each took."""
    common = dict(input_shape=data.input_shape, num_classes=data.num_classes,
                  warmup_epochs=codream.warmup_epochs, rounds=codream.rounds,
                  local_epochs=codream.local_epochs, lr=codream.local_lr,
                  batch_size=codream.batch_size, seed=run.seed, progress=progress,
                  bn_statistics=codream.bn_statistics)
    runners = {"isolated": lambda: run_isolated(clients, x_test, y_test, models=models, **common),
               "fedavg": lambda: run_fedavg(clients, x_test, y_test, model=models[0], **common),
               "centralized": lambda: run_centralized(clients, x_test, y_test, models=models,
                                                      **common)}
    results, seconds = {}, {}
    for name, runner in runners.items():
        if name not in run.baselines:
            continue
        if name == "fedavg" and len(set(models)) > 1:
            progress.log("fedavg skipped: it needs every client on the same architecture")
            continue
        start = time.perf_counter()
        results[name] = runner()
        seconds[name] = time.perf_counter() - start
    return results, seconds


def software_versions() -> dict[str, str]:
    import cryptography

    return {"codream_secure": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__,
            "cryptography": cryptography.__version__}


def _aggregator_report(aggregation: AggregationConfig, dp: str, fed: CoDreamFederation
                       ) -> dict:
    grad, labels = fed.grad_channel, fed.label_channel
    session = grad.session or labels.session
    stats = [c.stats for c in (grad, labels)]
    compared = sum(s.steps for s in stats)
    values = sum(s.values for s in stats)
    report = {"name": aggregation.aggregator, "threshold": None, "degree": None, "ring_bits": None,
              "scale_bits": None, "error_bound_per_step": None,
              "masking": {"dream": "device" if grad.device_masking else "host",
                          "labels": "device" if labels.device_masking else "host"},
              "unmasking": {"dream": "device" if grad.device_unmasking else "host",
                            "labels": "device" if labels.device_unmasking else "host"},
              "measured": {
                  "max_abs_error_vs_plain":
                      max(s.max_abs_error for s in stats) if compared else None,
                  "mean_abs_error_vs_plain": sum(s.sum_abs_error for s in stats) / values
                  if values else None,
                  "steps_compared": compared,
                  "clipped_values": sum(s.clipped for s in stats),
                  "seconds": sum(s.seconds for s in stats)}}
    if dp == "client":  # the released sums carry noise on purpose: no error to compare
        report["measured"].update(max_abs_error_vs_plain=None, mean_abs_error_vs_plain=None,
                                  steps_compared=0)
    if session is not None and aggregation.spec().masks_inputs:
        report.update(threshold=session.threshold, degree=session.degree,
                      ring_bits=aggregation.ring_bits)
    codecs = [getattr(c.session, "codec", None) for c in (grad, labels)]
    if all(codec is not None for codec in codecs):
        report["scale_bits"] = {"dream": codecs[0].scale_bits, "labels": codecs[1].scale_bits}
        report["error_bound_per_step"] = {"dream": grad.error_bound, "labels": labels.error_bound}
    return report


def _histograms(privacy: PrivacyConfig, data: LoadedDataset, parts: list[np.ndarray]) -> dict:
    """Per-client label histograms, published only without DP: they describe private data."""
    if privacy.dp != "off":
        return {"client_label_histograms_withheld": "a DP run publishes no statistic of a "
                                                    "client's data outside its accounting"}
    return {"client_label_histograms": label_histogram(data.y_train, parts,
                                                       data.num_classes).tolist(),
            "client_label_histograms_note": "each client's label counts: a statistic of its "
                                            "private data, published because DP is off"}


def _sample_trainers(privacy: PrivacyConfig, codream: CoDreamConfig,
                     clients: list[ClientData]) -> list[SampleLevelTrainer]:
    """One DP-SGD trainer (and accountant) per client, for every local epoch of the run."""
    from .sample_dp import SampleLevelTrainer

    budget = ({"noise_multiplier": privacy.dp_noise} if privacy.dp_noise is not None else
              {"target_epsilon": privacy.dp_epsilon,
               "planned_epochs": codream.warmup_epochs + codream.rounds * codream.local_epochs})
    return [SampleLevelTrainer(n_samples=len(c.y_train), batch_size=codream.batch_size,
                               max_grad_norm=privacy.dp_clip, delta=privacy.dp_delta,
                               accountant=privacy.dp_accountant, lr=codream.local_lr, **budget)
            for c in clients]


def _channels(aggregation: AggregationConfig, codream: CoDreamConfig, n_clients: int,
              masking: str, client_dp: ClientDP | None, device: torch.device
              ) -> list[AggregationChannel]:
    """The dream channel (dream gradients, or generator updates in generator mode) and the
    soft-label channel of the [aggregation] section."""
    dream = ((aggregation.grad_clip, "dream-gradient") if codream.dream_mode == "pixel" else
             (codream.generator_clip, "generator-update"))
    return [AggregationChannel(aggregation.aggregator, n_clients, clip=clip,
                               ring_bits=aggregation.ring_bits,
                               expected_dropout=aggregation.dropout_rate, purpose=purpose,
                               key_bits=aggregation.paillier_bits, dp=spec,
                               ledger=None if client_dp is None else client_dp.ledger,
                               masking=channel_masking, device=device,
                               threat_model=aggregation.threat_model)
            for clip, purpose, spec, channel_masking in (
                (*dream, client_dp and client_dp.grad, masking),
                (aggregation.label_clip, "soft-label", client_dp and client_dp.labels, "host"))]


def _histogram_channel(aggregation: AggregationConfig, n_clients: int, device: torch.device
                       ) -> AggregationChannel:
    """The channel that releases the pooled class histogram once (class-aware teacher).

    Counts are integers below its clip of 2^20 per class and client; the 64-bit ring keeps
    their sum exact to well under one count, so the server rounds it to integers.
    """
    return AggregationChannel(aggregation.aggregator, n_clients, clip=float(2**20), ring_bits=64,
                              expected_dropout=aggregation.dropout_rate,
                              purpose="class-histogram", key_bits=aggregation.paillier_bits,
                              device=device, threat_model=aggregation.threat_model)


def _dreamer(codream: CoDreamConfig, data: LoadedDataset, seed: int, device: torch.device
             ) -> GeneratorDreamer | None:
    """The meta-generator of dream_mode "generator" (None in pixel mode)."""
    if codream.dream_mode != "generator":
        return None
    return GeneratorDreamer(data.input_shape, mean=data.mean, std=data.std,
                            settings=GeneratorSettings.from_config(codream),
                            init_seed=derived_seed(seed, "meta-generator"), device=device)


def _use_threads(device: DeviceConfig) -> None:
    if device.threads:
        torch.set_num_threads(device.threads)


@dataclass
class PreparedRun:
    """Everything a run needs, built and checked before anything is written into --out."""

    config: SimulationConfig
    device: torch.device
    data: LoadedDataset
    clients: list[ClientData]
    parts: list[np.ndarray]
    client_models: tuple[str, ...]
    fed: CoDreamFederation
    client_dp: ClientDP | None
    done: int  # the last round the resumed checkpoint completed; -1 for a fresh run
    resume: bool
    started: dt.datetime
    clock: float


def prepare_simulation(config: SimulationConfig, *, resume: bool = False) -> PreparedRun:
    """Validate the config against the data and build the run: data, clients, models, DP plan,
    aggregation channels, and on --resume the restored checkpoint. Reads --out, never writes."""
    out = Path(config.run.out)
    check_output_folder(out, (CHECKPOINT, partial_path(Path(CHECKPOINT)).name, *REPORT_FILES))
    check_ring(config)
    started, clock = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    _use_threads(config.device)
    device = resolve_device(config.device.device)
    seed, codream, privacy = config.run.seed, config.codream, config.privacy
    data = load_run_data(config.data, seed)
    clients, parts = split_clients(data, config.data, seed, device)
    x_test = torch.from_numpy(data.x_test).to(device)
    y_test = torch.from_numpy(data.y_test).to(device)
    # client k starts from the same weights here as in every baseline, so the comparison is fair
    client_models = config.models.client_models(config.data.clients)
    models = [seeded_model(name, input_shape=data.input_shape, num_classes=data.num_classes,
                           seed=client_seed(seed, k)).to(device)
              for k, name in enumerate(client_models)]
    server_model = seeded_model(config.models.server_model, input_shape=data.input_shape,
                                num_classes=data.num_classes,
                                seed=client_seed(seed, 999)).to(device)
    # before DP-SGD swaps BatchNorm for GroupNorm: the server model and the baselines keep it
    check_models_train(config, models, server_model, input_shape=data.input_shape,
                       num_classes=data.num_classes)
    client_dp = trainers = None
    if privacy.dp == "client":
        from .dp_plan import plan_client_dp

        client_dp = plan_client_dp(privacy, config.aggregation_plan(),
                                   n_clients=config.data.clients,
                                   rounds=codream.rounds, dream_steps=codream.dream_steps,
                                   dream_batch=codream.dream_batch,
                                   grad_dim=codream.dream_batch * int(np.prod(data.input_shape)),
                                   label_dim=codream.dream_batch * data.num_classes)
    elif privacy.dp == "sample":
        from .sample_dp import make_private_ready

        models = [make_private_ready(m) for m in models]  # BatchNorm -> GroupNorm
        trainers = _sample_trainers(privacy, codream, clients)
    masking = resolve_masking(config.device.masking, config.aggregation.aggregator, privacy.dp,
                              device)
    channels = _channels(config.aggregation, codream, config.data.clients, masking, client_dp,
                         device)
    fed = CoDreamFederation(clients, models, server_model, x_test, y_test, codream=codream,
                            seed=seed, aggregation=config.aggregation,
                            device_options=config.device,
                            use_bn_statistics=privacy.dp != "sample", grad_channel=channels[0],
                            label_channel=channels[1], device=device, trainers=trainers,
                            teacher=config.teacher,
                            histogram_channel=_histogram_channel(config.aggregation,
                                                                 config.data.clients, device)
                            if config.teacher == "class-aware" else None,
                            dreamer=_dreamer(codream, data, seed, device))
    done = load_checkpoint(out / CHECKPOINT, config, fed) if resume else -1
    return PreparedRun(config, device, data, clients, parts, client_models, fed, client_dp, done,
                       resume, started, clock)


def run_prepared(run: PreparedRun, *, progress: Progress | None = None) -> SimulationOutcome:
    """The writing phase: warm-up, rounds with a checkpoint after each, baselines, the report."""
    progress = progress or NullProgress()
    config, fed, data, device = run.config, run.fed, run.data, run.device
    seed, codream, privacy = config.run.seed, config.codream, config.privacy
    clients, parts, client_dp = run.clients, run.parts, run.client_dp
    out = Path(config.run.out)
    make_output_folder(out)
    checkpoint = out / CHECKPOINT
    done = run.done
    if done < 0:
        fed.warm_up()
        save_checkpoint(checkpoint, config, fed)
        done = 0
    rounds_task = progress.task("CoDream rounds", codream.rounds)
    progress.advance(rounds_task, done)
    for r in range(done + 1, codream.rounds + 1):
        record = fed.run_round(r, progress)
        save_checkpoint(checkpoint, config, fed)
        progress.advance(rounds_task)
        progress.log(f"round {r}: mean client accuracy {np.mean(record.test):.3f}")
    progress.done(rounds_task)
    baselines, baseline_seconds = _baselines(config.run, codream, run.client_models, clients,
                                             data, fed.x_test, fed.y_test, progress)
    finished = dt.datetime.now(dt.timezone.utc)
    report = {
        "schema_version": 1,
        "config": config.to_dict(),
        "versions": software_versions(),
        "seeds": {"seed": seed},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "device": str(device), "torch_threads": torch.get_num_threads()},
        "dataset": {"name": data.name, "source": str(data.source), "train": len(data.y_train),
                    "test": len(data.y_test), "input_shape": list(data.input_shape),
                    "num_classes": data.num_classes, "client_sizes": [len(p) for p in parts],
                    "normalization": {"mean": list(data.mean), "std": list(data.std)},
                    **_histograms(privacy, data, parts)},
        "aggregator": _aggregator_report(config.aggregation, privacy.dp, fed),
        "privacy": privacy_report(privacy, config.aggregation.aggregator, fed, client_dp),
        "rounds": [r.to_dict() for r in fed.rounds],
        "final": {"codream": fed.result.summary(),
                  **{name: result.summary() for name, result in baselines.items()}},
        "baseline_curves": {name: {"test": result.test, "val": result.val}
                            for name, result in baselines.items()},
        "timing": {"total_seconds": time.perf_counter() - run.clock,
                   "baseline_seconds": baseline_seconds,
                   "started": run.started.isoformat(), "finished": finished.isoformat(),
                   "resumed": bool(run.resume)},
        "command": " ".join(sys.argv),
    }
    dreams = fed.last_dreams if fed.last_dreams is not None else torch.zeros(0, *data.input_shape)
    return SimulationOutcome(report, dreams.cpu().numpy(), tuple(data.mean), tuple(data.std))


def run_simulation(config: SimulationConfig, *, progress: Progress | None = None,
                   resume: bool = False) -> SimulationOutcome:
    """Run CoDream and its baselines on the same splits; checkpoint after every round. The whole
    run is prepared and checked before anything is written into --out."""
    return run_prepared(prepare_simulation(config, resume=resume), progress=progress)
