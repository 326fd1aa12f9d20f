"""The types report.json's rendered sections must have (docs/report-schema.md), checked before
rendering so that a damaged or hand-edited file is refused by name instead of crashing a plot."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["InvalidReport", "validate_report"]


class InvalidReport(ValueError):
    """A report.json field of the wrong type or shape; load_report names the file."""


def _expect(ok: bool, where: str, what: str, value: Any) -> None:
    if not ok:
        found = "null" if value is None else f"{type(value).__name__} {json.dumps(value)[:60]}"
        raise InvalidReport(f"{where} must be {what}, found {found}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _object(value: Any, where: str) -> dict:
    _expect(isinstance(value, dict), where, "an object", value)
    return value


def _numbers(value: Any, where: str) -> list:
    _expect(isinstance(value, list) and all(map(_is_number, value)), where,
            "a list of numbers", value)
    return value


def _optional_numbers(section: dict, keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        value = section.get(key)
        _expect(value is None or _is_number(value), f"{where}.{key}", "a number or null", value)


def _optional_objects(section: dict, keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        if section.get(key) is not None:
            _object(section[key], f"{where}.{key}")


def validate_report(report: dict) -> None:
    """Check the types that rendering (markdown, plots, the CLI summary) relies on."""
    for table, keys in _object(report["config"], "config").items():  # {table: {key: value}}
        _object(keys, f"config.{table}")
    if report.get("privacy") is not None:
        _object(report["privacy"], "privacy")
    for key in ("versions", "seeds", "machine", "dataset", "aggregator", "timing",
                "baseline_curves"):
        if key in report:
            _object(report[key], key)
    _validate_rounds(report["rounds"])
    _validate_final(_object(report["final"], "final"))
    for method, curve in (report.get("baseline_curves") or {}).items():
        test = _object(curve, f"baseline_curves.{method}").get("test") or []
        _expect(isinstance(test, list), f"baseline_curves.{method}.test", "a list", test)
        for r, row in enumerate(test):
            _numbers(row, f"baseline_curves.{method}.test[{r}]")
    _validate_details(report)


def _validate_rounds(rounds: Any) -> None:
    _expect(isinstance(rounds, list) and len(rounds) > 0, "rounds",
            "a non-empty list (round 0 is after warm-up)", rounds)
    clients = None
    for i, record in enumerate(rounds):
        where = f"rounds[{i}]"
        _object(record, where)
        _expect(isinstance(record.get("round"), int) and not isinstance(record["round"], bool),
                f"{where}.round", "an integer", record.get("round"))
        codream = _object(record.get("codream"), f"{where}.codream")
        test = _numbers(codream.get("test"), f"{where}.codream.test")
        _numbers(codream.get("val", []), f"{where}.codream.val")
        _expect(_is_number(codream.get("mean_test")), f"{where}.codream.mean_test", "a number",
                codream.get("mean_test"))
        clients = clients or len(test)
        _expect(len(test) == clients > 0, f"{where}.codream.test",
                f"one accuracy per client ({clients or 'at least one'}, as in rounds[0])", test)
        for key in ("bytes_up", "bytes_down"):
            _numbers(record.get(key, []), f"{where}.{key}")
        seconds = _object(record.get("seconds", {}), f"{where}.seconds")
        _optional_numbers(seconds, ("local", "dreams", "aggregation", "distill"),
                          f"{where}.seconds")
        _optional_numbers(record, ("epsilon", "skipped_batches"), where)


def _validate_final(final: dict) -> None:
    for method, result in final.items():
        where = f"final.{method}"
        _object(result, where)
        _optional_numbers(result, ("mean_accuracy", "last_round_mean_accuracy"), where)
        _numbers(result.get("per_client_accuracy") or [], f"{where}.per_client_accuracy")


def _validate_details(report: dict) -> None:
    """The optional sections: aggregator, dataset, timing, privacy."""
    agg = report.get("aggregator") or {}
    _optional_objects(agg, ("masking", "unmasking", "scale_bits", "error_bound_per_step",
                            "measured"), "aggregator")
    _optional_numbers(agg.get("measured") or {}, ("max_abs_error_vs_plain",
                                                  "mean_abs_error_vs_plain"),
                      "aggregator.measured")
    data = report.get("dataset") or {}
    for key in ("client_sizes", "client_label_histograms"):
        _expect(isinstance(data.get(key, []), list), f"dataset.{key}", "a list", data.get(key))
    _expect(isinstance(data.get("input_shape") or [], list), "dataset.input_shape", "a list",
            data.get("input_shape"))
    timing = report.get("timing") or {}
    _optional_numbers(timing, ("total_seconds",), "timing")
    _optional_objects(timing, ("baseline_seconds",), "timing")
    baseline_seconds = timing.get("baseline_seconds") or {}
    _optional_numbers(baseline_seconds, tuple(baseline_seconds), "timing.baseline_seconds")
    privacy = report.get("privacy") or {}
    _optional_objects(privacy, ("accountant_state",), "privacy")
    clients = privacy.get("clients") or []
    _expect(isinstance(clients, list) and all(isinstance(c, dict) for c in clients),
            "privacy.clients", "a list of objects", clients)
    if privacy.get("enabled"):  # the privacy plot labels its axis with delta
        _expect(_is_number(privacy.get("delta")), "privacy.delta", "a number",
                privacy.get("delta"))
