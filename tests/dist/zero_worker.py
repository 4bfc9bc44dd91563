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
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import deepspeed  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402

import stratopt_ds  # noqa: E402
import stratopt_ds.deepspeed  # noqa: E402
from helpers import TinyNet, batch, max_rel_err  # noqa: E402
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


def reference_run(cfg, world: int):
    """Single process, same global batches, same micro-batch split; bf16 forward if asked."""
    master = make_model()
    work = master
    if cfg.get("bf16"):  # DeepSpeed's fp32 master starts from the bf16-rounded weights
        work = make_model().to(torch.bfloat16)
        with torch.no_grad():
            for p in master.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    opt = build_optimizer(cfg, master)
    gas = cfg["gas"]
    for step in range(STEPS):
        acc = {n: torch.zeros_like(p) for n, p in master.named_parameters() if p.requires_grad}
        for micro in micro_batches(step, world, gas):
            for x, y in micro:
                work.zero_grad(set_to_none=True)
                (torch.nn.functional.cross_entropy(work(x).float(), y) / gas).backward()
                for n, p in work.named_parameters():
                    if p.requires_grad:
                        acc[n] += p.grad.float()
        for n, p in master.named_parameters():
            if p.requires_grad:
                p.grad = acc[n] / world
        if cfg.get("ds_clip"):
            clip_like_deepspeed(master.parameters(), cfg["ds_clip"])
        opt.step()
        if work is not master:
            with torch.no_grad():
                for (_, wp), mp in zip(work.named_parameters(), master.parameters()):
                    wp.copy_(mp)
    return {n: p.detach().clone() for n, p in master.named_parameters()}, opt.last_step.norms.clone()


def ds_config(cfg):
    zero = {"stage": cfg["stage"]}
    if cfg.get("offload"):
        zero["offload_optimizer"] = {"device": "cpu"}
    world = dist.get_world_size()
    return {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // (world * cfg["gas"]),
        "gradient_accumulation_steps": cfg["gas"],
        "zero_optimization": {**zero, **cfg.get("zero_extra", {})},
        "bf16": {"enabled": bool(cfg.get("bf16"))},
        # bf16 runs accumulate and reduce gradients in fp32, as the reference does; with
        # bf16 communication the reduction's own rounding (~4e-3) would hide any norm error.
        **({"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
           if cfg.get("bf16") else {}),
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
    model = make_model()
    opt = build_optimizer(cfg, model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(cfg))
    if cfg.get("no_reduce"):  # deliberately per-partition norms: the matrix must then fail
        stratopt_ds.zero.attach(opt, engine.optimizer, reduce_enabled=False)
    with AllReduceCounter(opt.layer_stats.num_layers) as counter:
        train_steps(engine, cfg, range(STEPS))
    params = full_fp32_params(engine)
    norms = opt.last_step.norms.clone()
    gathered = [torch.zeros_like(norms) for _ in range(world)]
    dist.all_gather(gathered, norms)
    same_on_ranks = all(torch.equal(g, gathered[0]) for g in gathered)
    kind = opt.sharding.kind if not opt.sharding.is_local else "none"
    layout = _layout_facts(opt)
    # ZeRO++ hpZ: parameters with a secondary (intra-group) partition besides their ZeRO-3 one
    layout["secondary_partitions"] = sum(getattr(p, "ds_secondary_tensor", None) is not None
                                         for p in model.parameters())
    return params, norms, same_on_ranks, counter.calls, kind, layout


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
    if world >= 4:  # ZeRO++ hpZ: a secondary copy of the parameters within groups of 2 ranks
        for name, gran in opts[:2]:
            cfgs.append(dict(stage=3, offload=False, gas=1, opt=name, granularity=gran,
                             zero_extra={"zero_hpz_partition_size": 2}))
    return cfgs


def no_reduce(world: int):
    if world >= 4:  # hpZ (the stages themselves: at 2 and 3 ranks)
        return [dict(stage=3, offload=False, gas=1, opt="stratopt", no_reduce=True,
                     zero_extra={"zero_hpz_partition_size": 2})]
    return [dict(stage=s, offload=o, gas=1, opt="stratopt", no_reduce=True)
            for s in (1, 2, 3) for o in (False, True)]


def full_fp32_params(engine):
    out = {}
    for n, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        out[n] = (full if full is not None else p.detach().float()).clone()
    return out


def train_steps(engine, cfg, steps):
    world, rank = dist.get_world_size(), dist.get_rank()
    for step in steps:
        for micro in micro_batches(step, world, cfg["gas"]):
            x, y = micro[rank]
            engine.backward(torch.nn.functional.cross_entropy(engine(x).float(), y))
            engine.step()


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
            ref, _ = reference_run(cfg, world)
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
}


def reshard_cfg(zero):
    return dict(zero, gas=1, opt="stratopt", type="StratOpt")


def run_reshard(phase, ckpt_root):
    from stratopt_ds.zero.checkpoint import load_sharded, save_sharded
    world, rank = dist.get_world_size(), dist.get_rank()
    results = []
    for case, (w_save, z_save, w_load, z_load) in RESHARD.items():
        path = os.path.join(ckpt_root, case)
        if phase == "save" and world == w_save:
            cfg = reshard_cfg(z_save)
            engine, *_ = stratopt_ds.deepspeed.initialize(model=make_model(), config=json_config(cfg, "StratOpt"))
            train_steps(engine, cfg, range(RESHARD_K))
            save_sharded(engine, path)
        elif phase == "load" and world == w_load:
            cfg = reshard_cfg(z_load)
            engine, *_ = stratopt_ds.deepspeed.initialize(model=make_model(seed=7), config=json_config(cfg, "StratOpt"))
            load_sharded(engine, path)
            train_steps(engine, cfg, range(RESHARD_K, STEPS))
            params = full_fp32_params(engine)
            if rank == 0:
                ref, _ = reference_run(cfg, world)
                results.append(dict(case=case, cfg=cfg, rel_err=max_rel_err(params, ref)))
        dist.barrier()
    return results


SUITES = {"matrix": matrix, "no_reduce": no_reduce}  # configuration lists, compared with one process


def run_suite(suite, out_dir):
    if suite == "paths":  # the entry paths step with the PyTorch reference (the rest: native)
        with use_backend("reference"):
            return run_paths(out_dir)
    if suite.startswith("reshard_"):
        return run_reshard(suite.split("_")[1], out_dir)
    world, rank = dist.get_world_size(), dist.get_rank()
    results = []
    for cfg in SUITES[suite](world):
        params, norms, same, calls, kind, layout = ds_run(cfg)
        if rank == 0:
            ref_params, ref_norms = reference_run(cfg, world)
            results.append(dict(cfg=cfg, world=world, kind=kind, **layout,
                                rel_err=max_rel_err(params, ref_params),
                                norm_rel_err=float(((norms - ref_norms).abs() / ref_norms.abs().clamp_min(1e-30)).max()),
                                norms_same_on_ranks=same, allreduce_calls=calls, steps=STEPS))
        dist.barrier()
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", nargs="+", choices=[*SUITES, "paths", "reshard_save", "reshard_load"],
                        required=True, help="run in this order in one launch (every launch costs seconds)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
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
