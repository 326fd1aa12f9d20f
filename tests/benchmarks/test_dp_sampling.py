"""benchmarks.dp_sampling: one line per size and mechanism, and a refused repeat count."""

from __future__ import annotations

import pytest

from benchmarks import dp_sampling


def test_prints_every_mechanism_at_every_size(capsys, monkeypatch):
    monkeypatch.setattr(dp_sampling, "SIZES", (64, 128))
    assert dp_sampling.main(["--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    for size in ("64", "128"):
        rows = [line for line in lines if line.split()[0] == size]
        assert [r.split()[2] for r in rows] == ["skellam", "discrete_gaussian", "central"]
        assert all(float(r.split()[-2]) >= 0 for r in rows)


def test_repeats_must_be_positive():
    with pytest.raises(SystemExit) as caught:
        dp_sampling.main(["--repeats", "0"])
    assert caught.value.code == 2
