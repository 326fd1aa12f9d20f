"""Fault plans: malformed ones are refused up front; a dropped client stays dropped."""

from __future__ import annotations

import re

import numpy as np
import pytest

from protocols import Dropout, FaultPlan, SecAggSession, Stage, secure_sum
from protocols.errors import ParameterError, TooFewSurvivorsError
from protocols.paillier.session import PaillierSession, paillier_sum
from protocols.registry import open_session

from .conftest import known_answer_keypair

N, M = 6, 5
X = np.random.default_rng(7).uniform(-1, 1, (N, M))
KEYPAIR = known_answer_keypair()


def _exact(clients) -> np.ndarray:
    return X[sorted(clients)].sum(axis=0)


@pytest.mark.parametrize(("build", "field"), [
    (lambda: Dropout(-1, 1, Stage.UPLOAD), "Dropout.client"),
    (lambda: Dropout(1.0, 1, Stage.UPLOAD), "Dropout.client"),
    (lambda: Dropout(True, 1, Stage.UPLOAD), "Dropout.client"),
    (lambda: Dropout("2", 1, Stage.UPLOAD), "Dropout.client"),
    (lambda: Dropout(2, -1, Stage.UPLOAD), "Dropout.step"),
    (lambda: Dropout(2, "1", Stage.UPLOAD), "Dropout.step"),
    (lambda: Dropout(2, 1.5, Stage.UPLOAD), "Dropout.step"),
    (lambda: Dropout(2, None, Stage.UPLOAD), "Dropout.step"),
    (lambda: Dropout(2, 1, "sometime"), "Dropout.stage"),
    (lambda: Dropout(2, 1, 3), "Dropout.stage"),
    (lambda: Dropout(2, 0, Stage.UPLOAD), "step 0 is the key setup"),
    (lambda: Dropout(2, 1, Stage.ADVERTISE), "step 0 is the key setup"),
    (lambda: FaultPlan(late={(1, 9)}).check(N), "FaultPlan.late client"),
    (lambda: FaultPlan(late={(0, 1)}).check(N), "FaultPlan.late step"),
    (lambda: FaultPlan(late={(1,)}).check(N), "FaultPlan.late entries"),
    (lambda: FaultPlan(tamper={(1, 2, "nowhere")}).check(N), "FaultPlan.tamper stage"),
    (lambda: FaultPlan(tamper={(1, -2, Stage.UPLOAD)}).check(N), "FaultPlan.tamper client"),
    (lambda: FaultPlan(tamper={(0, 2, Stage.ROSTER)}).check(N), "roster has no reply"),
    (lambda: FaultPlan(dropouts=[(2, 1, "upload")]).check(N), "not a Dropout"),
    (lambda: FaultPlan([Dropout(N, 1, Stage.UPLOAD)]).check(N), "Dropout.client must be a "
                                                                "client id below 6"),
    (lambda: FaultPlan.random(N, rate=0.5, stage="later"), "dropout stage"),
])
def test_a_malformed_fault_is_refused_naming_its_field(build, field):
    with pytest.raises(ParameterError, match=re.escape(field)):
        build()


def test_sessions_refuse_a_malformed_plan_before_running_anything():
    with pytest.raises(ParameterError, match=r"Dropout\.client must be a client id below 6"):
        secure_sum(X, protocol="secagg", clip=1.0, dropouts=[Dropout(6, 1, Stage.UPLOAD)])
    with pytest.raises(ParameterError, match=r"FaultPlan\.tamper client"):
        SecAggSession(N, M, clip=1.0, faults=FaultPlan(tamper={(1, 7, Stage.UPLOAD)}))
    session = SecAggSession(N, M, clip=1.0)
    with pytest.raises(ParameterError, match=r"Dropout\.client"):
        session.network.add_dropouts([Dropout(40, 2, Stage.UPLOAD)])


def test_string_stages_and_numpy_ints_are_read_as_what_they_name():
    dropout = Dropout(np.int64(2), np.int32(1), "shares")
    assert (dropout.client, dropout.step, dropout.stage) == (2, 1, Stage.SHARES)
    assert type(dropout.client) is int
    plan = FaultPlan(tamper={(1, 2, "upload")}).check(N)
    assert plan.tamper == {(1, 2, Stage.UPLOAD)}


