"""Native StratOpt ops (C++ CPU, CUDA) against the PyTorch reference and an fp64 implementation.

The CPU op is JIT-built on first use and cached (``python -m stratopt_ds.ops``); if it cannot be
built these tests FAIL (CI has g++), they never skip. GPU tests skip without a CUDA device; the
nvcc compile check skips only when ``nvcc`` is not on PATH.
"""
from __future__ import annotations

import glob
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import stratopt_ds
from stratopt_ds.ops import builder, dispatch, reference, use_backend

from helpers import TinyNet, compute_grads, loss_scale
from spec_reference import SpecOptimizer

ROOT = Path(__file__).resolve().parents[1]
HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, beta3=0.999,
          mix_alpha=0.0, t_alpha=0, t_beta3=0)


@pytest.fixture(params=["native", "reference"])
def backend(request, cpu_op):
    with use_backend(request.param):
        yield request.param


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    scale = b.abs().max().item() if b.numel() else 1.0
    return (a - b).abs().max().item() / scale if b.numel() else 0.0


# ---------------------------------------------------------------------------------------------
# The real optimizers, every name, native vs reference vs the fp64 spec implementation

SPEC_NAME = {"stratopt-noscale": ("stratopt", dict(scaling="none")),
             "stratopt-nomix": ("stratopt", dict(mix_alpha=0.0)),
             "stratopt-noclip": ("stratopt", dict(clip="none"))}


def _model():
    torch.manual_seed(3)
    return TinyNet(dims=(33, 130, 67, 41))  # odd sizes: vector bodies and scalar tails


def _drive(name, mode, steps=8, spec=None, **hp):
    model = _model()
    opt = stratopt_ds.create_optimizer(name, model, lr=1e-2, **hp)
    # A 40x gradient spike (loss_scale(7)) makes clipping fire. Without clipping it only
    # amplifies fp32 noise: the PyTorch reference itself then drifts ~1e-5 from fp64 (its
    # vectorised sqrt is not correctly rounded) while the native kernel stays ~3e-7 away.
    clips = opt.layer_options["clip"] != "none"
    with use_backend(mode):
        for step in range(steps):
            compute_grads(model, step, loss_scale(step + 5) if clips else 1.0)
            if spec is not None:
                spec.step({k: v.grad for k, v in model.named_parameters()})
            opt.step()
    return model, opt


