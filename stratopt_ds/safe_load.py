"""Read checkpoint files without ever running code from them.

``torch.load(weights_only=False)`` unpickles arbitrary objects: a crafted checkpoint runs
whatever its pickle names (``os.system``, ``open``, ...). Every checkpoint this package reads goes
through :func:`load` instead: ``weights_only=True`` (tensors, containers, numbers, strings) plus
an explicit allowlist of the few classes a given format holds (DeepSpeed's: see
:func:`deepspeed_globals`). Whatever else a file's pickle asks for is refused before it is built.

Torch files are zip archives whose index (the central directory) sits at the end and records a
CRC-32 of every member. :func:`check_file` reads only that index: cheap enough to run on every
rank over thousands of shards before a resume, and it catches a file that is missing, empty or
cut short. :func:`load` also checks every member's CRC, so a flipped bit anywhere is reported as
corruption instead of loading as silently wrong numbers (torch itself does not check on read);
that reads each file once more, about 0.9 s per GiB on one core (1.4 s to load a 1 GiB file
that torch.load alone reads in 0.65 s).
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

ZIP_MAGIC = b"PK\x03\x04"
CHUNK = 1 << 24  # CRC check read size: 16 MiB


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, truncated or corrupted, or refused
    because loading it would run code. The message names the file and what to do."""


ADVICE = "resume from an earlier checkpoint or restore an intact copy of this file"


def unusable(path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path}: {reason}; {ADVICE}")


def check_file(path) -> Optional[str]:
    """Why ``path`` is not a usable torch file (``"missing"``, ``"empty"``, ``"truncated or
    corrupted"``), judged from its size and zip index alone; None when it looks whole.

    Reads a few kilobytes at the end of the file, whatever its size. A pre-zip (legacy) torch
    file has no index: only its presence and first byte are checked here, the rest on load.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if size == 0:
        return "empty"
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != ZIP_MAGIC:
        return None if magic[:1] == b"\x80" else "truncated or corrupted (not a torch file)"
    try:
        with zipfile.ZipFile(path) as archive:
            # every member must end before the index: catches a file cut short and re-padded
            end = max((i.header_offset + i.compress_size for i in archive.infolist()), default=0)
            if end > archive.start_dir:
                return "truncated or corrupted (its members run past its zip index)"
    except zipfile.BadZipFile as e:  # "File is not a zip file": no index at the end, cut short
        return "truncated or corrupted" + ("" if "not a zip file" in str(e) else f" ({e})")
    except (OSError, EOFError, ValueError) as e:
        return f"truncated or corrupted ({e})"
    return None


def verify_crc(path) -> None:
    """Read every member of a zip-format torch file and compare its CRC-32 with the index.

    Members whose recorded CRC is 0 are skipped: torch writes 0 when CRC recording is turned off
    (``torch.serialization.set_crc32_options(False)``).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size > 0:
                    continue
                with archive.open(info) as member:
                    while member.read(CHUNK):
                        pass  # zipfile raises BadZipFile at the end of a member whose CRC differs
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise unusable(path, f"truncated or corrupted ({e})") from None


REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")


def load(path, map_location: Any = "cpu", allow: Iterable[Any] = (), mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with ``allow`` (classes, functions) permitted
    besides torch's own safe types; raise :class:`CheckpointError` naming the file when it is
    missing, truncated or corrupted, or needs anything else to unpickle. ``mmap``: the tensors
    map the file (zip files only) instead of being read into memory; only what is touched is
    paged in."""
    problem = check_file(path)
    if problem is not None:
        raise unusable(path, problem)
    zipped = _is_zip(path)
    if zipped:
        verify_crc(path)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and zipped)
    except pickle.UnpicklingError as e:
        refused = REFUSED_GLOBAL.search(str(e))
        if refused:
            raise CheckpointError(
                f"{path}: refused: unpickling it needs {refused.group(1)}, which no checkpoint of "
                "stratopt_ds holds (loading it could run code). Do not use this file unless you "
                "know where it came from; if you wrote it yourself, load it with "
                "torch.load(..., weights_only=False) and save its tensors again") from None
        raise _load_failure(path, zipped, e) from None
    except Exception as e:  # noqa: BLE001 - torch raises many types on bad bytes; all name the file
        raise _load_failure(path, zipped, e) from None


def _load_failure(path, crc_checked: bool, error: Exception) -> CheckpointError:
    detail = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    if crc_checked:  # the bytes are those that were written: not corruption, say what torch said
        return CheckpointError(f"{path}: cannot be loaded ({detail}); resume from an earlier "
                               "checkpoint or load it with the versions that wrote it")
    return unusable(path, f"truncated or corrupted ({detail})")


def _is_zip(path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == ZIP_MAGIC


def deepspeed_globals() -> list[Any]:
    """The non-tensor classes in DeepSpeed's own checkpoint files, and nothing else.

    Found by saving real checkpoints (deepspeed 0.19.8; ZeRO 0-3, fp32 and bf16, CPU optimizer
    offload, 1 and 2 ranks) and loading every file with ``weights_only=True``: the ZeRO optimizer
    files hold the loss scaler object, the stage as an enum and, at stages 1-2, the address of
    each parameter's fragment. Model-state files need none. All three are plain data classes:
    building them sets attributes and runs no code of the file's choosing. (fp16, whose dynamic
    loss scaler would add another class, is refused by stratopt_ds.)
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]
