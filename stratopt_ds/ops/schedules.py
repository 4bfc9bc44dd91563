"""Warm-up schedules of the slow momentum (docs/ALGORITHMS.md section 2), on tensors so the step needs no sync."""
from __future__ import annotations

import math

import torch


def mix_alpha_at(t: torch.Tensor, alpha: float, t_alpha: int) -> torch.Tensor:
    """a(t) = alpha * min(1, t / T_alpha); T_alpha = 0 means no warm-up."""
    if t_alpha <= 0:
        return torch.full_like(t, alpha)
    return alpha * torch.clamp(t / t_alpha, max=1.0)


def _half_life(beta: torch.Tensor) -> torch.Tensor:
    return math.log(0.5) / torch.log(beta) - 1.0


def beta3_at(t: torch.Tensor, beta1: torch.Tensor, beta3: float, t_beta3: int) -> torch.Tensor:
    """b3(t): linear in half-life space from beta1 (t = 0) to beta3 (t >= T_b3)."""
    if t_beta3 <= 0:
        return torch.full_like(t, beta3)
    s = torch.clamp(t / t_beta3, max=1.0)
    b3 = torch.as_tensor(beta3, dtype=t.dtype, device=t.device)
    h = (1.0 - s) * _half_life(beta1) + s * _half_life(b3)
    return torch.pow(0.5, 1.0 / (h + 1.0))
