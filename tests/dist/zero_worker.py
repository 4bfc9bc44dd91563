"""Multi-process ZeRO runs, launched by tests/test_zero.py as `deepspeed --num_gpus W ...`.

One process per rank loops over many configurations (every launch costs seconds). For each,
it trains the same model with DeepSpeed and, on rank 0, with the plain single-process optimizer
on the same global batches, and writes what the test asserts to a JSON file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import deepspeed  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402

import stratopt_ds  # noqa: E402
import stratopt_ds.deepspeed  # noqa: E402
from helpers import Block, TinyNet, batch, max_rel_err  # noqa: E402
from stratopt_ds.ops import use_backend  # noqa: E402
from stratopt_ds.optim import named_param_groups  # noqa: E402

GLOBAL_BATCH = 24
STEPS = 20
LR = 1e-2


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = TinyNet(vocab=11, dims=(7, 13, 10, 9), n_out=5)
    model.blocks[1].norm.bias.requires_grad_(False)  # a frozen tensor
    return model


class EmbedMean(torch.nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)

    def forward(self, tokens):
        return self.embed(tokens).mean(dim=1)


def pipeline_layers(seed: int = 0) -> list[torch.nn.Module]:
    """TinyNet as a list of pipeline layers: embedding, three blocks, head."""
    torch.manual_seed(seed)
    dims = (7, 13, 10, 9)
    layers = [EmbedMean(11, dims[0]), *(Block(a, b) for a, b in zip(dims[:-1], dims[1:])),
              torch.nn.Linear(dims[-1], 5, bias=False)]
    layers[2].norm.bias.requires_grad_(False)  # a frozen tensor
    return layers


class Unsplit(torch.nn.Module):
    """The pipeline's layers in one process, named as stratopt_ds names a PipelineModule's."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.layers = torch.nn.Sequential(*pipeline_layers(seed))

    def forward(self, tokens):
        return self.layers(tokens)


