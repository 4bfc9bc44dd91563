"""Memory of one rank loading a sharded checkpoint (stratopt_ds.zero.checkpoint) saved by W ranks.

    python bench/reshard_load_memory.py          # 4 and 16 saving ranks, 32 and 128 MiB each

Every loading rank reads every rank file (its fragments may sit in any of them). Read into
memory, that is the whole checkpoint per rank (7B with three fp32 moments: ~108 GB on each GPU
host process); mapped (``mmap``), only the fragments it copies are paged in. Each case runs in a
fresh process, which loads the files the way ``load_sharded`` does and copies one saving rank's
share (what a loading rank at the same world size needs: weights and three moments), and
reports how much its resident memory grew while the files are held.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_checkpoint(path: Path, world: int, mib: int) -> None:
    import torch

    from stratopt_ds.zero.checkpoint import FORMAT

    numel = mib * 2 ** 20 // 16  # param + three moments, fp32
    path.mkdir(parents=True, exist_ok=True)
    for rank in range(world):
        piece = {"name": "w", "offset": rank * numel, "length": numel,
                 **{key: torch.full((numel,), float(rank)) for key in
                    ("param", "exp_avg", "exp_avg_sq", "exp_avg_slow")}}
        torch.save({"format": FORMAT, "world": world, "rank": rank, "fragments": [piece], "step": 1.0},
                   path / f"rank{rank:05d}.pt")


def measure(path: str, mmap: bool) -> dict:
    import psutil
    import torch

    from stratopt_ds import safe_load
    from stratopt_ds.zero import checkpoint

    if not mmap:  # what the reshard did before: every file read whole
        mapped = safe_load.load
        safe_load.load = lambda f, *args, **kwargs: mapped(f, *args, **{**kwargs, "mmap": False})
    me = psutil.Process()
    before = me.memory_info().rss
    parts = checkpoint._load_all(path)
    saved = {"w": [piece for part in parts for piece in part["fragments"]]}
    mine = saved["w"][0]["length"]
    dest = torch.empty(mine)
    for key in checkpoint.STATE_KEYS + ("param",):  # rank 1's share, at the same world size
        checkpoint._fill(dest, "w", mine, key, saved)
    held = me.memory_info().rss  # the files' tensors still referenced, as during a load
    return {"rss_growth_mib": (held - before) / 2 ** 20, "share_mib": 4 * dest.numel() * 4 / 2 ** 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="4,16")
    parser.add_argument("--mib", default="32,128", help="MiB per rank file")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1] == "mmap")))
        return
    print(f"{'ranks':>5} {'MiB/file':>8} {'checkpoint MiB':>14} {'own share MiB':>13} "
          f"{'read: RSS MiB':>14} {'mapped: RSS MiB':>16}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        for world in map(int, args.worlds.split(",")):
            for mib in map(int, args.mib.split(",")):
                path = Path(tmp) / f"w{world}-{mib}"
                write_checkpoint(path, world, mib)
                rows = {}
                for how in ("read", "mmap"):
                    out = subprocess.run([sys.executable, __file__, "--measure", str(path), how],
                                         check=True, capture_output=True, text=True).stdout
                    rows[how] = json.loads(out.splitlines()[-1])
                print(f"{world:>5} {mib:>8} {world * mib:>14} {rows['mmap']['share_mib']:>13.0f} "
                      f"{rows['read']['rss_growth_mib']:>14.0f} {rows['mmap']['rss_growth_mib']:>16.0f}")
                for f in path.iterdir():
                    f.unlink()


if __name__ == "__main__":
    main()
