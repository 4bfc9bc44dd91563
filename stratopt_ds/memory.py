"""Memory planner: the model-state memory of a preset under DeepSpeed ZeRO, per GPU and per node.

``python -m stratopt_ds.memory --preset 7b --nodes 8 --gpus-per-node 8 [--optimizer stratopt]``

It counts *model states* only -- no activations, communication buckets, allocator fragmentation
or CUDA context -- with the accounting of DeepSpeed's own estimators
(``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_model_states_mem_needs``), so for
AdamW its totals are theirs. Assumptions, per parameter, with N GPUs in all:

* bf16 training: bf16 parameters (2 B) and gradients (2 B); the optimizer works on fp32 master
  weights (4 B), fp32 gradients (4 B) and 4 B per fp32 state: AdamW and the ``mix_alpha=0``
  variants keep m and v (8 B), StratOpt and other ``mix_alpha > 0`` ones also m2 (12 B);
* stage 0 keeps everything on every GPU; stage 1 partitions fp32 gradients, master weights and
  states (the bf16 gradients stay whole until they are reduced); stage 2 partitions the bf16
  gradients too; stage 3 also partitions the bf16 parameters and keeps gradients as fp32
  partitions, while the largest layer is gathered whole (bf16 parameters + gradients, 4 B per
  parameter of that layer) -- DeepSpeed's ZeRO-3 estimate, 18 B / N + 4 B x largest layer;
* optimizer offload (stages 1-3) moves fp32 gradients, master weights and states to host memory;
  the GPU keeps the bf16 parameters (and at stage 1 the bf16 gradients);
* CPU per node is the larger of the offloaded partitions of the node's GPUs and the peak of
  building the model: every local rank materialises it in fp32 (4 B/param), ZeRO-3 one layer at
  a time (``deepspeed.zero.Init``); times ``cpu_buffer_factor`` (DeepSpeed's
  ``additional_buffer_factor``, 1.5 by default there and here).

Two differences from DeepSpeed's host-memory numbers (GPU numbers are the same): its ZeRO-2
offload estimate neither divides the offloaded states by the number of nodes nor counts the
model-building peak per node (it uses all GPUs of the job); here both are per node, so the two
agree on one node. Its ZeRO-3 offload estimate ignores the build peak; here it counts when it is
larger (a small model on many nodes).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

from . import models

GIB = 2 ** 30
STAGES = (0, 1, 2, 3)


def state_bytes(optimizer: str) -> int:
    """Bytes per parameter of fp32 optimizer state: m, v (8), plus m2 when ``mix_alpha > 0``."""
    from .optim import preset_defaults

    return 4 * (3 if preset_defaults(optimizer)["mix_alpha"] > 0 else 2)


def preset_shape(name: str) -> SimpleNamespace:
    """The attributes of a preset's ``LlamaConfig`` that size it, without importing transformers."""
    p = models.preset(name)
    return SimpleNamespace(**{k: v for k, v in p.items() if k not in models.TRAIN_KEYS},
                           attention_bias=False, mlp_bias=False, head_dim=None)


