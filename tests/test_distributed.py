"""Rank-zero work is decided by one helper, correct before the process group exists and on several nodes."""

from __future__ import annotations

import pytest

from cil.distributed import is_rank_zero


@pytest.mark.parametrize(
    "environ, zero",
    [
        ({}, True),
        ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # the first process of the second node: LOCAL_RANK is 0
        ({"LOCAL_RANK": "2"}, False),
        ({"RANK": "0", "LOCAL_RANK": "0"}, True),
        ({"RANK": "4", "LOCAL_RANK": "0"}, False),
        ({"SLURM_PROCID": "0"}, True),
        ({"SLURM_PROCID": "5", "LOCAL_RANK": "0"}, False),
    ],
)
def test_is_rank_zero_from_the_launcher_environment(monkeypatch, environ, zero):
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert is_rank_zero() is zero
