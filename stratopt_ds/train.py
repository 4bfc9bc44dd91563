"""The main job: pretrain a LLaMA-style model with any stratopt_ds optimizer, on one process.

    python -m stratopt_ds.train                                   # tiny model, synthetic text
    python -m stratopt_ds.train --optimizer adamw --steps 200 --out runs/adamw
    python -m stratopt_ds.train --data corpus.jsonl --tokenizer bpe --opt-args clip=global
    python -m stratopt_ds.train --preset 134m --data stores/fineweb-gpt2 --device cuda

``--data`` is a token store (``python -m stratopt_ds.data build``) or a source that is built into
the store cache first; either way the run reads a memory-mapped store (``stratopt_ds.data``).
The options are a :class:`~stratopt_ds.train_config.TrainConfig` (command line, ``--config`` file,
or a study plan); :func:`resolve` checks them all, with the run policy, before any data is read
or any weight is allocated; :meth:`Trainer.run` then does the job from top to bottom: the data,
the model, the optimizer and its schedule, train, evaluate, ``metrics.jsonl`` and
``summary.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import data, models, preemption, resume, run_policy, train_config
from .metrics import MetricsLog, finite_or_none, optimizer_stats, print_summary
from .optim import create_optimizer
from .run_policy import parse_opt_args  # noqa: F401  (also this module's API: hf, examples)
from .safe_load import CheckpointError
from .summary import RunSummary
from .train_config import ConfigError, TrainConfig

# ------------------------------------------------------------------------------------------------
# Options: a TrainConfig, checked and resolved before any work


def build_parser() -> argparse.ArgumentParser:
    """``stratopt-train``'s command line: one flag per :class:`TrainConfig` field, and ``--config``."""
    return train_config.build_parser(description=__doc__.split("\n\n")[0])


@dataclass
class ResolvedRun:
    """A checked :class:`TrainConfig` with what the checks decided.

    ``config``: the options with the preset's defaults filled in (batch, sequence length, lr,
    warm-up) and the optimizer and tokenizer resolved; ``prepared``: the run policy's verdict
    (optimizer keywords, the prepared DeepSpeed config, notes); ``ranks``: data-parallel ranks as
    the launcher announced them; ``resume_tag``: the checkpoint ``resume`` continues from.
    """
    config: TrainConfig
    prepared: run_policy.PreparedRun
    data_request: data.DataRequest
    ranks: int = 1
    resume_tag: Optional[str] = None

    @property
    def hyperparams(self) -> dict[str, Any]:
        return self.prepared.hyperparams

    def identity(self) -> dict[str, Any]:
        """What defines the run; ``resume`` refuses a checkpoint whose identity differs."""
        values = {**vars(self.config), "hyperparams": self.hyperparams, "ranks": self.ranks}
        return {key: values[key] for key in resume.RUN_IDENTITY}


