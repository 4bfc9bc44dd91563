"""The one seam between the optimizer and its elementwise maths.

:func:`fragment_sumsq` and :func:`fragment_update` pick, per call and by the device of the
tensors, the native CPU kernel, the native CUDA kernel or the PyTorch reference
(:mod:`stratopt_ds.ops.reference`); all three take the same arguments.

Backend choice: ``STRATOPT_OPS=auto`` (default) uses the native op when it loads and falls
back to the reference with exactly one warning per process; ``native`` raises if the op for a
device cannot be loaded; ``reference`` never loads native code. :func:`use_backend` overrides
the environment (a context manager, for tests and benchmarks).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import threading
import warnings
from collections import OrderedDict
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from . import builder, reference

BACKENDS = ("auto", "native", "reference")
_override: Optional[str] = None
_warned = False
_warn_lock = threading.Lock()
# dtype codes of the native kernels: gradients of any of these; 16-bit weight copies (half_out)
# of the last two, written in the update pass.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
HALF_DTYPES = (torch.bfloat16, torch.float16)


def backend_setting() -> str:
    """The requested backend: :func:`use_backend` if active, else ``$STRATOPT_OPS``, else auto."""
    mode = _override or os.environ.get("STRATOPT_OPS", "auto").strip().lower() or "auto"
    if mode not in BACKENDS:
        raise ValueError(f"STRATOPT_OPS={mode!r}: expected one of {', '.join(BACKENDS)}")
    return mode


@contextlib.contextmanager
def use_backend(mode: str) -> Iterator[None]:
    """Force ``auto``, ``native`` or ``reference`` inside a ``with`` block."""
    global _override
    if mode not in BACKENDS:
        raise ValueError(f"backend {mode!r}: expected one of {', '.join(BACKENDS)}")
    previous, _override = _override, mode
    try:
        yield
    finally:
        _override = previous


def _kind(device: torch.device) -> Optional[str]:
    return {"cpu": "cpu", "cuda": "cuda"}.get(device.type)


def _warn_once(message: str) -> None:
    global _warned
    with _warn_lock:
        if _warned:
            return
        _warned = True
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def native_module(device: torch.device, supported: bool = True):
    """The native module for ``device`` under the current backend setting, or None (reference)."""
    mode = backend_setting()
    if mode == "reference":
        return None
    kind = _kind(device)
    if kind is None or not supported:
        if mode == "native":
            raise RuntimeError(f"STRATOPT_OPS=native: no native StratOpt op for these tensors "
                               f"(device {device}{'' if supported else ', unsupported dtype'})")
        return None
    module = builder.load(kind)
    if module is None:
        why = builder.why_unavailable(kind)
        if mode == "native":
            raise RuntimeError(f"STRATOPT_OPS=native but the {kind} op is unavailable: {why}")
        _warn_once(f"stratopt_ds: native {kind} op unavailable ({why}); using the PyTorch "
                   f"reference (slower). Set STRATOPT_OPS=reference to silence this warning.")
    return module


class TableCache:
    """Tables the native ops read, by key: host fragment rows, and the CUDA kernels' device
    tables (chunk rows and per-layer chunk lists keyed by fragment rows; pointer tables keyed
    by tensor addresses, new ones whenever a buffer is reallocated).

    Graph-safe: a captured CUDA graph replays its kernels with the table addresses it saw, so a
    table looked up while a graph is being captured is pinned, never evicted or freed (a few
    hundred bytes per table). The others are evicted least recently used beyond ``limit``. A
    table cannot be built during a capture (its host-to-device copy would be captured too, reading
    a host buffer at every replay), so a miss there is an error that says what to do.
    """

    def __init__(self, what: str, limit: int = 1024):
        self.what, self.limit = what, limit
        self._entries: OrderedDict[tuple, object] = OrderedDict()
        self._pinned: set[tuple] = set()
        self._lock = threading.Lock()

    def get(self, key: tuple, build: Callable[[], object], device: torch.device):
        capturing = _capturing(device)
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
                if capturing:
                    self._pinned.add(key)
                return value
        if capturing:
            raise RuntimeError(
                f"stratopt_ds: the fused optimizer step met {self.what} it has no table for while a CUDA graph "
                f"is being captured on {device}. Tables are built by an eager step: run one optimizer step "
                "with the same tensors before capturing, and keep them allocated between steps (e.g. "
                "zero_grad(set_to_none=False), so the gradients keep their addresses; a bfloat16/float16 model "
                "also needs the optimizer built with capturable=True).")
        value = build()
        with self._lock:
            value = self._entries.setdefault(key, value)  # another thread may have built it first
            while len(self._entries) - len(self._pinned) > self.limit:
                oldest = next(k for k in self._entries if k not in self._pinned)
                del self._entries[oldest]
        return value

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def pinned(self) -> int:
        return len(self._pinned)


_host_tables = TableCache("fragment rows")
_row_tables = TableCache("fragment rows")
_ptr_tables = TableCache("tensors (new addresses)")


def _capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _to_device(rows, device: torch.device) -> torch.Tensor:
    host = torch.tensor(rows, dtype=torch.int64)
    if device.type != "cuda":  # CPU tensors: the emulated CUDA op, and tests of the tables
        return host
    return host.pin_memory().to(device, non_blocking=True)


def host_frags(rows: tuple) -> torch.Tensor:
    """Fragment rows (tensor, start, length, layer) as a cached int64 (F, 4) CPU tensor: what
    both ops check the tensors against (and what the CPU op walks)."""
    return _host_tables.get(("host", rows), lambda: torch.tensor(rows, dtype=torch.int64).reshape(-1, 4),
                            torch.device("cpu"))


def _cuda_chunks(frags: Sequence[Sequence[int]], num_layers: int, chunk: int, device: torch.device,
                 numels: Callable[[], Sequence[int]]):
    """Fragments cut into chunks of <= ``chunk`` elements (one CUDA block each), and the per-layer
    chunk lists (CSR, chunks in table order) of the deterministic finalize; built once, cached.

    The op checks the rows against the tensors (every call). Before building, rows that do not
    fit ``numels()`` get an empty table instead, so that a bogus length cannot make Python cut
    billions of chunks before that check names the row."""
    rows = reference.as_rows(frags)
    key = ("chunks", str(device), num_layers, chunk, rows)
    if key not in _row_tables:  # rows seen for the first time: checked once, not every step
        sizes = numels()
        if not all(0 <= t < len(sizes) and 0 <= length <= sizes[t] for t, _, length, _ in rows):
            empty = torch.zeros((0, 4), dtype=torch.int64, device=device)
            return empty, torch.zeros(max(num_layers, 0) + 1, dtype=torch.int64, device=device), empty.view(-1)

    def build():
        chunks, per_layer = [], [[] for _ in range(num_layers)]
        for tensor, start, length, layer in rows:
            for off in range(0, length, chunk):
                if 0 <= layer < num_layers:
                    per_layer[layer].append(len(chunks))
                chunks.append((tensor, start + off, min(chunk, length - off), layer))
        layer_ptr = [0]
        for ids in per_layer:
            layer_ptr.append(layer_ptr[-1] + len(ids))
        flat_ids = [i for ids in per_layer for i in ids] or [0]
        return (_to_device(chunks or [[0, 0, 0, 0]], device)[: len(chunks)],
                _to_device(layer_ptr, device), _to_device(flat_ids, device))

    return _row_tables.get(key, build, device)


def _addr(x: Optional[torch.Tensor]) -> int:
    return 0 if x is None else x.data_ptr()


def _cuda_ptrs(rows: tuple, device: torch.device) -> torch.Tensor:
    """The (n, PTR_COLS) device pointer table of ``rows``; cached by the addresses, so steady
    steps (and a CUDA-graph capture after a warm-up step) make no host-to-device copy."""
    return _ptr_tables.get((str(device), rows), lambda: _to_device(rows, device), device)


def _ptr_rows(params, grads, exp_avgs, exp_avg_sqs, slows, outs, steps) -> tuple:
    """Rows (param, grad, m1, v, m2, copy, step, grad dtype, copy dtype) of the CUDA kernels.
    zip_longest: lists of different lengths reach the op, whose check names them."""
    return tuple((_addr(p), _addr(g), _addr(m), _addr(v), _addr(m2), _addr(o), _addr(st),
                  DTYPE_CODES.get(getattr(g, "dtype", None), -1),
                  DTYPE_CODES.get(o.dtype, -1) if o is not None else 0)
                 for p, g, m, v, m2, o, st in itertools.zip_longest(params, grads, exp_avgs, exp_avg_sqs,
                                                                     slows, outs, steps))


def fragment_sumsq(grads: Sequence[torch.Tensor], frags: Sequence[Sequence[int]], num_layers: int,
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """Per-layer float64 sums of squares of the fragments of ``grads``, on ``device``."""
    grads = list(grads)
    if device is None:
        device = grads[0].device if grads else torch.device("cpu")
    if not grads:
        return torch.zeros(num_layers, dtype=torch.float64, device=device)
    at = grads[0].device
    module = native_module(at, all(g.device == at and g.dtype in DTYPE_CODES for g in grads))
    rows = reference.as_rows(frags)
    if module is None:
        return reference.fragment_sumsq(grads, rows, num_layers, device)
    flats = [g.contiguous() for g in grads]  # the kernels read flat memory; copies only strided ones
    if module.KIND == "cpu":
        return module.fragment_sumsq(flats, host_frags(rows), num_layers).to(device)
    chunks, layer_ptr, layer_chunks = _cuda_chunks(rows, num_layers, module.CHUNK, at,
                                                   lambda: [g.numel() for g in flats])
    ptrs = _cuda_ptrs(_ptr_rows([None] * len(flats), flats, [], [], [], [], []), at)
    return module.fragment_sumsq(flats, host_frags(rows), num_layers, ptrs, chunks, layer_ptr,
                                 layer_chunks).to(device)


def fragment_update(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                    exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                    exp_avg_slows: Optional[Sequence[torch.Tensor]], steps: Sequence[torch.Tensor],
                    frags: Sequence[Sequence[int]], finite: torch.Tensor, clip_coef: torch.Tensor,
                    alpha: torch.Tensor, beta1_layer: Optional[torch.Tensor], *,
                    lr: Union[float, torch.Tensor],
                    beta1: float, beta2: float, eps: float, weight_decay: float, beta3: float,
                    mix_alpha: float, t_alpha: int, t_beta3: int,
                    half_out: Optional[Sequence[Optional[torch.Tensor]]] = None) -> None:
    """The fused update (arguments: :func:`stratopt_ds.ops.reference.fragment_update`).

    Both native ops check the same things with the same messages (``csrc/common/op_checks.h``):
    one device, contiguous tensors, float32 params and states, float64 one-element step counters,
    float64 per-layer vectors, host fragment rows inside the tensors. A ``half_out`` entry may be
    None (that tensor has no 16-bit copy) and the gradients may mix dtypes.

    ``lr`` may be a 0-dim tensor. The CUDA kernel then reads it from device memory, so a
    captured CUDA graph uses the value a scheduler last wrote into it; keep such a tensor on the
    parameters' device (float64 avoids a conversion kernel per step). The CPU kernel reads its
    value on the host, the reference computes with it as a tensor.
    """
    params = list(params)
    if not params:
        return
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    kw = dict(lr=lr if lr_tensor is not None else float(lr), beta1=float(beta1),
              beta2=float(beta2), eps=float(eps), weight_decay=float(weight_decay),
              beta3=float(beta3), mix_alpha=float(mix_alpha), t_alpha=int(t_alpha),
              t_beta3=int(t_beta3))
    at = params[0].device
    rows = reference.as_rows(frags)
    outs = list(half_out) if half_out is not None else [None] * len(params)
    slows = list(exp_avg_slows) if exp_avg_slows is not None else [None] * len(params)
    supported = (all(p.device == at and p.dtype == torch.float32 for p in params)
                 and all(g.device == at and g.dtype in DTYPE_CODES for g in grads)
                 and all(o is None or o.dtype in HALF_DTYPES for o in outs))
    module = native_module(at, supported)
    if module is None:
        reference.fragment_update(params, grads, exp_avgs, exp_avg_sqs, exp_avg_slows, steps, rows,
                                  finite, clip_coef, alpha, beta1_layer, half_out=half_out, **kw)
        return
    small = lambda x: None if x is None else x.to(at)  # noqa: E731  (no copy when already there)
    flats = [g.contiguous() for g in grads]
    args = (params, flats, list(exp_avgs), list(exp_avg_sqs), slows if exp_avg_slows is not None else [],
            list(steps), host_frags(rows), small(finite), small(clip_coef), small(alpha), small(beta1_layer))
    if module.KIND == "cpu":
        if lr_tensor is not None:
            kw["lr"] = float(lr_tensor)  # the CPU kernel takes a host scalar
        module.fragment_update(*args, half_out=outs, **kw)
        return
    ptrs = _cuda_ptrs(_ptr_rows(params, flats, args[2], args[3], slows, outs, args[5]), at)
    chunks, _, _ = _cuda_chunks(rows, clip_coef.numel(), module.CHUNK, at, lambda: [p.numel() for p in params])
    if lr_tensor is not None:  # read in the kernel: no host sync, graph-replayable
        kw["lr"] = 0.0
        lr_tensor = lr_tensor.to(device=at, dtype=torch.float64).reshape(1)
    module.fragment_update(*args, half_out=outs, ptrs=ptrs, chunks=chunks, lr_tensor=lr_tensor, **kw)
