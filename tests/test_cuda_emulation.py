"""The CUDA op, executed: on the CPU under the emulation of csrc/emulation (always), and on a GPU
when there is one (the same tests, ``[gpu]``; bench/gpu_check.sh runs them).

The emulated module is the unmodified csrc/cuda sources, kernels and torch glue, compiled for
the host (the device code's threads run as fibers, see csrc/emulation/README.md). It is driven
through :mod:`stratopt_ds.ops.dispatch` exactly as on a GPU: the same argument checks, table
builders, caches and launches; only ``dispatch.native_module`` is pointed at it for CPU
tensors. Every result is compared bit for bit with the CPU op.

``STRATOPT_EMULATED_CU=path`` builds the emulation from another kernel source instead (the
mutation check in csrc/emulation/mutation_check.py uses it).
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import stratopt_ds
from stratopt_ds.optim import OPTIMIZER_PRESETS, preset_defaults
from stratopt_ds.layer_map import Fragment
from stratopt_ds.ops import builder, dispatch, reference, use_backend
from stratopt_ds.zero.partition_map import UnsupportedZeroSetting, pending_rows

from helpers import TinyNet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "csrc" / "emulation"))
import emulated_op  # noqa: E402

NAMES = list(OPTIMIZER_PRESETS)
MIXED = (torch.float32, torch.bfloat16, torch.float16)
COPIES = ("none", "bf16", "fp16", "mixed")


# ---------------------------------------------------------------------------------------------
# Targets: the emulated op on CPU tensors, the real op on a GPU

@pytest.fixture(scope="session")
def emulated_module():
    kernels = Path(os.environ.get("STRATOPT_EMULATED_CU", ROOT / "csrc" / "cuda" / "stratopt_cuda.cu"))
    return emulated_op.build_extension(
        "stratopt_cuda_emulated", [kernels], [ROOT / "csrc" / "cuda" / "stratopt_cuda_binding.cpp"],
        [ROOT / "csrc" / "cuda"], defines={"STRATOPT_CUDA_DEVICE_TYPE": "c10::DeviceType::CPU"})


@contextlib.contextmanager
def running(module):
    """Route CPU tensors to ``module`` (never to the reference: unsupported tensors raise)."""
    real = dispatch.native_module

    def native_module(device, supported=True):
        if device.type != "cpu":
            return real(device, supported)
        if not supported:
            raise RuntimeError("the emulated CUDA op was asked to run tensors it does not support")
        return module

    dispatch.native_module = native_module
    try:
        yield
    finally:
        dispatch.native_module = real


@dataclass
class Target:
    name: str
    device: torch.device
    active: Callable[[], contextlib.AbstractContextManager]


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=["emulated", pytest.param("gpu", marks=gpu)])
def cuda(request, cpu_op):
    if request.param == "emulated":
        module = request.getfixturevalue("emulated_module")
        return Target("emulated", torch.device("cpu"), lambda: running(module))
    if builder.load("cuda") is None:
        pytest.fail(f"the CUDA op did not build: {builder.why_unavailable('cuda')}")
    return Target("gpu", torch.device("cuda"), lambda: use_backend("native"))


@pytest.fixture
def emulated(emulated_module, cpu_op):
    return Target("emulated", torch.device("cpu"), lambda: running(emulated_module))


def on_cpu_op():
    return use_backend("native")


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaNs included), across devices."""
    a, b = a.detach().cpu(), b.detach().cpu()
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)))


# ---------------------------------------------------------------------------------------------
# The update, call by call: every name's hyperparameters x gradient dtype x 16-bit copies

# Sizes with vector bodies, tails, and more than one CUDA chunk (16384 elements).
SIZES = [1, 7, 33, 130, 4099, 2 * 16384 + 5]
LAYERS = 5


