#!/usr/bin/env python
"""Break the CUDA kernels on purpose and check that the emulated suite notices.

For each mutation below, a mutated copy of csrc/cuda/stratopt_cuda.cu is written to a temporary
directory and tests/test_cuda_emulation.py runs against it (``STRATOPT_EMULATED_CU``; the
emulated module is rebuilt for that source). A mutation the suite does not fail on is reported
and the script exits 1. Not part of CI (each mutation is a build, ~30 s):

    .venv/bin/python csrc/emulation/mutation_check.py [--only NAME ...]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "csrc" / "cuda" / "stratopt_cuda.cu"

# name -> (exact text in the kernel source, its replacement, what it breaks)
MUTATIONS = {
    "warp-shuffle-offset": (
        "acc = __dadd_rn(acc, __shfl_down_sync(0xffffffffu, acc, off));",
        "acc = __dadd_rn(acc, __shfl_down_sync(0xffffffffu, acc, off == 16 ? 8 : off));",
        "the warp tree of the per-chunk sum of squares skips lanes 16-31",
    ),
    "finalize-shuffle-offset": (
        "acc += __shfl_down_sync(0xffffffffu, acc, off);",
        "acc += __shfl_down_sync(0xffffffffu, acc, off >> 1);",
        "the fp64 tree over a layer's chunk partials adds a lane to itself",
    ),
    "16-byte-path-gradient-offset": (
        "const Vec4<G> gv = load_grad4(g + head, j);",
        "const Vec4<G> gv = load_grad4(g, j);",
        "the 16-byte update loop reads gradients from before the peeled head",
    ),
    "16-byte-path-lane-order": (
        "update_one<M2>(s, to_f(gv.x[1]), pv.y, m1v.y, vv.y, m2v.y);",
        "update_one<M2>(s, to_f(gv.x[2]), pv.y, m1v.y, vv.y, m2v.y);",
        "the second element of each 16-byte group gets the third gradient",
    ),
    "no-scalar-fallback": (
        "    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) update_elem<G, M2, OUT>(s, c, i);\n    return;",
        "    return;",
        "a chunk whose arrays are misaligned against each other is left unchanged",
    ),
    "no-head-peel": (
        "const int64_t head = head_to(c.p, 16) < n ? head_to(c.p, 16) : n;",
        "const int64_t head = 0;",
        "a fragment that starts off a 16-byte boundary takes the element-by-element path",
    ),
    "sumsq-16-byte-path": (
        "const Vec4<G> x = load_grad4(g + head, j);",
        "const Vec4<G> x = load_grad4(g, j);",
        "the 16-byte sum-of-squares loop ignores the peeled head",
    ),
}


def run(name: str, source: str) -> tuple[bool, str, float]:
    """(the suite failed, its last lines, seconds) for one mutation."""
    find, replace, _ = MUTATIONS[name]
    if source.count(find) != 1:
        raise SystemExit(f"mutation {name}: expected one occurrence of {find!r} in {KERNELS}")
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as tmp:
        mutant = Path(tmp) / KERNELS.name
        mutant.write_text(source.replace(find, replace))
        env = dict(os.environ, STRATOPT_EMULATED_CU=str(mutant))
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                            str(ROOT / "tests" / "test_cuda_emulation.py"), "-k", "not gpu"],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        took = time.perf_counter() - start
    tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-4:])
    return r.returncode != 0, tail, took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(MUTATIONS), help="mutations to try")
    args = parser.parse_args()
    source = KERNELS.read_text()
    survivors = []
    for name in args.only or MUTATIONS:
        caught, tail, took = run(name, source)
        print(f"{'caught ' if caught else 'MISSED '} {name} ({MUTATIONS[name][2]}; {took:.0f} s)")
        print("    " + tail.replace("\n", "\n    "))
        if not caught:
            survivors.append(name)
    if survivors:
        raise SystemExit(f"the emulated suite missed: {', '.join(survivors)}")


if __name__ == "__main__":
    main()
