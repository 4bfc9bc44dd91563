"""Per-layer statistics and clipping (spec sections 3 and 5): one home for every optimizer.

Input per step: the per-layer sums of squares of the gradient, already summed over all ranks.
Output: per-layer clip coefficients and scales ``alpha_l`` for the elementwise update.

Choices where the spec leaves room (documented here, see also docs/OPTIMIZERS.md):

* The per-layer scalars (``n_l``, ``gbar_l``, ``r_l``, ``alpha_l``, clip coefficients) are
  kept in float64. They are L-length vectors, so this costs nothing, and it removes one rounding
  step between the reference and the native kernels. The elementwise maths stays fp32.
* ``gbar_hat_l`` uses the layer's own count of gbar updates (``count_l``) for its bias
  correction. It equals ``t - 1`` of the spec whenever all groups step together; it stays right
  when a layer spans parameter groups (``granularity="block"``).
* Nothing here synchronises with the host: the non-finite check is a device flag that the
  update uses to leave weights, states and counters untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

GLOBAL_CLIP_EPS = 1e-6  # g <- g * min(1, c / (N + 1e-6)), spec section 5


@dataclass
class LayerStep:
    """What one step's layer statistics hand to the update. All float64 vectors of length L."""

    norms: torch.Tensor      # n_l, before clipping
    clip_coef: torch.Tensor  # factor the gradient of layer l is multiplied by (1 = not clipped)
    alpha: torch.Tensor      # alpha_l, the update scale
    finite: torch.Tensor     # 0-dim bool: False means the whole step is skipped


class LayerStats:
    """gbar EMA, update counts, clip counts and the skipped-step counter of all L layers."""

    def __init__(self, num_layers: int, options: Mapping[str, Any], device: torch.device):
        self.options = dict(options)
        f64 = dict(dtype=torch.float64, device=device)
        self.gbar = torch.zeros(num_layers, **f64)
        self.count = torch.zeros(num_layers, **f64)
        self.clip_count = torch.zeros(num_layers, dtype=torch.int64, device=device)
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def num_layers(self) -> int:
        return self.gbar.numel()

    def advance(self, layer_sq: torch.Tensor) -> LayerStep:
        """Take one step's layer sums of squares; update the state unless a norm is non-finite."""
        opt = self.options
        layer_sq = layer_sq.to(self.gbar.device, torch.float64)
        finite = torch.isfinite(layer_sq).all()
        n = torch.sqrt(layer_sq)
        has_history = self.count > 0
        # 1 - bn^0 = 0 for layers without history: divide by 1 there, the value is unused.
        debias = torch.where(has_history, 1.0 - opt["norm_beta"] ** self.count, 1.0)
        gbar_hat = self.gbar / debias

        ones = torch.ones_like(n)
        clip = opt["clip"]
        if clip == "global":
            total = torch.sqrt(layer_sq.sum())
            coef = torch.clamp(opt["clip_threshold"] / (total + GLOBAL_CLIP_EPS), max=1.0) * ones
            clipped = coef < 1.0
            n_clipped = n * coef
        elif clip == "layer":
            limit = opt["clip_tau"] * gbar_hat
            clipped = has_history & (n > limit)
            coef = torch.where(clipped, limit / n, ones)
            n_clipped = torch.where(clipped, limit, n)
        else:
            coef, clipped, n_clipped = ones, torch.zeros_like(has_history), n

        r = torch.where(has_history, n_clipped / (gbar_hat + opt["norm_eps"]), ones)
        scaling = opt["scaling"]
        if scaling == "none":
            alpha = ones
        else:
            s = {"linear": r, "sqrt": torch.sqrt(r), "inverse": 1.0 / r}[scaling]
            alpha = torch.clamp(s, opt["alpha_min"], opt["alpha_max"])

        bn = opt["norm_beta"]
        self.gbar.copy_(torch.where(finite, bn * self.gbar + (1.0 - bn) * n_clipped, self.gbar))
        self.count.add_(finite.to(torch.float64))
        self.clip_count.add_((clipped & finite).to(torch.int64))
        self.skipped_steps.add_((~finite).to(torch.int64))
        # A skipped step must not carry NaN/Inf scalars into the update (0 * NaN is NaN).
        coef = torch.where(finite, coef, ones)
        alpha = torch.where(finite, alpha, ones)
        return LayerStep(norms=n, clip_coef=coef, alpha=alpha, finite=finite)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"gbar": self.gbar.clone(), "count": self.count.clone(),
                "clip_count": self.clip_count.clone(), "skipped_steps": self.skipped_steps.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for key in ("gbar", "count", "clip_count", "skipped_steps"):
            if key not in state:
                raise ValueError(f"layer statistics state has no {key!r}; got keys {sorted(state)}")
            mine, theirs = getattr(self, key), state[key]
            if tuple(theirs.shape) != tuple(mine.shape):
                raise ValueError(f"layer statistics {key!r} has shape {tuple(theirs.shape)}, "
                                 f"this optimizer has {tuple(mine.shape)} ({self.num_layers} layers)")
            mine.copy_(theirs)
