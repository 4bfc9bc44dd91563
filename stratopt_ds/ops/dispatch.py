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
import os
import threading
import warnings
from typing import Iterator, Optional, Sequence, Union

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


# Tables keyed by fragment rows (few, stable) and CUDA pointer tables keyed by addresses (new
# ones whenever a buffer is reallocated): separate, so that a stream of new addresses never
# evicts the row tables, which are rebuilt in Python.
_cache: dict[tuple, object] = {}
_ptr_cache: dict[tuple, object] = {}


def _cached(key: tuple, build, cache: dict = _cache):
    value = cache.get(key)
    if value is None:
        if len(cache) > 512:
            cache.clear()
        value = cache[key] = build()
    return value


def _to_device(rows, device: torch.device) -> torch.Tensor:
    host = torch.tensor(rows, dtype=torch.int64)
    if device.type != "cuda":  # the tables are built on CPU too, for tests
        return host
    return host.pin_memory().to(device, non_blocking=True)


def frag_table(frags: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """Rows (tensor, start, length, layer) as a cached int64 (F, 4) tensor on ``device``."""
    rows = reference.as_rows(frags)
    return _cached(("table", str(device), rows),
                   lambda: torch.tensor(rows, dtype=torch.int64).reshape(-1, 4).to(device))


def _uniform_grad_type(grads: Sequence[torch.Tensor]) -> Optional[int]:
    """The dtype code of gradients of one dtype; None (use the reference) for mixed dtypes."""
    dtypes = {g.dtype for g in grads}
    return DTYPE_CODES[dtypes.pop()] if len(dtypes) == 1 else None


def _cuda_chunks(frags: Sequence[Sequence[int]], num_layers: int, chunk: int, device: torch.device):
    """Fragments cut into chunks of <= ``chunk`` elements (one CUDA block each), and the per-layer
    chunk lists (CSR, chunks in table order) of the deterministic finalize; built once, cached."""
    rows = reference.as_rows(frags)

    def build():
        chunks, per_layer = [], [[] for _ in range(num_layers)]
        for tensor, start, length, layer in rows:
            for off in range(0, length, chunk):
                per_layer[layer].append(len(chunks))
                chunks.append((tensor, start + off, min(chunk, length - off), layer))
        layer_ptr = [0]
        for ids in per_layer:
            layer_ptr.append(layer_ptr[-1] + len(ids))
        flat_ids = [i for ids in per_layer for i in ids] or [0]
        return (_to_device(chunks or [[0, 0, 0, 0]], device)[: len(chunks)],
                _to_device(layer_ptr, device), _to_device(flat_ids, device))

    return _cached(("chunks", str(device), num_layers, chunk, rows), build)


def _cuda_ptrs(rows: tuple, device: torch.device, tensors: Optional[dict] = None) -> torch.Tensor:
    """The (n, 7) device pointer table of tuple ``rows``; cached by the addresses, so
    steady-state steps (and CUDA-graph capture after a warm-up step) make no host-to-device copy.

    The kernel walks every tensor as flat memory from its address, so a strided tensor would
    pair the wrong elements: ``tensors`` (name -> list, None entries allowed) are checked when a
    table is built, i.e. once per set of addresses, off the steady-state path."""
    def build():
        for name, items in (tensors or {}).items():
            for i, x in enumerate(items):
                if x is not None and not x.is_contiguous():
                    raise ValueError(f"{name}[{i}] is not contiguous (shape {tuple(x.shape)}, strides "
                                     f"{x.stride()}): the fused update needs contiguous tensors")
        return _to_device(rows, device)

    return _cached((str(device), rows), build, _ptr_cache)


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
    if at.type == "cpu":
        return module.fragment_sumsq(flats, frag_table(rows, at), num_layers).to(device)
    gtype = _uniform_grad_type(flats)
    if gtype is None:
        return reference.fragment_sumsq(grads, rows, num_layers, device)
    chunks, layer_ptr, layer_chunks = _cuda_chunks(rows, num_layers, module.CHUNK, at)
    ptrs = _cuda_ptrs(tuple((0, g.data_ptr(), 0, 0, 0, 0, 0) for g in flats), at)
    return module.sumsq(ptrs, gtype, chunks, layer_ptr, layer_chunks, num_layers).to(device)


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
    if module is not None and at.type == "cpu":
        if lr_tensor is not None:
            kw["lr"] = float(lr_tensor)  # the CPU kernel takes a host scalar
        small = lambda x: None if x is None else x.to(at)  # noqa: E731  (no copy when already there)
        module.fragment_update(
            params, [g.contiguous() for g in grads], list(exp_avgs), list(exp_avg_sqs),
            slows if exp_avg_slows is not None else [], list(steps), frag_table(rows, at),
            small(finite), small(clip_coef), small(alpha), small(beta1_layer), half_out=outs, **kw)
        return
    if module is not None:  # CUDA: one kernel per call, so one gradient dtype and one copy dtype
        flats = [g.contiguous() for g in grads]
        gtype = _uniform_grad_type(flats)
        out_codes = {DTYPE_CODES[o.dtype] for o in outs if o is not None}
        if gtype is not None and len(out_codes) <= 1:
            ptrs = tuple((p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(),
                          m2.data_ptr() if m2 is not None else 0, o.data_ptr() if o is not None else 0,
                          st.data_ptr())
                         for p, g, m, v, m2, o, st in zip(params, flats, exp_avgs, exp_avg_sqs, slows,
                                                          outs, steps))
            chunks, _, _ = _cuda_chunks(rows, clip_coef.numel(), module.CHUNK, at)
            if lr_tensor is not None:  # read in the kernel: no host sync, graph-replayable
                kw["lr"] = 0.0
                lr_tensor = lr_tensor.to(device=at, dtype=torch.float64).reshape(1)
            states = dict(params=params, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                          exp_avg_slows=slows, half_out=outs)
            module.update(_cuda_ptrs(ptrs, at, states), gtype, chunks, finite, clip_coef, alpha, beta1_layer,
                          out_type=out_codes.pop() if out_codes else 0, lr_tensor=lr_tensor, **kw)
            return
    reference.fragment_update(params, grads, exp_avgs, exp_avg_sqs, exp_avg_slows, steps, rows,
                              finite, clip_coef, alpha, beta1_layer, half_out=half_out, **kw)
