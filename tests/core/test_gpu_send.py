"""UploadSender: each step's uploads land in host buffers, whichever stream copies them."""

from __future__ import annotations

import pytest
import torch

from codream_secure.errors import ConfigError
from codream_secure.gpu.send import UploadSender


def uploads(n: int, m: int, step: int, device: str = "cpu") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return [torch.randint(-2**31, 2**31 - 1, (m,), generator=gen, dtype=torch.int32).to(device)
            for _ in range(n)]


def test_each_send_lands_in_the_buffers_and_overwrites_the_last():
    sender = UploadSender(3, 5, torch.int32, torch.device("cpu"))
    for step in range(3):
        sent = uploads(3, 5, step)
        sender.send(sent)
        for got, want in zip(sender.wait(), sent, strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize(("bad", "match"), [
    (uploads(2, 5, 0), "expected 3 uploads"),
    (uploads(3, 4, 0), r"shape \(4,\)"),
    ([u.to(torch.int64) for u in uploads(3, 5, 0)], "torch.int64"),
])
def test_wrong_uploads_are_refused_naming_the_problem(bad, match):
    sender = UploadSender(3, 5, torch.int32, torch.device("cpu"))
    with pytest.raises(ConfigError, match=match):
        sender.send(bad)


def test_an_empty_sender_is_refused():
    with pytest.raises(ConfigError, match="at least one"):
        UploadSender(0, 5, torch.int32, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("side_stream", [True, False])
def test_cuda_sends_survive_the_uploads_being_freed_and_reused(side_stream):
    n, m = 4, 1 << 22  # 16 MiB per upload: the copies are still running when the test goes on
    sender = UploadSender(n, m, torch.int32, torch.device("cuda"), side_stream=side_stream)
    for step in range(3):
        want = uploads(n, m, step)
        sent = [u.cuda() for u in want]
        sender.send(sent)
        del sent  # record_stream keeps the allocator from reusing them before the copies end
        scribble = [torch.full((m,), -1, dtype=torch.int32, device="cuda") for _ in range(n)]
        for got, expected in zip(sender.wait(), want, strict=True):
            assert torch.equal(got, expected)
        del scribble
