"""Crafted and damaged DeepSpeed checkpoints, launched once by tests/test_checkpoint_faults.py as
`deepspeed --num_gpus 1 ...`: loading them needs a real engine, and one rank suffices.

Every case builds a fresh engine in this process and records what loading raised; the test
asserts on the JSON report. A crafted file's pickle would create a marker file when unpickled:
the report says whether it appeared.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import deepspeed  # noqa: E402

import stratopt_ds.deepspeed  # noqa: E402
from helpers import TinyNet, batch, flip_tensor_byte  # noqa: E402
from stratopt_ds import resume, safe_load  # noqa: E402
from stratopt_ds.zero.checkpoint import load_sharded, save_sharded  # noqa: E402

IDENTITY = {key: None for key in resume.RUN_IDENTITY}


class TouchOnLoad:
    """Unpickling this creates ``target``: what any code in a checkpoint could do instead."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.target),)


def engine(stage: int):
    torch.manual_seed(0)
    config = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "StratOpt", "params": {"lr": 1e-2}}, "steps_per_print": 10**9}
    return stratopt_ds.deepspeed.initialize(model=TinyNet(), config=config)[0]


def trained(stage: int):
    e = engine(stage)
    for step in range(2):
        x, y = batch(step, n=8)
        e.backward(torch.nn.functional.cross_entropy(e(x), y))
        e.step()
    return e


def craft(path: str, target: str, allow=()) -> None:
    """Rewrite the checkpoint file ``path`` with a TouchOnLoad beside its real contents."""
    state = safe_load.load(path, allow=allow)
    state["extra"] = TouchOnLoad(target)
    torch.save(state, path)


def attempt(load) -> dict:
    try:
        return {"error": None, "result": load()}
    except safe_load.CheckpointError as e:
        return {"error": str(e), "type": "CheckpointError"}
    except Exception as e:  # noqa: BLE001 - the report says what else was raised
        return {"error": str(e), "type": type(e).__name__}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    stratopt_ds.deepspeed.release_cpu_comm_shm()
    root, report = pathlib.Path(args.dir), {}
    allow = safe_load.deepspeed_globals()

    def marker(case: str) -> str:
        return str(root / f"{case}.created")

    for stage in (2, 3):  # the untouched checkpoint loads through the safe loader
        ckpt = root / f"zero{stage}"
        resume.save_deepspeed(ckpt, 2, trained(stage), {"step": 2}, IDENTITY)
        report[f"clean_zero{stage}"] = attempt(lambda: resume.load_deepspeed(ckpt, "step_2", engine(stage)))

    ckpt = root / "zero2"
    files = {"model_states": "mp_rank_00_model_states.pt",
             "optim_states": "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    for case, name in files.items():
        path = ckpt / "step_2" / name
        shutil.copy(path, root / "intact.pt")
        craft(str(path), marker(case), allow)
        report[f"crafted_{case}"] = attempt(lambda: resume.load_deepspeed(ckpt, "step_2", engine(2)))
        report[f"crafted_{case}"].update(file=str(path), created=os.path.exists(marker(case)))
        shutil.copy(root / "intact.pt", path)
    path = ckpt / "step_2" / files["optim_states"]
    flip_tensor_byte(str(path))
    report["flipped_optim_states"] = attempt(lambda: resume.load_deepspeed(ckpt, "step_2", engine(2)))
    report["flipped_optim_states"]["file"] = str(path)

    sharded = str(root / "sharded")
    save_sharded(trained(2), sharded)
    report["clean_sharded"] = attempt(lambda: load_sharded(engine(2), sharded))
    path = os.path.join(sharded, "rank00000.pt")
    craft(path, marker("sharded"))
    report["crafted_sharded"] = attempt(lambda: load_sharded(engine(2), sharded))
    report["crafted_sharded"].update(file=path, created=os.path.exists(marker("sharded")))

    pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
