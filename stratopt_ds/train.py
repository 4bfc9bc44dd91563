"""The main job: pretrain a LLaMA-style model with any stratopt_ds optimizer, on one process.

    python -m stratopt_ds.train                                   # tiny model, synthetic text
    python -m stratopt_ds.train --optimizer adamw --steps 200 --out runs/adamw
    python -m stratopt_ds.train --data corpus.jsonl --tokenizer bpe --opt-args clip=global
    python -m stratopt_ds.train --preset 134m --data stores/fineweb-gpt2 --device cuda

``--data`` is a token store (``python -m stratopt_ds.data build``) or a source that is built into
the store cache first; either way the run reads a memory-mapped store (``stratopt_ds.data``).
Everything happens in ``main`` from top to bottom: check the options, open the data, the model,
the optimizer and its schedule, train, evaluate, write ``metrics.jsonl`` and ``summary.json``.
Bad options stop the job before any data is read or any weight is allocated.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import data, models, resume, run_policy
from .metrics import MetricsLog, finite_or_none, optimizer_stats, print_summary
from .optim import available_optimizers, create_optimizer
from .optim.config import with_run_length_warmups
from .run_policy import parse_opt_args  # noqa: F401  (also this module's API: hf, examples)
from .summary import RunSummary

# ------------------------------------------------------------------------------------------------
# Options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stratopt-train", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--optimizer", default=None,
        help="optimizer name, see stratopt_ds.available_optimizers() (default: the DeepSpeed "
             "config's optimizer, else stratopt)")
    add("--opt-args", action="extend", nargs="+", default=[], metavar="ARG",
        help="hyperparameter overrides: a JSON object or key=value pairs (values parsed as JSON)")
    add("--preset", default="tiny",
        help=f"model preset: {', '.join(models.MODEL_PRESETS)} (default: tiny)")
    add("--steps", type=int, default=100, help="optimizer steps (default: 100)")
    add("--batch-size", type=int, default=None, help="sequences per step (default: the preset's)")
    add("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's)")
    add("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    add("--warmup-steps", type=int, default=None,
        help="linear warm-up steps (default: 10%% of --steps)")
    add("--data", default="auto",
        help="a token store directory (python -m stratopt_ds.data build), or a source to build "
             "into the store cache first: 'fineweb' (streamed; by default as many tokens as the "
             "run trains on), 'synthetic', a .txt/.jsonl/.parquet file, a directory or glob of "
             "them, or 'auto' (default): fineweb when the hub is reachable, else synthetic")
    add("--max-docs", type=int, default=None,
        help="building from a source: read at most this many documents (default: all; 2000 "
             "for synthetic)")
    add("--tokenizer", default=None,
        help="building from a source: 'byte' (default), 'bpe' (trained on the data), or a hub "
             "name or local directory. A store brings its own; naming another is an error")
    add("--bpe-vocab", type=int, default=None,
        help="vocabulary size of --tokenizer bpe (default: 4096)")
    add("--cache-dir", default=None, help="where stores built from sources and trained "
        "tokenizers are cached (default: $STRATOPT_CACHE or ~/.cache/stratopt_ds)")
    add("--seed", type=int, default=0, help="model initialisation seed (default: 0)")
    add("--data-seed", type=int, default=0, help="data order seed (default: 0)")
    add("--val-windows", type=int, default=64,
        help="validation sequences: the first windows of the store's validation part, the same "
             "for every run (a source is built with exactly these) (default: 64)")
    add("--eval-every", type=int, default=100,
        help="validation every N steps; 0: only at the end (default: 100)")
    add("--eval-batches", type=int, default=4,
        help="validation batches per evaluation; 0: none (default: 4)")
    add("--out", default=None, help="directory for metrics.jsonl and summary.json")
    add("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    add("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None,
        help="train with DeepSpeed (run under the `deepspeed` launcher) using this JSON config; "
             "--batch-size is then the global batch: micro-batch x accumulation x ranks")
    add("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    add("--save-every", type=int, default=0,
        help="checkpoint to <out>/checkpoints every N steps and at the end; 0: never (default: 0)")
    add("--keep-checkpoints", type=int, default=2,
        help="keep the newest K checkpoints; 0: all (default: 2)")
    add("--resume", action="store_true",
        help="continue the run from the newest complete checkpoint in <out>/checkpoints")
    add("--diverge-after", type=int, default=20,
        help="stop as diverged (exit code 3) after K consecutive steps with a non-finite loss or "
             "a skipped update (non-finite gradients) (default: 20)")
    add("--no-tensorboard", action="store_true",
        help="do not write TensorBoard events to <out>/tensorboard")
    add("--time-norm-reduce", action="store_true",
        help="on CUDA, synchronise around the per-layer norm all-reduce so its share of the "
             "step is exact (on CPU it is always exact)")
    add("--no-progress", action="store_true", help="hide the progress bar")
    return p


def optimizer_hyperparams(name: str, overrides: dict[str, Any], lr: float, steps: int) -> dict:
    """The optimizer keywords: overrides, the peak lr, and the slow-momentum warm-up lengths.

    When the optimizer mixes in a slow momentum (mix_alpha > 0) its warm-ups ``t_alpha`` and
    ``t_beta3`` span the whole run unless the overrides set them.
    """
    run_policy.refuse_lr_in_args(overrides, "--opt-args", "--lr")
    return with_run_length_warmups(name, {**overrides, "lr": lr}, steps)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill the preset's defaults and stop with a clear message at the first bad option."""
    if args.optimizer is not None and args.optimizer not in available_optimizers():
        parser.error(f"--optimizer: unknown optimizer {args.optimizer!r}; "
                     f"available: {', '.join(available_optimizers())}")
    lr_given = args.lr is not None
    try:
        preset = models.preset(args.preset)
    except ValueError as e:
        parser.error(f"--preset: {e}")
    for key, default in [("batch_size", preset["batch_size"]), ("seq_len", preset["seq_len"]),
                         ("lr", preset["lr"]), ("warmup_steps", max(1, args.steps // 10))]:
        if getattr(args, key) is None:
            setattr(args, key, default)
    max_docs = 1 if args.max_docs is None else args.max_docs
    for option, value, minimum in [
            ("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
            ("--seq-len", args.seq_len, 1), ("--val-windows", args.val_windows, 1),
            ("--max-docs", max_docs, 1), ("--warmup-steps", args.warmup_steps, 0),
            ("--eval-every", args.eval_every, 0), ("--eval-batches", args.eval_batches, 0),
            ("--save-every", args.save_every, 0), ("--keep-checkpoints", args.keep_checkpoints, 0),
            ("--diverge-after", args.diverge_after, 1)]:
        if value < minimum:
            parser.error(f"{option} must be >= {minimum}, got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    args.data = data.resolve_source(args.data)
    args.data_request = data.DataRequest(
        args.data, args.seq_len, tokenizer=args.tokenizer, bpe_vocab=args.bpe_vocab,
        max_docs=args.max_docs, val_windows=args.val_windows, evaluate=args.eval_batches > 0,
        run_tokens=args.steps * args.batch_size * args.seq_len, cache_dir=args.cache_dir)
    try:
        args.tokenizer = args.data_request.check()
    except (data.DataError, FileNotFoundError) as e:
        parser.error(str(e) if str(e).startswith("--") else f"--data {args.data}: {e}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    try:
        overrides = parse_opt_args(args.opt_args)
    except ValueError as e:  # json.JSONDecodeError is a ValueError too
        parser.error(f"--opt-args: {e}")
    args.ds_config, base, args.ranks = None, {}, 1
    if args.deepspeed_config is not None:
        base = check_deepspeed_config(parser, args, lr_given)
    args.optimizer = args.optimizer or "stratopt"
    try:  # the run policy's checks of the optimizer keywords: bad values raise here
        args.hyperparams = optimizer_hyperparams(args.optimizer, {**base, **overrides},
                                                 args.lr, args.steps)
        clip_mode = run_policy.check_optimizer(args.optimizer, args.hyperparams)
    except ValueError as e:
        where = "the DeepSpeed config's optimizer.params or " if base else ""
        parser.error(f"{where}--opt-args: {e}")
    if args.ds_config is not None:
        try:
            args.ds_config["gradient_clipping"], args.notes = run_policy.engine_clipping(
                args.ds_config.get("gradient_clipping"), clip_mode)
        except ValueError as e:
            parser.error(f"{args.deepspeed_config}: {e}")
    if args.resume or args.save_every:
        if args.out is None:
            parser.error("--resume and --save-every need --out (checkpoints go to <out>/checkpoints)")
    if args.resume:
        try:
            args.resume_tag = resume.check_identity(checkpoint_dir(args), run_identity(args))
        except (FileNotFoundError, ValueError) as e:
            parser.error(str(e))
    return args


def check_deepspeed_config(parser: argparse.ArgumentParser, args: argparse.Namespace,
                           lr_given: bool) -> dict[str, Any]:
    """Read the config; return its optimizer params. Every error stops before any process group."""
    from .integrations.deepspeed import load_config, resolve_optimizer_name

    try:
        args.ds_config = config = load_config(args.deepspeed_config)
    except ValueError as e:
        parser.error(f"--deepspeed_config: {e}")
    params: dict[str, Any] = {}
    section = config.get("optimizer")
    if section:
        type_name = str(section.get("type", ""))
        name = resolve_optimizer_name(type_name)
        if name is None:
            parser.error(f"--deepspeed_config: optimizer.type {type_name!r} is not a stratopt_ds "
                         f"optimizer (the training entry logs per-layer norms); available: "
                         f"{', '.join(available_optimizers())}")
        if args.optimizer is not None and args.optimizer != name:
            parser.error(f"--optimizer {args.optimizer!r} conflicts with the DeepSpeed config's "
                         f"optimizer.type {type_name!r}; give one of them")
        args.optimizer = name
        params = dict(section.get("params") or {})
        config_lr = params.pop("lr", None)
        if config_lr is not None and not lr_given:
            args.lr = float(config_lr)  # the config's lr, unless --lr says otherwise
    # set by the deepspeed launcher (mpirun sets OMPI_*); DeepSpeedRun checks again after init
    args.ranks = int(os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or 1)
    try:
        run_policy.check_batch_split(args.batch_size, args.ranks, int(config.get("gradient_accumulation_steps", 1)))
    except ValueError as e:
        parser.error(str(e))
    return params


def checkpoint_dir(args: argparse.Namespace) -> Path:
    return Path(args.out) / "checkpoints"


def run_identity(args: argparse.Namespace) -> dict[str, Any]:
    """What defines the run; ``--resume`` refuses a checkpoint whose identity differs."""
    return {key: getattr(args, key) for key in resume.RUN_IDENTITY}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    return check_args(parser, parser.parse_args(argv))


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
# The job


class SingleProcess:
    """One process: our optimizer and the LambdaLR schedule."""

    world, rank = 1, 0
    micro = None  # evaluation batches: no micro-batch split on one process

    def __init__(self, args, model: nn.Module):
        self.model = model
        self.optimizer = create_optimizer(args.optimizer, model, **args.hyperparams)
        self.scheduler = lr_schedule(self.optimizer, args.warmup_steps, args.steps)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train_step(self, batch: data.Batch) -> float:
        device = self.model.device
        inputs, targets = batch.rows()
        loss = lm_loss(self.model, inputs.to(device), targets.to(device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()

    def save(self, directory: Path, step: int, client: dict, identity: dict) -> None:
        resume.save_single(directory, step, self.model, self.optimizer, self.scheduler,
                                client, identity)

    def load(self, directory: Path, tag: str) -> dict:
        return resume.load_single(directory, tag, self.model, self.optimizer, self.scheduler)

    def close(self) -> None:
        pass


class DeepSpeedRun:
    """Under the deepspeed launcher: the global batch is split over ranks and micro-batches."""

    def __init__(self, args, model: nn.Module):
        import deepspeed
        import torch.distributed as dist

        from .integrations.deepspeed import initialize, release_cpu_comm_shm

        self.dist = dist
        config = args.ds_config
        # check_args resolved the optimizer (config, --optimizer, --opt-args, --lr): it is ours.
        config["optimizer"] = {"type": args.optimizer,
                               "params": {**args.hyperparams}}
        scheduler = config.get("scheduler")
        if scheduler and scheduler.get("type") == "WarmupCosineLR":  # the run's length wins
            scheduler.setdefault("params", {}).update(total_num_steps=args.steps,
                                                      warmup_num_steps=args.warmup_steps)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        release_cpu_comm_shm()  # before anything can fail: a crashed run leaves no 66 MB per rank
        if torch.cuda.is_available():  # NCCL collectives below use the current device: one per rank
            torch.cuda.set_device(args.local_rank)
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.gas = int(config.get("gradient_accumulation_steps", 1))
        self.check_ranks_agree(args)
        self.micro = args.batch_size // (self.world * self.gas)
        config["train_micro_batch_size_per_gpu"] = self.micro
        config.pop("train_batch_size", None)
        make_schedule = None if scheduler else (
            lambda opt: lr_schedule(opt, args.warmup_steps, args.steps))
        self.model, _, _, _ = initialize(model=model, config=config, lr_scheduler=make_schedule)
        self.optimizer = self.model.basic_optimizer

    def check_ranks_agree(self, args) -> None:
        """What check_args could not know before the process group: the true number of ranks
        (launchers that set no WORLD_SIZE, e.g. mpirun) and one data source on every rank
        ('--data auto' is decided per rank)."""
        try:
            run_policy.check_batch_split(args.batch_size, self.world, self.gas)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        sources = [None] * self.world
        self.dist.all_gather_object(sources, args.data)
        if len(set(sources)) > 1:
            raise SystemExit(f"--data: the ranks chose different sources {sorted(set(sources))} "
                             "('auto' depends on whether each node reaches the hub); pass --data "
                             "explicitly")
        args.ranks = self.world

    def lr(self) -> float:
        return self.model.get_lr()[0]

    def close(self) -> None:
        """Leave the process group cleanly: gloo can abort a process that exits without it."""
        self.dist.barrier()
        self.dist.destroy_process_group()

    def train_step(self, batch: data.Batch) -> float:
        """This rank's micro-batches of the global batch: only their windows are read."""
        losses = []
        for m in range(self.gas):
            lo = (m * self.world + self.rank) * self.micro
            x, y = batch.rows(lo, lo + self.micro)
            loss = lm_loss(self.model, x.to(self.model.device), y.to(self.model.device))
            self.model.backward(loss)
            self.model.step()
            losses.append(loss.detach().float())
        mean = torch.stack(losses).mean()  # the logged loss: mean over the global batch
        self.dist.all_reduce(mean)  # on the model's device: NCCL reduces no CPU tensor
        return mean.item() / self.world

    def save(self, directory: Path, step: int, client: dict, identity: dict) -> None:
        resume.save_deepspeed(directory, step, self.model, client, identity)

    def load(self, directory: Path, tag: str) -> dict:
        return resume.load_deepspeed(directory, tag, self.model)


def norm_reducer(opt):
    """The per-layer norm all-reduce of a ZeRO-bound optimizer (None on one process)."""
    return getattr(opt.sharding, "reducer", None)


def main(argv: Optional[list[str]] = None) -> RunSummary:
    t_start = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    # Data: a token store (a source is built into the store cache first, once per node). Each
    # rank memory-maps it and reads only its own micro-batches' windows.
    training = args.data_request.open(progress=not args.no_progress)
    store = training.store
    batches = data.BatchIterator(training.train, args.batch_size, seed=args.data_seed,
                                 fingerprint=store.fingerprint)

    # Model, optimizer, schedule: on one process, or sharded by DeepSpeed.
    model = models.build_model(args.preset, store.vocab_size, args.seq_len,
                               seed=args.seed).to(device)
    store.check_model_vocab(model.config.vocab_size)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    run = DeepSpeedRun(args, model) if args.deepspeed_config else SingleProcess(args, model)
    opt, lead = run.optimizer, run.rank == 0
    if lead:
        print(f"{args.optimizer} {args.hyperparams} | {args.preset}: {n_params:,} params | {run.world} rank(s) | "
              f"{store.summary()} | {len(training.train):,} train / {len(training.val):,} val "
              f"windows of {args.seq_len}")

    # Resume: weights, optimizer, schedule, data position, history. Or start afresh.
    history = {"losses": [], "val_losses": [], "tokens": 0, "train_time": 0.0, "eval_time": 0.0,
               "norm_allreduce_time": 0.0, "elapsed": 0.0, "nonfinite_run": 0, "skipped": 0}
    start = 0
    if args.resume:
        client = run.load(checkpoint_dir(args), args.resume_tag)
        start, history = client["step"], client["history"]
        batches.load_state_dict(client["data"])
        resume.set_rng_state(client["rng"])
        if lead:
            print(f"resumed from {checkpoint_dir(args) / args.resume_tag} at step {start}")
    reducer = norm_reducer(opt)  # None on one process
    if reducer is not None:
        reducer.sync_cuda = args.time_norm_reduce
    counted = 0.0  # the reducer's seconds already added to the history

    def add_reducer_time() -> None:
        nonlocal counted
        if reducer is not None:
            history["norm_allreduce_time"] += reducer.seconds - counted
            counted = reducer.seconds

    # Train.
    layer_names = opt.layer_map.layout.layer_names
    log = MetricsLog(args.out if lead else None, layer_names, resume_step=start,
                     tensorboard=not args.no_tensorboard)
    losses, val_losses = history["losses"], history["val_losses"]
    status = "ok"
    t0, elapsed0 = time.perf_counter(), history["elapsed"]
    bar = tqdm(total=args.steps, initial=start, desc="train", disable=args.no_progress or not lead,
               file=sys.stderr, dynamic_ncols=True)
    for step in range(start + 1, args.steps + 1):
        t_step = time.perf_counter()
        batch = next(batches)
        lr = run.lr()
        losses.append(run.train_step(batch))
        history["train_time"] += time.perf_counter() - t_step
        history["tokens"] += batch.tokens
        stats = optimizer_stats(opt)
        log.write({"step": step, "loss": finite_or_none(losses[-1]), "lr": lr,
                   "tokens": history["tokens"], "elapsed": elapsed0 + time.perf_counter() - t0,
                   **stats})
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.2e}")
        # Diverged: K steps in a row with a non-finite loss or a skipped update (non-finite
        # gradients). Loss and norms are the same on every rank, so all ranks stop together.
        bad = not math.isfinite(losses[-1]) or stats["skipped_steps"] > history["skipped"]
        history["skipped"] = stats["skipped_steps"]
        history["nonfinite_run"] = history["nonfinite_run"] + 1 if bad else 0
        if history["nonfinite_run"] >= args.diverge_after:
            status = "diverged"

        is_eval_step = (args.eval_every and step % args.eval_every == 0) or step == args.steps
        if args.eval_batches and (is_eval_step or status == "diverged"):
            t_eval = time.perf_counter()
            val = evaluate(run.model, training.val, args.batch_size, args.eval_batches,
                           run.model.device, run.micro)
            history["eval_time"] += time.perf_counter() - t_eval
            val_losses.append((step, val))
            log.write({"step": step, "val_loss": finite_or_none(val), "tokens": history["tokens"],
                       "elapsed": elapsed0 + time.perf_counter() - t0})
            bar.set_postfix(loss=f"{losses[-1]:.3f}", val=f"{val:.3f}", lr=f"{lr:.2e}")
        if status == "diverged":
            break
        if args.save_every and (step % args.save_every == 0 or step == args.steps):
            add_reducer_time()
            history["elapsed"] = elapsed0 + time.perf_counter() - t0
            client = {"step": step, "history": history, "data": batches.state_dict(),
                      "rng": resume.rng_state()}
            run.save(checkpoint_dir(args), step, client, run_identity(args))
            if lead:
                resume.prune(checkpoint_dir(args), args.keep_checkpoints)
    bar.close()
    log.close()
    add_reducer_time()
    if val_losses and not math.isfinite(val_losses[-1][1]):
        status = "diverged"

    # Summary.
    steps_done = len(losses)
    train_time = history["train_time"]
    summary = RunSummary(
        status=status, optimizer=args.optimizer, preset=args.preset, params=n_params,
        hyperparams=args.hyperparams, data=args.data, store=str(store.path),
        store_fingerprint=store.fingerprint, tokenizer=store.tokenizer_name,
        steps=args.steps, steps_done=steps_done, batch_size=args.batch_size,
        seq_len=args.seq_len, ranks=run.world, seed=args.seed,
        data_seed=args.data_seed, tokens=history["tokens"],
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
        skipped_steps=opt.skipped_steps, clip_counts=opt.layer_clip_counts(),
        data_state=batches.state_dict(), epochs=batches.epoch(), layers=layer_names,
        out=args.out,
    )
    if lead:
        if args.out is not None:
            summary.write(Path(args.out) / "summary.json")
        print_summary(summary)
    run.close()
    return summary


EXIT_DIVERGED = 3


def cli(argv: Optional[list[str]] = None) -> int:
    """The console entry: exit 0 when the run finished, 3 when it diverged."""
    summary = main(argv)
    return EXIT_DIVERGED if summary.status == "diverged" else 0


if __name__ == "__main__":
    sys.exit(cli())
