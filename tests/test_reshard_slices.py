"""The reshard's placement of tensor-parallel slices (stratopt_ds.zero.tensor_parallel.Slice and
checkpoint._fill), against torch indexing of the unsplit tensor: fragments saved from one layout
(whole, or split along dim 0 or dim 1 in uneven slices, cut at arbitrary points) fill the
fragments of any other."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from stratopt_ds.zero.checkpoint import _fill
from stratopt_ds.zero.tensor_parallel import Slice

WHOLE = torch.arange(5 * 7, dtype=torch.float32).reshape(5, 7) * 0.5 + 1.0


def layout(dim: int, sizes: list[int]):
    """[(slice or None, the slice's values flattened)] of WHOLE split along ``dim`` in ``sizes``."""
    if dim is None:
        return [(None, WHOLE.flatten())]
    out, start = [], 0
    for size in sizes:
        part = WHOLE.narrow(dim, start, size).contiguous().flatten()
        inner = WHOLE[0, 0:1].numel() if dim == 1 else WHOLE.shape[1]
        out.append((Slice(size, WHOLE.shape[dim], start, inner), part))
        start += size
    return out


def saved_pieces(parts, cuts: int) -> dict[str, list]:
    """The pieces save_sharded would write: each slice cut into ``cuts`` fragments."""
    pieces = []
    for tp_slice, values in parts:
        bounds = torch.linspace(0, values.numel(), cuts + 1).round().int().tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            piece = {"name": "w", "offset": lo, "length": hi - lo, "param": values[lo:hi].clone()}
            if tp_slice is not None:
                piece["slice"] = dataclasses.astuple(tp_slice)
            pieces.append(piece)
    return {"w": pieces}


LAYOUTS = {"whole": (None, []), "rows 2+3": (0, [2, 3]), "cols 3+4": (1, [3, 4]),
           "cols 4+3": (1, [4, 3]), "cols 2+2+3": (1, [2, 2, 3])}


@pytest.mark.parametrize("source", LAYOUTS)
@pytest.mark.parametrize("target", LAYOUTS)
def test_any_slicing_fills_any_other(source, target):
    saved = saved_pieces(layout(*LAYOUTS[source]), cuts=3)
    for tp_slice, expected in layout(*LAYOUTS[target]):
        bounds = [0, expected.numel() // 3, expected.numel()]  # the target's own fragments
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            dest = torch.full((hi - lo,), float("nan"))
            _fill(dest, "w", lo, "param", saved, tp_slice)
            assert torch.equal(dest, expected[lo:hi]), (source, target, tp_slice, lo)


def test_a_missing_fragment_is_named():
    saved = saved_pieces(layout(1, [3, 4]), cuts=2)
    lost = saved["w"].pop(1)["length"]
    dest = torch.zeros(35)
    with pytest.raises(ValueError, match=f"checkpoint covers {35 - lost} of 35 elements of 'w'"):
        _fill(dest, "w", 0, "param", saved)


def test_runs_of_a_column_slice_are_one_per_row():
    cols = Slice(local=3, whole=7, start=4, inner=1)  # columns 4..6 of a 5 x 7 tensor
    assert cols.runs(0, 3) == [(4, 0, 3)]
    assert cols.runs(2, 4) == [(6, 0, 1), (11, 1, 3)]
    rows = Slice(local=2, whole=5, start=3, inner=7)   # rows 3..4: one run
    assert rows.runs(1, 12) == [(22, 0, 12)]
