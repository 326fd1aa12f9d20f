"""`codream-secure deploy-local`: a SuperLink and one SuperNode per client on loopback, the
CoDream app run on them to the end, simulate's report folder, and every process stopped."""

from __future__ import annotations

import dataclasses
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import codream_secure

from ..config import SimulationConfig
from ..config.files import config_toml
from ..errors import ConfigError
from ..out_folder import check_output_folder
from ..report import REPORT_FILES
from .deployment import DeploymentError, LocalDeployment
from .server_role import Deadlines, check_flower_config

__all__ = ["CLIENT_APP", "SERVER_APP", "deploy_local", "flower_run_config"]

SERVER_APP = "codream_secure.flower.server_app:app"
CLIENT_APP = "codream_secure.flower.client_app:app"
DEPLOYMENT_FOLDER = "deployment"  # inside --out: the SuperLink's, SuperNodes' and run's logs


def flower_run_config(config: SimulationConfig, deadlines: Deadlines, *,
                      wait_for_nodes: float = 120.0) -> dict[str, str | float]:
    """The Flower run config that carries `config` (as simulate's TOML) and the deadlines."""
    return {"config": config_toml(config), "deadline-protocol": float(deadlines.protocol),
            "deadline-work": float(deadlines.work), "wait-for-nodes": float(wait_for_nodes)}


def _absolute(config: SimulationConfig) -> SimulationConfig:
    """Paths made absolute: the ServerApp and ClientApps run in other working folders."""
    data = config.data if config.data.data_dir is None else dataclasses.replace(
        config.data, data_dir=str(Path(config.data.data_dir).resolve()))
    run = dataclasses.replace(config.run, out=str(Path(config.run.out).resolve()))
    return dataclasses.replace(config, data=data, run=run)


def _follow(log: Path, stop: threading.Event, echo: Callable[[str], None]) -> None:
    """Echo the ServerApp's round and dropout lines from the streamed run log as they come."""
    seen = 0
    while not stop.wait(0.5):
        if not log.exists():
            continue
        lines = log.read_text(errors="replace").splitlines()
        for line in lines[seen:]:
            text = line.strip()
            if text.startswith(("warm-up:", "round ", "SuperNode ", "report written")):
                echo(text)
        seen = len(lines)


def deploy_local(config: SimulationConfig, *, deadlines: Deadlines | None = None,
                 timeout_s: float = 3600.0, echo: Callable[[str], None] = print,
                 on_start: Callable[[LocalDeployment], None] | None = None,
                 simulation: bool = False) -> Path:
    """Run `config` on a local Flower deployment; the folder holding its report.

    `on_start` sees the deployment once every SuperNode has joined (a test kills one from it).
    `simulation` runs Flower's simulation runtime (virtual SuperNodes in one Ray instance)
    instead of one SuperNode process per client.

    Raises ConfigError for what the Flower app does not run, DeploymentError (naming the
    process and its log) when a process or the run fails. Every process started is stopped
    before this returns or raises, also on Ctrl-C and SIGTERM.
    """
    check_flower_config(config)
    if config.run.baselines:
        raise ConfigError("[run] baselines need every client's data in one place; a Flower "
                          "run reports CoDream only: set baselines = [] (or --baselines none)")
    config = _absolute(config)
    out = Path(config.run.out)
    check_output_folder(out, REPORT_FILES)
    work = out / DEPLOYMENT_FOLDER
    if work.exists():  # an earlier deployment's logs and state go; anything else stays
        if not (work / "flwr-home").is_dir():
            raise ConfigError(f"--out: {work} exists and is not a deployment folder this "
                              "command wrote; move it away or choose another --out")
        shutil.rmtree(work)
    deadlines = deadlines or Deadlines()
    package_root = Path(codream_secure.__file__).resolve().parent.parent
    stop = threading.Event()
    with LocalDeployment(work, num_supernodes=config.data.clients, simulation=simulation,
                         python_path=[package_root]) as deployment:
        nodes = "simulated SuperNodes" if simulation else "SuperNodes joined"
        echo(f"SuperLink on 127.0.0.1:{deployment.port}, {config.data.clients} {nodes}; logs "
             f"in {deployment.logs}")
        follower = threading.Thread(target=_follow, args=(deployment.logs / "flwr-run-1.log",
                                                          stop, echo), daemon=True)
        follower.start()
        if on_start is not None:
            on_start(deployment)
        try:
            deployment.run(SERVER_APP, CLIENT_APP, flower_run_config(config, deadlines),
                           timeout_s=timeout_s)
        finally:
            stop.set()
            follower.join()
    if not (out / "report.json").exists():
        raise DeploymentError(f"the run finished without writing {out / 'report.json'} (logs "
                              f"in {work / 'logs'})")
    return out
