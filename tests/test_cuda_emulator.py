"""The CUDA-on-CPU emulator itself (csrc/emulation): the launch rewrite, the cached builds, and
the semantics of the emulated device (barriers, warp intrinsics, launch limits, errors, bf16/fp16
conversions), through the self-test kernels of csrc/emulation/selftest.cu loaded with ctypes.
No GPU and no network needed."""
from __future__ import annotations

import ctypes
import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "csrc" / "emulation"
sys.path.insert(0, str(EMU))
import emulated_op  # noqa: E402

P = ctypes.c_void_p
U = ctypes.c_uint
I = ctypes.c_int
I64 = ctypes.c_int64
FULL = 0xFFFFFFFF

# cudaError_t values
SUCCESS, INVALID_VALUE, LAUNCH_FAILURE, INVALID_CONFIGURATION = 0, 1, 4, 9


def ptr(t: torch.Tensor) -> P:
    return P(t.data_ptr())


SIGNATURES = {
    "st_error_string": ([I], ctypes.c_char_p), "st_error_name": ([I], ctypes.c_char_p),
    "st_peek_error": ([], I), "st_get_last_error": ([], I), "st_set_fiber_backend": ([I], I),
    "st_warp_sum_down_f32": ([P, P, I, I], I), "st_warp_sum_down_f64": ([P, P, I, I], I),
    "st_warp_sum_xor_f32": ([P, P, I, I], I), "st_warp_sum_xor_f64": ([P, P, I, I], I),
    "st_shuffle": ([P, P, I, I, I, I, U], I), "st_broadcast": ([P, P, I], I),
    "st_vote": ([P, P, P, P, P, I], I), "st_match_reduce": ([P, P, P, P, P], I),
    "st_block_sum": ([P, P, I, I, I], I), "st_barrier_votes": ([P, P, P, P, I], I),
    "st_partial_warp": ([P, P, P, I], I), "st_indices": ([P, P, P, U, U, U, U, U, U], I),
    "st_launch": ([P, U, U, U, U, U, U, ctypes.c_size_t], I), "st_launch_only": ([P, U], None),
    "st_by_value": ([P, I], I), "st_dynamic_smem": ([P, I, ctypes.c_size_t, I], I),
    "st_hinted_copy": ([P] * 10 + [I], I),
    "st_divergent_barrier": ([P, I], I), "st_missing_lane": ([P], I), "st_mismatched_shuffles": ([P], I),
    "st_shuffle_vs_barrier": ([P], I), "st_source_outside_mask": ([P], I), "st_trap": ([P], I),
    "st_f32_to_bf16": ([P, P, I64], I), "st_f32_to_f16": ([P, P, I64], I), "st_bf16_to_f32": ([P, P, I64], I),
    "st_f16_to_f32": ([P, P, I64], I), "st_f64_to_16": ([P, P, P, I64], I),
    "st_time_launch": ([I, I, I, I, P], ctypes.c_double),
}


@pytest.fixture(scope="module")
def lib():
    cdll = emulated_op.build_ctypes_library("emu_selftest", [EMU / "selftest.cu"])
    for name, (args, res) in SIGNATURES.items():
        fn = getattr(cdll, name)
        fn.argtypes, fn.restype = args, res
    return cdll


def message(lib, err: int) -> str:
    return lib.st_error_string(err).decode()


def check(lib, err: int) -> None:
    assert err == SUCCESS, message(lib, err)


# ---------------------------------------------------------------------------------------------
# The source rewrite

R = emulated_op.rewrite_launches


def test_rewrite_config_forms():
    assert R("k<<<g, b>>>(x);") == '::emu::Launcher("k", g, b).run(k, x);'
    assert R("k<<<g, b, 64>>>(x, y);") == '::emu::Launcher("k", g, b, 64).run(k, x, y);'
    assert R("k<<<g, b, 0, s>>>(x);") == '::emu::Launcher("k", g, b, 0, s).run(k, x);'
    assert R("k<<<dim3(1, 2), std::min<int>(n, 256)>>>(a)") == \
        '::emu::Launcher("k", dim3(1, 2), std::min<int>(n, 256)).run(k, a)'


