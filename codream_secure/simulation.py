"""`codream-secure simulate` as a library call: data, clients, CoDream rounds, baselines, report."""

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

from . import __version__
from .baselines import client_seed, run_centralized, run_fedavg, run_isolated, seeded_model
from .checkpoint import CHECKPOINT, check_output_folder, load_checkpoint, save_checkpoint
from .config import SimulationConfig
from .data import LoadedDataset, label_histogram, load_dataset, partition, split_validation
from .dp_plan import privacy_report
from .errors import ConfigError
from .federation import (
    AggregationChannel,
    CoDreamFederation,
    CoDreamSettings,
)
from .progress import NullProgress, Progress
from .report import REPORT_FILES
from .results import ClientData, MethodResult

if TYPE_CHECKING:  # opacus loads only for runs with DP
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


def resolve_masking(config: SimulationConfig, device: torch.device) -> str:
    """Where dream gradients are masked: 'auto' is the device on CUDA with SecAgg, else host."""
    if config.masking != "auto":
        return config.masking
    secagg = config.aggregator in ("secagg", "secagg+") and config.dp != "client"
    return "device" if secagg and device.type == "cuda" else "host"


def _split_clients(data: LoadedDataset, config: SimulationConfig, device: torch.device
                   ) -> tuple[list[ClientData], list[np.ndarray]]:
    """Hold out one stratified validation set, then partition the rest among the clients.

    The validation set follows the global distribution: a client's own non-IID slice would
    select the round where it knows its few classes best, not where it generalises. It is kept
    out of every client's training data and every method selects on it; the test set selects
    nothing.
    """
    everything = np.arange(len(data.y_train))
    pool, val = split_validation(everything, data.y_train, fraction=config.val_fraction,
                                 seed=config.seed)
    parts = [pool[p] for p in partition(data.y_train[pool], config.clients,
                                        scheme=config.partition, alpha=config.alpha,
                                        seed=config.seed)]
    x_val = torch.from_numpy(data.x_train[val]).to(device)
    y_val = torch.from_numpy(data.y_train[val]).to(device)
    clients = [ClientData(torch.from_numpy(data.x_train[idx]).to(device),
                          torch.from_numpy(data.y_train[idx]).to(device), x_val, y_val)
               for idx in parts]
    return clients, parts


def _settings(config: SimulationConfig) -> CoDreamSettings:
    names = [name for name in CoDreamSettings.__dataclass_fields__ if hasattr(config, name)]
    return CoDreamSettings(**{name: getattr(config, name) for name in names},
                           use_bn_statistics=config.dp != "sample")


def _baselines(config: SimulationConfig, clients: list[ClientData], data: LoadedDataset,
               x_test: torch.Tensor, y_test: torch.Tensor, progress: Progress
               ) -> dict[str, MethodResult]:
    common = dict(input_shape=data.input_shape, num_classes=data.num_classes,
                  warmup_epochs=config.warmup_epochs, rounds=config.rounds,
                  local_epochs=config.local_epochs, lr=config.local_lr,
                  batch_size=config.batch_size, seed=config.seed, progress=progress)
    models = config.client_models
    results = {}
    if "isolated" in config.baselines:
        results["isolated"] = run_isolated(clients, x_test, y_test, models=models, **common)
    if "fedavg" in config.baselines:
        if len(set(models)) == 1:
            results["fedavg"] = run_fedavg(clients, x_test, y_test, model=models[0], **common)
        else:
            progress.log("fedavg skipped: it needs every client on the same architecture")
    if "centralized" in config.baselines:
        results["centralized"] = run_centralized(clients, x_test, y_test, models=models, **common)
    return results


def _versions() -> dict[str, str]:
    import cryptography

    return {"codream_secure": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__,
            "cryptography": cryptography.__version__}


