"""Periodic training checkpoints and ``--resume`` for the main job (one process or DeepSpeed).

Layout under ``<out>/checkpoints/``::

    step_40/      one complete checkpoint (``state.pt`` on one process; DeepSpeed's own files)
    step_60/
    latest        the tag of the newest *complete* checkpoint, e.g. ``step_60``

``latest`` is replaced atomically only after every file of the new checkpoint is written, so a
job killed while saving resumes from the previous checkpoint; nothing half-written is ever read.
The *client state* (step, data position, loss history, timers, RNG states and the options that
must not change) travels inside the checkpoint, so ``--resume`` continues the same run: the same
step, the same next batch, the same loss curve.

DeepSpeed checkpoints go through ``engine.save_checkpoint`` / ``load_checkpoint``; they carry
our optimizer's whole state (the per-layer statistics ride in its ``state_dict``) and load back
at the same number of ranks. To change the number of ranks use
:mod:`stratopt_ds.zero.checkpoint`.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

LATEST = "latest"

# Options that define the run: resuming with another value would silently change the experiment.
RUN_IDENTITY = ("optimizer", "hyperparams", "preset", "data", "tokenizer", "steps", "batch_size",
                "seq_len", "seed", "data_seed", "warmup_steps", "ranks")


def tag(step: int) -> str:
    return f"step_{step}"


def latest_tag(directory: Path) -> Optional[str]:
    """The tag of the newest complete checkpoint in ``directory``, or None."""
    marker = Path(directory) / LATEST
    if not marker.is_file():
        return None
    name = marker.read_text().strip()
    return name if (Path(directory) / name).is_dir() else None


def write_latest(directory: Path, name: str) -> None:
    tmp = Path(directory) / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, Path(directory) / LATEST)  # atomic: readers see the old or the new tag


def prune(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (never the one ``latest`` names)."""
    if keep <= 0:
        return
    current = latest_tag(directory)
    steps = sorted((int(p.name[5:]), p) for p in Path(directory).glob("step_*")
                   if p.is_dir() and p.name[5:].isdigit())
    for _, path in steps[:-keep]:
        if path.name != current:
            shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_identity(path: Path, identity: dict[str, Any]) -> None:
    """``run.json`` beside the checkpoint: readable before anything heavy is loaded."""
    (Path(path) / "run.json").write_text(json.dumps(identity, indent=1, sort_keys=True) + "\n")


def check_identity(directory: Path, current: dict[str, Any]) -> str:
    """The tag to resume from; refuse a different experiment, naming every option that changed."""
    name = latest_tag(directory)
    if name is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {directory}")
    saved = json.loads((Path(directory) / name / "run.json").read_text())
    current = json.loads(json.dumps(current))  # tuples -> lists, as saved
    changed = [f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now"
               for key in RUN_IDENTITY if saved.get(key) != current.get(key)]
    if changed:
        raise ValueError("--resume: the checkpoint belongs to a different run; changed options:\n  "
                         + "\n  ".join(changed))
    return name


def save_single(directory: Path, step: int, model, optimizer, scheduler, client: dict,
                identity: dict) -> None:
    """One process: write ``step_N/state.pt`` through a temporary name, then point ``latest`` at it."""
    directory = Path(directory)
    final = directory / tag(step)
    tmp = directory / f".{tag(step)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "client": client}, tmp / "state.pt")
    write_identity(tmp, identity)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_latest(directory, tag(step))


def load_single(directory: Path, name: str, model, optimizer, scheduler) -> dict:
    state = torch.load(Path(directory) / name / "state.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["client"]


def save_deepspeed(directory: Path, step: int, engine, client: dict, identity: dict) -> None:
    """Every rank: DeepSpeed writes its files; rank 0 then points ``latest`` at the new tag."""
    import torch.distributed as dist

    engine.save_checkpoint(str(directory), tag=tag(step), client_state={"stratopt": client},
                           save_latest=False)  # our marker, written only once all ranks are done
    dist.barrier()
    if dist.get_rank() == 0:
        write_identity(Path(directory) / tag(step), identity)
        write_latest(Path(directory), tag(step))
    dist.barrier()


def load_deepspeed(directory: Path, name: str, engine) -> dict:
    path, client = engine.load_checkpoint(str(directory), tag=name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"--resume: DeepSpeed could not load {Path(directory) / name}")
    return client["stratopt"]
