"""Small models and comparison helpers shared by the tests."""
from __future__ import annotations

import json
import socket
import time
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free a moment ago (held together, so never the same one twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def wait_for_logged_step(out: Path, step: int, proc=None, timeout: float = 240) -> int:
    """Wait until ``<out>/metrics.jsonl`` logs a training step >= ``step`` (or ``proc`` ends);
    the newest step logged."""
    path, newest, deadline = Path(out) / "metrics.jsonl", 0, time.time() + timeout
    while True:
        for line in path.read_text().splitlines()[-5:] if path.is_file() else []:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if "loss" in record:
                newest = max(newest, record["step"])
        if newest >= step or time.time() >= deadline or (proc is not None and proc.poll() is not None):
            return newest
        time.sleep(0.05)


def assert_usage_error(main, argv: list[str], words: list[str], capsys) -> None:
    """``main(argv)`` exits with argparse's usage status 2, and stderr names every word."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)


class Block(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        self.norm = nn.LayerNorm(d_out)

    def forward(self, x):
        return self.norm(torch.tanh(self.lin(x)))


class TinyNet(nn.Module):
    """Embedding, three blocks of different shapes, a head: names carry block indices."""

    def __init__(self, vocab: int = 11, dims=(6, 10, 7, 9), n_out: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dims[0])
        self.blocks = nn.ModuleList(Block(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(dims[-1], n_out, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens).mean(dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def batch(step: int, n: int = 16, seq: int = 5, vocab: int = 11, n_out: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed * 100003 + step)
    return (torch.randint(0, vocab, (n, seq), generator=gen),
            torch.randint(0, n_out, (n,), generator=gen))


def loss_scale(step: int) -> float:
    """Gradient spikes (layer clipping fires) and dips (the alpha clamp binds)."""
    return {7: 40.0, 13: 0.003, 19: 25.0, 23: 0.002}.get(step, 1.0)


def compute_grads(model: nn.Module, step: int, scale: float = 1.0) -> None:
    model.zero_grad(set_to_none=True)
    x, y = batch(step)
    (nn.functional.cross_entropy(model(x), y) * scale).backward()


def max_rel_err(a: dict, b: dict) -> float:
    """max over tensors of max|a-b| / max|b|."""
    return max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max())
               for k in b)


def flip_tensor_byte(path) -> None:
    """Flip one byte in the middle of the largest tensor of a torch file: the pickle stays
    valid, only a number changes (the zip's CRC no longer matches)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        f.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x5A]))


# ------------------------------------------------------------------------------------------------
# Study plans

ROOT = Path(__file__).resolve().parent.parent
CI_PLAN = ROOT / "stratopt_ds" / "study" / "plans" / "ci_tiny.yaml"
# An lr of 1e4 blows AdamW up within a few steps; after 3 skipped updates train.py stops the
# run as diverged (exit code 3, summary status "diverged").
DIVERGING_ARM = {"name": "adamw-hot", "optimizer": "adamw", "lr": 1.0e4, "diverge_after": 3}


def edited_plan(path: Path, name: str = "ci_tiny", edit=None, **changes) -> Path:
    """ci_tiny.yaml with top-level ``changes`` and then ``edit(raw)`` applied, written to ``path``."""
    import yaml

    raw = yaml.safe_load(CI_PLAN.read_text())
    raw.update(name=name, **changes)
    if edit:
        edit(raw)
    path.write_text(yaml.safe_dump(raw))
    return path
