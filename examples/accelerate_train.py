"""Pretrain a LLaMA preset with accelerate + DeepSpeed and a stratopt_ds optimizer (offline data).

    deepspeed --num_gpus 2 examples/accelerate_train.py --config ds_configs/hf/zero2_offload.json
    python examples/accelerate_train.py --config ds_configs/hf/zero2.json  # needs a launcher for >1 rank

The three stratopt_ds calls around accelerate's usual ones (``stratopt_ds.integrations.accelerate``):
``distributed_state()`` before the Accelerator (CPU-only DeepSpeed), ``deepspeed_plugin(config,
optimizer)`` for the Accelerator, ``bind_prepared(model, optimizer)`` after ``prepare``.
``--out`` gets ``summary.json``: losses and the optimizer DeepSpeed actually steps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from accelerate import Accelerator  # noqa: E402

from stratopt_ds import available_optimizers, create_optimizer, data, models  # noqa: E402
from stratopt_ds.integrations.accelerate import bind_prepared, deepspeed_plugin, distributed_state  # noqa: E402
from stratopt_ds.run_policy import parse_opt_args  # noqa: E402
from stratopt_ds.train import lr_schedule  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="DeepSpeed JSON config (see ds_configs/hf/)")
    p.add_argument("--optim", default="stratopt", choices=available_optimizers(), metavar="NAME",
                   help="a stratopt_ds optimizer (default: stratopt)")
    p.add_argument("--optim-args", nargs="+", default=[], metavar="K=V",
                   help="hyperparameters, values parsed as JSON: mix_alpha=8 clip=global")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per rank and step")
    p.add_argument("--preset", default="tiny", choices=list(models.MODEL_PRESETS))
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--data", default="synthetic",
                   help="a token store, or a local source to build into the store cache first")
    p.add_argument("--max-docs", type=int, default=None,
                   help="building from a source: at most N documents (default: 300 of synthetic)")
    p.add_argument("--data-seed", type=int, default=0, help="order of the training windows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for summary.json")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # from `deepspeed`
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    distributed_state()
    max_docs = args.max_docs or (300 if args.data == "synthetic" else None)
    request = data.DataRequest(args.data, args.seq_len, max_docs=max_docs, val_windows=16)
    try:
        request.check()
    except (data.DataError, FileNotFoundError) as err:
        raise SystemExit(f"--data {args.data}: {err}") from None
    training = request.open()
    model = models.build_model(args.preset, training.store.vocab_size, args.seq_len + 1, seed=args.seed)
    optimizer = create_optimizer(args.optim, model, lr=args.lr, **parse_opt_args(args.optim_args))
    scheduler = lr_schedule(optimizer, args.warmup_steps, args.steps)
    accelerator = Accelerator(deepspeed_plugin=deepspeed_plugin(args.config, optimizer))
    # Every rank draws the same seeded order from the memory-mapped store; prepare() splits each
    # batch across the ranks.
    loader = torch.utils.data.DataLoader(data.WindowDataset(training.train), batch_size=args.batch_size,
                                         sampler=data.WindowSampler(len(training.train), args.data_seed),
                                         drop_last=True)
    engine, wrapped_optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    bind_prepared(engine, optimizer)

    losses, batches, epoch = [], iter(loader), 0
    for _ in range(args.steps):
        try:
            ids = next(batches)["input_ids"]
        except StopIteration:
            epoch += 1
            loader.set_epoch(epoch)
            batches = iter(loader)
            ids = next(batches)["input_ids"]
        loss = engine(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)  # DeepSpeed steps inside
        wrapped_optimizer.step()
        scheduler.step()
        wrapped_optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), "mean").item())

    inner = engine.basic_optimizer
    summary = {"losses": losses, "world_size": accelerator.num_processes,
               "zero_stage": engine.zero_optimization_stage(), "offload": engine.zero_cpu_offload(),
               "inner_optimizer": type(inner).__name__, "inner_is_ours": inner is optimizer,
               "groups": [{"weight_decay": g["weight_decay"], "num_names": len(g["param_names"])}
                          for g in inner.param_groups],
               "bound": not inner.sharding.is_local, "gradient_clipping": engine.gradient_clipping()}
    if args.out and accelerator.is_main_process:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
    accelerator.wait_for_everyone()
    return summary


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