class MLPBlock(torch.nn.Module):
    """Pre-norm residual MLP: ``up`` is split by output rows across the TP ranks (column
    parallel), ``down`` by input columns (row parallel, its bias whole); the norm stays whole."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.up = torch.nn.Linear(dim, hidden)
        self.down = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class TPNet(torch.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(11, 8)
        self.blocks = torch.nn.ModuleList([MLPBlock(8, 12), MLPBlock(8, 16)])
        self.head = torch.nn.Linear(8, 5, bias=False)
        self.blocks[1].norm.bias.requires_grad_(False)  # a frozen tensor

    def forward(self, tokens):
        x = self.embed(tokens).mean(dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


TP_SPLIT = {r".*\.up\.(weight|bias)$": ("column", 0), r".*\.down\.weight$": ("row", 1)}


def autotp_section(size: int) -> dict:
    specs = [{"patterns": [pattern], "partition_type": kind} for pattern, (kind, _) in TP_SPLIT.items()]
    return {"autotp_size": size, "partition_config": {"use_default_specs": False, "layer_specs": specs}}


def unsplit_params(engine, per_rank: dict) -> dict:
    """The whole tensors from every rank's TP slices: split ones concatenated in TP-rank order
    along their split dimension, replicated ones from TP rank 0."""
    from deepspeed.utils import groups
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (groups.get_tensor_model_parallel_rank(), groups.get_data_parallel_rank(), per_rank))
    slices = sorted((tp, piece) for tp, dp, piece in everyone if dp == 0)
    out = {}
    for name in per_rank:
        dim = next((d for pattern, (_, d) in TP_SPLIT.items() if re.match(pattern, name)), None)
        out[name] = slices[0][1][name] if dim is None else torch.cat([piece[name] for _, piece in slices], dim)
    return out


def pipeline_model():
    from deepspeed.pipe import PipelineModule
    return PipelineModule(layers=pipeline_layers(), num_stages=2, partition_method="uniform",
                          loss_fn=torch.nn.CrossEntropyLoss())


def data_parallel_size(cfg) -> int:
    return dist.get_world_size() // (2 if cfg.get("pipeline") else cfg.get("tp", 1))


def micro_batches(step: int, world: int, gas: int):
    """[micro][rank] -> (x, y): the global batch of ``step`` split for ``world`` ranks and ``gas``."""
    x, y = batch(step, n=GLOBAL_BATCH, seq=5, vocab=11, n_out=5, seed=1)
    mb = GLOBAL_BATCH // (world * gas)
    return [[(x[(m * world + r) * mb:(m * world + r + 1) * mb], y[(m * world + r) * mb:(m * world + r + 1) * mb])
             for r in range(world)] for m in range(gas)]


def opt_kwargs(cfg):
    return dict(lr=LR, granularity=cfg.get("granularity", "tensor"))


def build_optimizer(cfg, model):
    """The optimizer of a run; ``groups3`` adds a third group of one 9-element tensor, so that
    at 4 ranks some ranks hold nothing of it but padding (an empty partition)."""
    if cfg.get("plain"):
        return stratopt_ds.create_optimizer(cfg["opt"], [p for p in model.parameters() if p.requires_grad],
                                            **opt_kwargs(cfg))
    if not cfg.get("groups3"):
        return stratopt_ds.create_optimizer(cfg["opt"], model, **opt_kwargs(cfg))
    groups = named_param_groups(model, 0.1)
    lonely = "blocks.2.norm.bias"
    for g in groups:
        if lonely in g["param_names"]:
            k = g["param_names"].index(lonely)
            tensor = g["params"].pop(k)
            g["param_names"].pop(k)
    groups.append({"params": [tensor], "param_names": [lonely], "weight_decay": 0.0, "lr": LR / 2})
    return stratopt_ds.create_optimizer(cfg["opt"], groups, **opt_kwargs(cfg))


def clip_like_deepspeed(params, clip: float) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).float()
    coef = torch.clamp((norm + 1e-6) / clip, min=1.0)
    for g in grads:
        g.mul_(1.0 / coef)


def half_dtype(cfg):
    return torch.bfloat16 if cfg.get("bf16") else torch.float16 if cfg.get("fp16") else None


def reference_run(cfg, world: int, loss_scales=None):
    """Single process, same global batches, same micro-batch split; bf16 or fp16 forward if
    asked. fp16: the loss times the step's loss scale is backpropagated in fp16, each rank's
    gradient averaged in fp32 and rounded to fp16 (as ZeRO 1/2 with fp32 communication do), then
    divided by the scale DeepSpeed unscales with (``loss_scales``: (backward, unscale) per step,
    recorded from DeepSpeed: larger where the dynamic scale grows, smaller where the step
    overflowed, which is then not stepped)."""
    make = Unsplit if cfg.get("pipeline") else TPNet if cfg.get("tp") or cfg.get("tpnet") else make_model
    master = make()
    work = master
    half = half_dtype(cfg)
    if half is not None:  # DeepSpeed's fp32 master starts from the 16-bit-rounded weights
        work = make().to(half)
        with torch.no_grad():
            for p in master.parameters():
                p.copy_(p.to(half).float())
    opt = build_optimizer(cfg, master)
    gas = cfg["gas"]
    for step in range(STEPS):
        scale, unscale = loss_scales[step] if cfg.get("fp16") else (1.0, 1.0)
        if unscale < scale:  # hysteresis 1: DeepSpeed halved the scale, so the step overflowed
            continue  # and was skipped: no optimizer step, the batch is spent
        acc = {n: torch.zeros_like(p) for n, p in master.named_parameters() if p.requires_grad}
        for micro in micro_batches(step, world, gas):
            for x, y in micro:
                work.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(work(x).float(), y) / gas
                (loss * scale if cfg.get("fp16") else loss).backward()
                for n, p in work.named_parameters():
                    if p.requires_grad:
                        acc[n] += p.grad.float()
        for n, p in master.named_parameters():
            if p.requires_grad:
                p.grad = acc[n] / world
                if cfg.get("fp16"):
                    p.grad = p.grad.half().float() / unscale
        if cfg.get("ds_clip"):
            clip_like_deepspeed(master.parameters(), cfg["ds_clip"])
        opt.step()
        if work is not master:
            with torch.no_grad():
                for (_, wp), mp in zip(work.named_parameters(), master.parameters()):
                    wp.copy_(mp)
    return ({n: p.detach().clone() for n, p in master.named_parameters()},
            by_layer_name(opt, opt.last_step.norms), layer_statistics(opt))


def by_layer_name(opt, values: torch.Tensor) -> torch.Tensor:
    """Per-layer values in the order of the layer names (a pipeline numbers its layers stage by
    stage, the single process group by group)."""
    names = opt.base_layer_map.layout.layer_names
    return values[sorted(range(len(names)), key=names.__getitem__)].clone()


def layer_statistics(opt) -> dict:
    stats = opt.layer_stats
    return {"gbar": by_layer_name(opt, stats.gbar), "count": by_layer_name(opt, stats.count),
            "skipped": int(stats.skipped_steps)}


def ds_config(cfg):
    zero = {"stage": cfg["stage"]}
    if cfg.get("offload"):
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // (data_parallel_size(cfg) * cfg["gas"]),
        "gradient_accumulation_steps": cfg["gas"],
        "zero_optimization": {**zero, **cfg.get("zero_extra", {})},
        "bf16": {"enabled": bool(cfg.get("bf16"))},
        # bf16 runs accumulate and reduce gradients in fp32, as the reference does; with
        # bf16 communication the reduction's own rounding (~4e-3) would hide any norm error.
        **({"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
           if cfg.get("bf16") else {}),
        # fp16: dynamic loss scaling, halved at every overflow (hysteresis 1)
        **({"tensor_parallel": autotp_section(cfg["tp"])} if cfg.get("tp") else {}),
        **({"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 1,
                     "loss_scale_window": cfg.get("scale_window", 1000)},
            "communication_data_type": "fp32"} if cfg.get("fp16") else {}),
        "gradient_clipping": cfg.get("ds_clip", 0.0),
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


class AllReduceCounter:
    """Wraps torch.distributed.all_reduce; counts float64 vectors of length L (our norms)."""

    def __init__(self, length: int):
        self.length, self.calls = length, 0
        self._orig = dist.all_reduce

    def __enter__(self):
        def counted(tensor, *args, **kwargs):
            if tensor.dtype == torch.float64 and tensor.numel() == self.length:
                self.calls += 1
            return self._orig(tensor, *args, **kwargs)
        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def ds_run(cfg):
    world = dist.get_world_size()
    model = pipeline_model() if cfg.get("pipeline") else TPNet() if cfg.get("tp") else make_model()
    opt = build_optimizer(cfg, model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(cfg))
    if cfg.get("no_reduce"):  # deliberately per-partition norms: the matrix must then fail
        stratopt_ds.zero.attach(opt, engine.optimizer, reduce_enabled=False)
    elif cfg.get("pipeline") or cfg.get("tp"):  # (a pipeline's layer numbering is agreed on at binding)
        stratopt_ds.zero.attach(opt, engine.optimizer, span_model_parallel=not cfg.get("data_norms_only"))
    loss_scales = []
    with AllReduceCounter(opt.layer_stats.num_layers) as counter:
        train_steps(engine, cfg, range(STEPS), loss_scales)
    params = full_fp32_params(engine)
    norms = by_layer_name(opt, opt.last_step.norms)
    gathered = [torch.zeros_like(norms) for _ in range(world)]
    dist.all_gather(gathered, norms)
    same_on_ranks = all(torch.equal(g, gathered[0]) for g in gathered)
    kind = opt.sharding.kind if not opt.sharding.is_local else "none"
    layout = _layout_facts(opt)
    # ZeRO++ hpZ: parameters with a secondary (intra-group) partition besides their ZeRO-3 one
    layout["secondary_partitions"] = sum(getattr(p, "ds_secondary_tensor", None) is not None
                                         for p in model.parameters())
    layout.update(skipped_by_deepspeed=engine.skipped_steps, loss_scales=loss_scales)
    return params, norms, same_on_ranks, counter.calls, kind, layout, layer_statistics(opt)


def _layout_facts(opt):
    """How many layers straddle ranks, and how much padding the partitions have."""
    if opt.sharding.is_local:
        return {"straddling_layers": 0, "padding": 0, "empty_slots": 0}
    slots = opt.sharding.slots
    mine = sorted({f.layer for s in slots for f in s.fragments})
    padding = sum(s.flat.numel() - sum(f.length for f in s.fragments) for s in slots)
    empty = sum(1 for s in slots if not s.fragments)
    # which optimizer fragments each rank holds: (layer, start, length) per slot, every rank
    held = [[(f.layer, f.start, f.length) for f in s.fragments] for s in slots]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (mine, padding, empty, held))
    digest = hashlib.sha256(repr([h for *_, h in everyone]).encode()).hexdigest()[:16]
    owners = {}
    for layers, *_ in everyone:
        for layer in layers:
            owners[layer] = owners.get(layer, 0) + 1
    return {"straddling_layers": sum(1 for n in owners.values() if n > 1),
            "padding": sum(p for _, p, *_ in everyone), "empty_slots": sum(e for _, _, e, _ in everyone),
            "fragments": digest}


def matrix(world: int):
    opts = [("stratopt", "tensor"), ("la-sqrt-b1depth-cliplayer", "block"),
            ("la-inverse-b1const-clipglobal", "tensor")]
    cfgs = []
    for stage in (0, 1, 2, 3):
        for offload in ((False,) if stage == 0 else (False, True)):
            for gas in (1, 2):
                for name, gran in opts:
                    cfgs.append(dict(stage=stage, offload=offload, gas=gas, opt=name, granularity=gran))
    # bf16 only at power-of-two world sizes: at 3 ranks DeepSpeed's stage-2 bf16 gradient path
    # rounds the rank-averaged gradient (measured 5e-3 from an fp32-reduced reference with the
    # same micro-batches); stages 1 and 3 match there too, but the matrix keeps one rule.
    if world & (world - 1) == 0:
        for stage in (1, 2, 3):
            cfgs.append(dict(stage=stage, offload=False, gas=2, opt="stratopt", bf16=True))
        cfgs.append(dict(stage=3, offload=True, gas=1, opt="stratopt", bf16=True))
    cfgs.append(dict(stage=2, offload=False, gas=1, opt="stratopt", ds_clip=0.05))
    for stage in (1, 2, 3):
        cfgs.append(dict(stage=stage, offload=stage == 3, gas=1, opt="stratopt", groups3=True))
    cfgs.append(dict(stage=3, offload=True, gas=2, opt="la-sqrt-b1depth-cliplayer", ds_clip=0.05))
    # fp16 with dynamic loss scaling at ZeRO 1/2 (power-of-two world sizes: fp16 averaging is
    # then exact up to the one rounding the reference reproduces); two forced overflow steps
    if world & (world - 1) == 0 and world > 1:
        for stage in (1, 2):
            for name, gran in opts[:2]:
                cfgs.append(dict(stage=stage, offload=False, gas=1, opt=name, granularity=gran,
                                 fp16=True, overflow_at=(3, 11)))
        # offload; clipping (the combined scale of the waiting groups is loss scale x clip);
        # a scale that doubles every 4 clean steps (DeepSpeed then unscales by the new scale)
        cfgs.append(dict(stage=2, offload=True, gas=1, opt="stratopt", fp16=True, overflow_at=(5,)))
        cfgs.append(dict(stage=2, offload=False, gas=1, opt="stratopt", fp16=True, ds_clip=0.05))
        cfgs.append(dict(stage=2, offload=False, gas=1, opt="stratopt", fp16=True, overflow_at=(9,),
                         scale_window=4))
    if world >= 4:  # ZeRO++ hpZ: a secondary copy of the parameters within groups of 2 ranks
        for name, gran in opts[:2]:
            cfgs.append(dict(stage=3, offload=False, gas=1, opt=name, granularity=gran,
                             zero_extra={"zero_hpz_partition_size": 2}))
    return cfgs


def no_reduce(world: int):
    if world >= 4:  # hpZ (the stages themselves: at 2 and 3 ranks)
        return [dict(stage=3, offload=False, gas=1, opt="stratopt", no_reduce=True,
                     zero_extra={"zero_hpz_partition_size": 2})]
    fp16 = [dict(stage=2, offload=False, gas=1, opt="stratopt", no_reduce=True, fp16=True,
                 overflow_at=(3,))] if world == 2 else []
    return [dict(stage=s, offload=o, gas=1, opt="stratopt", no_reduce=True)
            for s in (1, 2, 3) for o in (False, True)] + fp16


def full_fp32_params(engine):
    out = {}
    for n, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        out[n] = (full if full is not None else p.detach().float()).clone()
    if type(engine).__name__ == "PipelineEngine":  # every stage's, named as in Unsplit
        stages = [None] * dist.get_world_size()
        dist.all_gather_object(stages, out)
        out = {f"layers.{n}": p for stage in stages for n, p in stage.items()}
    elif engine.autotp_size() > 1:
        out = unsplit_params(engine, out)
    return out


def train_steps(engine, cfg, steps, loss_scales=None):
    """``overflow_at``: steps whose loss the last rank multiplies by 1e30, so that its fp16
    gradients overflow there (and only there); ``loss_scales`` gets each step's loss scale."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if cfg.get("pipeline"):  # the engine runs the step's micro-batches through both stages
        dp, dp_rank = engine.grid.get_data_parallel_world_size(), engine.grid.get_data_parallel_rank()
        for step in steps:
            engine.train_batch(iter([micro[dp_rank] for micro in micro_batches(step, dp, cfg["gas"])]))
        return
    if cfg.get("tp"):  # a TP pair takes the same micro-batch
        from deepspeed.utils import groups
        world, rank = groups.get_data_parallel_world_size(), groups.get_data_parallel_rank()
    for step in steps:
        backward_scale = float(getattr(engine.optimizer, "loss_scale", 1.0))
        for micro in micro_batches(step, world, cfg["gas"]):
            x, y = micro[rank]
            loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
            if step in cfg.get("overflow_at", ()) and rank == world - 1:
                loss = loss * 1e30
            engine.backward(loss)
            engine.step()
        if loss_scales is not None:  # DeepSpeed unscales by the scale it has after its update
            loss_scales.append((backward_scale, float(getattr(engine.optimizer, "loss_scale", 1.0))))


