"""Memory planner: the model-state memory of a preset under DeepSpeed ZeRO, per GPU and per node.

``python -m stratopt_ds.memory --preset 7b --nodes 8 --gpus-per-node 8 [--optimizer stratopt]
[--tp 4 --pp 2]`` (also ``python -m stratopt_ds.plan``)

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

Tensor (``--tp``, DeepSpeed AutoTP) and pipeline (``--pp``, ``PipelineModule``) parallelism:
a rank holds the parameters of its pipeline stage (the larger of the first, with the embedding,
and the last, with the head and final norm; ``ceil(layers / pp)`` blocks each), of which AutoTP
splits the attention and MLP matrices and the (untied) LM head ``tp`` ways, as HF's LLaMA
``tp_plan`` does, while the embedding and the RMSNorm weights stay whole on every TP rank
(:func:`rank_params`). ZeRO then partitions over the data-parallel group, ``N / (tp x pp)``
ranks. stratopt_ds supports pipelines at ZeRO 1 (DeepSpeed's pipeline engine runs 0 or 1; at 0
there is no ZeRO wrapper to bind) and AutoTP at ZeRO 1 or 2, so only those stages are planned
for such layouts. A tied embedding is counted whole on every rank (the tied presets are the
small ones, not TP targets; how AutoTP splits a tied head is not modelled). Under AutoTP every rank first builds
the whole model in fp32 (then it is split), which sets the CPU build peak.

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


def rank_params(config, tp: int = 1, pp: int = 1) -> int:
    """Parameters one rank holds under ``tp``-way AutoTP and a ``pp``-stage pipeline (the
    busier of the first and last stages); ``models.count_parameters`` at tp = pp = 1."""
    d, ff, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    split = d * q + 2 * d * kv + q * d + 3 * d * ff         # q, k, v, o; gate, up, down
    whole = 2 * d                                             # the two RMSNorm weights
    if config.attention_bias:
        split, whole = split + q + 2 * kv, whole + d          # column biases split, o's whole
    if config.mlp_bias:
        split, whole = split + 2 * ff, whole + d
    block = -(-split // tp) + whole
    blocks = -(-config.num_hidden_layers // pp)
    embedding = vocab * d
    head = 0 if config.tie_word_embeddings and pp == 1 else -(-vocab * d // tp)
    if pp == 1:
        return blocks * block + embedding + head + d
    return max(blocks * block + embedding, blocks * block + head + d)


def layout_stages(tp: int, pp: int) -> tuple[int, ...]:
    """The ZeRO stages stratopt_ds runs a layout at: pipelines 1, AutoTP 1-2."""
    if pp > 1:
        return (1,)
    return (1, 2) if tp > 1 else STAGES


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
    tp: int = 1
    pp: int = 1

    @property
    def cpu_per_node(self) -> float:
        """Peak host memory per node, with the buffer factor (DeepSpeed's cpu_mem)."""
        return max(self.cpu_states, self.cpu_build) * self.cpu_buffer_factor

    @property
    def gpu(self) -> float:
        host = self.grads32 + self.master + self.states if self.offload else 0.0
        return self.params + self.grads16 + self.grads32 + self.master + self.states + self.layer - host


def plan(total_params: int, largest_layer: int, nodes: int, gpus_per_node: int, stage: int,
         offload: bool = False, optimizer: str = "adamw", cpu_buffer_factor: float = 1.5,
         tp: int = 1, pp: int = 1, params_per_rank: Optional[int] = None) -> MemoryPlan:
    """The memory of one ZeRO ``stage`` (see the module docstring for the assumptions); under
    ``tp`` x ``pp`` model parallelism a rank holds ``params_per_rank`` (:func:`rank_params`)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage}")
    if offload and stage == 0:
        raise ValueError("optimizer offload needs ZeRO stage 1, 2 or 3")
    if min(total_params, largest_layer, nodes, gpus_per_node, tp, pp) < 1:
        raise ValueError("total_params, largest_layer, nodes, gpus_per_node, tp and pp must be >= 1")
    n = nodes * gpus_per_node
    if n % (tp * pp):
        raise ValueError(f"tp x pp = {tp} x {pp} does not divide the {n} GPUs")
    if stage not in layout_stages(tp, pp):
        raise ValueError(f"ZeRO stage {stage} with tp={tp}, pp={pp}: expected one of {layout_stages(tp, pp)}")
    if (tp > 1 or pp > 1) and params_per_rank is None:
        raise ValueError("tensor or pipeline parallelism needs params_per_rank (rank_params)")
    dp = n // (tp * pp)                               # the data-parallel group ZeRO partitions over
    p = params_per_rank or total_params
    part = 1 if stage == 0 else dp                    # how the fp32 optimizer side is divided
    params = 2 * p / (dp if stage == 3 else 1)
    grads16 = {0: 2 * p, 1: 2 * p, 2: 0 if offload else 2 * p / dp, 3: 0}[stage]
    grads32, master, states = 4 * p / part, 4 * p / part, state_bytes(optimizer) * p / part
    layer = 4 * largest_layer if stage == 3 else 0
    offloaded = gpus_per_node * (grads32 + master + states) if offload else 0
    built = largest_layer if stage == 3 else total_params if tp > 1 else p  # AutoTP splits after
    build = 4 * gpus_per_node * built
    return MemoryPlan(stage, offload, params, grads16, grads32, master, states, layer, offloaded, build,
                      cpu_buffer_factor, tp, pp)


def plans(total_params: int, largest_layer: int, nodes: int, gpus_per_node: int,
          optimizer: str = "adamw", offload: Optional[bool] = None,
          cpu_buffer_factor: float = 1.5, tp: int = 1, pp: int = 1,
          params_per_rank: Optional[int] = None) -> list[MemoryPlan]:
    """Every stage the layout runs without offload, then with it (``offload`` True/False: only those)."""
    stages = layout_stages(tp, pp)
    cases = [(s, False) for s in stages] + [(s, True) for s in stages if s > 0]
    return [plan(total_params, largest_layer, nodes, gpus_per_node, s, o, optimizer, cpu_buffer_factor,
                 tp, pp, params_per_rank)
            for s, o in cases if offload is None or o == offload]


def layouts(config, nodes: int, gpus_per_node: int, optimizer: str = "adamw",
            cpu_buffer_factor: float = 1.5) -> list[MemoryPlan]:
    """The model-parallel layouts of a cluster, without offload: AutoTP within a node (2, 4, 8
    ways, ZeRO 1 and 2) and pipelines of 2-8 stages (ZeRO 1), alone and combined."""
    total, largest, n = models.count_parameters(config), largest_layer_params(config), nodes * gpus_per_node
    rows = []
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4, 8):
            if (tp, pp) == (1, 1) or tp > gpus_per_node or n % (tp * pp) or pp > config.num_hidden_layers:
                continue
            for stage in (s for s in layout_stages(tp, pp) if s > 0):
                rows.append(plan(total, largest, nodes, gpus_per_node, stage, False, optimizer,
                                 cpu_buffer_factor, tp, pp, rank_params(config, tp, pp)))
    return rows


def format_table(rows: list[MemoryPlan]) -> str:
    cols = ("params", "grads16", "grads32", "master", "states", "layer")
    parallel = any(r.tp > 1 or r.pp > 1 for r in rows)
    head = (["tp", "pp"] if parallel else []) + [
        "stage", "offload", "params bf16", "grads bf16", "grads fp32", "master fp32",
        "opt states", "gathered", "GPU total", "CPU states/node", "CPU peak/node"]
    lines = []
    for r in rows:
        cells = ([str(r.tp), str(r.pp)] if parallel else []) + [str(r.stage), "cpu" if r.offload else "-"]
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
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel size (AutoTP; default 1): plan this layout only")
    parser.add_argument("--pp", type=int, default=1,
                        help="pipeline stages (PipelineModule; default 1): plan this layout only")
    args = parser.parse_args(argv)
    try:
        shape = preset_shape(args.preset)
    except ValueError as e:
        parser.error(f"--preset: {e}")
    for option, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node),
                          ("--tp", args.tp), ("--pp", args.pp)):
        if value < 1:
            parser.error(f"{option} must be >= 1, got {value}")
    n = args.nodes * args.gpus_per_node
    if n % (args.tp * args.pp):
        parser.error(f"--tp {args.tp} x --pp {args.pp} must divide the {n} GPUs "
                     f"(--nodes {args.nodes} x --gpus-per-node {args.gpus_per_node})")
    if args.pp > shape.num_hidden_layers:
        parser.error(f"--pp {args.pp}: {args.preset} has only {shape.num_hidden_layers} blocks to split")
    if not args.cpu_buffer_factor > 0:
        parser.error(f"--cpu-buffer-factor must be > 0, got {args.cpu_buffer_factor}")
    if args.optimizer not in available_optimizers():
        parser.error(f"--optimizer: unknown optimizer {args.optimizer!r}; "
                     f"available: {', '.join(available_optimizers())}")

    total, largest = models.count_parameters(shape), largest_layer_params(shape)
    sb = state_bytes(args.optimizer)
    print(f"{args.preset}: {total / 1e9:.2f}B parameters (largest layer {largest / 1e6:.1f}M), "
          f"{args.nodes} node(s) x {args.gpus_per_node} GPUs = {n} GPUs, optimizer {args.optimizer}: "
          f"{sb // 4} fp32 states ({sb} B/param)")
    print("GiB of model states per GPU (no activations or buffers); (x): offloaded to host memory, "
          "not in the GPU total.\nCPU peak/node: the offloaded states or building the fp32 model on "
          f"every local rank, whichever is larger; CPU columns x{args.cpu_buffer_factor:g} margin.\n")
    tp, pp = args.tp, args.pp
    if tp > 1 or pp > 1:
        print(f"tp={tp} x pp={pp}: {rank_params(shape, tp, pp) / 1e9:.2f}B parameters per rank, "
              f"ZeRO over {n // (tp * pp)} data-parallel ranks\n")
    print(format_table(plans(total, largest, args.nodes, args.gpus_per_node, args.optimizer,
                             True if args.offload else None, args.cpu_buffer_factor, tp, pp,
                             rank_params(shape, tp, pp))))
    if tp == pp == 1 and not args.offload:
        rows = layouts(shape, args.nodes, args.gpus_per_node, args.optimizer, args.cpu_buffer_factor)
        if rows:
            print("\nWith tensor (AutoTP, within a node) and pipeline parallelism; ZeRO partitions "
                  "over the remaining data-parallel ranks (--tp/--pp: one layout, with offload):\n")
            print(format_table(rows))


if __name__ == "__main__":
    main()
