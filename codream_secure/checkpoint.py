"""Resume checkpoints of a simulation: written atomically after every round, sealed with the
SHA-256 of their content and of their config, and on --resume verified before anything is
restored, read back without running code from the file (torch.load with weights_only) and
checked part by part."""

from __future__ import annotations

import io
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .checkpoint_file import BrokenCheckpoint, config_sha256, read_sealed, write_sealed
from .config import SimulationConfig
from .errors import ConfigError, os_reason
from .federation import ChannelStats, CoDreamFederation, RoundRecord

if TYPE_CHECKING:  # opacus loads only for runs with DP
    from .privacy import PrivacyLedger

__all__ = ["CHECKPOINT", "checkpoint_state", "load_checkpoint", "save_checkpoint",
           "settings_digest", "verified_state"]

CHECKPOINT = "checkpoint.pt"


def _comparable(config: SimulationConfig) -> dict:
    """The sectioned config without [run] out: a run moved to another folder still resumes."""
    values = config.to_dict()
    values["run"] = {k: v for k, v in values["run"].items() if k != "out"}
    return values


def settings_digest(config: SimulationConfig) -> str:
    """SHA-256 of the settings a checkpoint belongs to: the config's canonical JSON, less --out."""
    return config_sha256(_comparable(config))


def _changed(saved: dict, now: dict) -> list[str]:
    """'[table] key' for every key whose value differs (or that only one side has)."""
    changed = []
    for table in sorted(saved.keys() | now.keys()):
        old, new = saved.get(table), now.get(table)
        if not isinstance(old, dict) or not isinstance(new, dict):
            changed += [str(table)] if old != new else []
            continue
        changed += [f"[{table}] {k}" for k in sorted(old.keys() | new.keys())
                    if old.get(k, _ABSENT) != new.get(k, _ABSENT)]
    return changed


_ABSENT = object()


def save_checkpoint(path: Path, config: SimulationConfig, fed: CoDreamFederation) -> None:
    """Seal the run's state after a round into `path`, atomically (the previous file survives
    any failure); ConfigError when the folder refuses the write."""
    try:
        write_sealed(path, checkpoint_state(config, fed), settings_digest(config))
    except OSError as error:
        raise ConfigError(f"--out: cannot write the checkpoint {path} ({os_reason(error)}); the "
                          "previous checkpoint is kept: fix the folder and rerun with "
                          "--resume") from None


def checkpoint_state(config: SimulationConfig, fed: CoDreamFederation) -> dict:
    """The run's state after a round: tensors and plain data only (weights_only loads)."""
    return {
        "config": _comparable(config),
        "round": fed.rounds[-1].round,
        "models": [m.state_dict() for m in fed.models],
        "server_model": fed.server_model.state_dict(),
        "buffer": fed.buffer.tensors() if len(fed.buffer) else None,
        "result": (fed.result.val, fed.result.test),
        "rounds": [r.__dict__ for r in fed.rounds],
        "last_dreams": fed.last_dreams,
        "channels": [(asdict(c.stats), c.bytes_up.tolist(), c.bytes_down.tolist(), c.dp_clipped)
                     for c in (fed.grad_channel, fed.label_channel)],
        "accountants": [ledger.accountant.state_dict() for ledger in _ledgers(fed)],
        "dp_epochs": [t.epochs_done for t in fed.trainers or ()],
        "broadcast_down": fed.broadcast_down.tolist(),
        "pooled_histogram": None if fed.pooled_histogram is None
        else fed.pooled_histogram.tolist(),
        "generator": None if fed.dreamer is None else fed.dreamer.state_dict(),
    }


def _ledgers(fed: CoDreamFederation) -> list[PrivacyLedger]:
    """Every accountant of the run: the client-level ledger or one per DP-SGD trainer."""
    if fed.grad_channel.ledger is not None:
        return [fed.grad_channel.ledger]
    return [t.ledger for t in fed.trainers or ()]