def json_config(cfg, type_name):
    config = ds_config(cfg)
    for key in ("zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "gradient_clipping"):
        config.pop(key)  # stratopt_ds.deepspeed.initialize sets these itself
    config["optimizer"] = {"type": type_name, "params": opt_kwargs(cfg)}
    return config


def path_json_ours(cfg):
    """Path 1: stratopt_ds.deepspeed.initialize reads the optimizer from the JSON config."""
    engine, *_ = stratopt_ds.deepspeed.initialize(model=make_model(), config=json_config(cfg, cfg["type"]))
    train_steps(engine, cfg, range(STEPS))
    return full_fp32_params(engine), {"engine_clipping": engine.gradient_clipping(),
                                      "bound": not engine.basic_optimizer.sharding.is_local}


def path_torch_alias(cfg):
    """Path 3: plain deepspeed.initialize resolves the JSON type through torch.optim.<Class>."""
    model = make_model()
    config = ds_config(cfg)
    config["optimizer"] = {"type": cfg["type"], "params": opt_kwargs(cfg)}
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    train_steps(engine, cfg, range(STEPS))
    return full_fp32_params(engine), {"bound": not engine.basic_optimizer.sharding.is_local,
                                      "inner": type(engine.basic_optimizer).__name__}


def checkpoint_case(cfg, ckpt_dir):
    """Save at step k, resume in a fresh engine: step k+1 must be bit-identical."""
    k = 6
    engine, *_ = stratopt_ds.deepspeed.initialize(model=make_model(), config=json_config(cfg, "StratOpt"))
    train_steps(engine, cfg, range(k))
    engine.save_checkpoint(ckpt_dir, tag="k")
    at_k = full_fp32_params(engine)
    train_steps(engine, cfg, [k])
    after, gbar = full_fp32_params(engine), engine.basic_optimizer.layer_stats.gbar.clone()
    fresh, *_ = stratopt_ds.deepspeed.initialize(model=make_model(seed=7), config=json_config(cfg, "StratOpt"))
    fresh.load_checkpoint(ckpt_dir, tag="k")
    train_steps(fresh, cfg, [k])
    resumed = full_fp32_params(fresh)
    facts = {"bit_identical": all(torch.equal(after[n], resumed[n]) for n in after),
             "gbar_identical": torch.equal(gbar, fresh.basic_optimizer.layer_stats.gbar)}
    dist.barrier()
    if dist.get_rank() == 0 and not cfg.get("bf16"):  # DS's zero_to_fp32 cannot read BF16_Optimizer files
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        recovered = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag="k")
        facts["zero_to_fp32_equal"] = all(torch.equal(recovered[n].float(), at_k[n])
                                          for n in at_k if n in recovered)
        facts["zero_to_fp32_names"] = sorted(set(at_k) - set(recovered))
    return facts