def fill_defaults(config: TrainConfig) -> TrainConfig:
    """The preset's batch and sequence length, and a warm-up of 10% of the steps, where the
    config leaves them out (the lr is the run policy's: --lr, the DeepSpeed config's, the preset's)."""
    preset = models.preset(config.preset)
    return config.replace(
        batch_size=config.batch_size or preset["batch_size"], seq_len=config.seq_len or preset["seq_len"],
        warmup_steps=max(1, config.steps // 10) if config.warmup_steps is None else config.warmup_steps)


def data_request(config: TrainConfig, sized: bool = True) -> data.DataRequest:
    """The data a (filled) config asks for, its ``data`` resolved already ('auto' decided by
    :func:`stratopt_ds.data.resolve_source`); ``sized=False``: the run length is not known yet
    (a study run given in epochs), so a FineWeb build has no default size."""
    run_tokens = config.steps * config.batch_size * config.seq_len if sized else None
    return data.DataRequest(
        config.data, config.seq_len, tokenizer=config.tokenizer,
        bpe_vocab=config.bpe_vocab, max_docs=config.max_docs, val_windows=config.val_windows,
        evaluate=config.eval_batches > 0, run_tokens=run_tokens, cache_dir=config.cache_dir)


def resolve(config: TrainConfig, ranks: Optional[int] = None, deepspeed: Optional[dict] = None,
            names: run_policy.Settings = run_policy.Settings(),
            check_data: bool = True, check_device: bool = True) -> ResolvedRun:
    """Check ``config`` and decide everything the run needs before any work; raise ValueError
    (ConfigError, PolicyError, ...) naming the option and what is allowed.

    ``ranks``: the data-parallel ranks (default: the launcher's WORLD_SIZE); ``deepspeed``: the
    DeepSpeed config as a dict (default: read from ``config.deepspeed_config``); ``names``: how
    the caller names the settings; ``check_data=False``: the caller checks the data itself;
    ``check_device=False``: the run trains elsewhere (a study checked on a login node).
    """
    config.check()
    try:
        preset = models.preset(config.preset)
    except ValueError as e:
        raise ConfigError(f"--preset: {e}") from None
    try:
        device = torch.device(config.device)
    except RuntimeError as e:
        raise ConfigError(f"--device: {e}") from None
    if check_device and device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {config.device}: CUDA is not available on this machine")
    check_out(config)
    try:
        preemption.signal_of(config.stop_signal)
    except ValueError as e:
        raise ConfigError(f"--stop-signal: {e}") from None
    if config.deepspeed_config is not None and names.config == run_policy.Settings().config:
        names = dataclasses.replace(names, config=f"{names.config} {config.deepspeed_config}")
    if deepspeed is None and config.deepspeed_config is not None:
        from .integrations.deepspeed import load_config
        try:
            deepspeed = load_config(config.deepspeed_config)
        except ValueError as e:
            raise ConfigError(f"{names.config}: {e}") from None
    if ranks is None:  # set by the deepspeed launcher (mpirun sets OMPI_*); checked again after init
        ranks = int(os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or 1) \
            if deepspeed is not None else 1
    if config.batch_size is None and deepspeed is not None:  # the config's global batch
        config = config.replace(batch_size=run_policy.global_batch(deepspeed, ranks, names))
    config = fill_defaults(config)
    if check_data:  # 'auto' asks the hub once, here; a caller that checks the data itself decides
        config = config.replace(data=data.resolve_source(config.data))
    request = data_request(config)
    prepared = run_policy.prepare(run_policy.RunRequest(
        optimizer=config.optimizer, opt_args=config.opt_args, lr=config.lr,
        default_lr=preset["lr"], deepspeed=deepspeed, batch_size=config.batch_size,
        ranks=ranks, steps=config.steps, data=request if check_data else None, names=names,
        deepspeed_checks=True))
    config = config.replace(optimizer=prepared.optimizer, lr=prepared.lr,
                            tokenizer=prepared.tokenizer or config.tokenizer)
    run = ResolvedRun(config, prepared, request, ranks)
    if (config.resume or config.save_every) and config.out is None:
        raise ConfigError("--resume and --save-every need --out (checkpoints go to <out>/checkpoints)")
    if config.resume:  # the newest usable checkpoint of this run (a damaged newer one is named)
        try:
            run.resume_tag, notes = resume.resume_point(checkpoint_dir(config), run.identity())
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        prepared.notes.extend(notes)
    return run


def check_out(config: TrainConfig) -> None:
    """``--out`` is a directory (or will be one); nothing is created here."""
    if config.out is None:
        return
    out = Path(config.out)
    for path in (out, out / "checkpoints"):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {config.out}: {path} exists and is not a directory; name a "
                              f"directory (it is created if missing)")
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {config.out}: {parent} is not writable")


def checkpoint_dir(config: TrainConfig) -> Path:
    return Path(config.out) / "checkpoints"


def resolve_args(argv: Optional[list[str]] = None) -> ResolvedRun:
    """The command line (and its ``--config`` file), resolved; usage errors exit with code 2."""
    parser = build_parser()
    config = train_config.from_args(parser, argv)
    try:
        return resolve(config)
    except ValueError as e:
        parser.error(str(e))


# ------------------------------------------------------------------------------------------------
# Schedule, loss, evaluation, logging


def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                final_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak lr, then cosine decay to ``final_ratio`` * peak by the end."""

    def factor(step: int) -> float:  # step = 0 for the first optimizer step
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy."""
    logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, windows: data.Windows, batch_size: int, max_batches: int,
             device: torch.device, chunk: Optional[int] = None) -> float:
    """Mean loss over the (fixed) validation windows: the first ``batch_size * max_batches``.

    They go through the model ``chunk`` windows at a time (under DeepSpeed the micro-batch), so
    evaluating a large global batch never needs its logits in memory at once.
    """
    model.eval()
    chunk = chunk or batch_size
    total, count = 0.0, 0
    for inputs, targets in windows.batches(batch_size, max_batches):
        for lo in range(0, len(inputs), chunk):
            x, y = inputs[lo:lo + chunk].to(device), targets[lo:lo + chunk].to(device)
            total += lm_loss(model, x, y).item() * y.numel()
            count += y.numel()
    model.train()
    return total / count