def _hyper(name: str, lr_tensor: bool = False, device=torch.device("cpu")) -> dict:
    d = preset_defaults(name)
    mix = d["mix_alpha"] > 0
    lr = torch.tensor(3e-3, dtype=torch.float64, device=device) if lr_tensor else 3e-3
    return dict(lr=lr, beta1=d["betas"][0], beta2=d["betas"][1], eps=d["eps"], weight_decay=d["weight_decay"],
                beta3=d["beta3"], mix_alpha=d["mix_alpha"], t_alpha=10 if mix else 0, t_beta3=10 if mix else 0)


def _layout(seed: int):
    """Tensors of SIZES, three of them views at 1-3 elements past an allocation (a ZeRO flat
    buffer after an odd-sized tensor), one whose states are misaligned against its parameter
    (no 16-byte path at all); fragments with odd starts, empty fragments, a layer-less tail."""
    frags = []
    for i, n in enumerate(SIZES):
        a = n // 3
        frags += [(i, 0, a, i % LAYERS), (i, a, 0, (i + 1) % LAYERS), (i, a, n - a - (n > 8), (i + 2) % LAYERS)]
    return frags


def _tensor(n, dtype, offset, gen, scale=1.0, positive=False):
    base = torch.empty(n + offset, dtype=torch.float32)
    x = torch.randn(n, generator=gen) * scale
    if positive:
        x = x.abs()
    view = base[offset:] if dtype == torch.float32 else torch.empty(n + offset, dtype=dtype)[offset:]
    view.copy_(x)
    return view


def _problem(seed: int, grad_dtype, copies: str, mix: bool, depth: bool):
    gen = torch.Generator().manual_seed(seed)
    off = lambda i: {1: 1, 3: 3, 4: 2}.get(i, 0)  # noqa: E731  (views past an allocation)
    n_t = len(SIZES)
    grad_dtypes = [grad_dtype] * n_t if grad_dtype != "mixed" else [MIXED[i % 3] for i in range(n_t)]
    st = dict(
        params=[_tensor(n, torch.float32, off(i), gen) for i, n in enumerate(SIZES)],
        grads=[_tensor(n, grad_dtypes[i], off(i), gen, 1e-2) for i, n in enumerate(SIZES)],
        # tensor 2's states sit one element off its parameter's alignment: the scalar path
        exp_avgs=[_tensor(n, torch.float32, off(i) + (i == 2), gen, 1e-3) for i, n in enumerate(SIZES)],
        exp_avg_sqs=[_tensor(n, torch.float32, off(i), gen, 1e-5, positive=True) for i, n in enumerate(SIZES)],
        exp_avg_slows=[_tensor(n, torch.float32, off(i), gen, 1e-3) for i, n in enumerate(SIZES)] if mix else None,
        steps=[torch.tensor(float(3 + (i % 2)), dtype=torch.float64) for i in range(n_t)],
    )
    kinds = {"none": [None] * n_t, "bf16": [torch.bfloat16] * n_t, "fp16": [torch.float16] * n_t,
             "mixed": [[None, torch.bfloat16, torch.float16][i % 3] for i in range(n_t)]}[copies]
    st["half_out"] = [None if k is None else torch.full((n,), 7.0, dtype=k) for k, n in zip(kinds, SIZES)]
    layer = dict(clip_coef=torch.rand(LAYERS, generator=gen, dtype=torch.float64) * 0.5 + 0.5,
                 alpha=torch.rand(LAYERS, generator=gen, dtype=torch.float64) * 1.5 + 0.5,
                 beta1_layer=(torch.rand(LAYERS, generator=gen, dtype=torch.float64) * 0.1 + 0.85) if depth else None,
                 finite=torch.tensor(True))
    return st, layer


