"""The PyTorch reference of the native ops: the one readable statement of the elementwise maths.

Both functions take the same arguments as the native kernels (``csrc/cpu``, ``csrc/cuda``) and
the dispatcher (:mod:`stratopt_ds.ops.dispatch`); the kernels must agree with them to fp32
rounding (the kernels round sqrt correctly; torch's CPU sqrt may differ by an ulp). ``frags`` lists fragments as rows
``(tensor index, start, length, layer)`` into the flattened tensors of the call.

The update of one fragment of layer ``l`` at step ``t = max(step, 1)`` (the caller has already
added ``keep = float(finite)`` to ``step``)::

    g  = where(finite, grad * clip_coef_l, 0)
    m1 = lerp(m1, g,   (1-b1_l)*keep);   v = lerp(v, g*g, (1-b2)*keep)
    m2 = lerp(m2, g,   (1-b3(t))*keep)                       (only if mix_alpha > 0)
    u  = (m1/(1-b1_l^t) + a(t)*m2) / (sqrt(v/(1-b2^t)) + eps)
    theta = theta*(1 - lr*keep*wd) - lr*keep*alpha_l*u

A non-finite step (``finite`` False) therefore leaves weights and moments bit-identical.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .schedules import beta3_at, mix_alpha_at

FragRows = Sequence[Sequence[int]]  # rows (tensor, start, length, layer)


def as_rows(frags) -> tuple[tuple[int, int, int, int], ...]:
    """Fragment rows as a tuple of int tuples (hashable: the native ops cache tables by it);
    such a tuple, as :meth:`stratopt_ds.layer_map.LayerMap.rows_of` returns, passes unchanged."""
    if isinstance(frags, tuple) and (not frags or isinstance(frags[0], tuple)):
        return frags
    if isinstance(frags, torch.Tensor):
        frags = frags.tolist()
    return tuple(tuple(int(x) for x in r) for r in frags)


def segment_sum(values: torch.Tensor, segments: Sequence[int], num_segments: int) -> torch.Tensor:
    """``out[s] = sum of values[i] with segments[i] == s``, deterministically.

    Not ``index_add_``: on CUDA it adds float64 with atomics, in an order that changes from run
    to run (docs/ALGORITHMS.md section 9 asks for bitwise reproducible steps). The values of each segment are
    gathered into a zero-padded row of a (num_segments, most per segment) matrix and the rows
    summed: a fixed order on every device."""
    per: list[list[int]] = [[] for _ in range(num_segments)]
    for i, s in enumerate(segments):
        per[s].append(i)
    width = max((len(ids) for ids in per), default=0)
    out_shape = (num_segments,)
    if width == 0:
        return values.new_zeros(out_shape)
    pad = len(segments)  # the index of the appended zero
    index = torch.tensor([ids + [pad] * (width - len(ids)) for ids in per], dtype=torch.long)
    padded = torch.cat([values, values.new_zeros(1)])
    return padded[index.to(values.device)].sum(dim=1)


def fragment_sumsq(grads: Sequence[torch.Tensor], frags: FragRows, num_layers: int,
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """Per-layer sums of squares of the fragments, as a float64 vector of length ``num_layers``.

    Each fragment is summed in float64; fragment sums are added per layer by
    :func:`segment_sum` (deterministic). Layers without a fragment stay 0.
    """
    if device is None:
        device = grads[0].device if len(grads) else torch.device("cpu")
    flats = [g.reshape(-1) for g in grads]
    sums, ids = [], []
    for tensor, start, length, layer in as_rows(frags):
        piece = flats[tensor].narrow(0, start, length).to(torch.float64)
        sums.append(torch.dot(piece, piece))
        ids.append(layer)
    if not sums:
        return torch.zeros(num_layers, dtype=torch.float64, device=device)
    return segment_sum(torch.stack(sums), ids, num_layers).to(device)


def fragment_update(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                    exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                    exp_avg_slows: Optional[Sequence[torch.Tensor]], steps: Sequence[torch.Tensor],
                    frags: FragRows, finite: torch.Tensor, clip_coef: torch.Tensor,
                    alpha: torch.Tensor, beta1_layer: Optional[torch.Tensor], *,
                    lr: Union[float, torch.Tensor],
                    beta1: float, beta2: float, eps: float, weight_decay: float, beta3: float,
                    mix_alpha: float, t_alpha: int, t_beta3: int,
                    half_out: Optional[Sequence[Optional[torch.Tensor]]] = None) -> None:
    """The fused update, in place on flat float32 ``params`` and states (see the module doc).

    ``steps`` are the per-tensor float64 step counters, already incremented; ``clip_coef``,
    ``alpha`` and ``beta1_layer`` (None: ``beta1`` for every layer) are float64 per-layer
    vectors; ``half_out[i]``, when given (bfloat16 or float16), receives ``params[i]``
    rounded to nearest even in the same pass. ``lr`` may
    be a 0-dim tensor (used as a float64 tensor, never read on the host).
    """
    if isinstance(lr, torch.Tensor):
        lr = lr.to(torch.float64)
    keep = finite.to(torch.float64)  # 1: apply the step, 0: leave everything as it is
    coef, alph = clip_coef.unbind(0), alpha.unbind(0)
    beta1_of_layer = beta1_layer.unbind(0) if beta1_layer is not None else None
    rows = as_rows(frags)
    by_tensor: dict[int, list[tuple[int, int, int]]] = {}
    for tensor, start, length, layer in rows:
        by_tensor.setdefault(tensor, []).append((start, length, layer))
    for i, param in enumerate(params):
        t = torch.clamp(steps[i], min=1.0)  # a skipped first step must not divide by 0
        lr_k = lr * keep
        a_t = mix_alpha_at(t, mix_alpha, t_alpha) if mix_alpha > 0 else None
        device = param.device
        flat = {"param": param.view(-1), "grad": grads[i].reshape(-1), "m1": exp_avgs[i].view(-1),
                "v": exp_avg_sqs[i].view(-1)}
        if a_t is not None:
            flat["m2"] = exp_avg_slows[i].view(-1)
        for start, length, layer in by_tensor.get(i, ()):
            view = {k: x.narrow(0, start, length) for k, x in flat.items()}
            b1 = beta1_of_layer[layer] if beta1_of_layer is not None else torch.as_tensor(
                beta1, dtype=torch.float64, device=device)
            g = torch.where(finite, view["grad"].float() * coef[layer], 0.0)
            view["m1"].lerp_(g, (1.0 - b1) * keep)
            view["v"].lerp_(g * g, (1.0 - beta2) * keep)
            numer = view["m1"] / (1.0 - b1 ** t)
            if a_t is not None:
                b3 = beta3_at(t, b1, beta3, t_beta3)
                view["m2"].lerp_(g, (1.0 - b3) * keep)
                numer = numer + a_t * view["m2"]
            denom = torch.sqrt(view["v"] / (1.0 - beta2 ** t)) + eps
            view["param"].mul_(1.0 - lr_k * weight_decay)
            view["param"].add_(numer / denom * (-lr_k * alph[layer]))
        if half_out is not None and half_out[i] is not None:
            half_out[i].view(-1).copy_(flat["param"])