# ------------------------------------------------------------------------------------------------
# The backends: one process, or DeepSpeed


class SingleProcess:
    """One process: our optimizer and the LambdaLR schedule."""

    world, rank = 1, 0
    micro = None  # evaluation batches: no micro-batch split on one process

    def layout(self) -> str:
        return ""

    def __init__(self, run: ResolvedRun, model: nn.Module):
        config = run.config
        self.model = model
        self.optimizer = create_optimizer(config.optimizer, model, **run.hyperparams)
        self.scheduler = lr_schedule(self.optimizer, config.warmup_steps, config.steps)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def engine_skipped_steps(self) -> int:
        return 0  # no engine: only the optimizer skips (and counts) non-finite steps

    def train_step(self, batch: data.Batch, stop: bool = False) -> tuple[float, bool]:
        """One step; the loss, and whether to stop after it (``stop``: this process was asked to)."""
        device = self.model.device
        inputs, targets = batch.rows()
        loss = lm_loss(self.model, inputs.to(device), targets.to(device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.item(), stop

    def save(self, directory: Path, step: int, client: dict, identity: dict) -> None:
        resume.save_single(directory, step, self.model, self.optimizer, self.scheduler,
                           client, identity)

    def load(self, directory: Path, tag: str) -> dict:
        return resume.load_single(directory, tag, self.model, self.optimizer, self.scheduler)

    def close(self) -> None:
        pass


class DeepSpeedRun:
    """Under the deepspeed launcher: the global batch is split over ranks and micro-batches."""

    def __init__(self, run: ResolvedRun, model: nn.Module):
        import deepspeed
        import torch.distributed as dist

        from .integrations.deepspeed import initialize, release_cpu_comm_shm

        self.dist = dist
        config, ds_config = run.config, run.prepared.deepspeed
        # resolve() decided the optimizer (config section, --optimizer, --opt-args, --lr): ours.
        ds_config["optimizer"] = {"type": config.optimizer, "params": {**run.hyperparams}}
        scheduler = ds_config.get("scheduler")
        if scheduler and scheduler.get("type") == "WarmupCosineLR":  # the run's length wins
            scheduler.setdefault("params", {}).update(total_num_steps=config.steps,
                                                      warmup_num_steps=config.warmup_steps)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        release_cpu_comm_shm()  # before anything can fail: a crashed run leaves no 66 MB per rank
        if torch.cuda.is_available():  # NCCL collectives below use the current device: one per rank
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.gas = run_policy.accumulation_steps(ds_config, config.deepspeed_config)
        # tensor parallelism (AutoTP): the ranks of a TP group take the same micro-batches
        self.tensor_parallel = run_policy.tensor_parallel_size(ds_config)
        self.check_ranks_agree(run)
        self.data_ranks = self.world // self.tensor_parallel
        self.micro = config.batch_size // (self.data_ranks * self.gas)
        ds_config["train_micro_batch_size_per_gpu"] = self.micro
        ds_config.pop("train_batch_size", None)
        make_schedule = None if scheduler else (
            lambda opt: lr_schedule(opt, config.warmup_steps, config.steps))
        self.model, _, _, _ = initialize(model=model, config=ds_config, lr_scheduler=make_schedule)
        self.optimizer = self.model.basic_optimizer
        self.data_rank = self.rank
        if self.tensor_parallel > 1:
            from deepspeed.utils import groups
            self.data_rank = groups.get_data_parallel_rank()

    def check_ranks_agree(self, run: ResolvedRun) -> None:
        """What resolve() could not know before the process group: the true number of ranks
        (launchers that set no WORLD_SIZE, e.g. mpirun) and one data source on every rank
        ('--data auto' is decided per rank)."""
        try:
            run_policy.check_tensor_parallel(self.world, self.tensor_parallel)
            run_policy.check_batch_split(run.config.batch_size, self.world // self.tensor_parallel, self.gas)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        sources = [None] * self.world
        self.dist.all_gather_object(sources, run.config.data)
        if len(set(sources)) > 1:
            raise SystemExit(f"--data: the ranks chose different sources {sorted(set(sources))} "
                             "('auto' depends on whether each node reaches the hub); pass --data "
                             "explicitly")
        run.ranks = self.world

    def lr(self) -> float:
        return self.model.get_lr()[0]

    def layout(self) -> str:
        """How the ranks split the model, for the header ('' for data parallelism alone)."""
        return f" (tensor parallel {self.tensor_parallel})" if self.tensor_parallel > 1 else ""

    def engine_skipped_steps(self) -> int:
        """Steps DeepSpeed skipped itself on a gradient overflow: the optimizer never saw them.
        A host counter DeepSpeed keeps (and checkpoints); reading it costs no sync."""
        return self.model.skipped_steps

    def close(self) -> None:
        """Leave the process group cleanly: gloo can abort a process that exits without it."""
        self.dist.barrier()
        self.dist.destroy_process_group()

    def train_step(self, batch: data.Batch, stop: bool = False) -> tuple[float, bool]:
        """This rank's micro-batches of the global batch: only their windows are read. Returns
        the loss of the global batch and whether any rank was asked to stop (``stop``: this one
        was); both ride in one all-reduce, the one the logged loss needs anyway."""
        losses = []
        for m in range(self.gas):
            lo = (m * self.data_ranks + self.data_rank) * self.micro
            x, y = batch.rows(lo, lo + self.micro)
            loss = lm_loss(self.model, x.to(self.model.device), y.to(self.model.device))
            self.model.backward(loss)
            self.model.step()
            losses.append(loss.detach().float())
        mean = torch.stack(losses).mean()  # the logged loss: mean over the global batch
        packed = torch.stack([mean, torch.full_like(mean, float(stop))])  # no host-to-device copy
        self.dist.all_reduce(packed)  # on the model's device: NCCL reduces no CPU tensor
        loss_sum, stops = packed.tolist()
        return loss_sum / self.world, stops > 0  # (a TP group's ranks hold the same loss)

    def save(self, directory: Path, step: int, client: dict, identity: dict) -> None:
        resume.save_deepspeed(directory, step, self.model, client, identity)

    def load(self, directory: Path, tag: str) -> dict:
        return resume.load_deepspeed(directory, tag, self.model)


def norm_reducer(opt):
    """The per-layer norm all-reduce of a ZeRO-bound optimizer (None on one process)."""
    return getattr(opt.sharding, "reducer", None)


# ------------------------------------------------------------------------------------------------
# The job


class Trainer:
    """One training run of a :class:`TrainConfig`, read top to bottom in :meth:`run`.

    ``Trainer(config)`` checks the config (:func:`resolve`: a bad option raises ValueError before
    any data is read or any weight is allocated); :meth:`run` trains and returns the
    :class:`RunSummary` it also writes to ``<out>/summary.json`` (not when the stop signal
    stopped it at a checkpoint: status "stopped", the run is not over).
    """

    def __init__(self, config: TrainConfig | ResolvedRun):
        self.resolved = config if isinstance(config, ResolvedRun) else resolve(config)
        self.config = self.resolved.config

    def run(self) -> RunSummary:
        # The stop signal (slurm's time-limit warning) is caught from here on and read once a step.
        signum = preemption.signal_of(self.config.stop_signal) if self.config.out else None
        with preemption.StopRequest(signum) as stop:
            return self._train(stop)

    def _train(self, stop: preemption.StopRequest) -> RunSummary:
        t_start = time.perf_counter()
        config, resolved = self.config, self.resolved
        device = torch.device(config.device)
        torch.manual_seed(config.seed)

        # Data: a token store (a source is built into the store cache first, once per node). Each
        # rank memory-maps it and reads only its own micro-batches' windows.
        training = resolved.data_request.open(progress=config.progress)
        store = training.store
        batches = data.BatchIterator(training.train, config.batch_size, seed=config.data_seed,
                                     fingerprint=store.fingerprint)

        # Model, optimizer, schedule: on one process, or sharded by DeepSpeed.
        model = models.build_model(config.preset, store.vocab_size, config.seq_len,
                                   seed=config.seed).to(device)
        store.check_model_vocab(model.config.vocab_size)
        model.train()
        n_params = sum(p.numel() for p in model.parameters())
        backend = DeepSpeedRun(resolved, model) if resolved.prepared.deepspeed is not None \
            else SingleProcess(resolved, model)
        opt, lead = backend.optimizer, backend.rank == 0
        if lead:
            for note in resolved.prepared.notes + ([stop.note] if stop.note else []):
                print(f"note: {note}")
            print(f"{config.optimizer} {resolved.hyperparams} | {config.preset}: {n_params:,} params | "
                  f"{backend.world} rank(s){backend.layout()} | {store.summary()} | {len(training.train):,} train / "
                  f"{len(training.val):,} val windows of {config.seq_len}")

        # Resume: weights, optimizer, schedule, data position, history. Or start afresh.
        history = {"losses": [], "val_losses": [], "tokens": 0, "train_time": 0.0, "eval_time": 0.0,
                   "norm_allreduce_time": 0.0, "elapsed": 0.0, "nonfinite_run": 0, "skipped": 0}
        start = 0
        if config.resume:
            client = backend.load(checkpoint_dir(config), resolved.resume_tag)
            start, history = client["step"], client["history"]
            batches.load_state_dict(client["data"])
            resume.set_rng_state(client["rng"])
            if lead:
                print(f"resumed from {checkpoint_dir(config) / resolved.resume_tag} at step {start}")
        reducer = norm_reducer(opt)  # None on one process
        if reducer is not None:
            reducer.sync_cuda = config.time_norm_reduce
        counted = 0.0  # the reducer's seconds already added to the history

        def add_reducer_time() -> None:
            nonlocal counted
            if reducer is not None:
                history["norm_allreduce_time"] += reducer.seconds - counted
                counted = reducer.seconds

        # Train.
        layer_names = opt.layer_map.layout.layer_names
        log = MetricsLog(config.out if lead else None, layer_names, resume_step=start,
                         tensorboard=config.tensorboard)
        losses, val_losses = history["losses"], history["val_losses"]
        status = "ok"
        t0, elapsed0 = time.perf_counter(), history["elapsed"]
        bar = tqdm(total=config.steps, initial=start, desc="train",
                   disable=not (config.progress and lead), file=sys.stderr, dynamic_ncols=True)
        for step in range(start + 1, config.steps + 1):
            t_step = time.perf_counter()
            batch = next(batches)
            lr = backend.lr()
            loss, stopping = backend.train_step(batch, stop.requested)  # every rank agrees
            losses.append(loss)
            history["train_time"] += time.perf_counter() - t_step
            history["tokens"] += batch.tokens
            stats = optimizer_stats(opt, engine_skipped=backend.engine_skipped_steps(),
                                    engine_skipped_before=history.get("engine_skipped", 0))
            history["engine_skipped"] = backend.engine_skipped_steps()
            log.write({"step": step, "loss": finite_or_none(losses[-1]), "lr": lr,
                       "tokens": history["tokens"], "elapsed": elapsed0 + time.perf_counter() - t0,
                       **stats})
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.2e}")
            # Diverged: K steps in a row with a non-finite loss or a skipped update (non-finite
            # gradients, skipped by the optimizer or by DeepSpeed before it). Loss and skips are
            # the same on every rank, so all ranks stop together.
            bad = not math.isfinite(losses[-1]) or stats["skipped_steps"] > history["skipped"]
            history["skipped"] = stats["skipped_steps"]
            history["nonfinite_run"] = history["nonfinite_run"] + 1 if bad else 0
            if history["nonfinite_run"] >= config.diverge_after:
                status = "diverged"

            is_eval_step = (config.eval_every and step % config.eval_every == 0) or step == config.steps
            if config.eval_batches and (is_eval_step or status == "diverged"):
                t_eval = time.perf_counter()
                val = evaluate(backend.model, training.val, config.batch_size, config.eval_batches,
                               backend.model.device, backend.micro)
                history["eval_time"] += time.perf_counter() - t_eval
                val_losses.append((step, val))
                log.write({"step": step, "val_loss": finite_or_none(val), "tokens": history["tokens"],
                           "elapsed": elapsed0 + time.perf_counter() - t0})
                bar.set_postfix(loss=f"{losses[-1]:.3f}", val=f"{val:.3f}", lr=f"{lr:.2e}")
            if status == "diverged":
                break
            stopping = stopping and step < config.steps  # at the last step: just finish
            if stopping or (config.save_every and (step % config.save_every == 0 or step == config.steps)):
                add_reducer_time()
                history["elapsed"] = elapsed0 + time.perf_counter() - t0
                client = {"step": step, "history": history, "data": batches.state_dict(),
                          "rng": resume.rng_state()}
                backend.save(checkpoint_dir(config), step, client, resolved.identity())
                if lead:
                    resume.prune(checkpoint_dir(config), config.keep_checkpoints)
            if stopping:
                status = "stopped"
                break
        bar.close()
        log.close()
        add_reducer_time()
        if status == "ok" and val_losses and not math.isfinite(val_losses[-1][1]):
            status = "diverged"

        # Summary.
        steps_done = len(losses)
        train_time = history["train_time"]
        summary = RunSummary(
            status=status, optimizer=config.optimizer, preset=config.preset, params=n_params,
            hyperparams=resolved.hyperparams, data=config.data, store=str(store.path),
            store_fingerprint=store.fingerprint, tokenizer=store.tokenizer_name,
            steps=config.steps, steps_done=steps_done, batch_size=config.batch_size,
            seq_len=config.seq_len, ranks=backend.world, seed=config.seed,
            data_seed=config.data_seed, tokens=history["tokens"],
            first_loss=finite_or_none(losses[0]) if losses else None,
            last_loss=finite_or_none(losses[-1]) if losses else None,
            losses=[finite_or_none(x) for x in losses],
            val_loss=finite_or_none(val_losses[-1][1]) if val_losses else None,
            val_losses=[(s, finite_or_none(v)) for s, v in val_losses],
            tokens_per_s=history["tokens"] / max(train_time, 1e-9), train_time=train_time,
            step_time=train_time / max(steps_done, 1),
            norm_allreduce_time=history["norm_allreduce_time"],
            norm_allreduce_share=history["norm_allreduce_time"] / max(train_time, 1e-9),
            wall_time=time.perf_counter() - t_start, resumed_from=start or None,
            skipped_steps=opt.skipped_steps + backend.engine_skipped_steps(),
            clip_counts=opt.layer_clip_counts(),
            data_state=batches.state_dict(), epochs=batches.epoch(), layers=layer_names,
            out=config.out,
        )
        if lead and status == "stopped":  # no summary.json: the run is not over
            print(f"stopped after step {steps_done} on {stop.signum.name}: checkpoint "
                  f"{checkpoint_dir(config) / resume.tag(steps_done)}; go on with --resume "
                  f"(exit code {preemption.EXIT_STOPPED})", flush=True)
        elif lead:
            if config.out is not None:
                summary.write(Path(config.out) / "summary.json")
            print_summary(summary)
        backend.close()
        return summary


def main(argv: Optional[list[str]] | TrainConfig = None) -> RunSummary:
    """Train from a command line (``argv``; None: ``sys.argv``) or a :class:`TrainConfig`."""
    if isinstance(argv, TrainConfig):
        return Trainer(argv).run()
    return Trainer(resolve_args(argv)).run()


EXIT_DIVERGED = 3
EXIT_STOPPED = preemption.EXIT_STOPPED


def cli(argv: Optional[list[str]] = None) -> int:
    """The console entry: exit 0 when the run finished, 3 when it diverged, 75 when the stop
    signal stopped it at a checkpoint (go on with --resume); one line and exit 1 when a
    checkpoint that passed the checks fails to load (a refused or damaged file, named), exit 2
    when data that passed the checks fails to build (the file and line named)."""
    try:
        summary = main(argv)
    except (CheckpointError, data.DataError) as e:  # found only while loading or building
        print(f"stratopt-train: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, data.DataError) else 1
    return {"diverged": EXIT_DIVERGED, "stopped": preemption.EXIT_STOPPED}.get(summary.status, 0)


if __name__ == "__main__":
    sys.exit(cli())