def _to(obj, device):
    """A copy on ``device`` that keeps each tensor's misalignment: the same storage offset
    modulo 16 bytes, inside a larger allocation (a clone or .to() would align it)."""
    if isinstance(obj, torch.Tensor):
        off = obj.storage_offset() % (16 // obj.element_size()) if obj.dim() == 1 else 0
        copy_ = torch.empty(obj.numel() + off, dtype=obj.dtype, device=device)[off:].view(obj.shape)
        return copy_.copy_(obj)
    if isinstance(obj, list):
        return [_to(x, device) for x in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _update(st, layer, frags, hyper):
    dispatch.fragment_update(st["params"], st["grads"], st["exp_avgs"], st["exp_avg_sqs"], st["exp_avg_slows"],
                             st["steps"], frags, layer["finite"], layer["clip_coef"], layer["alpha"],
                             layer["beta1_layer"], half_out=st["half_out"], **hyper)


def _assert_states_equal(want, got, where):
    for key in ("params", "exp_avgs", "exp_avg_sqs", "exp_avg_slows", "half_out"):
        for i, (a, b) in enumerate(zip(want[key] or [], got[key] or [])):
            if a is None:
                assert b is None
                continue
            assert same(a, b), f"{where}: {key}[{i}] differs in {int((a.cpu() != b.cpu()).sum())} elements"


def test_every_variant_is_bit_identical_to_the_cpu_op(cuda):
    """Every optimizer name's hyperparameters x {fp32, bf16, fp16, mixed} gradients x {no,
    bf16, fp16, mixed} 16-bit copies; misaligned tensors and fragments, empty fragments; then a
    skipped step (copies refreshed, nothing else moves) and a step with a tensor lr."""
    frags = _layout(0)
    checked = 0
    for n, name in enumerate(NAMES):
        d = preset_defaults(name)
        mix, depth = d["mix_alpha"] > 0, d["beta1_mode"] == "depth"
        for g, grad_dtype in enumerate((torch.float32, torch.bfloat16, torch.float16, "mixed")):
            for copies in COPIES:
                st, layer = _problem(100 * n + 10 * g + COPIES.index(copies), grad_dtype, copies, mix, depth)
                want = _to(st, torch.device("cpu"))
                with on_cpu_op():
                    _update(want, layer, frags, _hyper(name))
                got, glayer = _to(st, cuda.device), _to(layer, cuda.device)
                assert [x.data_ptr() % 16 for x in got["params"]] == [x.data_ptr() % 16 for x in st["params"]]
                assert got["exp_avgs"][2].data_ptr() % 16 != got["params"][2].data_ptr() % 16
                with cuda.active():
                    _update(got, glayer, frags, _hyper(name))
                _assert_states_equal(want, got, f"{name} grads={grad_dtype} copies={copies}")
                checked += 1
    assert checked == len(NAMES) * 4 * len(COPIES)


@pytest.mark.parametrize("copies", COPIES)
def test_skipped_steps_and_a_tensor_lr(cuda, copies):
    """finite=False: weights and states stay bit-identical, the copies are refreshed from the
    weights; an lr given as a device tensor is read in the kernel and matches a float lr."""
    frags = _layout(1)
    st, layer = _problem(7, torch.bfloat16, copies, mix=True, depth=False)
    for lr_tensor in (False, True):
        want, got = _to(st, torch.device("cpu")), _to(st, cuda.device)
        with on_cpu_op():
            _update(want, layer, frags, _hyper("stratopt"))
        with cuda.active():
            _update(got, _to(layer, cuda.device), frags, _hyper("stratopt", lr_tensor, cuda.device))
        _assert_states_equal(want, got, f"lr_tensor={lr_tensor}")
    skip = dict(layer, finite=torch.tensor(False))
    for o in got["half_out"] + want["half_out"]:
        if o is not None:
            o.fill_(7.0)  # stale copies: the skipped step must refresh them
    before = _to(got, torch.device("cpu"))
    with on_cpu_op():
        _update(want, skip, frags, _hyper("stratopt"))
    with cuda.active():
        _update(got, _to(skip, cuda.device), frags, _hyper("stratopt"))
    _assert_states_equal(want, got, "skipped step")
    for key in ("params", "exp_avgs", "exp_avg_sqs", "exp_avg_slows"):
        assert all(same(a, b) for a, b in zip(before[key], got[key])), key
    for t, start, n, _ in frags:  # inside its fragments each copy is its weights, rounded
        p, o = got["params"][t][start:start + n], got["half_out"][t]
        if o is not None:
            assert same(o[start:start + n], p.to(o.dtype)), (t, start, n)


def _access_counts(module):
    """(loads, stores) of the emulated kernels by width {1, 2, 4, 8, 16 bytes} since the last call."""
    lib = ctypes.CDLL(module.__file__)
    out = (ctypes.c_uint64 * 10)()
    lib.emu_access_counts(out)
    lib.emu_reset_access_counts()
    widths = (1, 2, 4, 8, 16)
    return dict(zip(widths, out[:5])), dict(zip(widths, out[5:]))


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_16_byte_accesses_cover_misaligned_fragments(emulated_module, emulated, grad_dtype):
    """A fragment starting 1 element past a 16-byte boundary (most fragments of a ZeRO flat
    buffer after an odd-sized tensor) peels 3 elements and moves the rest 4 at a time: p, m1,
    v in 16-byte accesses, the gradient in 16 (fp32) or 8 (16-bit) bytes, none misaligned."""
    n, start, length = 10_000, 1, 9_990
    st = dict(params=[torch.randn(n)], grads=[torch.randn(n).to(grad_dtype)], exp_avgs=[torch.zeros(n)],
              exp_avg_sqs=[torch.zeros(n)], exp_avg_slows=None,
              steps=[torch.ones((), dtype=torch.float64)], half_out=[None])
    layer = dict(clip_coef=torch.ones(1, dtype=torch.float64), alpha=torch.ones(1, dtype=torch.float64),
                 beta1_layer=None, finite=torch.tensor(True))
    assert st["params"][0].data_ptr() % 16 == 0
    frags = [(0, start, length, 0)]
    with emulated.active():
        _access_counts(emulated_module)
        _update(st, layer, frags, _hyper("adamw"))
        loads, stores = _access_counts(emulated_module)
        groups = (length - 3) // 4  # 3 peeled, 1 left in the tail
        gwidth = 16 if grad_dtype == torch.float32 else 8
        assert loads[16] == 3 * groups + (groups if gwidth == 16 else 0)
        assert stores[16] == 3 * groups
        assert loads[8] >= (groups if gwidth == 8 else 0)
        dispatch.fragment_sumsq(st["grads"], frags, 1)
        loads, _ = _access_counts(emulated_module)
        assert loads[gwidth] >= groups


# ---------------------------------------------------------------------------------------------
# Sums of squares: fp64-close, bitwise stable

@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16, "mixed"])
def test_sums_of_squares_match_fp64_and_are_stable(cuda, grad_dtype):
    gen = torch.Generator().manual_seed(5)
    sizes = [3, 4099, 2**20 + 7, 16384]
    dtypes = [MIXED[i % 3] if grad_dtype == "mixed" else grad_dtype
              for i in range(len(sizes))]
    grads = [_tensor(n, dt, i % 4, gen) for i, (n, dt) in enumerate(zip(sizes, dtypes))]
    frags = [(0, 0, 3, 0), (1, 1, 4000, 1), (1, 4001, 98, 0), (2, 0, 2**19 + 3, 2), (2, 2**19 + 3, 2**19 + 4, 1),
             (3, 0, 0, 3), (3, 5, 16379, 3)]
    layers = 5  # layer 4 has no fragment
    want = torch.zeros(layers, dtype=torch.float64)
    for t, s, n, lay in frags:
        want[lay] += (grads[t][s:s + n].double() ** 2).sum()
    on_device = [g.to(cuda.device) for g in grads]
    with cuda.active():
        first = dispatch.fragment_sumsq(on_device, frags, layers)
        second = dispatch.fragment_sumsq(on_device, frags, layers)
    assert same(first, second), "reruns must give the same bits"
    rel = ((first.cpu() - want).abs() / want.clamp_min(1e-300))[:4]
    assert float(rel.max()) <= 1e-12, rel.tolist()  # fp64 accumulation (the issue asks 1e-7)
    assert float(first[4]) == 0.0


