"""torch.optim conformance (issue 14): what PyTorch's generic optimizer tests found in ours.

Copies of the optimizer object, non-contiguous parameters, step counters loaded as numbers,
complex parameters, and torch.distributed.checkpoint's get/set_optimizer_state_dict.
"""
from __future__ import annotations

import copy
import io
import threading

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

import stratopt_ds
from stratopt_ds.ops import use_backend

from helpers import TinyNet, compute_grads, loss_scale

NAMES = ["stratopt", "adamw", "la-sqrt-b1depth-cliplayer"]
HP = dict(lr=1e-2, t_alpha=8, t_beta3=8)  # short warm-ups: the slow momentum matters early


def _make(name, seed=0):
    torch.manual_seed(seed)
    model = TinyNet()
    return model, stratopt_ds.create_optimizer(name, model, **HP)


def _train(model, opt, steps):
    for step in steps:  # loss_scale: spikes make layer clipping fire, dips bind the alpha clamp
        compute_grads(model, step, loss_scale(step))
        opt.step()


def _round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _assert_same_run(model_a, opt_a, model_b, opt_b):
    """Same weights, states and layer statistics, bit for bit."""
    assert len(opt_a.state) == len(opt_b.state)
    for (k, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), k
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[key], sb[key]) for key in sa), k
    for key in ("gbar", "count", "clip_count", "skipped_steps"):
        assert torch.equal(getattr(opt_a.layer_stats, key), getattr(opt_b.layer_stats, key)), key


# 1. copy.deepcopy / pickle ---------------------------------------------------------------------

@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("name", NAMES)
def test_a_copied_optimizer_continues_bit_identically(name, how):
    model, opt = _make(name)
    ref_model, ref_opt = _make(name)  # the same run, never copied
    _train(model, opt, range(6))
    _train(ref_model, ref_opt, range(6))
    # model and optimizer copied together, so the copy steps the copied parameters
    model2, opt2 = copy.deepcopy((model, opt)) if how == "deepcopy" else _round_trip((model, opt))
    assert torch.equal(opt2.layer_stats.count, torch.full_like(opt2.layer_stats.count, 6))  # came along
    for m, o in ((model, opt), (model2, opt2), (ref_model, ref_opt)):
        _train(m, o, range(6, 12))
    _assert_same_run(model2, opt2, ref_model, ref_opt)
    _assert_same_run(model, opt, ref_model, ref_opt)  # the copy shares nothing with the original
    assert opt2.layer_clip_counts() == ref_opt.layer_clip_counts()


def test_a_copy_does_not_keep_a_zero_binding():
    """Under ZeRO the groups hold DeepSpeed's flat partitions: a copy keeps the map of the model's
    own parameters (by identity) and drops the binding, to re-attach in step()."""
    model, opt = _make("stratopt")
    _train(model, opt, range(2))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for group in opt.param_groups:
        group["params"] = [flat] if group is opt.param_groups[0] else []
    opt.sharding = threading.Lock()  # stands for a binding: neither copyable nor picklable
    copied = copy.deepcopy(opt)
    assert copied.sharding.is_local
    assert copied.base_layer_map.fragments.keys() == opt.base_layer_map.fragments.keys()
    assert copied.param_name == opt.param_name
    assert torch.equal(copied.layer_stats.count, opt.layer_stats.count)


# 2. Non-contiguous parameters ------------------------------------------------------------------

def _strided_params():
    torch.manual_seed(3)
    base = torch.randn(6, 8)
    params = [nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last).weight,
              nn.Parameter(torch.randn(5, 7).t()),                          # transposed
              nn.Parameter(base[:, 1:6]),                                   # a slice of a larger tensor
              nn.Parameter(torch.randn(6, 5).t().to(torch.bfloat16)),       # transposed bf16
              nn.Parameter(torch.randn(2, 3, 4).permute(2, 0, 1)),          # permuted
              nn.Parameter(torch.randn(9))]                                 # contiguous, for company
    assert [p.is_contiguous() for p in params] == [False] * 5 + [True]
    return params, base


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_parameters_step_like_their_contiguous_copies(name, backend, capturable):
    params, base = _strided_params()
    clones = [nn.Parameter(p.detach().clone(memory_format=torch.contiguous_format)) for p in params]
    layouts = [(p.data_ptr(), p.stride()) for p in params]
    outside = base[:, [0, 6, 7]].clone()
    opts = [stratopt_ds.create_optimizer(name, ps, capturable=capturable, **HP) for ps in (params, clones)]
    gen = torch.Generator().manual_seed(0)
    with use_backend(backend):
        for step in range(4):
            for p, c in zip(params, clones):
                g = torch.randn(p.shape, generator=gen).mul_(loss_scale(step + 5)).to(p.dtype)
                p.grad = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype).copy_(g)  # p's layout
                c.grad = g
            for opt in opts:
                opt.step()
    for k, (p, c) in enumerate(zip(params, clones)):
        assert (p.data_ptr(), p.stride()) == layouts[k], k  # stepped in place, layout kept
        assert p.dtype == c.dtype and torch.equal(p, c), k
        st, sc = opts[0].state[p], opts[1].state[c]
        assert all(st[key].is_contiguous() and torch.equal(st[key], sc[key]) for key in sc), k
    assert torch.equal(base[:, [0, 6, 7]], outside)  # the slice's neighbours untouched
    assert torch.equal(opts[0].layer_stats.gbar, opts[1].layer_stats.gbar)


