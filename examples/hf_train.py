"""Pretrain a LLaMA preset with the HF Trainer and a stratopt_ds optimizer (offline data).

    deepspeed --num_gpus 2 examples/hf_train.py --deepspeed ds_configs/hf/zero2.json \\
        --optim stratopt --learning_rate 3e-3 --max_steps 20 --output_dir runs/hf
    python examples/hf_train.py --optim la-sqrt-b1depth-cliplayer --optim_args clip_tau=3 ...

Every ``TrainingArguments`` option works (``StratTrainingArguments``, see ``stratopt_ds.integrations.hf``),
plus the model and data options below. ``--data`` is a token store (``python -m stratopt_ds.data
build``) or a local source built into the store cache first; each window of ``--seq_len + 1``
tokens is one example, its own labels (the model shifts them), read from the memory-mapped store.
``summary.json`` in ``--output_dir`` records the losses and the optimizer DeepSpeed stepped.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from transformers import HfArgumentParser  # noqa: E402

from stratopt_ds import data, models  # noqa: E402
from stratopt_ds.integrations.hf import StratTrainer, StratTrainingArguments  # noqa: E402


@dataclass
class ModelDataArguments:
    preset: str = field(default="tiny", metadata={"help": f"model preset: {', '.join(models.MODEL_PRESETS)}"})
    seq_len: Optional[int] = field(default=None, metadata={"help": "tokens per example (default: the preset's)"})
    data: str = field(default="synthetic", metadata={
        "help": "a token store directory, or 'synthetic' or a .txt/.jsonl/.parquet file (or a directory "
                "or glob of them) to build into the store cache first"})
    tokenizer: Optional[str] = field(default=None, metadata={
        "help": "building from a source: 'byte' (default), 'bpe' or a local tokenizer directory; a store "
                "brings its own"})
    bpe_vocab: Optional[int] = field(default=None, metadata={"help": "vocabulary of --tokenizer bpe"})
    max_docs: Optional[int] = field(default=None, metadata={"help": "building from a source: read at most "
                                                                     "this many documents"})
    val_windows: int = field(default=64, metadata={"help": "validation examples (the first windows of the "
                                                           "store's validation part)"})


def data_request(margs: ModelDataArguments) -> data.DataRequest:
    seq_len = margs.seq_len or models.preset(margs.preset)["seq_len"]
    return data.DataRequest(margs.data, seq_len, tokenizer=margs.tokenizer, bpe_vocab=margs.bpe_vocab,
                            max_docs=margs.max_docs, val_windows=margs.val_windows)


def parse(argv: Optional[list[str]] = None) -> tuple[ModelDataArguments, StratTrainingArguments]:
    parser = HfArgumentParser((ModelDataArguments, StratTrainingArguments))
    margs, targs = parser.parse_args_into_dataclasses(args=argv)
    try:
        models.preset(margs.preset)
    except ValueError as err:
        parser.error(str(err))
    if data.resolve_source(margs.data) == "fineweb":  # 'auto' too, where the hub answers
        parser.error(f"--data {margs.data} streams FineWeb from the network; this script reads "
                     "local data only (give a store, a file or 'synthetic')")
    try:
        data_request(margs).check()
    except (data.DataError, FileNotFoundError) as err:
        parser.error(f"--data {margs.data}: {err}")
    return margs, targs


def build_trainer(argv: Optional[list[str]] = None) -> StratTrainer:
    margs, targs = parse(argv)
    request = data_request(margs)
    training = request.open(progress=not targs.disable_tqdm)
    model = models.build_model(margs.preset, training.store.vocab_size, request.seq_len + 1,
                               seed=targs.seed)
    return StratTrainer(model=model, args=targs, train_dataset=data.WindowDataset(training.train),
                        eval_dataset=data.WindowDataset(training.val))


def summarize(trainer: StratTrainer) -> dict[str, Any]:
    """What the run did: losses per logged step, and the optimizer that actually stepped."""
    engine = trainer.model_wrapped
    inner = getattr(engine, "basic_optimizer", trainer.built_optimizer)
    return {
        "optim": trainer.args.optim,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "eval_losses": [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h],
        "world_size": trainer.args.world_size,
        "zero_stage": engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None,
        "inner_optimizer": type(inner).__name__,
        "groups": [{"weight_decay": g["weight_decay"], "num_names": len(g.get("param_names", []))}
                   for g in inner.param_groups],
        "bound": not getattr(getattr(inner, "sharding", None), "is_local", True),
        "gradient_clipping": engine.gradient_clipping() if hasattr(engine, "gradient_clipping") else None,
    }


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    trainer = build_trainer(argv)
    trainer.train()
    summary = summarize(trainer)
    if trainer.is_world_process_zero():
        os.makedirs(trainer.args.output_dir, exist_ok=True)
        with open(os.path.join(trainer.args.output_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
    return summary


def shutdown() -> None:
    """Leave the process group before exit: without it ZeRO-3 ranks can abort at interpreter
    shutdown ("terminate called without an active exception") after a successful run."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    shutdown()