def unsupported_case(cfg):
    config = json_config(cfg, "StratOpt")
    config["zero_optimization"].update(cfg.get("zero_extra", {}))
    if cfg["stage"] == 0:  # DeepSpeed itself refuses bf16 with fp32 accumulation at stage 0
        config.pop("data_types", None)
        config.pop("communication_data_type", None)
    try:
        stratopt_ds.deepspeed.initialize(model=make_model(), config=config)
    except ValueError as err:
        return {"error": f"{type(err).__name__}: {err}"}
    return {"error": None}


def run_paths(out_dir):
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    cases = [("json_ours", dict(stage=2, offload=False, gas=1, opt="stratopt", type="StratOpt")),
             ("json_ours", dict(stage=3, offload=True, gas=2, opt="la-sqrt-b1depth-cliplayer",
                                type="la-sqrt-b1depth-cliplayer", granularity="block")),
             ("torch_alias", dict(stage=3, offload=False, gas=1, opt="la-sqrt-b1depth-cliplayer",
                                  type="LASqrtB1DepthClipLayer", plain=True)),
             ("torch_alias", dict(stage=1, offload=True, gas=2, opt="stratopt", type="StratOpt", plain=True))]
    for path, cfg in cases:
        params, facts = {"json_ours": path_json_ours, "torch_alias": path_torch_alias}[path](cfg)
        if rank == 0:
            ref, *_ = reference_run(cfg, world)
            results.append(dict(case=path, cfg=cfg, rel_err=max_rel_err(params, ref), **facts))
        dist.barrier()
    for cfg in (dict(stage=2, offload=False, gas=1, opt="stratopt"),
                dict(stage=3, offload=True, gas=2, opt="stratopt"),
                dict(stage=1, offload=False, gas=1, opt="stratopt", bf16=True)):
        facts = checkpoint_case(cfg, os.path.join(out_dir, f"ckpt-{cfg['stage']}-{int(cfg['offload'])}"))
        if rank == 0:
            results.append(dict(case="checkpoint", cfg=cfg, **facts))
    for cfg in (dict(stage=2, offload=False, gas=1, opt="stratopt", zero_extra={"round_robin_gradients": True}),
                dict(stage=0, offload=False, gas=1, opt="stratopt", bf16=True)):
        facts = unsupported_case(cfg)
        if rank == 0:
            results.append(dict(case="unsupported", cfg=cfg, **facts))
        dist.barrier()
    return results


