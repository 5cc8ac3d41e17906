"""Per-sample random streams, so that a sample does not depend on its batch.

Sample i of a run with seed s draws its k-th noise tensor from a counter-based generator keyed by
(s, i, k): the result is the same in a batch of 1 or of 64, on any number of workers, and on CPU or
CUDA. torch.Generator has one stream per generator, and a generator per sample would cost a Python
call per sample and step; hashing counters with splitmix64 is fully vectorised instead.

Normals come from the Box-Muller transform of two 24-bit uniforms, so |z| <= 5.9 (the normal's mass
beyond that is 4e-9): a truncation far below anything a sampler or estimator can resolve.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _i64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


MAX_SEED = (1 << 63) - 1  # a seed is one int64 key: larger ones would alias smaller ones, so they are refused
_GOLDEN = _i64(0x9E3779B97F4A7C15)
_M1 = _i64(0xBF58476D1CE4E5B9)
_M2 = _i64(0x94D049BB133111EB)


def _srl(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64(z: Tensor) -> Tensor:
    """The splitmix64 finaliser on int64 tensors (wrapping arithmetic): a bijective 64-bit hash."""
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


class SampleNoise:
    """Independent noise streams for the samples with the given global indices.

    seed: the run's seed.  indices: (B,) global sample indices (sample i of a run is i wherever it is
    drawn).  Each call to randn/rademacher advances a shared draw counter, so two runs that make the
    same sequence of calls give sample i the same numbers.
    """

    def __init__(self, seed: int, indices: Tensor | int, device=None):
        if isinstance(indices, int):
            indices = torch.arange(indices)
        self.device = torch.device(device) if device is not None else indices.device
        idx = indices.to(self.device, torch.int64)
        if not 0 <= int(seed) <= MAX_SEED:
            raise ValueError(f"seed {seed} is outside [0, {MAX_SEED}]")
        seed_key = splitmix64(torch.tensor(int(seed), dtype=torch.int64))
        self._keys = splitmix64(seed_key.to(self.device) + idx * _GOLDEN)  # (B,)
        self.draws = 0

    def __len__(self) -> int:
        return self._keys.shape[0]

    def _bits(self, shape) -> Tensor:
        n = math.prod(shape)
        offset = _i64(((self.draws + 1) * _M2) % (1 << 64))
        key = splitmix64(self._keys + offset)  # (B,)
        self.draws += 1
        e = torch.arange(n, device=self.device, dtype=torch.int64)
        return splitmix64(key[:, None] + e[None] * _GOLDEN).reshape(len(self), *shape)

    def randn(self, shape, dtype=torch.float32) -> Tensor:
        """(B, *shape) standard normals."""
        h = self._bits(tuple(shape))
        u1 = (_srl(h, 40).to(torch.float64) + 0.5) / 2**24
        u2 = ((_srl(h, 16) & 0xFFFFFF).to(torch.float64) + 0.5) / 2**24
        z = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
        return z.to(dtype)

    def rademacher(self, shape, dtype=torch.float32) -> Tensor:
        """(B, *shape) independent +-1 signs."""
        return (_srl(self._bits(tuple(shape)), 63) * 2 - 1).to(dtype)

    def like(self, x: Tensor) -> Tensor:
        """Standard normals shaped like x (x's first dimension is the batch)."""
        return self.randn(x.shape[1:], dtype=x.dtype).to(x.device)
