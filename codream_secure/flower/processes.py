"""The processes of a local Flower deployment: started in their own sessions with their logs in
files, found again through /proc (pid, parent, process group, an environment marker), and
signalled group by group. Linux only, like the deployment that uses them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import CoDreamError

__all__ = ["HOST", "MARKER", "Child", "DeploymentError", "Node", "all_pids", "descendants",
           "executable", "exit_on_sigterm", "free_port", "listening", "live_processes",
           "port_taken", "proc_stat"]

MARKER = "CODREAM_FLOWER_DEPLOYMENT"
HOST = "127.0.0.1"


class DeploymentError(CoDreamError):
    """A deployment process failed; the message names it and ends with its log's tail."""


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a live process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid, pgid = text[text.rindex(")") + 2:].split()[:3]
    return state, int(ppid), int(pgid)


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def live_processes(marker: str = "", pids: Sequence[int] = (),
                   pgids: Sequence[int] = ()) -> set[int]:
    """Live (not zombie) processes carrying `marker`, listed in `pids`, or in a group of `pgids`."""
    needle = f"{MARKER}={marker}\0".encode()
    found = set()
    for pid in all_pids():
        stat = proc_stat(pid)
        if stat is None or stat[0] == "Z" or pid == os.getpid():
            continue
        if pid in pids or stat[2] in pgids:
            found.add(pid)
        elif marker:
            try:
                if needle in Path(f"/proc/{pid}/environ").read_bytes():
                    found.add(pid)
            except OSError:
                pass
    return found


def descendants(roots: Sequence[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        if (stat := proc_stat(pid)) is not None:
            children.setdefault(stat[1], []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def listening(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Child:
    """One started command in its own session, logging to a file."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str],
                 cwd: Path) -> None:
        self.name, self.log = name, log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                          start_new_session=True)

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            text = []
        return "\n".join(text)

    def error(self, what: str) -> DeploymentError:
        return DeploymentError(f"{self.name} {what} (log {self.log}):\n{self.tail()}")


def executable(name: str) -> str:
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    if found := shutil.which(name):
        return found
    raise DeploymentError(f"{name} not found beside {sys.executable}: "
                          "install codream-secure[flower] (flwr 1.42)")


@dataclass
class Node:
    """A SuperNode: its current process and its command line for a given Runtime API port."""

    child: Child
    argv_on: Callable[[int], list[str]]
    restarts: int = 0


def port_taken(child: Child) -> bool:
    return "address already in use" in child.tail(60).lower()


def exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)
