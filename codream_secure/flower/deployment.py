"""A Flower 1.42 deployment on one machine: a SuperLink, SuperNodes and `flwr run`, on loopback.

Every process runs Flower's own command-line tools, so this module never imports flwr. Each one
starts in its own session with a private FLWR_HOME, free ports, telemetry, update checks and
runtime dependency installation off (nothing downloads), and an environment marker that its
descendants inherit; closing the deployment signals every process group it saw, then sweeps
anything still carrying the marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from ..config.files import toml_literal
from .certificates import NodeKeys, TlsFiles, make_node_keys
from .processes import (
    HOST,
    MARKER,
    Child,
    DeploymentError,
    Node,
    descendants,
    executable,
    exit_on_sigterm,
    free_port,
    listening,
    live_processes,
    port_taken,
    proc_stat,
)

__all__ = ["CONNECTION", "MARKER", "DeploymentError", "LocalDeployment", "RunFailed",
           "RunResult", "app_pyproject", "live_processes", "node_config_arg", "toml_value"]

CONNECTION = "codream-local"
Scalar = str | int | float | bool
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_RUN_ID = re.compile(r"Successfully started run (\d+)")


class RunFailed(DeploymentError):
    """`flwr run` ended, but the run's status is not `finished:completed`."""


@dataclass(frozen=True)
class RunResult:
    """One finished run: its id, its status on the SuperLink, and where `flwr run` logged."""

    run_id: int
    status: str
    seconds: float
    log: Path