def test_the_reference_sums_are_deterministic_without_index_add(monkeypatch):
    """The PyTorch reference adds fragment sums per layer in a fixed order: not index_add_,
    whose float64 atomics on CUDA change the bits from run to run."""
    def refuse(*args, **kwargs):
        raise AssertionError("index_add_ is not deterministic on CUDA")

    monkeypatch.setattr(torch.Tensor, "index_add_", refuse)
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(n, generator=gen) for n in (5, 9, 1)]
    frags = [(0, 0, 5, 2), (1, 0, 4, 0), (1, 4, 5, 2), (2, 0, 1, 2), (1, 2, 0, 3)]
    want = torch.zeros(5, dtype=torch.float64)
    for t, s, n, lay in frags:
        want[lay] += (grads[t][s:s + n].double() ** 2).sum()
    got = reference.fragment_sumsq(grads, frags, 5)
    assert torch.allclose(got, want, rtol=1e-15, atol=0) and got[1] == got[3] == got[4] == 0
    assert torch.equal(reference.segment_sum(torch.tensor([1.0, 2.0, 4.0]), [2, 0, 2], 3),
                       torch.tensor([2.0, 0.0, 5.0]))


def test_waiting_group_sums_go_through_the_op(emulated):
    """Under ZeRO a group still waiting holds its gradient as pieces whose concatenation is the
    flat layout; its per-layer sums are the op's own fragment sums over rows split at the piece
    boundaries (pending_rows), so the native kernels take them, deterministically."""
    gen = torch.Generator().manual_seed(4)
    pieces = [torch.randn(n, generator=gen).to(dt) for n, dt in ((5, torch.float32), (7, torch.bfloat16),
                                                                  (4, torch.float32))]
    flat = torch.cat([p.double() for p in pieces])
    frags = [Fragment(0, 3, 1), Fragment(3, 8, 0), Fragment(11, 5, 1), Fragment(16, 0, 2)]
    rows = pending_rows(pieces, frags)
    assert rows == [(0, 0, 3, 1), (0, 3, 2, 0), (1, 0, 6, 0), (1, 6, 1, 1), (2, 0, 4, 1)]
    want = torch.zeros(3, dtype=torch.float64)
    for f in frags:
        want[f.layer] += (flat[f.start:f.start + f.length] ** 2).sum()
    with emulated.active():
        got = dispatch.fragment_sumsq(pieces, rows, 3)
    assert torch.allclose(got, want, rtol=1e-7, atol=0)
    with pytest.raises(UnsupportedZeroSetting, match="pending gradient has 16 elements"):
        pending_rows(pieces, [Fragment(10, 7, 0)])