@pytest.mark.parametrize("stage", [Stage.ADVERTISE, Stage.ROSTER])
@pytest.mark.parametrize("protocol", ["secagg", "secagg+"])
def test_a_client_silent_during_key_setup_leaves_the_sum_of_the_others(stage, protocol):
    result = secure_sum(X, protocol=protocol, clip=1.0, dropouts=[Dropout(2, 0, stage)])
    assert result.included == (0, 1, 3, 4, 5) and result.dropped == (2,)
    assert np.abs(result.total - _exact(result.included)).max() <= result.error_bound
    session = SecAggSession(N, M, clip=1.0, protocol=protocol,
                            faults=FaultPlan([Dropout(2, 0, stage)]))
    # the caller may hand every client's vector: the one that left at setup stays out
    outcome = session.step({c: X[c] for c in range(N)}, drop_after_upload=[2])
    assert outcome.included == {0, 1, 3, 4, 5}
    assert np.abs(outcome.total - _exact(outcome.included)).max() <= session.error_bound(5)


def test_setup_dropouts_below_the_threshold_raise_too_few():
    with pytest.raises(TooFewSurvivorsError, match="key advertisement"):
        secure_sum(X, protocol="secagg", clip=1.0, threshold=4,
                   dropouts=[Dropout(c, 0, Stage.ADVERTISE) for c in (0, 1, 2)])


def test_the_earliest_of_two_dropouts_wins_whatever_their_order():
    for dropouts in ([Dropout(2, 1, Stage.UPLOAD), Dropout(2, 3, Stage.SHARES)],
                     [Dropout(2, 3, Stage.SHARES), Dropout(2, 1, Stage.UPLOAD)]):
        assert FaultPlan(dropouts).silent_from() == {2: Dropout(2, 1, Stage.UPLOAD).point}
        session = SecAggSession(N, M, clip=1.0, protocol="secagg", faults=FaultPlan(dropouts))
        for _ in range(3):
            assert 2 not in session.step({c: X[c] for c in range(N)}).included


def test_a_dropout_before_upload_beats_drop_after_upload():
    faults = FaultPlan([Dropout(3, 1, Stage.UPLOAD)])
    session = SecAggSession(N, M, clip=1.0, protocol="secagg", faults=faults)
    outcome = session.step({c: X[c] for c in range(N)}, drop_after_upload=[3])
    assert 3 not in outcome.included and 3 in outcome.dropped


def test_a_client_that_left_never_comes_back():
    session = SecAggSession(N, M, clip=1.0, protocol="secagg")
    first = session.step({c: X[c] for c in range(N) if c != 0}, drop_after_upload=[1])
    assert 0 not in first.included and 1 in first.included  # 1 uploaded, then left
    for _ in range(2):
        again = session.step({c: X[c] for c in range(N)}, drop_after_upload=[0, 1])
        assert again.included == {2, 3, 4, 5}
        assert np.abs(again.total - _exact(again.included)).max() <= session.error_bound(4)


def test_random_setup_stage_dropouts_happen_at_the_key_setup():
    plan = FaultPlan.random(N, rate=0.5, stage="advertise", seed=3)
    assert plan.dropouts and {d.step for d in plan.dropouts} == {0}
    later = FaultPlan.random(N, rate=0.5, stage="shares", seed=3, steps=(2, 3))
    assert {d.step for d in later.dropouts} <= {2, 3}


# ---- Paillier: the same plans, checked the same way, played on its stages ---------------------

def _paillier(**options) -> PaillierSession:
    return PaillierSession(N, M, clip=1.0, keypair=KEYPAIR, workers=1, unsafe_small_keys=True,
                           **options)


def _paillier_sum(dropouts, **options):
    return paillier_sum(X, clip=1.0, keypair=KEYPAIR, workers=1, unsafe_small_keys=True,
                        dropouts=dropouts, **options)


@pytest.mark.parametrize(("run", "field"), [
    (lambda: _paillier_sum([Dropout(N, 1, Stage.UPLOAD)]), "Dropout.client must be a client id "
                                                            "below 6"),
    (lambda: _paillier_sum([Dropout(2, 3, Stage.SHARES), 9]), "Dropout.client must be a client "
                                                               "id below 6"),
    (lambda: _paillier_sum([-1]), "Dropout.client must be an int >= 0"),
    (lambda: _paillier_sum(["2"]), "Dropout.client"),
    (lambda: _paillier_sum([(2, 1, "upload")]), "Dropout.client"),
    (lambda: _paillier_sum([], dropout_rate=0.5, dropout_stage="later"), "dropout stage"),
    (lambda: _paillier_sum([], dropout_rate=1.5), "dropout rate"),
    (lambda: _paillier(faults=FaultPlan([Dropout(7, 0, Stage.ROSTER)])), "Dropout.client"),
    (lambda: _paillier(faults=FaultPlan(late={(0, 1)})), "FaultPlan.late step"),
    (lambda: _paillier(faults=FaultPlan(late={(1, 6)})), "FaultPlan.late client"),
    (lambda: _paillier(faults=FaultPlan(tamper={(1, 2, "nowhere")})), "FaultPlan.tamper stage"),
    (lambda: _paillier(faults=FaultPlan(tamper={(2, 1, Stage.SHARES)})),
     "FaultPlan.tamper stage: a Paillier client sends nothing at 'shares'"),
    (lambda: _paillier(faults=FaultPlan(dropouts=[(2, 1, "upload")])), "not a Dropout"),
])
def test_paillier_refuses_a_malformed_plan_naming_its_field(run, field):
    with pytest.raises(ParameterError, match=re.escape(field)):
        run()