def _short(error: Exception, limit: int = 160) -> str:
    """An error's message on one line, cut to `limit` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _NotACheckpoint(Exception):
    """What makes a file's content unusable as a checkpoint; load_checkpoint names the file."""


_CHECKPOINT_KEYS = ("config", "round", "models", "server_model", "buffer", "result", "rounds",
                    "last_dreams", "channels", "accountants", "dp_epochs", "broadcast_down",
                    "pooled_histogram", "generator")


def _read_state(content: bytes, device: torch.device) -> dict:
    """torch.load without running code from the content; a dict with a 'config' dict."""
    try:
        state = torch.load(io.BytesIO(content), map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise _NotACheckpoint("its content is not a torch file of tensors and plain "
                              "data") from None
    except (EOFError, OSError, RuntimeError, ValueError) as error:  # torch's first sentence
        raise _NotACheckpoint(f"unreadable content: {str(error).split('. ')[0]}") from None
    if not isinstance(state, dict):
        raise _NotACheckpoint(f"it holds a {type(state).__name__}, not a dict")
    if not isinstance(state.get("config"), dict):
        raise _NotACheckpoint("it has no 'config' dict")
    return state


def verified_state(path: Path, config: SimulationConfig, device: torch.device) -> dict:
    """The state sealed in `path` once its content digest and its config digest (this run's
    settings) check out; ConfigError naming the file for a missing, truncated, corrupted,
    foreign or unreadable one."""
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {path}; start without --resume")
    try:
        sealed = read_sealed(path)
    except BrokenCheckpoint as error:
        raise ConfigError(f"--resume: {path} {error}; nothing was restored") from None
    except OSError as error:
        raise ConfigError(f"--resume: cannot read {path} ({os_reason(error)})") from None
    try:
        state = _read_state(sealed.content, device)
    except _NotACheckpoint as error:
        raise ConfigError(f"--resume: {path} is not a codream-secure checkpoint "
                          f"({error})") from None
    if sealed.config_sha256 != settings_digest(config):
        raise ConfigError(_foreign(path, state["config"], _comparable(config)))
    return state


def load_checkpoint(path: Path, config: SimulationConfig, fed: CoDreamFederation) -> int:
    """Restore `fed` from the verified state in `path`; the last round it completed.
    ConfigError for a file that fails verification or does not fit this run."""
    state = verified_state(path, config, fed.device)
    try:
        return _restore(state, fed)
    # a hand-made state with recomputed digests fails in whichever part is wrong
    except (_NotACheckpoint, ConfigError, KeyError, TypeError, ValueError, RuntimeError,
            AttributeError, IndexError) as error:
        raise ConfigError(f"--resume: {path} is not a codream-secure checkpoint "
                          f"({_short(error)})") from None


def _foreign(path: Path, saved: dict, now: dict) -> str:
    """Why a checkpoint whose config digest differs from this run's is refused."""
    changed = _changed(saved, now)
    if not changed:  # the content's config is ours, so the digest in the header was damaged
        return (f"--resume: {path} is corrupted: its config-sha256 matches neither these "
                "settings nor the ones stored inside it; nothing was restored")
    return (f"--resume: {path} was written under different settings ({', '.join(changed)}); "
            "use the same config and flags or a new --out")


def _restore(state: dict, fed: CoDreamFederation) -> int:
    """Load every part of a checkpoint into `fed`; the last round it completed."""
    missing = [key for key in _CHECKPOINT_KEYS if key not in state]
    if missing:
        raise _NotACheckpoint(f"missing {', '.join(map(repr, missing))}")
    if not isinstance(state["round"], int) or state["round"] < 0:
        raise _NotACheckpoint(f"'round' is {state['round']!r}, not a round number")
    if not isinstance(state["models"], list) or len(state["models"]) != len(fed.models):
        raise _NotACheckpoint(f"'models' should hold {len(fed.models)} client models")
    for k, (model, weights) in enumerate(zip(fed.models, state["models"], strict=True)):
        _load_weights(model, weights, f"client model {k}")
    _load_weights(fed.server_model, state["server_model"], "server model")
    if state["buffer"] is not None:
        fed.buffer.add(*_tensors(state["buffer"], 2, fed.x_test.shape[1:], "buffer"))
    if state["last_dreams"] is not None:
        (fed.last_dreams,) = _tensors((state["last_dreams"],), 1, fed.x_test.shape[1:],
                                     "last_dreams")
    fed.result.val, fed.result.test = _per_client_rows(state["result"], fed.n)
    fed.rounds = [RoundRecord(**r) for r in state["rounds"]]
    for channel, (stats, up, down, clipped) in zip((fed.grad_channel, fed.label_channel),
                                                   state["channels"], strict=True):
        channel.stats = ChannelStats(**stats)
        channel.bytes_up, channel.bytes_down = _counts(up, fed.n), _counts(down, fed.n)
        channel.dp_clipped = int(clipped)
    for ledger, accountant in zip(_ledgers(fed), state["accountants"], strict=True):
        if not isinstance(accountant, dict) or not isinstance(accountant.get("history"), list):
            raise _NotACheckpoint("an accountant state has no 'history' list")
        ledger.accountant.load_state_dict(accountant)
    for trainer, epochs in zip(fed.trainers or (), state["dp_epochs"], strict=True):
        trainer.epochs_done = int(epochs)
    # DP-SGD batches and noise come from fresh os.urandom keys: no generator state to restore
    fed.broadcast_down = _counts(state["broadcast_down"], fed.n)
    fed.pooled_histogram = _histogram(state["pooled_histogram"], fed)
    if fed.dreamer is not None:  # generator mode: the meta-generator goes on where it was
        _load_weights(fed.dreamer.meta, state["generator"], "meta-generator")
    elif state["generator"] is not None:
        raise _NotACheckpoint("it holds a meta-generator, but this run dreams in pixel mode")
    return state["round"]


def _histogram(values: object, fed: CoDreamFederation) -> np.ndarray | None:
    """The pooled class histogram a class-aware run released after warm-up."""
    if fed.teacher_kind != "class-aware":
        return None
    counts = np.asarray(values, dtype=np.float64)
    if counts.ndim != 1 or not np.isfinite(counts).all() or (counts < 0).any():
        raise _NotACheckpoint("'pooled_histogram' is not a list of class counts")
    return counts


def _load_weights(model: torch.nn.Module, weights: object, what: str) -> None:
    if not isinstance(weights, dict):
        raise _NotACheckpoint(f"the {what} is a {type(weights).__name__}, not a state dict")
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:  # torch lists every missing or mis-shaped tensor
        raise _NotACheckpoint(f"the {what} does not fit: {_short(error)}") from None


def _tensors(values: object, count: int, shape: torch.Size, what: str) -> tuple:
    """`count` tensors whose first one holds inputs of `shape` (after the batch dimension)."""
    if (not isinstance(values, (tuple, list)) or len(values) != count
            or not all(isinstance(v, torch.Tensor) for v in values)
            or values[0].dim() < 1 or values[0].shape[1:] != shape):
        raise _NotACheckpoint(f"'{what}' should be {count} tensor(s) of inputs shaped "
                              f"{tuple(shape)}")
    return tuple(values)


def _per_client_rows(pair: object, clients: int) -> tuple[list, list]:
    """(val, test) accuracies: two lists of rounds, each row one number per client."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise _NotACheckpoint("the accuracies are not a (val, test) pair")
    for rows in pair:
        if not isinstance(rows, list) or any(not isinstance(row, list) or len(row) != clients
                                             for row in rows):
            raise _NotACheckpoint(f"the accuracies do not have one entry per client ({clients})")
    return pair[0], pair[1]


def _counts(values: object, clients: int) -> np.ndarray:
    """Per-client byte counts (a list) as int64."""
    counts = np.asarray(values, dtype=np.int64)
    if counts.shape != (clients,):
        raise _NotACheckpoint(f"byte counts need one entry per client ({clients})")
    return counts
