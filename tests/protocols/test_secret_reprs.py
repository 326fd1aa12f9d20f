"""No key or step secret shows in the repr/str of the objects holding it, nor in an error."""

from __future__ import annotations

import os
import types

import numpy as np

from protocols.api import SecAggSession
from protocols.primitives import kdf, shamir
from protocols.secagg import client as client_module
from protocols.secagg import keys
from protocols.secagg.client import StepSecrets
from protocols.secagg.messages import decode_message
from protocols.session import Dropout, FaultPlan, Stage
from protocols.transport import stage_of_request

from .conftest import tap_wire


def _spellings(secret: bytes) -> list[str]:
    """How a secret would show in a log line: hex, or bytes' repr (and its inside)."""
    return [secret.hex(), repr(secret), repr(secret)[2:-1]]


def _leaks(text: str, secrets: list[bytes]) -> list[bytes]:
    return [s for s in secrets if any(spelled in text for spelled in _spellings(s))]


def test_no_secret_shows_in_any_repr_or_error(monkeypatch):
    self_seeds: list[bytes] = []

    def recording_urandom(size: int) -> bytes:
        self_seeds.append(os.urandom(size))
        return self_seeds[-1]

    n, m = 7, 16
    x = {c: np.random.default_rng(c).uniform(-1, 1, m) for c in range(n)}
    # step 1: 5 never uploads (pair seeds are revealed), 4 falls silent after the consistency
    # round (its self mask comes from shares); 2 is silent in the consistency round of step 2,
    # which is then retried as step 3
    faults = FaultPlan(dropouts=[Dropout(5, 1, Stage.UPLOAD), Dropout(4, 1, Stage.SHARES),
                                 Dropout(2, 2, Stage.CONSISTENCY)])
    session = SecAggSession(n, m, clip=1.0, protocol="secagg", rounding_seed=b"r" * 32,
                            faults=faults, threat_model="active", threshold=2)
    monkeypatch.setattr(client_module, "os", types.SimpleNamespace(urandom=recording_urandom))
    wire = tap_wire(session.network)
    session.step({c: v for c, v in x.items() if c != 5})
    assert session.step({c: x[c] for c in session.active}).included == {0, 1, 3, 6}
    # step 4 left half way (6 does not upload), so the server's step state holds revealed
    # pair seeds and consistency tokens
    server, network = session.server, session.network
    session._pending = {c: x[c] for c in session.active}

    def carry(requests):
        stage = stage_of_request(next(iter(requests.values())))
        return network.exchange(requests, step=server.last_step, stage=stage).replies

    uploads = {c: r for c, r in carry(server.open_step()).items() if c != 6}
    consistency = server.receive(carry(server.receive(uploads)))
    server.receive(carry(consistency))
    assert server._step.pair_seeds and server._step.tokens

    clients = session.network.clients
    sid = session.server.session_id
    secrets: list[bytes] = [*self_seeds]
    for c in clients.values():
        secrets.append(c._dither_secret)
        for table in (c._pair_keys, c._seal_keys, c._open_keys, c._confirm_keys):
            secrets.extend(table.values())
        secrets.extend(keys.pair_step_seed(k, session_id=sid, step=s)
                       for k in c._pair_keys.values() for s in (1, 2, 3, 4))
    shares = shamir.split(self_seeds[0], threshold=2, share_ids=[1, 2, 3])
    secrets.extend(shares.values())
    assert len(secrets) > 100 and all(len(s) >= 32 for s in secrets)

    private, public = kdf.generate_keypair()
    step_secrets = StepSecrets(0, 1, self_seeds[0], {1: secrets[-1]}, self_seeds[1],
                               "aes-256-ctr", np.arange(3))
    messages = [decode_message(data) for data in wire]
    errors = [e for _, _, e in session.network.refusals] + [
        e for _, _, e in session.server.rejections]
    shown = [session, session.server, session.server._step, step_secrets, private,
             *clients.values(), *(c._step for c in clients.values()), *messages, *errors,
             *network.missed]
    text = "\n".join(f"{obj!r}\n{obj!s}" for obj in shown)
    assert "PairwiseReveal" in text and "ConsistencyReply" in text and "ShareReveal" in text
    assert _leaks(text, secrets) == []
    # control: the same check finds a secret that is shown
    assert _leaks(repr(clients[0]._pair_keys), secrets)