# 3. Step counters loaded as numbers ------------------------------------------------------------

@pytest.mark.parametrize("step", [3, 3.0, torch.tensor(3), torch.tensor(3, dtype=torch.int32),
                                  torch.tensor([3.0])])
@pytest.mark.parametrize("name", NAMES)
def test_a_loaded_step_may_be_a_number_or_an_integer_tensor(name, step):
    model, opt = _make(name)
    _train(model, opt, range(3))
    saved = _round_trip(opt.state_dict())
    for state in saved["state"].values():
        state["step"] = step  # as torch's optimizers accept
    resumed, opt2 = _make(name, seed=99)
    resumed.load_state_dict(model.state_dict())
    opt2.load_state_dict(saved)
    for state in opt2.state.values():
        assert state["step"].dtype == torch.float64 and state["step"].dim() == 0
        assert float(state["step"]) == 3.0
    _train(model, opt, range(3, 6))
    _train(resumed, opt2, range(3, 6))
    _assert_same_run(model, opt, resumed, opt2)


# 4. Complex parameters -------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_complex_parameters_are_refused(name):
    real = nn.Parameter(torch.randn(4))
    cplx = nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))
    message = (r"parameter 1 \(shape \(3, 2\), torch.complex64\) is complex: "
               "complex parameters are not supported")
    with pytest.raises(ValueError, match=message):
        stratopt_ds.create_optimizer(name, [real, cplx])
    opt = stratopt_ds.create_optimizer(name, [real])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [cplx]})
    assert len(opt.param_groups) == 1  # the refused group was not kept
    # a parameter turned complex after construction is refused in step(), and left as it was
    real.data = torch.randn(4, dtype=torch.complex64)
    real.grad = torch.randn(4, dtype=torch.complex64)
    before = real.detach().clone()
    with pytest.raises(ValueError, match=r"gradient of parameter 0 \(shape \(4,\), torch.complex64\) is"):
        opt.step()
    assert torch.equal(real, before)


# 5. torch.distributed.checkpoint ---------------------------------------------------------------

@pytest.mark.parametrize("options", [None, StateDictOptions(cpu_offload=True)],
                         ids=["default", "cpu_offload"])
@pytest.mark.parametrize("name", NAMES)
def test_dcp_get_set_optimizer_state_dict_round_trip(name, options):
    """get -> (a file) -> fresh model and optimizer -> set: the run goes on bit for bit."""
    model, opt = _make(name)
    _train(model, opt, range(8))
    saved = _round_trip(get_optimizer_state_dict(model, opt, options=options))
    resumed, opt2 = _make(name, seed=99)
    resumed.load_state_dict(model.state_dict())
    set_optimizer_state_dict(resumed, opt2, optim_state_dict=saved, options=options)
    assert "layer_stats" not in opt2.param_groups[0]  # statistics, not a group setting
    _assert_same_run(model, opt, resumed, opt2)
    _train(model, opt, range(8, 14))
    _train(resumed, opt2, range(8, 14))
    _assert_same_run(model, opt, resumed, opt2)


def test_dcp_flattened_state_dict_is_refused_by_name_and_leaves_the_optimizer_as_it_was():
    """flatten_optimizer_state_dict=True rebuilds groups from a fresh optimizer's keys, so the
    layer statistics cannot ride in them: loading says so, and changes nothing."""
    model, opt = _make("stratopt")
    _train(model, opt, range(4))
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    saved = _round_trip(get_optimizer_state_dict(model, opt, options=flat))
    resumed, opt2 = _make("stratopt", seed=99)
    before = copy.deepcopy(opt2.state_dict())
    with pytest.raises(ValueError, match="flatten_optimizer_state_dict=True"):
        set_optimizer_state_dict(resumed, opt2, optim_state_dict=saved, options=flat)
    after = opt2.state_dict()
    assert torch.equal(after["param_groups"][0]["layer_stats"]["gbar"],
                       before["param_groups"][0]["layer_stats"]["gbar"])


@pytest.mark.parametrize("kept", ["groups", "top-level"])
def test_state_dict_keeps_the_statistics_where_dcp_and_older_readers_find_them(kept):
    """Every param_groups entry carries the statistics (DCP keeps those); the top-level key that
    earlier versions wrote and read stays, and a state dict with only one of them loads."""
    model, opt = _make("stratopt")
    _train(model, opt, range(8))
    saved = opt.state_dict()
    stats = opt.layer_stats.state_dict()
    for where in [saved] + saved["param_groups"]:
        assert all(torch.equal(where["layer_stats"][k], v) for k, v in stats.items())
    saved = _round_trip(saved)
    if kept == "groups":  # what DCP hands over
        del saved["layer_stats"]
    else:  # a state dict saved before the statistics moved into the groups
        for group in saved["param_groups"]:
            del group["layer_stats"]
    resumed, opt2 = _make("stratopt", seed=99)
    resumed.load_state_dict(model.state_dict())
    opt2.load_state_dict(saved)
    _train(model, opt, range(8, 12))
    _train(resumed, opt2, range(8, 12))
    _assert_same_run(model, opt, resumed, opt2)
