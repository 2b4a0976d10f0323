"""Shared test helpers: a one-thread fixture for tiny-tensor tests and a free TCP port for gloo process groups."""

from __future__ import annotations

import socket

import pytest
import torch


@pytest.fixture
def one_thread():
    # Tiny tensors: with other processes on the 2 cores, every multi-threaded op waits for a busy core.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def free_port() -> int:
    """A TCP port nobody listens on right now, for MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