RESHARD_K = 8
RESHARD = {  # case -> (save world, save stage/offload, load world, load stage/offload)
    "s2_2to3": (2, dict(stage=2, offload=False), 3, dict(stage=2, offload=False)),
    "s1_2to_s3_3": (2, dict(stage=1, offload=False), 3, dict(stage=3, offload=False)),
    "s3off_4to2": (4, dict(stage=3, offload=True), 2, dict(stage=3, offload=True)),
    # TP2 x DP2 (AutoTP, ZeRO-1) to the unsplit model on 4 ranks (ZeRO-2), and back
    "tp2dp2_to_dp4": (4, dict(stage=1, offload=False, tp=2), 4, dict(stage=2, offload=False, tpnet=True)),
    "dp4_to_tp2dp2": (4, dict(stage=2, offload=False, tpnet=True), 4, dict(stage=1, offload=False, tp=2)),
    # a 2-stage pipeline x 2 data-parallel ranks, to the unsplit model on 2 ranks (ZeRO-2); last:
    # after a pipeline (or AutoTP) engine, no other engine may start in the process
    "pp2dp2_to_dp2": (4, dict(stage=1, offload=False, pipeline=True, gas=2), 2,
                      dict(stage=2, offload=False, unsplit=True)),
}


def reshard_cfg(zero):
    return dict(dict(gas=1, opt="stratopt", type="StratOpt"), **zero)