def _aggregator_report(config: SimulationConfig, fed: CoDreamFederation) -> dict:
    grad, labels = fed.grad_channel, fed.label_channel
    session = grad.session or labels.session
    stats = [c.stats for c in (grad, labels)]
    compared = sum(s.steps for s in stats)
    values = sum(s.values for s in stats)
    report = {"name": config.aggregator, "threshold": None, "degree": None, "ring_bits": None,
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
    if config.dp == "client":  # the released sums carry noise on purpose: no error to compare
        report["measured"].update(max_abs_error_vs_plain=None, mean_abs_error_vs_plain=None,
                                  steps_compared=0)
    if session is not None and config.aggregator != "plain":
        report.update(threshold=session.threshold, degree=session.degree,
                      ring_bits=config.ring_bits)
    codecs = [getattr(c.session, "codec", None) for c in (grad, labels)]
    if all(codec is not None for codec in codecs):
        report["scale_bits"] = {"dream": codecs[0].scale_bits, "labels": codecs[1].scale_bits}
        report["error_bound_per_step"] = {"dream": grad.error_bound, "labels": labels.error_bound}
    return report


def _histograms(config: SimulationConfig, data: LoadedDataset, parts: list[np.ndarray]) -> dict:
    """Per-client label histograms, published only without DP: they describe private data."""
    if config.dp != "off":
        return {"client_label_histograms_withheld": "a DP run publishes no statistic of a "
                                                    "client's data outside its accounting"}
    return {"client_label_histograms": label_histogram(data.y_train, parts,
                                                       data.num_classes).tolist(),
            "client_label_histograms_note": "each client's label counts: a statistic of its "
                                            "private data, published because DP is off"}


def _sample_trainers(config: SimulationConfig, clients: list[ClientData]
                     ) -> list[SampleLevelTrainer]:
    """One DP-SGD trainer (and accountant) per client, for every local epoch of the run."""
    from .sample_dp import SampleLevelTrainer

    budget = ({"noise_multiplier": config.dp_noise} if config.dp_noise is not None else
              {"target_epsilon": config.dp_epsilon,
               "planned_epochs": config.warmup_epochs + config.rounds * config.local_epochs})
    return [SampleLevelTrainer(n_samples=len(c.y_train), batch_size=config.batch_size,
                               max_grad_norm=config.dp_clip, delta=config.dp_delta,
                               accountant=config.dp_accountant, lr=config.local_lr, **budget)
            for c in clients]


def run_simulation(config: SimulationConfig, *, progress: Progress | None = None,
                   resume: bool = False) -> SimulationOutcome:
    """Run CoDream and its baselines on the same splits; checkpoint after every round."""
    progress = progress or NullProgress()
    out = Path(config.out)
    check_output_folder(out, REPORT_FILES)
    started, clock = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    data = load_dataset(config.dataset, config.data_dir, max_train=config.max_train,
                        max_test=config.max_test, seed=config.seed,
                        normalization=(config.data_mean, config.data_std)
                        if config.data_mean else None)
    clients, parts = _split_clients(data, config, device)
    x_test = torch.from_numpy(data.x_test).to(device)
    y_test = torch.from_numpy(data.y_test).to(device)
    # client k starts from the same weights here as in every baseline, so the comparison is fair
    models = [seeded_model(name, input_shape=data.input_shape, num_classes=data.num_classes,
                           seed=client_seed(config.seed, k)).to(device)
              for k, name in enumerate(config.client_models)]
    server_model = seeded_model(config.server_model, input_shape=data.input_shape,
                                num_classes=data.num_classes,
                                seed=client_seed(config.seed, 999)).to(device)
    client_dp = trainers = None
    if config.dp == "client":
        from .dp_plan import plan_client_dp

        client_dp = plan_client_dp(config,
                                   grad_dim=config.dream_batch * int(np.prod(data.input_shape)),
                                   label_dim=config.dream_batch * data.num_classes)
    elif config.dp == "sample":
        from .sample_dp import make_private_ready

        models = [make_private_ready(m) for m in models]  # BatchNorm -> GroupNorm
        trainers = _sample_trainers(config, clients)
    channels = [AggregationChannel(config.aggregator, config.clients, clip=clip,
                                   ring_bits=config.ring_bits, expected_dropout=config.dropout_rate,
                                   purpose=purpose, key_bits=config.paillier_bits, dp=spec,
                                   ledger=None if client_dp is None else client_dp.ledger,
                                   masking=masking, device=device)
                for clip, purpose, spec, masking in (
                    (config.grad_clip, "dream-gradient", client_dp and client_dp.grad,
                     resolve_masking(config, device)),
                    (config.label_clip, "soft-label", client_dp and client_dp.labels, "host"))]
    fed = CoDreamFederation(clients, models, server_model, x_test, y_test,
                            settings=_settings(config), grad_channel=channels[0],
                            label_channel=channels[1], device=device, trainers=trainers)
    checkpoint = out / CHECKPOINT
    done = load_checkpoint(checkpoint, config, fed) if resume else -1
    if done < 0:
        fed.warm_up()
        save_checkpoint(checkpoint, config, fed)
        done = 0
    rounds_task = progress.task("CoDream rounds", config.rounds)
    progress.advance(rounds_task, done)
    for r in range(done + 1, config.rounds + 1):
        record = fed.run_round(r, progress)
        save_checkpoint(checkpoint, config, fed)
        progress.advance(rounds_task)
        progress.log(f"round {r}: mean client accuracy {np.mean(record.test):.3f}")
    progress.done(rounds_task)
    baselines = _baselines(config, clients, data, x_test, y_test, progress)
    finished = dt.datetime.now(dt.timezone.utc)
    report = {
        "schema_version": 1,
        "config": config.to_dict(),
        "versions": _versions(),
        "seeds": {"seed": config.seed},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "device": str(device), "torch_threads": torch.get_num_threads()},
        "dataset": {"name": data.name, "source": str(data.source), "train": len(data.y_train),
                    "test": len(data.y_test), "input_shape": list(data.input_shape),
                    "num_classes": data.num_classes, "client_sizes": [len(p) for p in parts],
                    "normalization": {"mean": list(data.mean), "std": list(data.std)},
                    **_histograms(config, data, parts)},
        "aggregator": _aggregator_report(config, fed),
        "privacy": privacy_report(config, fed, client_dp),
        "rounds": [r.to_dict() for r in fed.rounds],
        "final": {"codream": fed.result.summary(),
                  **{name: result.summary() for name, result in baselines.items()}},
        "baseline_curves": {name: {"test": result.test, "val": result.val}
                            for name, result in baselines.items()},
        "timing": {"total_seconds": time.perf_counter() - clock,
                   "started": started.isoformat(), "finished": finished.isoformat(),
                   "resumed": bool(resume)},
        "command": " ".join(sys.argv),
    }
    dreams = fed.last_dreams if fed.last_dreams is not None else torch.zeros(0, *data.input_shape)
    return SimulationOutcome(report, dreams.cpu().numpy(), tuple(data.mean), tuple(data.std))