def test_paillier_sum_keeps_every_dropout_it_is_given():
    # step 0: never sends its key (0) or sends it, then falls silent (1); step 1: before (2) and
    # after (3) its upload; a bare int (4) never uploads; a later step never comes in one sum
    result = _paillier_sum([Dropout(0, 0, Stage.ADVERTISE), Dropout(1, 0, Stage.ROSTER),
                            Dropout(2, 1, Stage.UPLOAD), Dropout(3, 1, Stage.PAIRWISE), 4,
                            Dropout(5, 2, Stage.UPLOAD)])
    assert result.included == (3, 5) and result.dropped == (0, 1, 2, 4)
    assert np.abs(result.total - _exact(result.included)).max() <= result.error_bound
    assert result.bytes_up[0] == 0 and 0 < result.bytes_up[1] < result.bytes_up[3]
    with pytest.raises(TooFewSurvivorsError, match="needs 3, only 2"):
        _paillier_sum([0, 1, 2, 4], quorum=3)


def test_paillier_setup_dropouts_below_the_quorum_refuse_to_open():
    with pytest.raises(TooFewSurvivorsError, match="key setup"):
        _paillier(quorum=4, faults=FaultPlan([Dropout(c, 0, Stage.ROSTER) for c in (0, 1, 2)]))


def test_paillier_the_earliest_dropout_wins_and_a_silenced_client_stays_out():
    for dropouts in ([Dropout(2, 1, Stage.UPLOAD), Dropout(2, 3, Stage.SHARES)],
                     [Dropout(2, 3, Stage.SHARES), Dropout(2, 1, Stage.UPLOAD)]):
        session = _paillier(faults=FaultPlan(dropouts))
        for _ in range(3):  # its input is ignored once it has gone silent
            assert 2 not in session.step({c: X[c] for c in range(N)}).included
        assert 2 not in session.active
    # after its upload it is in that step's sum, then never again; a mere absence is not final
    session = _paillier(faults=FaultPlan([Dropout(4, 1, Stage.SHARES)]))
    first = session.step({c: X[c] for c in range(N) if c != 0}, drop_after_upload=[1])
    assert first.included == {1, 2, 3, 4, 5} and first.dropped == {0}
    second = session.step({c: X[c] for c in range(N)})
    assert second.included == {0, 1, 2, 3, 5} and second.dropped == frozenset()


def test_paillier_late_and_tampered_uploads_miss_their_step_only():
    faults = FaultPlan(late={(1, 2)}, tamper={(0, 5, Stage.ADVERTISE), (2, 3, Stage.UPLOAD)})
    session = _paillier(faults=faults)
    assert session.active == {0, 1, 2, 3, 4}  # 5's key never arrived: not in the session
    first = session.step({c: X[c] for c in range(N)})
    second = session.step({c: X[c] for c in range(N)})
    assert first.included == {0, 1, 3, 4} and second.included == {0, 1, 2, 4}
    assert np.abs(second.total - _exact(second.included)).max() <= session.error_bound(4)
    assert [(step, c) for step, c, _ in session.refusals] == [(0, 5), (2, 3)]


def test_open_session_passes_the_plan_to_a_paillier_session(keypair2048):
    faults = FaultPlan([Dropout(1, 0, Stage.ADVERTISE)])
    session = open_session("paillier", 3, 2, clip=1.0, keypair=keypair2048, faults=faults)
    assert session.step({c: X[c, :2] for c in range(3)}).included == {0, 2}
    with pytest.raises(ParameterError, match=r"FaultPlan\.tamper stage"):
        open_session("paillier", 3, 2, clip=1.0, keypair=keypair2048,
                     faults=FaultPlan(tamper={(1, 0, Stage.CONSISTENCY)}))