@pytest.mark.parametrize("name", stratopt_ds.available_optimizers())
def test_every_optimizer_native_matches_reference_and_fp64(name, cpu_op):
    hp = dict(t_alpha=4, t_beta3=4) if name in ("stratopt", "ademamix", "stratopt-noclip",
                                                 "stratopt-noscale") else {}
    base, over = SPEC_NAME.get(name, (name, {}))
    init = _model()
    spec = SpecOptimizer({k: v.detach().clone() for k, v in init.named_parameters()},
                         {k: (0.1 if v.ndim >= 2 else 0.0) for k, v in init.named_parameters()},
                         base, lr=1e-2, **over, **hp)
    nat_model, nat = _drive(name, "native", spec=spec, **hp)
    ref_model, ref = _drive(name, "reference", **hp)
    for (k, a), b in zip(nat_model.named_parameters(), ref_model.parameters()):
        assert rel_err(a, b) <= 1e-5, (k, rel_err(a, b))
        assert rel_err(a, spec.p[k]) <= 1e-5, (k, "fp64", rel_err(a, spec.p[k]))
        sa, sb = nat.state[a], ref.state[b]
        assert set(sa) == set(sb)
        for key in sa:
            assert rel_err(sa[key], sb[key]) <= 1e-5, (k, key)
    assert torch.allclose(nat.layer_stats.gbar, ref.layer_stats.gbar, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# The kernels directly, against an fp64 implementation written here

def _fp64_update(p, g, m1, v, m2, t, coef, alpha, b1, hp):
    """Spec section 4 in float64 for one fragment (no lerp tricks, plain EMA form)."""
    p, g, m1, v = (x.double() for x in (p, g, m1, v))
    g = g * coef
    m1 = b1 * m1 + (1 - b1) * g
    v = hp["beta2"] * v + (1 - hp["beta2"]) * g * g
    numer = m1 / (1 - b1 ** t)
    if m2 is not None:
        s = min(1.0, t / hp["t_beta3"]) if hp["t_beta3"] else 1.0
        hl = lambda b: math.log(0.5) / math.log(b) - 1.0  # noqa: E731
        b3 = 0.5 ** (1.0 / ((1 - s) * hl(b1) + s * hl(hp["beta3"]) + 1.0)) if hp["t_beta3"] else hp["beta3"]
        a = hp["mix_alpha"] * (min(1.0, t / hp["t_alpha"]) if hp["t_alpha"] else 1.0)
        m2 = b3 * m2.double() + (1 - b3) * g
        numer = numer + a * m2
    u = numer / (torch.sqrt(v / (1 - hp["beta2"] ** t)) + hp["eps"])
    p = p - hp["lr"] * (alpha * u + hp["weight_decay"] * p)
    return p, m1, v, m2


def _problem(sizes, num_layers, mix, grad_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = len(sizes)
    rnd = lambda k, s=1.0: [torch.randn(x, generator=gen) * s for x in sizes]  # noqa: E731
    st = dict(params=rnd(0), grads=[g.to(grad_dtype) for g in rnd(0, 0.1)],
              exp_avgs=rnd(0, 0.01), exp_avg_sqs=[x.abs() * 1e-3 for x in rnd(0)],
              exp_avg_slows=rnd(0, 0.01) if mix else None,
              steps=[torch.tensor(float(3 + i), dtype=torch.float64) for i in range(n)])
    layer = dict(clip_coef=torch.rand(num_layers, generator=gen, dtype=torch.float64) + 0.5,
                 alpha=torch.rand(num_layers, generator=gen, dtype=torch.float64) * 3 + 0.1,
                 beta1_layer=0.85 + 0.1 * torch.rand(num_layers, generator=gen, dtype=torch.float64))
    return st, layer


def _clone(st):
    return {k: ([x.clone() for x in v] if isinstance(v, list) else v) for k, v in st.items()}


def _call(fn, st, frags, layer, finite=True, half_out=None, **hp):
    fn(st["params"], st["grads"], st["exp_avgs"], st["exp_avg_sqs"], st["exp_avg_slows"],
       st["steps"], frags, torch.tensor(finite), layer["clip_coef"], layer["alpha"],
       layer["beta1_layer"], half_out=half_out, **{**HP, **hp})


# sizes chosen around the SIMD width, the 64-lane reduction and the block sizes
ODD = [1, 3, 22, 64, 127, 4095, 8193, 65537]


@pytest.mark.parametrize("mix", [0.0, 5.0])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_update_matches_fp64_and_reference(cpu_op, mix, grad_dtype):
    sizes = ODD
    # several fragments per tensor, an empty fragment, layers shared between tensors
    frags = []
    for i, n in enumerate(sizes):
        cut = n // 3
        frags += [(i, 0, cut, i % 5), (i, cut, 0, 6), (i, cut, n - cut, (i + 2) % 7)]
    hp = dict(mix_alpha=mix, t_alpha=10, t_beta3=10)
    st, layer = _problem(sizes, 7, mix, grad_dtype)
    nat, ref = _clone(st), _clone(st)
    with use_backend("native"):
        _call(dispatch.fragment_update, nat, frags, layer, **hp)
    _call(reference.fragment_update, ref, frags, layer, **hp)
    for i, (tensor, start, length, l) in enumerate(frags):
        sl = slice(start, start + length)
        t = max(float(st["steps"][tensor]), 1.0)
        want = _fp64_update(st["params"][tensor][sl], st["grads"][tensor][sl].float(),
                            st["exp_avgs"][tensor][sl], st["exp_avg_sqs"][tensor][sl],
                            st["exp_avg_slows"][tensor][sl] if mix else None, t,
                            float(layer["clip_coef"][l]), float(layer["alpha"][l]),
                            float(layer["beta1_layer"][l]), {**HP, **hp})
        got = (nat["params"][tensor][sl], nat["exp_avgs"][tensor][sl],
               nat["exp_avg_sqs"][tensor][sl], nat["exp_avg_slows"][tensor][sl] if mix else None)
        for name, g, w in zip(("param", "m1", "v", "m2"), got, want):
            if w is not None and w.numel():
                assert rel_err(g, w) <= 1e-5, (i, name, rel_err(g, w))
    for key in ("params", "exp_avgs", "exp_avg_sqs") + (("exp_avg_slows",) if mix else ()):
        for a, b in zip(nat[key], ref[key]):
            assert rel_err(a, b) <= 1e-5, key


def test_cpu_sumsq_matches_fp64(cpu_op):
    sizes = ODD + [2**20 + 7]
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in sizes]
    grads[2] = grads[2].to(torch.bfloat16)
    grads[3] = grads[3].to(torch.float16)
    frags = [(i, 0, n, i % 4) for i, n in enumerate(sizes)] + [(0, 1, 0, 5), (8, 5, 1000, 6)]
    with use_backend("native"):
        got = dispatch.fragment_sumsq(grads, frags, 8)
    want = torch.zeros(8, dtype=torch.float64)
    for tensor, start, length, l in frags:
        x = grads[tensor].double()[start:start + length]
        want[l] += (x * x).sum()
    assert got.dtype == torch.float64 and got.shape == (8,)
    assert got[7] == 0 and got[5] == 0  # a layer with no elements stays 0
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    assert torch.allclose(got, reference.fragment_sumsq(grads, frags, 8), rtol=1e-6, atol=0)


# values on and around the rounding ties of each 16-bit format, overflow, subnormals, zeros
HALF_EDGES = {
    torch.bfloat16: [1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 3.0e38, -3.0e38, 1e-40, 0.0, -0.0],
    torch.float16: [1.0 + 2**-11, 1.0 + 3 * 2**-11, -(1.0 + 2**-11), 65504.0, 65520.0, -7.0e4,
                    2**-25, 3 * 2**-26, 2**-24 + 2**-26, 1e-8, 0.0, -0.0],
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_copy_is_bit_exact(cpu_op, dtype):
    sizes = [1, 17, 4099]
    frags = [(i, 0, n, 0) for i, n in enumerate(sizes)]
    st, layer = _problem(sizes, 1, 0.0)
    edges = torch.tensor(HALF_EDGES[dtype])
    st["params"][2][: edges.numel()] = edges
    for finite in (False, True):  # a skipped step first: it copies the edges unchanged
        outs = [torch.empty(n, dtype=dtype) for n in sizes]
        with use_backend("native"):
            _call(dispatch.fragment_update, st, frags, layer, finite=finite, half_out=outs)
        for p, o in zip(st["params"], outs):
            assert torch.equal(o.view(torch.int16), p.to(dtype).view(torch.int16))
        if dtype == torch.float16 and not finite:  # the edges did hit overflow and subnormals
            assert outs[2][4].isinf() and outs[2][6] == 0 and 0 < outs[2][7] < 2**-14


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_model_through_the_optimizer_is_exact(cpu_op, dtype):
    """A bf16/fp16 model: the native step writes the weights in its own pass; the result is the
    reference's (fp32 maths, then rounding) up to one rounding of the 16-bit format."""
    def run(mode):
        torch.manual_seed(4)
        model = TinyNet(dims=(33, 130, 67, 41)).to(dtype)
        opt = stratopt_ds.create_optimizer("stratopt", model, lr=1e-2)
        with use_backend(mode):
            for step in range(3):
                compute_grads(model, step)
                opt.step()
        return list(model.parameters())

    # one rounding, element by element: a spacing of the format at |b| (fixed below the normals)
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    floor = torch.finfo(dtype).smallest_normal
    for a, b in zip(run("native"), run("reference")):
        assert a.dtype == dtype
        assert ((a.float() - b.float()).abs() <= ulp * b.float().abs().clamp_min(floor)).all()


# ---------------------------------------------------------------------------------------------
# Determinism

def _run_once(st, frags, layer, hp):
    st = _clone(st)
    with use_backend("native"):
        sq = dispatch.fragment_sumsq(st["grads"], frags, 7)
        _call(dispatch.fragment_update, st, frags, layer, **hp)
    return sq, st


def test_reruns_and_thread_counts_are_bitwise_identical(cpu_op):
    sizes = [300_001, 70_003, 5]
    frags = [(0, 0, 150_000, 0), (0, 150_000, 150_001, 1), (1, 0, 70_003, 2), (2, 0, 5, 3)]
    hp = dict(mix_alpha=5.0, t_alpha=10, t_beta3=10)
    st, layer = _problem(sizes, 7, 5.0)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (2, 1, 2):
            torch.set_num_threads(n)
            results.append(_run_once(st, frags, layer, hp))
    finally:
        torch.set_num_threads(threads)
    (sq0, st0) = results[0]
    for sq, s in results[1:]:
        assert torch.equal(sq, sq0)
        for key in ("params", "exp_avgs", "exp_avg_sqs", "exp_avg_slows"):
            assert all(torch.equal(a, b) for a, b in zip(s[key], st0[key])), key


def test_isa_variants_agree_bitwise(cpu_op, tmp_path):
    """AVX-512, AVX2 and the portable loop compute the same bits (run in subprocesses)."""
    script = tmp_path / "isa.py"
    script.write_text(
        "import sys, torch\n"
        "from stratopt_ds.ops import builder\n"
        "m = builder.load('cpu')\n"
        "g = [torch.randn(70001, generator=torch.Generator().manual_seed(1))]\n"
        "f = torch.tensor([[0, 0, 70001, 0], [0, 3, 999, 1]])\n"
        "s = m.fragment_sumsq(g, f, 2)\n"
        "p = [torch.randn(70001)*0+1.0]; m1=[torch.zeros(70001)]; v=[torch.zeros(70001)]\n"
        "m.fragment_update(p, g, m1, v, [], [torch.tensor(1.0, dtype=torch.float64)], f[:1],\n"
        "  torch.tensor(True), torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64),\n"
        "  None, 1e-3, 0.9, 0.999, 1e-8, 0.1, 0.999, 0.0, 0, 0, [])\n"
        "print(m.isa(), s.tolist(), float(p[0].double().sum()), float(v[0].double().sum()))\n")
    outs = {}
    for isa in ("avx512", "avx2", "scalar"):
        env = dict(os.environ, STRATOPT_CPU_ISA=isa)
        r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
        if r.returncode != 0 and "lacks" in r.stderr:
            continue  # this CPU cannot run that variant
        assert r.returncode == 0, r.stderr[-2000:]
        name, rest = r.stdout.split(" ", 1)
        assert name == isa
        outs[isa] = rest
    assert "scalar" in outs and len(set(outs.values())) == 1, outs


# ---------------------------------------------------------------------------------------------
# Edge cases

def test_empty_partitions_and_fragments(cpu_op):
    with use_backend("native"):
        assert torch.equal(dispatch.fragment_sumsq([], [], 3), torch.zeros(3, dtype=torch.float64))
        empty = torch.empty(0)
        assert torch.equal(dispatch.fragment_sumsq([empty], [(0, 0, 0, 1)], 3),
                           torch.zeros(3, dtype=torch.float64))
        st, layer = _problem([0, 5], 2, 0.0)
        before = _clone(st)
        _call(dispatch.fragment_update, st, [(0, 0, 0, 1), (1, 2, 0, 0)], layer)  # nothing to do
        for key in ("params", "exp_avgs", "exp_avg_sqs"):
            assert all(torch.equal(a, b) for a, b in zip(st[key], before[key]))
        dispatch.fragment_update([], [], [], [], None, [], [], torch.tensor(True),
                                 layer["clip_coef"], layer["alpha"], None, **HP)


def test_misaligned_views_are_handled(cpu_op):
    base = torch.randn(4 * 1001 + 1)
    st, layer = _problem([1000] * 1, 1, 5.0)
    views = {k: torch.zeros(1001 * 5)[1:1001] for k in ("p",)}  # storage offset 1: not 16-B aligned
    p = views["p"]
    p.copy_(base[:1000])
    ref = _clone(st)
    st["params"] = [p]
    ref["params"] = [base[:1000].clone()]
    with use_backend("native"):
        _call(dispatch.fragment_update, st, [(0, 0, 1000, 0)], layer, mix_alpha=5.0)
    _call(reference.fragment_update, ref, [(0, 0, 1000, 0)], layer, mix_alpha=5.0)
    assert p.data_ptr() % 16 != 0
    assert rel_err(p, ref["params"][0]) <= 1e-5
    with use_backend("native"):
        g = torch.randn(2001)[1:]
        assert torch.allclose(dispatch.fragment_sumsq([g], [(0, 0, 2000, 0)], 1),
                              (g.double() ** 2).sum().reshape(1), rtol=1e-6)


def test_strided_gradients_are_copied_for_the_native_op(cpu_op):
    """A strided gradient (here 1-D, where reshape(-1) would keep the strides) goes through the
    dispatcher natively and gives the reference's result; the raw op rejects it (below)."""
    st, layer = _problem([64], 1, 0.0)
    st["grads"] = [torch.randn(64, 2).t()[0]]
    assert not st["grads"][0].is_contiguous()
    ref = _clone(st)
    with use_backend("native"):
        sq = dispatch.fragment_sumsq(st["grads"], [(0, 0, 64, 0)], 1)
        _call(dispatch.fragment_update, st, [(0, 0, 64, 0)], layer)
    _call(reference.fragment_update, ref, [(0, 0, 64, 0)], layer)
    assert torch.allclose(sq, (st["grads"][0].double() ** 2).sum().reshape(1), rtol=1e-6)
    assert rel_err(st["params"][0], ref["params"][0]) <= 1e-5


def test_bad_arguments_are_rejected_clearly(cpu_op):
    st, layer = _problem([64], 1, 0.0)
    args = lambda **o: ({**st, **o}, [[0, 0, 64, 0]], layer)  # noqa: E731
    table = lambda rows: torch.tensor(rows, dtype=torch.int64)  # noqa: E731

    def native(s, frags, lay, **kw):
        cpu_op.fragment_update(s["params"], s["grads"], s["exp_avgs"], s["exp_avg_sqs"], [], s["steps"],
                               table(frags), torch.tensor(True), lay["clip_coef"], lay["alpha"], None,
                               half_out=[], **HP, **kw)

    nc = torch.randn(64, 2).t()[0]  # a strided (non-contiguous) view
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be contiguous"):
        native(*args(grads=[nc]))
    with pytest.raises(RuntimeError, match=r"params\[0\] must be float32"):
        native(*args(params=[st["params"][0].double()]))
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] has 63 elements"):
        native(*args(exp_avgs=[torch.zeros(63)]))
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be float32, bfloat16 or float16"):
        native(*args(grads=[torch.zeros(64, dtype=torch.float64)]))
    with pytest.raises(RuntimeError, match=r"frags row 0 \[0, 65\) is outside tensor 0"):
        native(st, [[0, 0, 65, 0]], layer)
    with pytest.raises(RuntimeError, match=r"frags row 0 layer 3 is outside"):
        native(st, [[0, 0, 64, 3]], layer)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be contiguous"):
        cpu_op.fragment_sumsq([nc], table([[0, 0, 64, 0]]), 1)
    with pytest.raises(RuntimeError, match=r"steps\[0\] must be a one-element float64 step counter"):
        native(*args(steps=[torch.ones(2, dtype=torch.float64)]))
    with pytest.raises(RuntimeError, match=r"half_out\[0\] must be bfloat16 or float16"):
        s, frags, lay = args()
        cpu_op.fragment_update(s["params"], s["grads"], s["exp_avgs"], s["exp_avg_sqs"], [], s["steps"],
                               table(frags), torch.tensor(True), lay["clip_coef"], lay["alpha"], None,
                               half_out=[torch.zeros(64)], **HP)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_step_counter_must_be_float64(cpu_op, dtype):
    """Step counters are float64 (the CUDA kernel reads them as doubles on the device, so a
    float32 one would be misread; both ops refuse it alike), and their value matters."""
    def params_after(step):
        st, layer = _problem([64], 1, 0.0)  # same seed: same start every time
        cpu_op.fragment_update(st["params"], st["grads"], st["exp_avgs"], st["exp_avg_sqs"], [], [step],
                               torch.tensor([[0, 0, 64, 0]]), torch.tensor(True), layer["clip_coef"],
                               layer["alpha"], None, half_out=[], **HP)
        return st["params"][0]

    with pytest.raises(RuntimeError, match=r"steps\[0\] must be a one-element float64 step counter"):
        params_after(torch.tensor(7, dtype=dtype))
    at_7 = params_after(torch.tensor(7.0, dtype=torch.float64))
    assert not torch.equal(params_after(torch.tensor(1.0, dtype=torch.float64)), at_7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_skips_the_step_natively(cpu_op, bad):
    model = _model()
    opt = stratopt_ds.create_optimizer("stratopt", model, lr=1e-2)
    with use_backend("native"):
        for step in range(2):
            compute_grads(model, step)
            opt.step()
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        states = {k: {s: x.clone() for s, x in opt.state[v].items()} for k, v in model.named_parameters()}
        compute_grads(model, 2)
        model.blocks[1].lin.weight.grad[3, 5] = bad
        opt.step()
    assert opt.skipped_steps == 1
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), k
        for s, x in opt.state[v].items():
            assert torch.equal(x, states[k][s]), (k, s)


# ---------------------------------------------------------------------------------------------
# Backend selection and fallback

def test_backend_env_and_one_warning(cpu_op, monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", False)
    monkeypatch.setitem(builder._why, "cpu", "RuntimeError: no compiler (simulated)")
    monkeypatch.delitem(builder._cache, "cpu")
    g = [torch.ones(10)]
    monkeypatch.setenv("STRATOPT_OPS", "auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert dispatch.fragment_sumsq(g, [(0, 0, 10, 0)], 1).item() == 10.0
    assert len([w for w in caught if "native cpu op unavailable" in str(w.message)]) == 1
    monkeypatch.setenv("STRATOPT_OPS", "native")
    with pytest.raises(RuntimeError, match="STRATOPT_OPS=native but the cpu op is unavailable"):
        dispatch.fragment_sumsq(g, [(0, 0, 10, 0)], 1)
    monkeypatch.setenv("STRATOPT_OPS", "bogus")
    with pytest.raises(ValueError, match="STRATOPT_OPS='bogus'"):
        dispatch.fragment_sumsq(g, [(0, 0, 10, 0)], 1)


def test_report_lists_backends(cpu_op):
    r = subprocess.run([sys.executable, "-m", "stratopt_ds.ops"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "cpu: available" in r.stdout
    if torch.version.cuda is None:
        assert "cuda: unavailable (torch built without CUDA)" in r.stdout


def test_a_wheel_install_ships_the_sources_and_jit_builds_from_them(tmp_path):
    """Outside an editable install there is no csrc/ at the repository root: the wheel carries
    the sources in stratopt_ds/ops/csrc, byte-identical, and the JIT build uses that copy."""
    wheels, target, cache = tmp_path / "wheels", tmp_path / "site", tmp_path / "cache"
    src = tmp_path / "src"  # a copy: no stale build/ of the checkout can leak into the wheel
    src.mkdir()
    for name in ("setup.py", "MANIFEST.in", "README.md", "requirements.txt"):
        shutil.copy(ROOT / name, src)
    for tree in ("stratopt_ds", "csrc"):
        shutil.copytree(ROOT / tree, src / tree, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    run = lambda cmd, **kw: subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)  # noqa: E731
    r = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
             "-w", str(wheels), str(src)])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
             *map(str, wheels.glob("*.whl"))])
    assert r.returncode == 0, r.stderr[-3000:]
    shipped = target / "stratopt_ds" / "ops" / "csrc"
    for rel in builder.CPU_SOURCES + builder.CPU_DEPENDS + builder.CUDA_SOURCES + builder.CUDA_DEPENDS:
        assert (shipped / rel).read_bytes() == (ROOT / "csrc" / rel).read_bytes(), rel
    env = {**os.environ, "PYTHONPATH": str(target), "STRATOPT_OPS_CACHE": str(cache)}
    r = run([sys.executable, "-m", "stratopt_ds.ops"], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cpu: available (JIT build" in r.stdout, r.stdout
    ninja = "".join(f.read_text() for f in cache.glob("*/build.ninja"))
    assert str(shipped / "cpu" / "stratopt_cpu.cpp") in ninja


# ---------------------------------------------------------------------------------------------
# CUDA

NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_sources_compile(arch, tmp_path):
    """Every .cu compiles with the installed nvcc, against the CUDA runtime and torch's c10 headers
    (the kernels check their launches with C10_CUDA_KERNEL_LAUNCH_CHECK). The CPU torch wheel
    lacks one generated c10/cuda header, which a CUDA build has; a stand-in supplies it."""
    from torch.utils import cpp_extension

    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    torch_includes = [arg for path in cpp_extension.include_paths() for arg in ("-I", path)]
    sources = sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu")))
    assert sources
    for src in sources:
        obj = tmp_path / (Path(src).stem + f"_{arch}.o")
        cmd = [NVCC, "-c", src, "-o", str(obj), f"-arch={arch}", "-std=c++17", "-O3",
               "--fmad=false", "-I", str(Path(src).parent), *torch_includes, "-I", str(tmp_path / "stub")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-4000:]}"
        assert obj.stat().st_size > 0


CUDA_TORCH_DIR = os.environ.get("STRATOPT_CUDA_TORCH_DIR")


@pytest.mark.skipif(NVCC is None or not CUDA_TORCH_DIR,
                    reason="set STRATOPT_CUDA_TORCH_DIR (tools/check_cuda_glue.py --fetch) and have nvcc")
def test_cuda_op_compiles_and_links_against_cuda_torch(tmp_path):
    """The whole CUDA op (kernels + torch glue), built exactly as the JIT build does, against a
    CUDA torch's headers and libraries, linked with --no-undefined. Runs without a GPU."""
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "check_cuda_glue.py"), "--torch-dir",
                        CUDA_TORCH_DIR, "--build-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "--no-undefined" in r.stdout and "-lc10_cuda" in r.stdout
    assert (tmp_path / "stratopt_cuda_glue_check.so").stat().st_size > 0


def test_cuda_chunk_tables_cover_every_fragment_once():
    """The host-side tables of the CUDA kernels, built and checked on CPU: chunks of at most
    CHUNK elements tile every fragment exactly once, carry its layer, and the per-layer chunk
    lists (CSR) make the two-stage sum, emulated here in fp64, equal the reference."""
    torch.manual_seed(0)
    sizes = [10, 1, 37, 64, 0]
    frags = [(0, 0, 4, 1), (0, 4, 6, 0), (1, 0, 1, 2), (2, 0, 37, 1), (3, 0, 0, 4), (3, 0, 64, 3)]
    num_layers, chunk = 6, 7  # layer 5 has no fragment, layer 4 only an empty one
    grads = [torch.randn(n, dtype=torch.float64) for n in sizes]
    chunks, layer_ptr, layer_chunks = dispatch._cuda_chunks(frags, num_layers, chunk, torch.device("cpu"),
                                                            lambda: sizes)
    rows = chunks.tolist()
    assert all(0 < n <= chunk for _, _, n, _ in rows)
    for t, start, length, layer in frags:  # the chunks of a fragment tile it, in order
        mine = [(b, n) for tt, b, n, lay in rows if tt == t and start <= b < start + length and lay == layer]
        assert [b for b, _ in mine] == list(range(start, start + length, chunk))
        assert sum(n for _, n in mine) == length
    assert sum(n for _, _, n, _ in rows) == sum(f[2] for f in frags)
    ptr = layer_ptr.tolist()
    assert ptr[0] == 0 and ptr[-1] == len(rows) and ptr[5] == ptr[6] and ptr[4] == ptr[5]
    ids = layer_chunks.tolist()[: ptr[-1]]
    partial = [float((grads[t][b:b + n] ** 2).sum()) for t, b, n, _ in rows]
    emulated = torch.tensor([sum(partial[k] for k in ids[ptr[l]:ptr[l + 1]]) for l in range(num_layers)],
                            dtype=torch.float64)
    assert all(rows[k][3] == l for l in range(num_layers) for k in ids[ptr[l]:ptr[l + 1]])
    assert torch.allclose(emulated, reference.fragment_sumsq(grads, frags, num_layers), rtol=1e-12, atol=0)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("mix", [0.0, 5.0])
def test_cuda_update_and_sumsq_match_reference(mix):
    if builder.load("cuda") is None:
        pytest.fail(f"CUDA op did not build: {builder.why_unavailable('cuda')}")
    sizes = ODD + [2**20 + 7]
    frags = [(i, 0, n // 2, i % 3) for i, n in enumerate(sizes)] + \
            [(i, n // 2, n - n // 2, 3) for i, n in enumerate(sizes)]
    hp = dict(mix_alpha=mix, t_alpha=10, t_beta3=10)
    st, layer = _problem(sizes, 4, mix)
    dev = torch.device("cuda")
    gpu = {k: ([x.to(dev) for x in v] if isinstance(v, list) else v) for k, v in st.items()}
    glayer = {k: v.to(dev) for k, v in layer.items()}
    outs = [torch.empty(n, dtype=torch.bfloat16, device=dev) for n in sizes]
    with use_backend("native"):
        sq = dispatch.fragment_sumsq(gpu["grads"], frags, 4)
        sq2 = dispatch.fragment_sumsq(gpu["grads"], frags, 4)
        fn = dispatch.fragment_update
        fn(gpu["params"], gpu["grads"], gpu["exp_avgs"], gpu["exp_avg_sqs"], gpu["exp_avg_slows"],
           gpu["steps"], frags, torch.tensor(True, device=dev), glayer["clip_coef"], glayer["alpha"],
           glayer["beta1_layer"], half_out=outs, **{**HP, **hp})
    assert torch.equal(sq, sq2)
    assert torch.allclose(sq.cpu(), reference.fragment_sumsq(st["grads"], frags, 4), rtol=1e-6)
    ref = _clone(st)
    _call(reference.fragment_update, ref, frags, layer, **hp)
    for a, b, o in zip(gpu["params"], ref["params"], outs):
        assert rel_err(a.cpu(), b) <= 1e-5
        assert torch.equal(o, a.to(torch.bfloat16))


def _scheduled_run(device, lr, graphed=False, steps=5, schedule=True):
    """StratOpt under a LambdaLR on fixed gradients (a constant one with ``schedule=False``);
    optionally replaying one captured step."""
    torch.manual_seed(0)
    model = TinyNet(dims=(33, 130, 67, 41)).to(device)
    opt = stratopt_ds.create_optimizer("stratopt", model, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, (lambda s: 1.0 / (1.0 + s)) if schedule else (lambda s: 1.0))
    torch.manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    if graphed:  # warm-up on a side stream (states and tables are built there), then capture
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            opt.step()
        torch.cuda.current_stream().wait_stream(s)
        sched.step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
        for _ in range(steps):
            graph.replay()
            sched.step()
    else:
        for _ in range(steps + 1):
            opt.step()
            sched.step()
    return [p.detach().cpu().clone() for p in model.parameters()], opt


def test_tensor_lr_follows_a_scheduler(backend):
    """A 0-dim tensor lr, filled in place by a torch scheduler, gives the float-lr result."""
    want, _ = _scheduled_run("cpu", 1e-2)
    lr = torch.tensor(1e-2, dtype=torch.float64)
    got, opt = _scheduled_run("cpu", lr)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert all(g["lr"] is lr for g in opt.param_groups)  # filled in place, never replaced
    assert lr.item() == pytest.approx(1e-2 / 7)
    held, _ = _scheduled_run("cpu", 1e-2 / 2)  # the check can fail: another lr differs
    assert not all(torch.equal(a, b) for a, b in zip(want, held))
    frozen, _ = _scheduled_run("cpu", 1e-2, schedule=False)  # and the schedule reaches the step
    assert not all(torch.equal(a, b) for a, b in zip(want, frozen))


@pytest.mark.parametrize("bad", [torch.tensor([1e-3, 1e-3]), torch.tensor(1), torch.tensor(-1e-3)])
def test_bad_tensor_lr_is_rejected(bad):
    with pytest.raises(ValueError, match="lr"):
        stratopt_ds.create_optimizer("stratopt", _model(), lr=bad)


@cuda
def test_cuda_graph_replay_follows_the_lr_schedule():
    """One captured step replayed under a LambdaLR equals eager steps bit for bit: the kernel
    reads the tensor lr on the device, so the graph does not freeze the lr of its capture."""
    if builder.load("cuda") is None:
        pytest.fail(f"CUDA op did not build: {builder.why_unavailable('cuda')}")
    dev = torch.device("cuda")
    with use_backend("native"):
        eager, _ = _scheduled_run(dev, 1e-2)
        lr = torch.tensor(1e-2, dtype=torch.float64, device=dev)
        replayed, opt = _scheduled_run(dev, lr, graphed=True)
        torch.cuda.synchronize()
    assert opt.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in replayed)
    assert all(torch.equal(a, b) for a, b in zip(eager, replayed))