# ---------------------------------------------------------------------------------------------
# The real optimizer, every name, fp32 / bf16 / fp16 / mixed models

def _dyadic_grads(model, step):
    """Gradients k * 2^-10 with |k| <= 4: exactly representable in bf16/fp16, and their squares
    sum exactly in fp32 in any order, so the CPU op and the CUDA op see the same per-layer norms
    and must then produce the same bits everywhere."""
    gen = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        k = torch.randint(-4, 5, p.shape, generator=gen).to(torch.float32) * 2.0**-10
        p.grad = k.to(p.device, p.dtype)


def _model(dtype, device):
    torch.manual_seed(3)
    model = TinyNet(dims=(33, 130, 67, 41))
    if dtype == "mixed":  # blocks in bf16, the rest fp32: a group mixes tensors with and without copies
        for block in model.blocks:
            block.to(torch.bfloat16)
    else:
        model.to(dtype)
    return model.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, "mixed"])
def test_every_optimizer_steps_like_the_cpu_op(cuda, dtype):
    """Three steps of every name (the second skipped: an inf gradient) through LayerwiseAdam,
    on the CUDA op and the CPU op: weights and every state bit-identical."""
    for name in NAMES:
        runs = []
        for device, active in ((torch.device("cpu"), on_cpu_op), (cuda.device, cuda.active)):
            model = _model(dtype, device)
            opt = stratopt_ds.create_optimizer(name, model, lr=1e-2, t_alpha=4, t_beta3=4)
            with active():
                for step in range(3):
                    _dyadic_grads(model, step)
                    if step == 1:
                        next(model.parameters()).grad.view(-1)[0] = float("inf")
                    opt.step()
            assert opt.skipped_steps == 1
            runs.append((model, opt))
        (m0, o0), (m1, o1) = runs
        for (k, a), b in zip(m0.named_parameters(), m1.parameters()):
            assert same(a, b), f"{name} {dtype}: {k}"
            for key, x in o0.state[a].items():
                assert same(x, o1.state[b][key]), f"{name} {dtype}: {k} {key}"