def test_rewrite_template_and_qualified_kernels():
    src = "update_kernel<float, M2, OUT><<<grid, kThreads, 0, st>>>(ptrs, chunks);"
    assert R(src) == ('::emu::Launcher("update_kernel<float, M2, OUT>", grid, kThreads, 0, st)'
                      ".run(update_kernel<float, M2, OUT>, ptrs, chunks);")
    assert R("ns::k<A<B>, (1 > 2)><<<1, 1>>>(x)") == \
        '::emu::Launcher("ns::k<A<B>, (1 > 2)>", 1, 1).run(ns::k<A<B>, (1 > 2)>, x)'
    assert R("(*fn)<<<1, 1>>>(x)") == '::emu::Launcher("(*fn)", 1, 1).run((*fn), x)'


def test_rewrite_empty_arguments_and_line_breaks():
    assert R("k<<<1, 1>>>();") == '::emu::Launcher("k", 1, 1).run(k);'
    assert R("k<<<1, 1>>>( /* none */ );") == '::emu::Launcher("k", 1, 1).run(k);'
    src = "a();\nkern<T,\n     U>\n<<<grid,\n   block>>>\n  (x,\n   y);\nb();\n"
    out = R(src)
    assert out.count("\n") == src.count("\n")  # compiler messages keep their line numbers
    assert out.splitlines()[0] == "a();" and out.splitlines()[-1] == "b();"
    assert '::emu::Launcher("kern<T, U>", grid,\n   block).run(kern<T,\n     U>, x,\n   y)' in out


def test_rewrite_ignores_comments_and_strings():
    src = 'const char* s = "k<<<1,1>>>()"; // k<<<1,1>>>()\n/* k<<<1,1>>>() */ char c = \'<\';'
    assert R(src) == src
    assert R('k<<<1, 1>>>(R"(<<<)", 1\'000)') == '::emu::Launcher("k", 1, 1).run(k, R"(<<<)", 1\'000)'


def test_rewrite_reports_malformed_launches():
    with pytest.raises(ValueError, match="line 2: '<<<' without a matching '>>>'"):
        R("x;\nk<<<1, 1(a);")
    with pytest.raises(ValueError, match="without an argument list"):
        R("k<<<1, 1>>>;")


def test_rewrite_extern_shared():
    src = "__global__ void f() {\n  extern __shared__ __align__(16) float smem[];\n  smem[0] = 1;\n}\n"
    out = emulated_op.rewrite_source(src)
    assert "float* const smem = static_cast<float*>(::emu::dynamic_shared_memory());" in out
    assert out.count("\n") == src.count("\n")
    out = emulated_op.rewrite_source("namespace a {\nextern __shared__ unsigned char buf[];\n}\n")
    assert "#define buf (static_cast<unsigned char*>(::emu::dynamic_shared_memory()))" in out


def test_rewrite_of_the_project_kernels_changes_only_launches():
    src = (ROOT / "csrc" / "cuda" / "stratopt_cuda.cu").read_text()
    out = emulated_op.rewrite_source(src)
    assert "<<<" not in out and out.count("\n") == src.count("\n")
    changed = [(a, b) for a, b in zip(src.splitlines(), out.splitlines()) if a != b]
    assert changed and all("<<<" in a and "::emu::Launcher(" in b for a, b in changed)


# ---------------------------------------------------------------------------------------------
# Cached builds