def toml_value(value: Scalar) -> str:
    """A flat config value as TOML, as `--node-config` and `[tool.flwr.app.config]` read it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if any(c in value for c in "\"'\n\\"):
        raise ValueError(f"config value {value!r} holds a quote, backslash or newline")
    return f'"{value}"'


def node_config_arg(config: Mapping[str, Scalar]) -> str:
    """`--node-config` text: space-separated key=value pairs."""
    for key in config:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise ValueError(f"config key {key!r} must be letters, digits, '-' or '_'")
    return " ".join(f"{key}={toml_value(value)}" for key, value in config.items())


def app_pyproject(server_app: str, client_app: str, run_config: Mapping[str, Scalar]) -> str:
    """A minimal Flower app declaration; the run config is declared here so runs can read it."""
    lines = ['[project]', 'name = "codream-flower-run"', 'version = "1.0.0"',
             'description = "CoDream on Flower"', 'license = "Apache-2.0"', "dependencies = []",
             "", "[tool.flwr.app]", 'publisher = "codream-secure"', "",
             "[tool.flwr.app.components]", f"serverapp = {toml_value(server_app)}",
             f"clientapp = {toml_value(client_app)}", "", "[tool.flwr.app.config]"]
    node_config_arg({key: 0 for key in run_config})  # the same key rules
    lines += [f"{key} = {toml_literal(value)}" for key, value in run_config.items()]
    return "\n".join(lines) + "\n"


class LocalDeployment:
    """A SuperLink and `num_supernodes` SuperNodes on loopback; a context manager.

    SuperNode k gets ``partition-id=k num-partitions=num_supernodes`` plus `node_config`.
    With `tls` every API speaks TLS and SuperNodes trust `tls.ca_certificate`; with
    `supernode_auth` the SuperLink admits only SuperNodes whose public key was registered
    (`register`), and the default SuperNodes get fresh keys registered before they start.
    With `simulation` the SuperLink runs Flower's simulation runtime instead: its
    `num_supernodes` virtual SuperNodes live in one Ray instance (the `flower` extra's
    `flwr[simulation]`), and no SuperNode process is started. Leaving the block (normally, by
    an exception, Ctrl-C or SIGTERM) stops every process.
    """

    def __init__(self, folder: Path, *, num_supernodes: int,
                 node_config: Mapping[str, Scalar] | None = None, tls: TlsFiles | None = None,
                 supernode_auth: bool = False, simulation: bool = False,
                 python_path: Sequence[Path] = (),
                 log_dir: Path | None = None, startup_timeout_s: float = 90.0,
                 grace_s: float = 5.0) -> None:
        if supernode_auth and tls is None:
            raise ValueError("SuperNode authentication needs TLS: Flower 1.42 refuses it without")
        if num_supernodes < 0:
            raise ValueError(f"num_supernodes must be >= 0, got {num_supernodes}")
        if simulation and (tls is not None or supernode_auth):
            raise ValueError("the simulation runtime runs its SuperNodes inside the SuperLink: "
                             "no TLS or SuperNode authentication to set up")
        self.folder, self.num_supernodes, self.tls = folder, num_supernodes, tls
        self.simulation = simulation
        self.node_config, self.supernode_auth = dict(node_config or {}), supernode_auth
        self.python_path = python_path
        self.startup_timeout_s, self.grace_s = startup_timeout_s, grace_s
        self.logs = log_dir or folder / "logs"
        self.home = folder / "flwr-home"
        self.marker = uuid.uuid4().hex
        self.port = 0
        self.startup_seconds: dict[str, float] = {}
        self.seen_pids: set[int] = set()
        self.seen_pgids: set[int] = set()
        self.superlink: Child | None = None
        self._children: list[Child] = []
        self._nodes: list[Node] = []
        self._runs = 0
        self._closed = False
        self._sigterm_installed = False
        self._previous_sigterm: object = None

    def __enter__(self) -> LocalDeployment:
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, exit_on_sigterm)
            self._sigterm_installed = True
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        """Start the SuperLink, write the connection, register keys, start and await the nodes."""
        for folder in (self.logs, self.home, self.folder / "apps"):
            folder.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        self._start_superlink()
        self.startup_seconds["superlink listening"] = time.monotonic() - began
        self._write_connection()
        for k in range(0 if self.simulation else self.num_supernodes):
            keys = None
            if self.supernode_auth:
                keys = make_node_keys(self.folder / "keys", f"supernode-{k}")
                self.register(keys.public_key)
            self.add_supernode(k, keys=keys)
        for k in range(0 if self.simulation else self.num_supernodes):
            self.wait_until_joined(k)
        self.startup_seconds["supernodes joined"] = time.monotonic() - began

    # -- processes ------------------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ, FLWR_HOME=str(self.home), FLWR_TELEMETRY_ENABLED="0",
                   FLWR_DISABLE_UPDATE_CHECK="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
        env[MARKER] = self.marker
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        paths = [str(p) for p in self.python_path] + [p for p in [env.get("PYTHONPATH")] if p]
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
        return env

    def _spawn(self, name: str, argv: list[str], log: Path) -> Child:
        child = Child(name, argv, log, self._environment(), self.folder)
        self._children.append(child)
        self.seen_pids.add(child.popen.pid)
        self.seen_pgids.add(child.popen.pid)
        return child

    def _start_superlink(self) -> None:
        tls = self.tls
        security = (["--ssl-certfile", str(tls.server_certificate), "--ssl-keyfile",
                     str(tls.server_key), "--ssl-ca-certfile", str(tls.ca_certificate)]
                    if tls else ["--insecure"])
        for _ in range(3):
            self.port = free_port()
            argv = [executable("flower-superlink"), *security, "--host", HOST,
                    "--port", str(self.port), "--disable-runtime-dependency-installation"]
            argv += ["--enable-supernode-auth"] if self.supernode_auth else []
            argv += ["--simulation"] if self.simulation else []
            superlink = self._spawn("superlink", argv, self.logs / "superlink.log")
            deadline = time.monotonic() + self.startup_timeout_s
            while superlink.popen.poll() is None and not listening(self.port):
                if time.monotonic() > deadline:
                    raise superlink.error(f"did not listen on port {self.port}")
                time.sleep(0.2)
            if superlink.popen.poll() is None:
                self.superlink = superlink
                return
            if not port_taken(superlink):
                raise superlink.error(f"exited with status {superlink.popen.returncode}")
        raise superlink.error("found no free port in 3 tries")

    def _write_connection(self) -> None:
        """The `flwr` CLI reads SuperLink connections from FLWR_HOME/config.toml."""
        security = (f"root-certificates = {toml_value(str(self.tls.ca_certificate))}"
                    if self.tls else "insecure = true")
        # the simulation runtime's virtual SuperNodes: one CPU each, in one Ray instance
        simulated = (f"options.num-supernodes = {self.num_supernodes}\n"
                     "options.backend.client-resources.num-cpus = 1\n"
                     f"options.backend.init-args.num-cpus = {os.cpu_count() or 1}\n"
                     if self.simulation else "")
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{HOST}:{self.port}"\n{security}\n{simulated}')

    def add_supernode(self, partition_id: int, *, keys: NodeKeys | None = None,
                      trust_ca: bool = True, max_wait_s: float | None = None,
                      extra_config: Mapping[str, Scalar] | None = None) -> int:
        """Start one more SuperNode (not awaited); its index for the other SuperNode methods.

        `keys` authenticates it; `trust_ca=False` leaves out the CA certificate (the node then
        checks the SuperLink against the system's trust store); `max_wait_s` bounds its retries.
        """
        config = {"partition-id": partition_id, "num-partitions": self.num_supernodes,
                  **self.node_config, **(extra_config or {})}
        argv = [executable("flower-supernode"), "--superlink", f"{HOST}:{self.port}",
                "--host", HOST, "--node-config", node_config_arg(config)]
        if self.tls is None:
            argv.append("--insecure")
        elif trust_ca:
            argv += ["--root-certificates", str(self.tls.ca_certificate)]
        if keys is not None:
            argv += ["--auth-supernode-private-key", str(keys.private_key)]
        if max_wait_s is not None:
            argv += ["--max-wait-time", str(max_wait_s)]
        index = len(self._nodes)

        def argv_on(port: int) -> list[str]:
            return [*argv, "--port", str(port)]

        log = self.logs / f"supernode-{index}.log"
        self._nodes.append(Node(self._spawn(f"supernode {index}", argv_on(free_port()), log),
                                 argv_on))
        return index

    def _node(self, k: int) -> Child:
        """SuperNode k, restarted on a fresh port (twice at most) if another process took it."""
        node = self._nodes[k]
        if node.child.popen.poll() is not None and port_taken(node.child) and node.restarts < 2:
            node.restarts += 1
            node.child = self._spawn(node.child.name, node.argv_on(free_port()), node.child.log)
        return node.child

    def supernode_log(self, k: int) -> str:
        """Everything SuperNode k logged so far."""
        return self._nodes[k].child.log.read_text(errors="replace")

    def supernode_id(self, k: int) -> int | None:
        """The node id SuperNode k got from the SuperLink, or None if it never joined."""
        match = _NODE_ID.search(self.supernode_log(k))
        return int(match[1]) if match else None

    def wait_until_joined(self, k: int, timeout_s: float | None = None) -> int:
        """SuperNode k's node id once it joined; DeploymentError if it exits or times out."""
        deadline = time.monotonic() + (timeout_s or self.startup_timeout_s)
        while (node_id := self.supernode_id(k)) is None:
            child = self._node(k)
            if child.popen.poll() is not None:
                raise child.error(f"exited with status {child.popen.returncode} before joining")
            if time.monotonic() > deadline:
                raise child.error("did not join the SuperLink in time")
            time.sleep(0.2)
        return node_id

    def wait_until_exited(self, k: int, timeout_s: float) -> int:
        """SuperNode k's exit status; DeploymentError if it still runs after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while (status := self._node(k).popen.poll()) is None:
            if time.monotonic() > deadline:
                raise self._node(k).error(f"still runs after {timeout_s} s")
            time.sleep(0.2)
        return status

    def kill_supernode(self, k: int) -> None:
        """Kill SuperNode k and everything it started at once (SIGKILL), as a crash would."""
        child = self._node(k)
        if child.popen.poll() is None:
            self._signal_groups(signal.SIGKILL, [child])
        child.popen.wait()
        deadline = time.monotonic() + 5
        while live_processes(pgids=[child.popen.pid]) and time.monotonic() < deadline:
            time.sleep(0.1)

    # -- the flwr CLI ---------------------------------------------------------------------

    def flwr(self, *args: str, timeout_s: float = 120.0) -> str:
        """Run `flwr *args` against this deployment (FLWR_HOME, environment); its stdout."""
        with (self.logs / "flwr-cli.log").open("ab") as log:
            log.write(f"$ flwr {' '.join(args)}\n".encode())
            log.flush()
            try:
                done = subprocess.run([executable("flwr"), *args], stdout=subprocess.PIPE,
                                      stderr=log, stdin=subprocess.DEVNULL, cwd=self.folder,
                                      env=self._environment(), timeout=timeout_s,
                                      start_new_session=True, check=False)
            except subprocess.TimeoutExpired as late:
                raise DeploymentError(f"flwr {' '.join(args)} did not finish within "
                                      f"{timeout_s} s (log {log.name})") from late
            log.write(done.stdout)
        if done.returncode:
            tail = "\n".join((self.logs / "flwr-cli.log").read_text().splitlines()[-25:])
            raise DeploymentError(f"flwr {args[0]} exited with status {done.returncode} "
                                  f"(log {self.logs / 'flwr-cli.log'}):\n{tail}")
        return done.stdout.decode(errors="replace")

    def _flwr_json(self, *args: str) -> dict[str, Any]:
        text = self.flwr(*args, CONNECTION, "--format", "json")
        return dict(json.loads(text[text.index("{"):]))

    def register(self, public_key: Path) -> int:
        """Register a SuperNode's public key (`flwr supernode register`); the node id it gets."""
        return int(self._flwr_json("supernode", "register", str(public_key))["node-id"])

    def online_node_ids(self) -> list[int]:
        """Node ids the SuperLink lists as online (`flwr supernode ls`)."""
        nodes = self._flwr_json("supernode", "ls")["nodes"]
        return sorted(int(n["node-id"]) for n in nodes if n["status"] == "online")

    def run_status(self, run_id: int) -> str:
        """The run's status on the SuperLink, e.g. `finished:completed` (`flwr ls --run-id`)."""
        runs = self._flwr_json("ls", "--run-id", str(run_id))["runs"]
        return str(runs[0]["status"])

    def run(self, server_app: str, client_app: str, run_config: Mapping[str, Scalar] | None = None,
            *, timeout_s: float = 600.0, check: bool = True) -> RunResult:
        """Write an app for the two `module:attribute` components and `flwr run` it to the end.

        RunFailed (with `check`) when the run's status is not `finished:completed`;
        DeploymentError when `flwr run` fails, times out, or the SuperLink dies meanwhile.
        """
        if self.superlink is None:
            raise DeploymentError("start the deployment before running an app")
        self._runs += 1
        app = self.folder / "apps" / f"run-{self._runs}"
        app.mkdir(parents=True, exist_ok=True)
        (app / "pyproject.toml").write_text(app_pyproject(server_app, client_app, run_config or {}))
        runner = self._spawn(f"flwr run {self._runs}",
                             [executable("flwr"), "run", str(app), CONNECTION, "--stream"],
                             self.logs / f"flwr-run-{self._runs}.log")
        began = time.monotonic()
        while runner.popen.poll() is None:
            if self.superlink.popen.poll() is not None:
                raise self.superlink.error("exited during a run")
            if time.monotonic() - began > timeout_s:
                self._signal_groups(signal.SIGKILL, [runner])
                raise runner.error(f"did not finish within {timeout_s} s")
            time.sleep(0.2)
        seconds = time.monotonic() - began
        match = _RUN_ID.search(runner.log.read_text(errors="replace"))
        if runner.popen.returncode or match is None:
            raise runner.error(f"exited with status {runner.popen.returncode}")
        run_id = int(match[1])
        status = self.run_status(run_id)
        if check and status != "finished:completed":
            raise RunFailed(f"{runner.name} (run {run_id}) ended {status} "
                            f"(log {runner.log}):\n{runner.tail()}")
        return RunResult(run_id, status, seconds, runner.log)

    # -- stopping -------------------------------------------------------------------------

    def _our_groups(self, children: Sequence[Child], marker: bool) -> set[int]:
        """Groups holding a live process of `children`, of their descendants, or the marker."""
        roots = [c.popen.pid for c in children if c.popen.poll() is None]
        pids = set(roots) | descendants(roots)
        pids |= live_processes(self.marker) if marker else set()
        groups = {stat[2] for pid in pids if (stat := proc_stat(pid)) and stat[0] != "Z"}
        self.seen_pids |= pids
        self.seen_pgids |= groups
        return groups

    def _signal_groups(self, sig: int, children: Sequence[Child], marker: bool = False) -> None:
        for group in self._our_groups(children, marker) - {os.getpgrp()}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)

    def close(self) -> None:
        """Stop every process: SIGTERM to each group holding one, SIGKILL after `grace_s`.

        A process counts as the deployment's if it was started here, descends from one that
        was, or carries the marker (a descendant whose parent is gone still has it).
        """
        if self._closed:
            return
        self._closed = True
        main = threading.current_thread() is threading.main_thread()
        if main:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            # a killed process can take seconds to go on a loaded machine (Ray's workers and
            # shared-memory store among them): wait for it, returning as soon as all are gone
            for sig, wait_s in ((signal.SIGTERM, self.grace_s), (signal.SIGKILL, 20.0)):
                self._signal_groups(sig, self._children, marker=True)
                deadline = time.monotonic() + wait_s
                while self._our_groups(self._children, True) and time.monotonic() < deadline:
                    time.sleep(0.1)
            for child in self._children:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.popen.wait(timeout=5)
        finally:
            if self._sigterm_installed:
                previous = self._previous_sigterm
                signal.signal(signal.SIGTERM, previous if previous is not None  # type: ignore[arg-type]
                              else signal.SIG_DFL)
            if main:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