def reshard_model(cfg, seed):
    if cfg.get("pipeline"):
        return pipeline_model()  # (seeded inside: the same initial weights)
    if cfg.get("tp") or cfg.get("tpnet"):
        return TPNet(seed)
    return Unsplit(seed) if cfg.get("unsplit") else make_model(seed=seed)


def run_reshard(phase, ckpt_root, tensor_parallel=False):
    """The save or load side of every case at this world size, with AutoTP or without (an
    AutoTP engine must come after every other engine in its process)."""
    from stratopt_ds.zero.checkpoint import load_sharded, save_sharded
    world, rank = dist.get_world_size(), dist.get_rank()
    results = []
    for case, (w_save, z_save, w_load, z_load) in RESHARD.items():
        path = os.path.join(ckpt_root, case)
        if bool((z_save if phase == "save" else z_load).get("tp")) != tensor_parallel:
            continue
        if phase == "save" and world == w_save:
            cfg = reshard_cfg(z_save)
            engine, *_ = stratopt_ds.deepspeed.initialize(model=reshard_model(cfg, 0), config=json_config(cfg, "StratOpt"))
            train_steps(engine, cfg, range(RESHARD_K))
            save_sharded(engine, path)
        elif phase == "load" and world == w_load:
            cfg = reshard_cfg(z_load)
            engine, *_ = stratopt_ds.deepspeed.initialize(model=reshard_model(cfg, 7), config=json_config(cfg, "StratOpt"))
            load_sharded(engine, path)
            train_steps(engine, cfg, range(RESHARD_K, STEPS))
            params = full_fp32_params(engine)
            if rank == 0:
                ref, *_ = reference_run(dict(cfg, pipeline=z_save.get("pipeline")), data_parallel_size(cfg))
                results.append(dict(case=case, cfg=cfg, rel_err=max_rel_err(params, ref)))
        dist.barrier()
    return results


