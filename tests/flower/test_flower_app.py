"""The ServerApp and ClientApp over an in-memory Flower grid: Flower's own Message, RecordDict
and Context types, client state kept only in context.state, and nodes that die, err or answer
garbage."""

from __future__ import annotations

import json

import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import Context, RecordDict  # noqa: E402

from codream_secure.config import SimulationConfig  # noqa: E402
from codream_secure.flower import client_app, server_app  # noqa: E402
from codream_secure.flower.link import GridLink  # noqa: E402
from codream_secure.flower.payload import Payload  # noqa: E402
from codream_secure.simulation import run_simulation  # noqa: E402
from tests.core.tiny_runs import write_toml  # noqa: E402
from tests.flower.memory_grid import MemoryGrid  # noqa: E402
from tests.flower.test_remote_run import FAST  # noqa: E402


def _run(tmp_path, behaviour=None, *, name="flower", **keys) -> tuple[dict, MemoryGrid]:
    keys = {**FAST, **keys, "out": str(tmp_path / name)}
    toml = write_toml(tmp_path / f"{name}.toml", **keys).read_text()
    run_config = {"config": toml, "deadline-protocol": 0.3, "deadline-work": 0.6,
                  "wait-for-nodes": 1.0}
    grid = MemoryGrid(client_app.app, keys["clients"], run_config, behaviour)
    server_app.app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                 run_config=run_config))
    return json.loads((tmp_path / name / "report.json").read_text()), grid


def test_the_flower_app_gives_simulates_run_with_plain_sums(tmp_path):
    report, grid = _run(tmp_path, aggregator="plain")
    local = run_simulation(SimulationConfig.from_keys(
        **{**FAST, "aggregator": "plain", "out": str(tmp_path / "local")})).report
    assert [r["codream"] for r in report["rounds"]] == [r["codream"] for r in local["rounds"]]
    assert report["runtime"]["supernodes"] == {"0": 101, "1": 102, "2": 103}
    for context in grid.contexts.values():  # what survives between messages, and only that
        assert set(context.state.array_records) == {"codream.model"}


def test_secure_sums_keep_each_clients_protocol_state_in_its_context(tmp_path):
    report, grid = _run(tmp_path, aggregator="secagg")
    for context in grid.contexts.values():
        saved = context.state.config_records["codream.protocol"]
        assert set(saved) == {"dream", "labels"} and all(isinstance(v, bytes)
                                                         for v in saved.values())
    assert report["runtime"]["departures"] == [] and report["aggregator"]["threshold"] == 2
    assert (tmp_path / "flower" / "report.md").exists()


_SILENT = "no reply before the 0.3 s deadline"


# per node: 1 hello, 2 warm-up (with round 1's local training), 3 key offer, 4 roster, 5 upload,
# 6 consistency, 7 shares (the stages of the first dream sum), 8 the second batch's upload,
# 11-12 the soft-label session's offer and roster
@pytest.mark.parametrize(("fate", "at_message", "reason", "stage"), [
    ("silent", 3, _SILENT, "advertise"), ("silent", 4, _SILENT, "roster"),
    ("silent", 5, _SILENT, "upload"), ("silent", 6, _SILENT, "consistency"),
    ("silent", 7, _SILENT, "shares"), ("error", 8, "error reply: node unavailable", "upload"),
    ("garbage", 12, "undecodable reply", "roster")])
def test_a_node_that_fails_mid_run_is_a_protocol_dropout(tmp_path, fate, at_message, reason,
                                                         stage):
    def fails(node, count):
        return fate if node == 103 and count >= at_message else None

    report, _ = _run(tmp_path, fails, aggregator="secagg", clients=4)
    departures = report["runtime"]["departures"]
    assert [d["client"] for d in departures] == [2]
    assert reason in departures[0]["reason"] and departures[0]["stage"] == stage
    assert report["runtime"]["survivors"] == [0, 1, 3]
    assert report["rounds"][-1]["note"] == ""  # the survivors finished the run together
    assert 2 not in report["rounds"][-1]["included_in_dreams"]


def test_a_node_serving_a_partition_of_another_run_is_refused(tmp_path):
    config = {**FAST, "out": str(tmp_path / "x")}
    toml = write_toml(tmp_path / "x.toml", **config).read_text()
    grid = MemoryGrid(client_app.app, 3, {"config": toml}, node_config={"num-partitions": 5})
    link = GridLink(grid, {c: 101 + c for c in range(3)})
    answered = link.call({0: Payload("hello")}, deadline=1.0)
    assert "num-partitions=5" in answered.replies[0].refused


def test_the_grid_link_waits_no_longer_than_its_deadline():
    class NeverAnswers(MemoryGrid):
        def push_messages(self, messages):
            ids = []
            for i, message in enumerate(messages):
                message.metadata.__dict__["_message_id"] = f"id{i}"
                ids.append(f"id{i}")
            return ids

        def pull_messages(self, ids):
            return []

    now = [0.0]
    link = GridLink(NeverAnswers(client_app.app, 2, {}), {0: 101, 1: 102}, poll=0.5,
                    clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    answered = link.call({0: Payload("hello"), 1: Payload("hello")}, deadline=2.0)
    assert answered.replies == {} and now[0] == pytest.approx(2.0)
    assert answered.missed == {0: "no reply before the 2 s deadline",
                               1: "no reply before the 2 s deadline"}


def test_large_protocol_messages_travel_as_arrays_and_come_back_byte_for_byte():
    import numpy as np

    from codream_secure.flower.payload import Reply
    from codream_secure.flower.records import (
        LARGE_BYTES,
        payload_from_content,
        payload_to_content,
        reply_from_content,
        reply_to_content,
    )

    big, small = bytes(range(256)) * (LARGE_BYTES // 128), b"\x00tiny"
    content = payload_to_content(Payload("secure", {"request": big, "purpose": "dream"},
                                         {"meta": np.ones(3, np.float32)}))
    assert "request" not in content.config_records["codream"]
    assert payload_from_content(content).values["request"] == big
    back = reply_from_content(reply_to_content(Reply({"reply": small, "other": big})))
    assert back.values == {"reply": small, "other": big}


def test_baselines_in_the_config_are_left_out_of_a_flower_run_and_its_report(tmp_path):
    report, _ = _run(tmp_path, aggregator="plain", rounds=1, baselines=("isolated",))
    assert report["config"]["run"]["baselines"] == [] and set(report["final"]) == {"codream"}
