"""HF Trainer cases under DeepSpeed, launched once by tests/test_hf.py as `deepspeed --num_gpus 2 ...`.

Every case builds a fresh StratTrainer in this process (a launch costs seconds, a case less than
one), and the last runs examples/hf_train.py as a script; rank 0 writes one JSON report that the
test asserts on.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import traceback

import torch
import torch.distributed as dist

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402

import hf_train  # noqa: E402  (examples/hf_train.py)
from stratopt_ds import create_optimizer, data, models  # noqa: E402
from stratopt_ds.integrations.hf import StratTrainer, StratTrainingArguments, named_decay_groups  # noqa: E402

HF_CONFIGS = os.path.join(ROOT, "ds_configs", "hf")
SEQ_LEN, MICRO = 32, 4


def argv(config: str, out: str, steps: int, *extra: str) -> list[str]:
    return ["--deepspeed", os.path.join(HF_CONFIGS, config), "--output_dir", out, "--max_steps", str(steps),
            "--per_device_train_batch_size", str(MICRO), "--seq_len", str(SEQ_LEN), "--max_docs", "200",
            "--learning_rate", "3e-3", "--weight_decay", "0.1", "--logging_steps", "1", "--report_to", "none",
            "--save_strategy", "no", "--disable_tqdm", "true", *extra]


def full_weights(engine) -> dict[str, torch.Tensor]:
    """fp32 weights on every rank (a collective under ZeRO-3)."""
    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (full if full is not None else p.detach().float()).clone()
    return out


def norm_check(trainer: StratTrainer) -> dict:
    """One more engine step on a fixed global batch; its per-layer norms against a single-process
    reference on the same weights and the same per-rank micro-batches."""
    engine, opt = trainer.model_wrapped, trainer.built_optimizer
    world, rank = dist.get_world_size(), dist.get_rank()
    windows = trainer.train_dataset.windows.read(range(world * MICRO))
    weights = full_weights(engine)
    mine = windows[rank * MICRO:(rank + 1) * MICRO]
    engine.backward(engine(input_ids=mine, labels=mine).loss)
    engine.step()
    got = opt.last_step.norms.clone()

    ref_model = models.build_model("tiny", 257, SEQ_LEN + 1)
    ref_model.load_state_dict(weights)
    for r in range(world):  # DeepSpeed averages the ranks' mean losses' gradients
        ids = windows[r * MICRO:(r + 1) * MICRO]
        (ref_model(input_ids=ids, labels=ids).loss / world).backward()
    ref = create_optimizer(trainer.args.optim, named_decay_groups(trainer, ref_model, 0.0),
                           granularity=opt.layer_options["granularity"])
    ref.step()
    gathered = [torch.zeros_like(got) for _ in range(world)]
    dist.all_gather(gathered, got)
    return {"norm_rel_err": float(((got - ref.last_step.norms).abs() / ref.last_step.norms).max()),
            "norms_same_on_ranks": all(torch.equal(g, gathered[0]) for g in gathered),
            "num_layers": int(got.numel()), "layer_names": opt.layer_map.layout.layer_names}


def script_case(out: str, config: str, steps: int, *extra: str) -> dict:
    """examples/hf_train.py's own trainer (its command line), trained, then the norm check."""
    trainer = hf_train.build_trainer(argv(config, out, steps, *extra))
    trainer.train()
    return {**hf_train.summarize(trainer), **norm_check(trainer)}


def client_optimizer_case(out: str) -> dict:
    """Trap 1: optimizers=(instance, scheduler) under DeepSpeed must be the ones that run."""
    _, targs = hf_train.parse(argv("zero2.json", out, 3))
    model = models.build_model("tiny", 257, SEQ_LEN + 1)
    opt = create_optimizer("stratopt-nomix", model, lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    windows = data.DataRequest("synthetic", SEQ_LEN, max_docs=200, val_windows=16).open().train
    trainer = StratTrainer(model=model, args=targs, optimizers=(opt, sched),
                           train_dataset=data.WindowDataset(windows))
    trainer.train()
    inner = trainer.model_wrapped.basic_optimizer
    return {"inner_is_client": inner is opt, "inner_optimizer": type(inner).__name__,
            "lrs": [g["lr"] for g in inner.param_groups], "steps": int(opt.layer_stats.count.max()),
            "scheduler_is_client": trainer.lr_scheduler is sched, "bound": not inner.sharding.is_local,
            "groups": len(inner.param_groups)}


def refused(build) -> dict:
    try:
        build()
    except (ValueError, TypeError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    return {"error": None}


def scheduler_conflict_case(out: str) -> dict:
    """Trap 1, the refused half: a scheduler passed next to a DeepSpeed "scheduler" section."""
    with open(os.path.join(HF_CONFIGS, "zero2.json")) as fh:
        config = json.load(fh)
    config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 2}}
    model = models.build_model("tiny", 257, SEQ_LEN + 1)
    opt = create_optimizer("stratopt", model)
    args = StratTrainingArguments(output_dir=out, deepspeed=config, max_steps=2, report_to="none",
                                  per_device_train_batch_size=MICRO)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return refused(lambda: StratTrainer(model=model, args=args, optimizers=(opt, sched)))


def script_cli_case(out: str, local_rank: int) -> dict:
    """examples/hf_train.py run as a script (its __main__, the launcher's --local_rank included) with
    the shipped ZeRO-2 config, whose StratOpt section is translated. Its exit tears down the
    process group, so it runs last."""
    sys.argv = [os.path.join(ROOT, "examples", "hf_train.py"), f"--local_rank={local_rank}",
                "--deepspeed", os.path.join(ROOT, "ds_configs", "tiny_zero2_cpu.json"), "--optim", "stratopt",
                "--max_steps", "20", "--learning_rate", "0.003", "--weight_decay", "0.1", "--warmup_steps", "5",
                "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                "--seq_len", str(SEQ_LEN), "--max_docs", "200", "--logging_steps", "2", "--save_strategy", "no",
                "--report_to", "none", "--disable_tqdm", "true", "--output_dir", out]
    runpy.run_path(sys.argv[0], run_name="__main__")
    summary = os.path.join(out, "summary.json")
    if not os.path.exists(summary):  # rank 0 writes it
        return {}
    with open(summary) as fh:
        return json.load(fh)


CASES = {
    "zero3": lambda out: script_case(out, "zero3.json", 12, "--optim", "stratopt"),
    "zero2_block": lambda out: script_case(out, "zero2.json", 3, "--optim", "la-sqrt-b1depth-cliplayer",
                                           "--optim_args", "granularity=block,clip_tau=3"),
    "zero2_offload": lambda out: script_case(out, "zero2_offload.json", 2),
    "client_optimizer": client_optimizer_case,
    "scheduler_conflict": scheduler_conflict_case,
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    rank, results = int(os.environ["RANK"]), {}
    cases = [*CASES.items(), ("script_cli", lambda out: script_cli_case(out, args.local_rank))]
    for name, case in cases:
        try:
            results[name] = case(os.path.join(os.path.dirname(args.out), name))
        except Exception:  # report it; the test names the case that broke
            results[name] = {"crash": traceback.format_exc()}
        if dist.is_initialized():
            dist.barrier()
    if rank == 0:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
