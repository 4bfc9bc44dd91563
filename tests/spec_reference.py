"""An independent float64 implementation of docs/ALGORITHMS.md, written for the tests.

It imports nothing from stratopt_ds: it works on plain dicts of named float64 tensors, with the
spec's formulas as written (step counter t, bn^(t-1) debiasing, block regex of section 7).
"""
from __future__ import annotations

import math
import re

import torch

OPTIMIZER_PRESETS = {
    "adamw": dict(scaling="none", clip="none", mix_alpha=0.0, beta1_mode="const"),
    "ademamix": dict(scaling="none", clip="none", mix_alpha=8.0, beta1_mode="const"),
    "stratopt": dict(scaling="linear", clip="layer", mix_alpha=5.0, beta1_mode="const"),
}
for s in ("linear", "sqrt", "inverse"):
    for b in ("const", "depth"):
        for c in ("global", "layer"):
            OPTIMIZER_PRESETS[f"la-{s}-b1{b}-clip{c}"] = dict(scaling=s, clip=c, mix_alpha=0.0, beta1_mode=b)

DEFAULTS = dict(lr=3e-4, b1=0.9, b2=0.999, b3=0.999, eps=1e-8, wd=0.1, t_alpha=0, t_beta3=0,
                clip_threshold=1.0, clip_tau=2.0, bn=0.99, eps_n=1e-12, alpha_min=0.1,
                alpha_max=10.0, granularity="tensor")


def _block(name):
    m = re.search(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


class SpecOptimizer:
    """fp64 spec optimizer over {name: tensor}; ``wd_of`` gives each tensor's weight decay."""

    def __init__(self, params: dict, wd_of: dict, name: str, **overrides):
        self.hp = {**DEFAULTS, **OPTIMIZER_PRESETS[name], **overrides}
        self.p = {k: v.detach().to(torch.float64).clone() for k, v in params.items()}
        self.wd_of = wd_of
        blocks = {k: _block(k) for k in params}
        nb = max([b for b in blocks.values() if b is not None], default=-1) + 1
        self.depth = {k: (0.5 if b is None else (b / (nb - 1) if nb > 1 else 0.0))
                      for k, b in blocks.items()}
        block_mode = self.hp["granularity"] == "block"
        self.layer_of = {k: (f"block.{b}" if block_mode and b is not None else k)
                         for k, b in blocks.items()}
        self.m = {k: torch.zeros_like(v) for k, v in self.p.items()}
        self.v = {k: torch.zeros_like(v) for k, v in self.p.items()}
        self.m2 = {k: torch.zeros_like(v) for k, v in self.p.items()}
        self.gbar = {l: 0.0 for l in self.layer_of.values()}
        self.t = 0
        self.skipped = 0
        self.clip_events = 0
        self.clamp_events = 0

    def step(self, grads: dict):
        hp = self.hp
        g = {k: v.to(torch.float64) for k, v in grads.items()}
        sq = {}
        for k, l in self.layer_of.items():
            sq[l] = sq.get(l, 0.0) + float((g[k] ** 2).sum())
        if not all(math.isfinite(x) for x in sq.values()):
            self.skipped += 1
            return
        self.t += 1
        t = self.t
        n = {l: math.sqrt(x) for l, x in sq.items()}
        N = math.sqrt(sum(x * x for x in n.values()))
        coef, alpha = {}, {}
        for l, nl in n.items():
            gbar_hat = self.gbar[l] / (1 - hp["bn"] ** (t - 1)) if t > 1 else None
            c, n_clip = 1.0, nl
            if hp["clip"] == "global":
                c = min(1.0, hp["clip_threshold"] / (N + 1e-6))
                n_clip = nl * c
            elif hp["clip"] == "layer" and t >= 2 and nl > hp["clip_tau"] * gbar_hat:
                c = hp["clip_tau"] * gbar_hat / nl
                n_clip = hp["clip_tau"] * gbar_hat
            if c < 1.0:
                self.clip_events += 1
            r = 1.0 if t == 1 else n_clip / (gbar_hat + hp["eps_n"])
            if hp["scaling"] == "none":
                a = 1.0
            else:
                s = {"linear": r, "sqrt": math.sqrt(r), "inverse": 1.0 / r if r > 0 else math.inf}[hp["scaling"]]
                a = min(max(s, hp["alpha_min"]), hp["alpha_max"])
                if a != s:
                    self.clamp_events += 1
            coef[l], alpha[l] = c, a
            self.gbar[l] = hp["bn"] * self.gbar[l] + (1 - hp["bn"]) * n_clip
        a_t = hp["mix_alpha"] * (min(1.0, t / hp["t_alpha"]) if hp["t_alpha"] > 0 else 1.0)
        f = lambda b: math.log(0.5) / math.log(b) - 1  # noqa: E731
        for k in self.p:
            l = self.layer_of[k]
            gk = g[k] * coef[l]
            b1 = 0.85 + 0.10 * self.depth[k] if hp["beta1_mode"] == "depth" else hp["b1"]
            b2 = hp["b2"]
            if hp["t_beta3"] > 0:
                s = min(1.0, t / hp["t_beta3"])
                b3 = 0.5 ** (1 / ((1 - s) * f(b1) + s * f(hp["b3"]) + 1))
            else:
                b3 = hp["b3"]
            self.m[k] = b1 * self.m[k] + (1 - b1) * gk
            self.v[k] = b2 * self.v[k] + (1 - b2) * gk * gk
            self.m2[k] = b3 * self.m2[k] + (1 - b3) * gk
            mix = a_t * self.m2[k] if hp["mix_alpha"] > 0 else 0.0
            u = (self.m[k] / (1 - b1 ** t) + mix) / (torch.sqrt(self.v[k] / (1 - b2 ** t)) + hp["eps"])
            self.p[k] = self.p[k] - hp["lr"] * (alpha[l] * u + self.wd_of[k] * self.p[k])