def test_a_bf16_model_resumes_bit_identically(emulated):
    """Save, load, step on: bit-identical to the uninterrupted run, on the emulated CUDA op; the
    moments stay float32 and the step counters float64 after load_state_dict."""
    def make(seed):
        torch.manual_seed(seed)
        model = TinyNet(dims=(33, 130, 67, 41)).to(torch.bfloat16)
        return model, stratopt_ds.create_optimizer("stratopt", model, lr=1e-2, t_alpha=8, t_beta3=8)

    with emulated.active():
        model, opt = make(11)
        for step in range(4):
            _dyadic_grads(model, step)
            opt.step()
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        saved_model = copy.deepcopy(model.state_dict())
        for step in range(4, 7):
            _dyadic_grads(model, step)
            opt.step()
        resumed, opt2 = make(99)
        resumed.load_state_dict(saved_model)
        buf.seek(0)
        opt2.load_state_dict(torch.load(buf, weights_only=False))
        for p in resumed.parameters():
            st = opt2.state[p]
            assert {st[k].dtype for k in ("exp_avg", "exp_avg_sq", "exp_avg_slow")} == {torch.float32}
            assert st["step"].dtype == torch.float64
        for step in range(4, 7):
            _dyadic_grads(resumed, step)
            opt2.step()
    for (k, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert a.dtype == torch.bfloat16 and same(a, b), k
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert all(same(a[key], b[key]) for key in a), a.keys()


# ---------------------------------------------------------------------------------------------
# One validation, the same messages

def _bad_calls():
    """(what, mutate(st, layer, frags) -> frags): each breaks one rule."""
    def setter(key, i, value):
        def mutate(st, layer, frags):
            st[key][i] = value(st[key][i])
            return frags
        return mutate

    def layer_setter(key, value):
        def mutate(st, layer, frags):
            layer[key] = value(layer[key])
            return frags
        return mutate

    def drop(key):
        def mutate(st, layer, frags):
            st[key] = st[key][:-1]
            return frags
        return mutate

    return [
        ("float32 step counter", setter("steps", 1, lambda s: s.float())),
        ("two-element step counter", setter("steps", 0, lambda s: torch.cat([s.reshape(1), s.reshape(1)]))),
        ("bf16 moments (torch's load_state_dict cast)", setter("exp_avgs", 2, lambda m: m.bfloat16())),
        ("states of another size", setter("exp_avg_sqs", 3, lambda v: v[:-1].clone())),
        ("strided parameter", setter("params", 1, lambda p: torch.zeros(p.numel(), 2)[:, 0])),
        ("one gradient fewer (zip would truncate)", drop("grads")),
        ("one step counter fewer", drop("steps")),
        ("a copy of another size", setter("half_out", 4, lambda o: torch.zeros(o.numel() + 1, dtype=o.dtype))),
        ("float32 clip coefficients", layer_setter("clip_coef", lambda c: c.float())),
        ("alpha of another length", layer_setter("alpha", lambda a: a[:-1].clone())),
        ("finite as a float", layer_setter("finite", lambda f: f.float())),
        ("fragment past the end", lambda st, layer, frags: frags[:-1] + [(5, 10, 10**6, 0)]),
        ("fragment of a missing layer", lambda st, layer, frags: frags + [(0, 0, 1, LAYERS)]),
        ("fragment of a missing tensor", lambda st, layer, frags: frags + [(len(SIZES), 0, 1, 0)]),
    ]


def _message(fn) -> str:
    with pytest.raises(RuntimeError) as info:
        fn()
    return str(info.value).splitlines()[0]


@pytest.mark.parametrize("what,mutate", _bad_calls(), ids=[w for w, _ in _bad_calls()])
def test_both_ops_refuse_bad_calls_alike(emulated, what, mutate):
    """The CPU op and the CUDA op share one validation: the same refusal, word for word, before
    any kernel runs; nothing is written."""
    messages = []
    for active in (on_cpu_op, emulated.active):
        st, layer = _problem(3, torch.float32, "mixed", mix=True, depth=True)
        frags = mutate(st, layer, _layout(0))
        before = [p.clone() for p in st["params"]]
        with active():
            messages.append(_message(lambda: _update(st, layer, frags, _hyper("stratopt"))))
        assert all(same(a, b) for a, b in zip(before, st["params"]))
    assert messages[0] == messages[1], messages
    assert messages[0].startswith("stratopt op: "), messages[0]


def test_both_ops_refuse_bad_sums_alike(emulated):
    grads = [torch.zeros(8), torch.zeros(10, 2)[:, 0]]
    messages = []
    for active in (on_cpu_op, emulated.active):
        with active():
            messages.append(_message(lambda: dispatch.fragment_sumsq(grads[:1], [(0, 0, 9, 0)], 1)))
    assert messages[0] == messages[1] == "stratopt op: frags row 0 [0, 9) is outside tensor 0 of 8 elements"


# ---------------------------------------------------------------------------------------------
# Graph-safe tables

@pytest.fixture
def fresh_tables(monkeypatch):
    """Empty table caches with a small limit, restored afterwards."""
    for name in ("_host_tables", "_row_tables", "_ptr_tables"):
        old = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, dispatch.TableCache(old.what, limit=8))
    return dispatch


