"""``RunSummary``: what one training run reports, as ``<out>/summary.json``.

:func:`stratopt_ds.train.main` returns it and writes it (atomically, only when a run ends); the
study reads it back with :meth:`RunSummary.read` (its verdict, final and per-eval validation
losses, layer names). One typed record instead of a dict read by string keys in three places.
Every field has a default, so a summary written by an older version still loads.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

OK, DIVERGED = "ok", "diverged"


@dataclass
class RunSummary:
    status: str = OK                     # "ok", "diverged" (non-finite loss or skipped updates),
    #                                      or "stopped" (the stop signal; never in summary.json)
    optimizer: str = ""                  # optimizer name (stratopt_ds.available_optimizers())
    preset: str = ""                     # model preset (stratopt_ds.models.MODEL_PRESETS)
    params: int = 0                      # model parameters
    hyperparams: dict[str, Any] = field(default_factory=dict)  # the optimizer keywords used
    data: str = ""                       # the --data request as given
    store: str = ""                      # the token store read (path)
    store_fingerprint: str = ""          # its content fingerprint (resume and studies check it)
    tokenizer: str = ""                  # the store's tokenizer name
    steps: int = 0                       # steps asked for
    steps_done: int = 0                  # steps taken (fewer when the run diverged)
    batch_size: int = 0                  # global batch, in windows
    seq_len: int = 0                     # tokens per window
    ranks: int = 1                       # data-parallel ranks
    seed: int = 0                        # model-init seed
    data_seed: int = 0                   # data-order seed
    tokens: int = 0                      # training tokens seen
    first_loss: Optional[float] = None   # training loss of the first step
    last_loss: Optional[float] = None    # training loss of the last step
    losses: list[Optional[float]] = field(default_factory=list)  # per step (None: non-finite)
    val_loss: Optional[float] = None     # the last validation loss
    val_losses: list = field(default_factory=list)  # [(step, loss)] at every evaluation
    tokens_per_s: float = 0.0            # training throughput (all ranks)
    train_time: float = 0.0              # seconds in the training loop
    step_time: float = 0.0               # train_time / steps_done
    norm_allreduce_time: float = 0.0     # seconds in the per-layer norm all-reduce
    norm_allreduce_share: float = 0.0    # its share of train_time
    wall_time: float = 0.0               # seconds from start to summary
    resumed_from: Optional[int] = None   # the step a --resume started from
    skipped_steps: int = 0               # optimizer steps skipped for a non-finite norm
    clip_counts: dict[str, int] = field(default_factory=dict)  # layer name -> times clipped
    data_state: dict[str, Any] = field(default_factory=dict)   # the batch iterator's position
    epochs: Any = None                   # epochs of the training part read (fractional)
    layers: list[str] = field(default_factory=list)  # layer names, the order of metrics.jsonl lists
    out: Optional[str] = None            # the run directory

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, path: str | Path) -> None:
        """Write as JSON, atomically: a reader sees the whole summary or none."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunSummary":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})  # keys of another version: ignored

    @classmethod
    def read(cls, path: str | Path) -> Optional["RunSummary"]:
        """The summary at ``path``; None when there is none (or a kill cut it short)."""
        try:
            raw = json.loads(Path(path).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return cls.from_dict(raw) if isinstance(raw, dict) else None
