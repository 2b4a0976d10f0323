"""Reproducible randomness for training loops: seeds mixed from integers, a scope that seeds Python's, NumPy's and
torch's global generators and restores them afterwards, and the generator states a checkpoint records.

timm's augmentations draw from all three global generators (RandAugment and random erasing from ``random`` and
``numpy``, Mixup from ``numpy``, drop path from ``torch``), so a draw is reproducible only when all three are set.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import numpy as np
import torch


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on the integers ``parts`` only, well mixed so that nearby tuples are unrelated."""
    if any(p < 0 for p in parts):
        raise ValueError(f"seed parts must be >= 0, got {parts}")
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_all(seed: int, cuda: bool = True) -> None:
    """Seed ``random``, ``numpy.random`` and torch's CPU generator (and every CUDA device's unless ``cuda`` is
    False: ``torch.manual_seed`` costs ~0.2 ms, too much per sample) from one well-mixed 63-bit seed."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    if cuda:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """The three global generators' states, as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(), "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng(cuda: bool = True) -> Iterator[None]:
    """Whatever the body seeds or draws, the CPU generators leave the block as they entered it (and the CUDA ones,
    when CUDA is in use and ``cuda`` is True)."""
    saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    cuda_states = (torch.cuda.get_rng_state_all() if cuda and torch.cuda.is_available() and torch.cuda.is_initialized()
                   else None)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.default_generator.set_state(saved[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def seeded(seed: int, cuda: bool = True) -> Iterator[None]:
    """Run the body with the global generators seeded from ``seed``; restore them afterwards. ``cuda=False``
    leaves the CUDA generators alone (cheaper; for CPU-side work such as data augmentation)."""
    with preserved_rng(cuda):
        seed_all(seed, cuda)
        yield