def _capturing(monkeypatch, on: bool):
    monkeypatch.setattr(dispatch, "_capturing", lambda device: on)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tables_are_built_before_capture_and_pinned(emulated, fresh_tables, monkeypatch, dtype):
    """After one eager step a captured step finds every table (a bf16 model too: with
    capturable=True its fp32 work buffers keep their addresses); the tables it used are never
    evicted afterwards, however many new ones come; a table missing during a capture is refused
    with what to do."""
    torch.manual_seed(0)
    model = TinyNet(dims=(33, 130, 67, 41)).to(dtype)
    opt = stratopt_ds.create_optimizer("stratopt", model, lr=1e-2, capturable=True)
    with emulated.active():
        _dyadic_grads(model, 0)
        opt.step()                       # eager: builds the tables
        _dyadic_grads(model, 1)          # new gradient tensors: new addresses
        opt.step()
        tables = {k: v for cache in (dispatch._row_tables, dispatch._ptr_tables) for k, v in cache._entries.items()}
        _capturing(monkeypatch, True)
        opt.step()                       # "captured": every table found, and pinned
        pinned = {k: tables[k] for k in dispatch._ptr_tables._pinned | dispatch._row_tables._pinned}
        assert pinned and dispatch._ptr_tables.pinned() >= 1 and dispatch._row_tables.pinned() >= 1
        _capturing(monkeypatch, False)
        for step in range(2, 14):        # 12 more sets of gradient addresses: evictions
            _dyadic_grads(model, step)
            opt.step()
        assert len(dispatch._ptr_tables) <= 8 + dispatch._ptr_tables.pinned()
        for key, table in pinned.items():
            cache = dispatch._ptr_tables if key in dispatch._ptr_tables._pinned else dispatch._row_tables
            assert cache._entries.get(key) is table, "a table a graph holds was evicted"
        _dyadic_grads(model, 99)
        _capturing(monkeypatch, True)
        with pytest.raises(RuntimeError, match="run one optimizer step with the same tensors before capturing"):
            opt.step()


