"""Checkpoint and stop on a signal: slurm's time-limit warning or a preemption notice.

Slurm sends a signal some time before it ends a job (``--signal=USR2@120``; submitit asks for
USR2, the default here). The run then saves a checkpoint after the step it is in and exits with
:data:`EXIT_STOPPED` (75, ``EX_TEMPFAIL``): "stopped at a checkpoint, go on with ``--resume``".
The study's slurm jobs requeue themselves and resume from it (:mod:`stratopt_ds.study.slurm`).

The handler only raises a flag. The loop reads it once a step and the ranks agree on it inside
the all-reduce that already averages the step's loss (no extra collective and no extra host
sync): a signal that reaches one rank stops all of them after the same step, and they save one
consistent checkpoint.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

EXIT_STOPPED = 75
SIGNALS = ("USR1", "USR2")  # not TERM/INT: launchers (deepspeed, torchrun) kill the ranks on them


def signal_of(name: str) -> Optional[signal.Signals]:
    """``USR1``/``SIGUSR1``, ``USR2``/``SIGUSR2``, or None for ``none``; ValueError otherwise."""
    key = str(name).upper().removeprefix("SIG")
    if key == "NONE":
        return None
    if key not in SIGNALS:
        raise ValueError(f"unknown signal {name!r}; allowed: {', '.join(SIGNALS)} or none")
    return signal.Signals[f"SIG{key}"]


class StopRequest:
    """Set by ``signum`` while installed (a context manager); ``requested`` says whether it came.

    Installs only in the main thread (Python delivers signals there); elsewhere, and for
    ``signum=None``, it does nothing and ``note`` says why.
    """

    def __init__(self, signum: Optional[signal.Signals]):
        self.signum = signum
        self.requested = False
        self.note: Optional[str] = None
        self._installed = False
        self._previous = None

    def _raise(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> "StopRequest":
        if self.signum is None:
            return self
        if threading.current_thread() is not threading.main_thread():
            self.note = (f"{self.signum.name} does not stop this run at a checkpoint: the run is "
                         "not in the main thread")
            return self
        self._previous = signal.signal(self.signum, self._raise)
        self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:  # the previous handler may be None (set outside Python): default
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