def test_ctypes_build_is_cached_and_keyed_by_headers(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATOPT_OPS_CACHE", str(tmp_path / "cache"))
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    (src_dir / "value.h").write_text("#define VALUE 41\n")
    (src_dir / "tiny.cu").write_text(
        '#include <cuda_runtime.h>\n#include "value.h"\n'
        "__global__ void k(int* out) { out[threadIdx.x] = VALUE + 1; }\n"
        'extern "C" int run(int* out) { k<<<1, 4>>>(out); return (int)cudaGetLastError(); }\n')
    first = emulated_op.build_ctypes_library("tiny", [src_dir / "tiny.cu"])
    built = list((tmp_path / "cache").glob("tiny_*/libtiny.so"))
    assert len(built) == 1 and (built[0].parent / "tiny_emulated.cpp").is_file()
    mtime = built[0].stat().st_mtime_ns
    t0 = time.perf_counter()
    again = emulated_op.build_ctypes_library("tiny", [src_dir / "tiny.cu"])
    assert time.perf_counter() - t0 < 0.5 and built[0].stat().st_mtime_ns == mtime  # not recompiled
    out = torch.zeros(4, dtype=torch.int32)
    assert again.run(ptr(out)) == 0 and out.tolist() == [42] * 4 and first._name == again._name
    (src_dir / "value.h").write_text("#define VALUE 99\n")  # a header next to the .cu: new hash
    changed = emulated_op.build_ctypes_library("tiny", [src_dir / "tiny.cu"])
    assert changed._name != again._name
    assert changed.run(ptr(out)) == 0 and out.tolist() == [100] * 4


def test_cache_root_follows_the_builder_rule(monkeypatch, tmp_path):
    from stratopt_ds.ops import builder

    for env in ({"STRATOPT_OPS_CACHE": str(tmp_path)}, {"TORCH_EXTENSIONS_DIR": str(tmp_path)}, {}):
        monkeypatch.delenv("STRATOPT_OPS_CACHE", raising=False)
        monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert emulated_op.cache_root() == builder.cache_dir()


# ---------------------------------------------------------------------------------------------
# Warp intrinsics

def _tree_down(v: torch.Tensor) -> torch.Tensor:
    """Lane 0 of the shfl_down tree, in the kernel's order (lanes past the end keep their value)."""
    v = v.view(-1, 32)
    for off in (16, 8, 4, 2, 1):
        v = v + torch.cat([v[:, off:], v[:, 32 - off:]], dim=1)
    return v[:, 0]


def _tree_xor(v: torch.Tensor) -> torch.Tensor:
    v = v.view(-1, 32)
    lanes = torch.arange(32)
    for off in (16, 8, 4, 2, 1):
        v = v + v[:, lanes ^ off]
    return v.reshape(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_warp_sums(lib, dtype):
    suffix = "f32" if dtype == torch.float32 else "f64"
    x = torch.randn(3 * 256, dtype=dtype, generator=torch.Generator().manual_seed(1))
    down = torch.zeros(3 * 8, dtype=dtype)
    check(lib, getattr(lib, f"st_warp_sum_down_{suffix}")(ptr(x), ptr(down), 3, 256))
    assert torch.equal(down, _tree_down(x))  # bit for bit: same tree, same roundings
    xor = torch.zeros_like(x)
    check(lib, getattr(lib, f"st_warp_sum_xor_{suffix}")(ptr(x), ptr(xor), 3, 256))
    assert torch.equal(xor, _tree_xor(x))


def _shuffle_model(values, op, param, width, mask):
    """CUDA's shuffles (PTX shfl.sync): lanes outside the mask skip; a source lane beyond the
    segment or outside the mask leaves the caller's own value, except for __shfl_sync (op 0),
    where reading a lane that is not in the mask (or does not exist) is an error: None."""
    n = len(values)
    out = list(values)
    for t in range(n):
        base, lane = t - t % 32, t % 32
        exist = [base + j < n for j in range(32)]
        if not (mask >> lane) & 1:
            continue
        seg_lo = lane - lane % width
        seg_hi = seg_lo + width - 1
        b = param & 31
        j = {0: seg_lo + (b % width), 1: lane - b, 2: lane + b, 3: lane ^ b}[op]
        ok = (j >= seg_lo) if op == 1 else (j <= seg_hi)
        if ok and 0 <= j < 32 and (mask >> j) & 1 and exist[j]:
            out[t] = values[base + j]
        elif op == 0:
            return None
    return out


@pytest.mark.parametrize("threads", [32, 64, 40])
def test_shuffle_semantics(lib, threads):
    vals = [(t + 1) * 1000003 for t in range(threads)]
    x = torch.tensor(vals, dtype=torch.int64)
    out = torch.zeros_like(x)
    cases = 0
    for op in range(4):
        for width in (32, 16, 8, 4, 2, 1):
            for param in (0, 1, 3, 5, 16, 31, 33):
                for mask in (FULL, 0x0000FFFF, 0xFFFF0000):
                    expect = _shuffle_model(vals, op, param, width, mask)
                    err = lib.st_shuffle(ptr(x), ptr(out), threads, op, param, width, mask)
                    if expect is None:
                        assert err == LAUNCH_FAILURE and "which is not in its mask" in message(lib, err)
                        continue
                    check(lib, err)
                    assert out.tolist() == expect, (op, width, param, hex(mask))
                    cases += 1
    assert cases > 250


def test_shfl_sync_broadcast(lib):
    x = torch.arange(32, dtype=torch.float32) * 1.5
    out = torch.zeros(32)
    for src in (0, 13, 31, 45, -1):
        check(lib, lib.st_broadcast(ptr(x), ptr(out), src))
        assert torch.equal(out, torch.full((32,), float(x[src % 32])))


def test_votes(lib):
    pred = (torch.rand(64, generator=torch.Generator().manual_seed(2)) < 0.5).to(torch.int32)
    pred[32:] = 1
    ballot, active = torch.zeros(64, dtype=torch.int32), torch.zeros(64, dtype=torch.int32)
    any_, all_ = torch.zeros(64, dtype=torch.int32), torch.zeros(64, dtype=torch.int32)
    check(lib, lib.st_vote(ptr(pred), ptr(ballot), ptr(any_), ptr(all_), ptr(active), 64))
    for w in range(2):
        p = pred[32 * w:32 * w + 32]
        bits = sum(1 << i for i in range(32) if p[i])
        assert (ballot[32 * w:32 * w + 32].view(torch.int32).to(torch.int64) & FULL).eq(bits).all()
        assert any_[32 * w:32 * w + 32].eq(int(p.any())).all() and all_[32 * w:32 * w + 32].eq(int(p.all())).all()
    # __activemask(): the warp's lanes that have not exited (lanes run one after another, so a
    # lane that already finished is missing from later lanes' masks).
    active = active.to(torch.int64) & FULL
    assert int(active[0]) == FULL and all(int(active[i]) >> (i % 32) & 1 for i in range(64))


def test_match_and_reduce(lib):
    x = torch.tensor([i % 5 for i in range(32)], dtype=torch.int32)
    match, total = torch.zeros(32, dtype=torch.int32), torch.zeros(32, dtype=torch.int32)
    mn, mx = torch.zeros(32, dtype=torch.int32), torch.zeros(32, dtype=torch.int32)
    check(lib, lib.st_match_reduce(ptr(x), ptr(match), ptr(total), ptr(mn), ptr(mx)))
    for i in range(32):
        assert int(match[i]) & FULL == sum(1 << j for j in range(32) if j % 5 == i % 5)
    assert total.eq(int(x.sum())).all() and mn.eq(-8).all() and mx.eq(4).all()


# ---------------------------------------------------------------------------------------------
# Blocks: barriers, shared memory, indices, partial warps, arguments

@pytest.mark.parametrize("threads", [256, 1024, 96, 32])
def test_block_reduction_with_shared_memory(lib, threads):
    n, blocks = 10_007, 4
    x = torch.randint(-50, 50, (n,), generator=torch.Generator().manual_seed(3)).float()  # exact sums
    out = torch.zeros(blocks)
    check(lib, lib.st_block_sum(ptr(x), ptr(out), n, blocks, threads))
    expect = [x[torch.arange(n) % (blocks * threads) // threads == b].sum() for b in range(blocks)]
    assert out.tolist() == [float(e) for e in expect]


def test_barrier_count_and_or(lib):
    pred = torch.zeros(100, dtype=torch.int32)
    pred[[3, 50, 99]] = 1
    count, all_, any_ = (torch.zeros(100, dtype=torch.int32) for _ in range(3))
    check(lib, lib.st_barrier_votes(ptr(pred), ptr(count), ptr(all_), ptr(any_), 100))
    assert count.eq(3).all() and all_.eq(0).all() and any_.eq(1).all()


def test_partial_last_warp(lib):
    x = torch.arange(40, dtype=torch.float32)
    total, ballot = torch.zeros(40), torch.zeros(40, dtype=torch.int32)
    check(lib, lib.st_partial_warp(ptr(x), ptr(total), ptr(ballot), 40))
    assert ballot[:32].eq(-1).all() and ballot[32:].eq(0xFF).all()  # lanes 32..39 form warp 1
    assert total[:32].eq(float(x[:32].sum())).all()
    # In warp 1 the xor partners of masks 16 and 8 do not exist: a lane then keeps its own value
    # (a GPU returns garbage), so those two rounds double the sum.
    assert total[32:].eq(4 * float(x[32:].sum())).all()


def test_indices_and_block_order(lib):
    g, b = (3, 2, 2), (4, 3, 2)
    n_blocks, n_threads = 12, 24
    out = torch.full((n_blocks * n_threads,), -1, dtype=torch.int32)
    order, counter = torch.zeros(n_blocks, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    check(lib, lib.st_indices(ptr(out), ptr(order), ptr(counter), *g, *b))
    assert out.tolist() == list(range(n_blocks * n_threads))
    assert order.tolist() == list(range(n_blocks))  # blocks run in blockIdx order, x fastest


def test_arguments_are_passed_by_value(lib):
    out = torch.zeros(64, dtype=torch.int32)
    check(lib, lib.st_by_value(ptr(out), 64))
    assert out.tolist() == [7 + 100 + 2 * t for t in range(64)]


def test_cache_hinted_loads_and_stores(lib):
    n = 64
    a, c = torch.randn(4 * n), torch.randint(0, 2**31, (2 * n,), dtype=torch.int32)
    e, g = torch.randint(-2**62, 2**62, (n,)), torch.randint(0, 2**15, (n,), dtype=torch.int16)
    x = torch.randn(n)
    b, d, f, h, y = torch.zeros_like(a), torch.zeros_like(c), torch.zeros_like(e), torch.zeros_like(g), torch.zeros_like(x)
    check(lib, lib.st_hinted_copy(ptr(a), ptr(b), ptr(c), ptr(d), ptr(e), ptr(f), ptr(g), ptr(h), ptr(x), ptr(y), n))
    assert torch.equal(a, b) and torch.equal(c, d) and torch.equal(e, f) and torch.equal(g, h)
    assert torch.equal(y, x + x)


def test_dynamic_shared_memory(lib):
    out = torch.zeros(256)
    check(lib, lib.st_dynamic_smem(ptr(out), 256, 256 * 4, 0))
    assert out.tolist() == [float(255 - t) for t in range(256)]
    err = lib.st_dynamic_smem(ptr(out), 256, 64 * 1024, 0)
    assert err == INVALID_CONFIGURATION and "exceed this kernel's limit of 49152" in message(lib, err)
    check(lib, lib.st_dynamic_smem(ptr(out), 256, 64 * 1024, 100 * 1024))  # opted in
    err = lib.st_dynamic_smem(ptr(out), 256, 1024, 300 * 1024)
    assert err == INVALID_VALUE and "opt-in limit" in message(lib, err)


# ---------------------------------------------------------------------------------------------
# Launch limits and errors

@pytest.mark.parametrize("grid,block,text", [
    ((1, 1, 1), (1025, 1, 1), "block.x = 1025 exceeds 1024"),
    ((1, 1, 1), (513, 2, 1), "block (513,2,1) has 1026 threads; the limit is 1024 per block"),
    ((1, 1, 1), (1, 1, 65), "block.z = 65 exceeds 64"),
    ((1, 65536, 1), (32, 1, 1), "grid.y = 65536 exceeds 65535"),
    ((1, 1, 65536), (32, 1, 1), "grid.z = 65536 exceeds 65535"),
    ((2**31, 1, 1), (32, 1, 1), "grid.x = 2147483648 exceeds 2147483647"),
    ((0, 1, 1), (32, 1, 1), "grid (0,1,1) has a zero dimension"),
    ((1, 1, 1), (0, 1, 1), "block (0,1,1) has a zero dimension"),
])
def test_launch_limits(lib, grid, block, text):
    counter = torch.zeros(1, dtype=torch.int32)
    err = lib.st_launch(ptr(counter), *grid, *block, 0)
    assert err == INVALID_CONFIGURATION
    assert lib.st_error_name(err) == b"cudaErrorInvalidConfiguration"
    assert text in message(lib, err) and "kernel count_threads" in message(lib, err)
    assert int(counter) == 0  # a refused launch does not run


def test_largest_launches_run(lib):
    counter = torch.zeros(1, dtype=torch.int32)
    check(lib, lib.st_launch(ptr(counter), 2, 65535, 1, 1, 1, 1, 0))
    check(lib, lib.st_launch(ptr(counter), 1, 1, 1, 1024, 1, 1, 0))
    check(lib, lib.st_launch(ptr(counter), 1, 1, 1, 16, 1, 64, 0))
    assert int(counter) == 2 * 65535 + 1024 + 1024


def test_last_error_is_sticky_until_read(lib):
    counter = torch.zeros(1, dtype=torch.int32)
    lib.st_launch_only(ptr(counter), 2000)
    assert lib.st_peek_error() == INVALID_CONFIGURATION and lib.st_peek_error() == INVALID_CONFIGURATION
    lib.st_launch_only(ptr(counter), 32)  # a good launch does not clear it
    assert int(counter) == 32 and lib.st_get_last_error() == INVALID_CONFIGURATION
    assert lib.st_peek_error() == SUCCESS and lib.st_get_last_error() == SUCCESS


@pytest.mark.parametrize("fn,args,patterns", [
    ("st_divergent_barrier", (64,), [r"kernel divergent_barrier, block \(0,0,0\): divergent __syncthreads\(\)",
                                     r"thread \(\d+,0,0\) = lane \d+ of warp \d+ (exited|waits)"]),
    ("st_missing_lane", (), [r"kernel missing_lane, block \(0,0,0\): lane 5 of warp 0 missing from "
                             r"__shfl_down_sync with mask 0xffffffff, delta 1, width 32: it has exited"]),
    ("st_mismatched_shuffles", (), [r"lanes of warp 0 wait at different warp operations",
                                    r"delta 1", r"delta 2"]),
    ("st_shuffle_vs_barrier", (), [r"lane 3 of warp 0 missing from __shfl_xor_sync.*waits at __syncthreads\(\)"]),
    ("st_source_outside_mask", (), [r"__shfl_sync reads lane 20, which is not in its mask 0x0000ffff"]),
    ("st_trap", (), [r"kernel traps, block \(0,0,0\): thread \(7,0,0\) = lane 7 of warp 0: __trap\(\) called"]),
])
def test_kernel_errors_are_reported_not_fatal(lib, fn, args, patterns):
    out = torch.zeros(64, dtype=torch.int32)
    err = getattr(lib, fn)(ptr(out), *args)
    assert err == LAUNCH_FAILURE, message(lib, err)
    text = message(lib, err)
    assert text.startswith("unspecified launch failure [CUDA emulator: kernel ")
    for pattern in patterns:
        assert re.search(pattern, text), (pattern, text)
    # The abandoned threads' fibers are reset: the next launch runs normally.
    x = torch.randn(256)
    down = torch.zeros(8)
    check(lib, lib.st_warp_sum_down_f32(ptr(x), ptr(down), 1, 256))
    assert torch.equal(down, _tree_down(x))


def test_fast_switch_backend(lib):
    """The register-swap fibers (EMU_CUDA_FIBERS=fast, x86-64) give the same results and errors
    as the default swapcontext ones."""
    old = lib.st_set_fiber_backend(0)
    try:
        x = torch.randn(512, dtype=torch.float64)
        down = torch.zeros(16, dtype=torch.float64)
        check(lib, lib.st_warp_sum_down_f64(ptr(x), ptr(down), 2, 256))
        assert torch.equal(down, _tree_down(x))
        out = torch.zeros(64, dtype=torch.int32)
        assert lib.st_divergent_barrier(ptr(out), 64) == LAUNCH_FAILURE
        total = torch.zeros(2)
        check(lib, lib.st_block_sum(ptr(x.float()), ptr(total), 512, 2, 256))
    finally:
        lib.st_set_fiber_backend(old)


def test_concurrent_launches_from_threads(lib):
    results, errors = {}, []

    def work(i):
        try:
            x = torch.randn(1024, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
            down = torch.zeros(32, dtype=torch.float64)
            for _ in range(20):
                check(lib, lib.st_warp_sum_down_f64(ptr(x), ptr(down), 4, 256))
            results[i] = torch.equal(down, _tree_down(x))
            assert lib.st_launch(ptr(torch.zeros(1, dtype=torch.int32)), 1, 1, 1, 2000, 1, 1, 0) == INVALID_CONFIGURATION
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(results.values()) and len(results) == 4


def test_block_launch_cost(lib):
    out = torch.zeros(1024)
    no_barrier = min(lib.st_time_launch(256, 0, 0, 200, ptr(out)) for _ in range(3))
    barriers = min(lib.st_time_launch(256, 4, 0, 200, ptr(out)) for _ in range(3))
    shuffles = min(lib.st_time_launch(256, 5, 1, 200, ptr(out)) for _ in range(3))
    print(f"256-thread block: {no_barrier * 1e6:.1f} us, with 4 barriers {barriers * 1e6:.1f} us, "
          f"with 5 shuffles {shuffles * 1e6:.1f} us")
    assert 0 < no_barrier < 5e-4 and 0 < barriers < 1e-3 and 0 < shuffles < 1e-3


# ---------------------------------------------------------------------------------------------
# bf16 / fp16 conversions, bit for bit against torch (the CPU op's c10 conversions)

def _edge_floats() -> torch.Tensor:
    bits = []
    for e in list(range(0, 12)) + list(range(95, 130)) + list(range(140, 146)) + [253, 254, 255]:
        for m in (0, 1, 2, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0x18000,
                  0xFFFF, 0x10000, 0x7FF000, 0x7FEFFF, 0x7FF001, 0x400000, 0x7FFFFF):
            bits.append((e << 23) | m)
    v = torch.tensor(bits, dtype=torch.int64).to(torch.int32)
    v = torch.cat([v, v | torch.tensor(-2**31, dtype=torch.int32)]).view(torch.float32)
    special = torch.tensor([0.0, -0.0, 65504.0, 65519.996, 65520.0, 65536.0, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25,
                            2.0**-14, 2.0**-15 * 1.5, float("inf"), float("-inf"), 3.4028235e38])
    return torch.cat([v, special, -special])


def _random_floats(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    raw = torch.randint(-2**31, 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    near = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 20, (n,), generator=g).float())
    x = torch.cat([raw, near, _edge_floats()])
    return x[~torch.isnan(x)].contiguous()


def test_float_to_16bit_conversions_match_torch(lib):
    x = _random_floats(1_500_000)
    for fn, dtype in (("st_f32_to_bf16", torch.bfloat16), ("st_f32_to_f16", torch.float16)):
        out = torch.zeros(x.numel(), dtype=torch.int16)
        check(lib, getattr(lib, fn)(ptr(x), ptr(out), x.numel()))
        expect = x.to(dtype).view(torch.int16)
        bad = (out != expect).nonzero().flatten()
        assert bad.numel() == 0, (dtype, [(float(x[i]), hex(int(out[i]) & 0xFFFF), hex(int(expect[i]) & 0xFFFF))
                                          for i in bad[:5]])


def test_nan_converts_to_canonical_nan(lib):
    x = torch.tensor([2**31 - 1, 0x7FC00000, 0x7F800001, -1], dtype=torch.int64).to(torch.int32).view(torch.float32)
    assert torch.isnan(x).all()
    for fn in ("st_f32_to_bf16", "st_f32_to_f16"):
        out = torch.zeros(4, dtype=torch.int16)
        check(lib, getattr(lib, fn)(ptr(x), ptr(out), 4))
        assert out.eq(0x7FFF).all()


def test_16bit_to_float_conversions_match_torch(lib):
    bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    for fn, dtype in (("st_bf16_to_f32", torch.bfloat16), ("st_f16_to_f32", torch.float16)):
        out = torch.zeros(bits.numel())
        check(lib, getattr(lib, fn)(ptr(bits), ptr(out), bits.numel()))
        expect = bits.view(dtype).float()
        nan = torch.isnan(expect)
        assert torch.equal(torch.isnan(out), nan)
        assert torch.equal(out[~nan].view(torch.int32), expect[~nan].view(torch.int32))


def test_double_to_16bit_rounds_once(lib):
    # 1 + 2^-8 + 2^-30 lies just above a bf16 tie: rounding through float (1 + 2^-8, a tie) would
    # give 1.0; CUDA's __double2bfloat16 rounds once, up.
    d = torch.tensor([1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30), 1 + 2**-11 + 2**-40, 1 + 2**-8, 0.1, 70000.0,
                      2.0**-26, 2.0**-25 + 2.0**-60], dtype=torch.float64)
    bf, hf = torch.zeros(d.numel(), dtype=torch.int16), torch.zeros(d.numel(), dtype=torch.int16)
    check(lib, lib.st_f64_to_16(ptr(d), ptr(bf), ptr(hf), d.numel()))
    assert [int(v) & 0xFFFF for v in bf] == [0x3F81, 0xBF81, 0x3F80, 0x3F80, 0x3DCD, 0x4789, 0x3280, 0x3300]
    assert [int(v) & 0xFFFF for v in hf] == [0x3C04, 0xBC04, 0x3C01, 0x3C04, 0x2E66, 0x7C00, 0x0000, 0x0001]


# ---------------------------------------------------------------------------------------------
# The torch-side stand-ins (c10/cuda headers) and the project's op

def test_c10_launch_check_raises_with_the_emulator_detail():
    lib = emulated_op.build_ctypes_library("emu_selftest_c10", [EMU / "selftest_c10.cu"], with_torch=True)
    msg = ctypes.create_string_buffer(2048)
    out = torch.zeros(2048, dtype=torch.int32)
    assert lib.st_c10_launch(ptr(out), 64, msg, 2048) == 0 and out[:64].eq(8).all()
    assert lib.st_c10_launch(ptr(out), 1025, msg, 2048) == 1
    assert msg.value.decode().startswith(
        "CUDA kernel launch failed: cudaErrorInvalidConfiguration: invalid configuration argument "
        "[CUDA emulator: kernel fill: block.x = 1025 exceeds 1024]")
    assert lib.st_c10_check(2, msg, 2048) == 1 and msg.value == b"CUDA error: cudaErrorMemoryAllocation: out of memory"
    assert lib.st_c10_check(0, msg, 2048) == 0


def test_project_kernels_and_binding_build():
    """csrc/cuda (kernels + torch glue) compiles unmodified against the stand-ins."""
    module = emulated_op.build_extension(
        "stratopt_cuda_emulated", [ROOT / "csrc" / "cuda" / "stratopt_cuda.cu"],
        [ROOT / "csrc" / "cuda" / "stratopt_cuda_binding.cpp"], [ROOT / "csrc" / "cuda"],
        defines={"STRATOPT_CUDA_DEVICE_TYPE": "c10::DeviceType::CPU"})
    assert module.__name__.startswith("stratopt_cuda_emulated_")
    assert Path(module.__file__).parent.parent == emulated_op.cache_root()


@pytest.mark.parametrize("fn,args,report", [
    ("st_null_store", "", "CUDA emulator: SIGSEGV in kernel null_store, block (1,0,0), thread (3,0,0)\n"),
    ("st_recursion", ", 1000", "CUDA emulator: SIGSEGV in kernel recursion, block (0,0,0), thread (0,0,0): "
                               "stack overflow (each emulated thread has a 128 KiB stack)\n"),
])
def test_crash_in_a_kernel_names_it(lib, fn, args, report):
    """A memory fault kills the process, as on a GPU, but first says where it happened."""
    import subprocess

    code = (f"import ctypes; lib = ctypes.CDLL({lib._name!r}); buf = ctypes.create_string_buffer(4096); "
            f"print(lib.st_recursion(buf, 10), flush=True); lib.{fn}(buf{args})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == -11 and r.stdout == "0\n" and report in r.stderr, (r.returncode, r.stderr)