def test_a_16_bit_model_needs_capturable_for_a_graph(emulated, fresh_tables, monkeypatch):
    """Without capturable, a bf16 model steps through a new p.float() each step: a capture
    after an eager step meets new addresses and says to build the optimizer capturable."""
    torch.manual_seed(0)
    model = TinyNet(dims=(33, 130, 67, 41)).to(torch.bfloat16)
    opt = stratopt_ds.create_optimizer("stratopt", model, lr=1e-2)
    with emulated.active():
        _dyadic_grads(model, 0)
        opt.step()
        _capturing(monkeypatch, True)
        with pytest.raises(RuntimeError, match="capturable=True"):
            opt.step()
    with pytest.raises(ValueError, match="capturable='yes'"):
        stratopt_ds.create_optimizer("stratopt", model, capturable="yes")


def test_capturable_changes_no_result(emulated):
    runs = []
    for capturable in (False, True):
        torch.manual_seed(0)
        model = TinyNet(dims=(33, 130, 67, 41)).to(torch.bfloat16)
        opt = stratopt_ds.create_optimizer("stratopt", model, lr=1e-2, capturable=capturable)
        with emulated.active():
            for step in range(3):
                _dyadic_grads(model, step)
                opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(same(a, b) for a, b in zip(*runs))


def test_the_table_cache_evicts_least_recently_used():
    cache = dispatch.TableCache("things", limit=2)
    cpu = torch.device("cpu")
    a = cache.get(("a",), lambda: object(), cpu)
    cache.get(("b",), lambda: object(), cpu)
    assert cache.get(("a",), lambda: pytest.fail("a was evicted"), cpu) is a
    cache.get(("c",), lambda: object(), cpu)  # evicts b, the least recently used
    assert len(cache) == 2 and ("b",) not in cache._entries and cache._entries[("a",)] is a


# ---------------------------------------------------------------------------------------------
# The GPU alone: a real CUDA graph of a bf16 model

@gpu
def test_a_captured_bf16_step_replays_like_eager_steps():
    if builder.load("cuda") is None:
        pytest.fail(f"the CUDA op did not build: {builder.why_unavailable('cuda')}")
    dev = torch.device("cuda")

    def run(graphed):
        torch.manual_seed(0)
        model = TinyNet(dims=(33, 130, 67, 41)).to(dev, torch.bfloat16)
        opt = stratopt_ds.create_optimizer("stratopt", model, capturable=True,
                                           lr=torch.tensor(1e-2, dtype=torch.float64, device=dev))
        _dyadic_grads(model, 0)
        with use_backend("native"):
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                opt.step()  # warm-up: states, work buffers and tables
            torch.cuda.current_stream().wait_stream(s)
            if graphed:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    opt.step()
                for _ in range(5):
                    graph.replay()
            else:
                for _ in range(5):
                    opt.step()
        torch.cuda.synchronize()
        return [p.detach().cpu() for p in model.parameters()], opt

    eager, _ = run(False)
    replayed, opt = run(True)
    assert opt.skipped_steps == 0
    assert all(same(a, b) for a, b in zip(eager, replayed))