def model_parallel(world: int):
    """At 4 ranks, ZeRO-1: pipeline x data parallel 2 x 2 (DeepSpeed's PipelineEngine), then
    tensor x data parallel 2 x 2 (AutoTP) at ZeRO 1 and 2, where a block's up/down projections
    are split across the TP pair and its norm and down bias are whole on both; each also with
    the norms reduced over the data-parallel group only (``data_norms_only``: must fail). Its own
    launch, last in it: both engines set DeepSpeed's process-wide parallel groups, which a later
    engine without model parallelism in the same process would inherit and fail on."""
    opts = [("stratopt", "tensor"), ("la-sqrt-b1depth-cliplayer", "block"),
            ("la-inverse-b1const-clipglobal", "tensor")]
    pipeline = [dict(stage=1, offload=False, gas=2, opt=name, granularity=gran, pipeline=True)
                for name, gran in opts]
    tensor = [dict(stage=stage, offload=False, gas=1, opt=name, granularity=gran, tp=2)
              for stage in (1, 2) for name, gran in opts]
    clip_global = opts[2][0]  # per-layer maths sees only its own layer; global clipping sees all
    return (pipeline + [dict(stage=1, offload=False, gas=2, opt=clip_global, pipeline=True, data_norms_only=True)]
            + tensor + [dict(stage=2, offload=False, gas=1, opt=clip_global, tp=2, data_norms_only=True)])


SUITES = {"matrix": matrix, "no_reduce": no_reduce, "model_parallel": model_parallel}  # compared with one process


def run_suite(suite, out_dir):
    if suite == "paths":  # the entry paths step with the PyTorch reference (the rest: native)
        with use_backend("reference"):
            return run_paths(out_dir)
    if suite.startswith("reshard_"):
        return run_reshard(suite.split("_")[1], out_dir, tensor_parallel=suite.endswith("_tp"))
    world, rank = dist.get_world_size(), dist.get_rank()
    results = []
    for cfg in SUITES[suite](world):
        params, norms, same, calls, kind, layout, stats = ds_run(cfg)
        if rank == 0:
            ref_params, ref_norms, ref_stats = reference_run(cfg, data_parallel_size(cfg), layout["loss_scales"])
            results.append(dict(cfg=cfg, world=world, kind=kind, **layout,
                                rel_err=max_rel_err(params, ref_params),
                                layer_counts=stats["count"].tolist(), ref_layer_counts=ref_stats["count"].tolist(),
                                skipped_by_us=stats["skipped"],
                                gbar_rel_err=float(((stats["gbar"] - ref_stats["gbar"]).abs()
                                                    / ref_stats["gbar"].abs().clamp_min(1e-30)).max()),
                                norm_rel_err=float(((norms - ref_norms).abs() / ref_norms.abs().clamp_min(1e-30)).max()),
                                norms_same_on_ranks=same, allreduce_calls=calls, steps=STEPS))
        dist.barrier()
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", nargs="+", choices=[*SUITES, "paths", "reshard_save", "reshard_load",
                                                       "reshard_save_tp", "reshard_load_tp"],
                        required=True, help="run in this order in one launch (every launch costs seconds)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    # DeepSpeed refuses fp16 where oneDNN has no fp16 kernels ("Type fp16 is not supported on
    # your device."); torch's CPU fp16 arithmetic is real, so the fp16 rows lift that check.
    get_accelerator().is_fp16_supported = lambda: True
    stratopt_ds.deepspeed.release_cpu_comm_shm()
    out_dir = os.path.dirname(os.path.abspath(args.out))
    results = [dict(row, suite=suite) for suite in args.suite for row in run_suite(suite, out_dir)]
    if dist.get_rank() == 0:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