def largest_layer_params(config) -> int:
    """Parameters of the largest module (own parameters only), as DeepSpeed's ZeRO-3 estimator counts."""
    d, ff = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * (getattr(config, "head_dim", None) or d // config.num_attention_heads)
    ab, mb = bool(config.attention_bias), bool(config.mlp_bias)
    return max(config.vocab_size * d, d * q + q * ab, q * d + d * ab, d * ff + ff * mb, ff * d + d * mb)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU of each model state (``offload``: states are in host memory) and per node of CPU."""
    stage: int
    offload: bool
    params: float      # bf16 parameters
    grads16: float     # bf16 gradients
    grads32: float     # fp32 gradients
    master: float      # fp32 master weights
    states: float      # fp32 optimizer states
    layer: float       # ZeRO-3: the largest layer gathered (bf16 params + grads)
    cpu_states: float  # per node: the offloaded partitions of its GPUs
    cpu_build: float   # per node: building the model (fp32 on every local rank)
    cpu_buffer_factor: float = 1.5

    @property
    def cpu_per_node(self) -> float:
        """Peak host memory per node, with the buffer factor (DeepSpeed's cpu_mem)."""
        return max(self.cpu_states, self.cpu_build) * self.cpu_buffer_factor

    @property
    def gpu(self) -> float:
        host = self.grads32 + self.master + self.states if self.offload else 0.0
        return self.params + self.grads16 + self.grads32 + self.master + self.states + self.layer - host


def plan(total_params: int, largest_layer: int, nodes: int, gpus_per_node: int, stage: int,
         offload: bool = False, optimizer: str = "adamw", cpu_buffer_factor: float = 1.5) -> MemoryPlan:
    """The memory of one ZeRO ``stage`` (see the module docstring for the assumptions)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage}")
    if offload and stage == 0:
        raise ValueError("optimizer offload needs ZeRO stage 1, 2 or 3")
    if min(total_params, largest_layer, nodes, gpus_per_node) < 1:
        raise ValueError("total_params, largest_layer, nodes and gpus_per_node must be >= 1")
    n = nodes * gpus_per_node
    p = total_params
    part = 1 if stage == 0 else n                     # how the fp32 optimizer side is divided
    params = 2 * p / (n if stage == 3 else 1)
    grads16 = {0: 2 * p, 1: 2 * p, 2: 0 if offload else 2 * p / n, 3: 0}[stage]
    grads32, master, states = 4 * p / part, 4 * p / part, state_bytes(optimizer) * p / part
    layer = 4 * largest_layer if stage == 3 else 0
    offloaded = gpus_per_node * (grads32 + master + states) if offload else 0
    build = 4 * gpus_per_node * (largest_layer if stage == 3 else p)
    return MemoryPlan(stage, offload, params, grads16, grads32, master, states, layer, offloaded, build,
                cpu_buffer_factor)


def plans(total_params: int, largest_layer: int, nodes: int, gpus_per_node: int,
          optimizer: str = "adamw", offload: Optional[bool] = None,
          cpu_buffer_factor: float = 1.5) -> list[MemoryPlan]:
    """Every stage without offload, then stages 1-3 with it (``offload`` True/False: only those)."""
    cases = [(s, False) for s in STAGES] + [(s, True) for s in STAGES[1:]]
    return [plan(total_params, largest_layer, nodes, gpus_per_node, s, o, optimizer, cpu_buffer_factor)
            for s, o in cases if offload is None or o == offload]


def format_table(rows: list[MemoryPlan]) -> str:
    cols = ("params", "grads16", "grads32", "master", "states", "layer")
    head = ["stage", "offload", "params bf16", "grads bf16", "grads fp32", "master fp32",
            "opt states", "gathered", "GPU total", "CPU states/node", "CPU peak/node"]
    lines = []
    for r in rows:
        cells = [str(r.stage), "cpu" if r.offload else "-"]
        for c in cols:
            v = getattr(r, c) / GIB
            host = r.offload and c in ("grads32", "master", "states")
            cells.append("-" if v == 0 else f"({v:.2f})" if host else f"{v:.2f}")
        states = r.cpu_states * r.cpu_buffer_factor / GIB
        cells += [f"{r.gpu / GIB:.2f}", f"{states:.1f}" if states else "-", f"{r.cpu_per_node / GIB:.1f}"]
        lines.append(cells)
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(x.rjust(w) for x, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines])


def main(argv: Optional[list[str]] = None) -> None:
    from .optim import available_optimizers

    parser = argparse.ArgumentParser(prog="python -m stratopt_ds.memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, help=f"model preset: {', '.join(models.MODEL_PRESETS)}")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes (default: 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default: 8)")
    parser.add_argument("--optimizer", default="stratopt", help="optimizer name (default: stratopt)")
    parser.add_argument("--offload", action="store_true",
                        help="show only the rows with optimizer offload (default: with and without)")
    parser.add_argument("--cpu-buffer-factor", type=float, default=1.5,
                        help="host-memory margin, DeepSpeed's additional_buffer_factor (default: 1.5)")
    args = parser.parse_args(argv)
    try:
        shape = preset_shape(args.preset)
    except ValueError as e:
        parser.error(f"--preset: {e}")
    for option, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            parser.error(f"{option} must be >= 1, got {value}")
    if not args.cpu_buffer_factor > 0:
        parser.error(f"--cpu-buffer-factor must be > 0, got {args.cpu_buffer_factor}")
    if args.optimizer not in available_optimizers():
        parser.error(f"--optimizer: unknown optimizer {args.optimizer!r}; "
                     f"available: {', '.join(available_optimizers())}")

    total, largest = models.count_parameters(shape), largest_layer_params(shape)
    n = args.nodes * args.gpus_per_node
    sb = state_bytes(args.optimizer)
    print(f"{args.preset}: {total / 1e9:.2f}B parameters (largest layer {largest / 1e6:.1f}M), "
          f"{args.nodes} node(s) x {args.gpus_per_node} GPUs = {n} GPUs, optimizer {args.optimizer}: "
          f"{sb // 4} fp32 states ({sb} B/param)")
    print("GiB of model states per GPU (no activations or buffers); (x): offloaded to host memory, "
          "not in the GPU total.\nCPU peak/node: the offloaded states or building the fp32 model on "
          f"every local rank, whichever is larger; CPU columns x{args.cpu_buffer_factor:g} margin.\n")
    print(format_table(plans(total, largest, args.nodes, args.gpus_per_node, args.optimizer,
                             True if args.offload else None, args.cpu_buffer_factor)))


if __name__ == "__main__":
    main()
