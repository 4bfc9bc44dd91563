"""Windows of a store's part, the seeded epoch order, and resumable batches.

* **Windows** (``Windows``): window ``i`` is tokens ``[i*S, i*S + S + 1)`` of a part, inputs its
  first ``S`` tokens and targets its last ``S``; consecutive windows share one token, so every
  token but the first is a target exactly once per epoch (Megatron's GPT samples do the same).
* **Order** (``Permutation``): each epoch visits the windows in the order of a keyed Feistel
  bijection of ``range(n)``, computed index by index: no permutation of the windows is ever
  materialised, so a rank's memory does not grow with the store.
* **Batches** (``BatchIterator``): batch ``k`` holds positions ``k*B .. k*B+B-1`` of the endless
  epoch sequence, a pure function of (store, data seed, k). The iterator hands out the batch's
  window indices; a rank reads only the rows of its own micro-batches (``Batch.rows``).
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from .errors import DataError
from .store import TokenPart

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser on a Python int (round keys)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Permutation:
    """A seeded bijection of ``range(n)``, evaluated per index.

    A balanced Feistel network over the smallest even number of bits that holds ``n - 1`` (so
    the domain is less than ``4n``), with ``ROUNDS`` rounds of a splitmix64 round function, and
    cycle-walking (apply again until the value is below ``n``), as in Black and Rogaway's
    construction and Grain's ``index_shuffle``. O(1) memory; a batch of indices is a few numpy
    operations.
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        key = _mix64(seed & _MASK64)
        self.keys = []
        for _ in range(self.ROUNDS):
            key = _mix64(key)
            self.keys.append(np.uint64(key))

    def _round(self, right: np.ndarray, key: np.uint64) -> np.ndarray:
        z = right ^ key
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & self.mask

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << half) | right

    def __call__(self, index: np.ndarray | int) -> np.ndarray:
        """The images of ``index`` (an int or an array of them), with its shape."""
        shape = np.shape(index)
        x = np.asarray(index, dtype=np.int64).reshape(-1)
        if x.size and (int(x.min()) < 0 or int(x.max()) >= self.n):
            raise IndexError(f"index outside a permutation of {self.n}")
        with np.errstate(over="ignore"):  # the round function multiplies modulo 2**64
            y = self._encrypt(x.astype(np.uint64))
            outside = y >= self.n
            while outside.any():  # cycle-walk back into range(n)
                y[outside] = self._encrypt(y[outside])
                outside = y >= self.n
        return y.astype(np.int64).reshape(shape)


def epoch_permutation(n: int, seed: int, epoch: int) -> Permutation:
    """The order of epoch ``epoch`` for data seed ``seed``."""
    return Permutation(n, _mix64((seed & _MASK64) * 1_000_003 + epoch))


class Windows:
    """The windows of ``seq_len + 1`` tokens of one part of a store (at most ``limit``)."""

    def __init__(self, part: TokenPart, seq_len: int, limit: Optional[int] = None):
        if seq_len < 1:
            raise DataError(f"--seq-len must be >= 1, got {seq_len}")
        self.part, self.seq_len = part, seq_len
        available = max(0, (len(part) - 1) // seq_len)
        self.count = available if limit is None else min(limit, available)

    def __len__(self) -> int:
        return self.count

    def read(self, indices: np.ndarray | list[int]) -> torch.Tensor:
        """int64 ``[len(indices), seq_len + 1]``."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.count):
            raise IndexError(f"window index outside 0..{self.count - 1}")
        rows = self.part.gather(indices * self.seq_len, self.seq_len + 1)
        return torch.from_numpy(rows.astype(np.int64))

    def batches(self, batch_size: int, max_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``batch_size * max_batches`` windows in order, as (inputs, targets)."""
        stop = min(self.count, batch_size * max_batches)
        for lo in range(0, stop, batch_size):
            rows = self.read(np.arange(lo, min(lo + batch_size, stop)))
            yield rows[:, :-1], rows[:, 1:]


class Batch:
    """One global batch: its window indices, read only where a rank asks for its rows."""

    def __init__(self, windows: Windows, indices: np.ndarray):
        self.windows, self.indices = windows, indices

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def tokens(self) -> int:
        """Target tokens of the whole batch."""
        return len(self.indices) * self.windows.seq_len

    def rows(self, lo: int = 0, hi: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of rows ``lo:hi``, int64 ``[rows, seq_len]``."""
        rows = self.windows.read(self.indices[lo:hi])
        return rows[:, :-1], rows[:, 1:]


class BatchIterator:
    """Endless batches of training windows in seeded epochs, resumable at any step.

    ``state_dict()`` holds the step and what the order depends on; ``load_state_dict`` refuses a
    state of another store, seed, batch size or window count.
    """

    def __init__(self, windows: Windows, batch_size: int, seed: int, step: int = 0,
                 fingerprint: str = ""):
        if batch_size <= 0:
            raise DataError(f"batch_size must be > 0, got {batch_size}")
        if len(windows) == 0:
            raise DataError("no training window: the training part is shorter than seq_len + 1")
        self.windows, self.batch_size, self.seed, self.step = windows, batch_size, seed, step
        self.fingerprint = fingerprint
        self._perms: dict[int, Permutation] = {}

    def _perm(self, epoch: int) -> Permutation:
        if epoch not in self._perms:
            self._perms = {epoch: epoch_permutation(len(self.windows), self.seed, epoch)}
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Window indices of batch ``step`` (a batch may straddle two epochs)."""
        n = len(self.windows)
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        epochs = positions // n
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            out[where] = self._perm(int(epoch))(positions[where] - epoch * n)
        return out

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> Batch:
        batch = Batch(self.windows, self.indices(self.step))
        self.step += 1
        return batch

    def epoch(self) -> float:
        """Epochs consumed so far."""
        return self.step * self.batch_size / len(self.windows)

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "num_windows": len(self.windows), "store": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("store", "seed", "batch_size", "num_windows"):
            if state.get(key) != mine[key]:
                raise DataError(f"cannot resume the data order: {key}={state.get(key)!r} in the "
                                f"saved state, {mine[key]!r} here")
        self.step = int(state["step"])


# ------------------------------------------------------------------------------------------------
# For torch DataLoaders (HF Trainer, accelerate)


class WindowDataset(torch.utils.data.Dataset):
    """Windows as causal-LM examples: ``input_ids`` = ``labels`` (the model shifts them), of
    ``seq_len + 1`` tokens. Each item reads its window from the memory-mapped store."""

    def __init__(self, windows: Windows):
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.windows.read([i])[0]
        return {"input_ids": ids, "labels": ids}


class WindowSampler(torch.utils.data.Sampler):
    """The epoch order of ``BatchIterator`` for a DataLoader: ``set_epoch(e)`` picks the epoch.

    Unlike ``RandomSampler`` / ``DistributedSampler`` (``torch.randperm(n)`` on every rank and
    every epoch) it holds no list of the windows; indices come in blocks of 4,096.
    """

    BLOCK = 4096

    def __init__(self, num_windows: int, seed: int):
        self.n, self.seed, self.epoch = num_windows, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        perm = epoch_permutation(self.n, self.seed, self.epoch)
        for lo in range(0, self.n, self.BLOCK):
            yield from perm(np.arange(lo, min(lo + self.BLOCK, self.n))).tolist()
