"""Reference optimizers against torch.optim.AdamW and the spec-written fp64 implementation."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import stratopt_ds
from stratopt_ds.optim import named_param_groups

from helpers import TinyNet, compute_grads, loss_scale, max_rel_err
from spec_reference import SpecOptimizer


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyNet()


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_available_optimizers_lists_every_family_member():
    names = stratopt_ds.available_optimizers()
    assert {"adamw", "ademamix", "stratopt", "stratopt-noscale", "stratopt-nomix",
            "stratopt-noclip"} <= set(names)
    assert len([n for n in names if n.startswith("la-")]) == 12
    assert "la-sqrt-b1depth-cliplayer" in names


def test_torch_optim_aliases_resolve_to_our_classes():
    assert torch.optim.StratOpt.preset == "stratopt"
    assert torch.optim.LASqrtB1DepthClipLayer.preset == "la-sqrt-b1depth-cliplayer"
    assert torch.optim.AdamW is not stratopt_ds.LayerwiseAdamW  # torch's class untouched


def test_adamw_matches_torch_adamw_50_steps():
    ours_model, torch_model = _model(1), _model(1)
    ours = stratopt_ds.create_optimizer("adamw", ours_model, lr=1e-2)
    ref = torch.optim.AdamW(named_param_groups(torch_model, 0.1), lr=1e-2, weight_decay=0.1)
    for step in range(50):
        for model, opt in ((ours_model, ours), (torch_model, ref)):
            compute_grads(model, step)
            opt.step()
    assert max_rel_err(_params(ours_model), _params(torch_model)) <= 1e-6


def _wd_of(model):
    return {k: (0.1 if v.ndim >= 2 else 0.0) for k, v in model.named_parameters()}


def _run_against_spec(name, steps=30, **hp):
    model = _model(2)
    spec = SpecOptimizer(_params(model), _wd_of(model), name,
                         **{k: v for k, v in hp.items() if k in ("lr", "t_alpha", "t_beta3", "granularity")})
    opt = stratopt_ds.create_optimizer(name, model, **hp)
    for step in range(steps):
        compute_grads(model, step, loss_scale(step))
        spec.step({k: v.grad for k, v in model.named_parameters()})
        opt.step()
    return model, opt, spec


@pytest.mark.parametrize("name,hp", [
    ("ademamix", dict(lr=1e-2, t_alpha=12, t_beta3=12)),
    ("stratopt", dict(lr=1e-2, t_alpha=12, t_beta3=12)),
    ("stratopt", dict(lr=1e-2, granularity="block")),
    ("la-sqrt-b1depth-cliplayer", dict(lr=1e-2)),
    ("la-inverse-b1const-clipglobal", dict(lr=1e-2)),
    ("la-linear-b1depth-clipglobal", dict(lr=1e-2, granularity="block")),
])
def test_matches_fp64_spec_implementation(name, hp):
    model, opt, spec = _run_against_spec(name, **hp)
    assert max_rel_err(_params(model), spec.p) <= 1e-5
    if spec.hp["clip"] == "layer":
        assert spec.clip_events > 0 and sum(opt.layer_clip_counts().values()) == spec.clip_events
    if spec.hp["scaling"] != "none":
        assert spec.clamp_events > 0, "the alpha clamp never bound: the test would not see it"
    # The layer EMA agrees too.
    ours = dict(zip(opt.layer_map.layout.layer_names, opt.layer_stats.gbar.tolist()))
    assert set(ours) == set(spec.gbar)
    for layer, value in spec.gbar.items():
        assert ours[layer] == pytest.approx(value, rel=1e-5), layer


def test_b1_depth_uses_block_depth():
    opt = stratopt_ds.create_optimizer("la-sqrt-b1depth-cliplayer", _model())
    depth = dict(zip(opt.layer_map.layout.layer_names, opt.layer_map.layout.depths))
    assert depth["blocks.0.lin.weight"] == 0.0
    assert depth["blocks.1.norm.bias"] == 0.5
    assert depth["blocks.2.lin.bias"] == 1.0
    assert depth["embed.weight"] == 0.5 and depth["head.weight"] == 0.5


def _run_pair(make_a, make_b, steps=30):
    ma, mb = _model(3), _model(3)
    oa, ob = make_a(ma), make_b(mb)
    for step in range(steps):
        for model, opt in ((ma, oa), (mb, ob)):
            compute_grads(model, step)
            opt.step()
    return _params(ma), _params(mb)


def test_noscale_without_mix_and_clip_is_adamw():
    a, b = _run_pair(
        lambda m: stratopt_ds.create_optimizer("stratopt-noscale", m, lr=1e-2, mix_alpha=0.0, clip="none"),
        lambda m: torch.optim.AdamW(named_param_groups(m, 0.1), lr=1e-2, weight_decay=0.1))
    assert max_rel_err(a, b) <= 1e-6


def test_noscale_without_clip_is_ademamix():
    a, b = _run_pair(
        lambda m: stratopt_ds.create_optimizer("stratopt-noscale", m, lr=1e-2, mix_alpha=8.0,
                                               clip="none", t_alpha=10, t_beta3=10),
        lambda m: stratopt_ds.create_optimizer("ademamix", m, lr=1e-2, t_alpha=10, t_beta3=10))
    assert max_rel_err(a, b) == 0.0


def test_plain_params_and_groups_are_taken_as_given():
    model = _model()
    params = list(model.parameters())
    opt = stratopt_ds.create_optimizer("stratopt", params)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.1
    assert opt.layer_map.num_layers == len(params)
    groups = [{"params": params[:2], "lr": 1e-3}, {"params": params[2:]}]
    opt = stratopt_ds.create_optimizer("adamw", groups, lr=5e-4)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 5e-4]


def test_model_groups_decay_and_skip_frozen():
    model = _model()
    model.blocks[0].lin.weight.requires_grad_(False)
    opt = stratopt_ds.create_optimizer("stratopt", model, weight_decay=0.05)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "blocks.0.lin.weight" not in decay["param_names"] + no_decay["param_names"]
    assert all(n.endswith(("bias", "norm.weight")) for n in no_decay["param_names"])
    assert set(decay["param_names"]) == {"embed.weight", "blocks.1.lin.weight",
                                          "blocks.2.lin.weight", "head.weight"}


def _clone_state(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("name", stratopt_ds.available_optimizers())
def test_state_dict_round_trip_is_bit_identical(name):
    model = _model(4)
    opt = stratopt_ds.create_optimizer(name, model, lr=1e-2, t_alpha=8, t_beta3=8)
    for step in range(6):
        compute_grads(model, step, loss_scale(step + 5))
        opt.step()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), _clone_state(opt.state_dict())
    compute_grads(model, 6)
    opt.step()
    resumed = _model(99)
    resumed.load_state_dict(saved_model)
    opt2 = stratopt_ds.create_optimizer(name, resumed, lr=1e-2, t_alpha=8, t_beta3=8)
    opt2.load_state_dict(saved_opt)
    compute_grads(resumed, 6)
    opt2.step()
    for (k, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), k
    assert torch.equal(opt.layer_stats.gbar, opt2.layer_stats.gbar)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_skips_the_step_and_counts_it(bad):
    model = _model(5)
    opt = stratopt_ds.create_optimizer("stratopt", model, lr=1e-2)
    for step in range(3):
        compute_grads(model, step)
        opt.step()
    before = _params(model)
    state_before = _clone_state(opt.state_dict())
    compute_grads(model, 3)
    model.blocks[1].lin.weight.grad[0, 0] = bad
    opt.step()
    assert opt.skipped_steps == 1
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), k
    after = opt.state_dict()
    for idx, st in state_before["state"].items():
        for key, value in st.items():
            assert torch.equal(after["state"][idx][key], value), (idx, key)
    assert torch.equal(after["layer_stats"]["gbar"], state_before["layer_stats"]["gbar"])
    compute_grads(model, 4)
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.isfinite(v).all() for v in model.parameters())
    assert not torch.equal(model.blocks[1].lin.weight, before["blocks.1.lin.weight"])


def test_first_step_skipped_leaves_no_nan():
    model = _model(6)
    opt = stratopt_ds.create_optimizer("stratopt", model)
    compute_grads(model, 0)
    model.head.weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    compute_grads(model, 1)
    opt.step()
    assert all(torch.isfinite(v).all() for v in model.parameters())
    assert all(float(s["step"]) == 1.0 for s in opt.state.values())


def test_bf16_parameters_keep_fp32_states():
    model = _model(7).to(torch.bfloat16)
    opt = stratopt_ds.create_optimizer("stratopt", model)
    compute_grads(model, 0)
    opt.step()
    state = opt.state[model.head.weight]
    assert state["exp_avg"].dtype == torch.float32 and model.head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_model_resumes_bit_identically(backend, dtype, monkeypatch):
    """torch's load_state_dict would cast the moments to the parameters' dtype (the kernels then
    refuse them, and a bf16 model could not resume at all); they come back float32, exactly as
    saved, and the resumed run steps on bit for bit like the uninterrupted one."""
    monkeypatch.setenv("STRATOPT_OPS", backend)

    def make(seed):
        model = _model(seed).to(dtype)
        return model, stratopt_ds.create_optimizer("stratopt", model, lr=1e-2, t_alpha=8, t_beta3=8)

    model, opt = make(11)
    for step in range(4):
        compute_grads(model, step)
        opt.step()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), _clone_state(opt.state_dict())
    for step in range(4, 7):
        compute_grads(model, step)
        opt.step()
    resumed, opt2 = make(99)
    resumed.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    for p in resumed.parameters():
        st = opt2.state[p]
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == st["exp_avg_slow"].dtype == torch.float32
        assert st["step"].dtype == torch.float64
    for step in range(4, 7):
        compute_grads(resumed, step)
        opt2.step()
    for (k, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert a.dtype == dtype and torch.equal(a, b), k
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(a[key], b[key]) for key in a), a.keys()


BAD_INPUT = [
    (dict(lr=-1.0), "lr=-1.0"),
    (dict(lr=float("nan")), "lr=nan"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\]=1.0"),
    (dict(betas=(0.9,)), "betas=\\(0.9,\\)"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\]=-0.1"),
    (dict(eps=0.0), "eps=0.0"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1"),
    (dict(beta3=1.5), "beta3=1.5"),
    (dict(mix_alpha=-1), "mix_alpha=-1"),
    (dict(t_alpha=-1), "t_alpha=-1"),
    (dict(t_beta3=2.5), "t_beta3=2.5"),
    (dict(scaling="cubic"), "scaling='cubic'.*'linear'"),
    (dict(beta1_mode="deep"), "beta1_mode='deep'.*'depth'"),
    (dict(clip="both"), "clip='both'.*'global'"),
    (dict(clip_threshold=0.0), "clip_threshold=0.0"),
    (dict(clip_tau=-2.0), "clip_tau=-2.0"),
    (dict(norm_beta=1.0), "norm_beta=1.0"),
    (dict(norm_eps=0.0), "norm_eps=0.0"),
    (dict(alpha_min=0.0), "alpha_min=0.0"),
    (dict(alpha_min=5.0, alpha_max=2.0), "alpha_min=5.0.*alpha_max=2.0"),
    (dict(granularity="row"), "granularity='row'.*'block'"),
    (dict(momentum=0.9), "unknown hyperparameter 'momentum'"),
]


@pytest.mark.parametrize("kwargs,message", BAD_INPUT)
def test_bad_hyperparameters_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        stratopt_ds.create_optimizer("stratopt", _model(), **kwargs)


def test_unknown_optimizer_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown optimizer 'adam'.*stratopt"):
        stratopt_ds.create_optimizer("adam", _model())


def test_block_granularity_needs_names():
    with pytest.raises(ValueError, match="granularity='block' needs parameter names"):
        stratopt_ds.create_optimizer("stratopt", list(_model().parameters()), granularity="block")


def test_layer_keyword_in_a_group_is_refused():
    params = list(_model().parameters())
    with pytest.raises(ValueError, match="'clip' is an optimizer-wide setting"):
        stratopt_ds.create_optimizer("stratopt", [{"params": params, "clip": "none"}])


def test_bad_group_value_is_refused():
    params = list(_model().parameters())
    with pytest.raises(ValueError, match="lr=-0.5"):
        stratopt_ds.create_optimizer("stratopt", [{"params": params[:1]}, {"params": params[1:], "lr": -0.5}])


def test_load_state_dict_from_another_optimizer_is_refused():
    model = _model()
    torch_opt = torch.optim.AdamW(model.parameters())
    opt = stratopt_ds.create_optimizer("stratopt", list(model.parameters()))
    with pytest.raises(ValueError, match="no 'layer_stats'"):
        opt.load_state_dict(torch_opt.state_dict())


def test_logged_statistics_match_the_optimizer_state():
    """metrics.optimizer_stats (one host copy per step) against the optimizer's own tensors,
    after clipping steps and a skipped (NaN) step."""
    from stratopt_ds.metrics import optimizer_stats

    model = _model()
    opt = stratopt_ds.create_optimizer("stratopt", model, lr=1e-2)
    for step in range(1, 9):
        compute_grads(model, step, loss_scale(step))
        if step == 5:
            next(model.parameters()).grad[0] = float("nan")
        opt.step()
        s = optimizer_stats(opt)
        norms, alpha = opt.last_step.norms.double(), opt.last_step.alpha.double()
        if step == 5:
            assert s["grad_norm"] is None and None in s["layer_norms"]
        else:
            assert s["grad_norm"] == pytest.approx(float(norms.norm()), rel=1e-12)
            assert s["layer_norms"] == pytest.approx(norms.tolist(), rel=1e-12)
        assert (s["alpha_min"], s["alpha_max"]) == (float(alpha.min()), float(alpha.max()))
        assert s["layer_alpha"] == alpha.tolist()
        assert s["clip_events"] == sum(opt.layer_clip_counts().values())
        assert s["skipped_steps"] == opt.skipped_steps == (1 if step >= 5 else 0)
    assert s["clip_events"] > 0


def test_number_layers_globally_renumbers_a_stage_before_its_first_step_only():
    """A pipeline stage's optimizer takes the whole pipeline's numbering: its tensors keep their
    layers by name, the others exist (L of the whole model, depths of the whole model)."""
    stage = TinyNet()
    whole = [f"x.{n}" for n in ("embed.weight",)] + [n for n, _ in TinyNet().named_parameters()]
    opt = stratopt_ds.create_optimizer("la-sqrt-b1depth-cliplayer", stage, granularity="block")
    opt.number_layers_globally(whole)
    layout = opt.base_layer_map.layout
    assert layout.layer_names[0] == "x.embed.weight" and opt.layer_stats.num_layers == layout.num_layers
    for p in stage.parameters():
        (frag,) = opt.base_layer_map.fragments_of(p)
        assert frag.length == p.numel() and layout.layer_names[frag.layer] != "x.embed.weight"
    compute_grads(stage, 0)
    opt.step()
    assert opt.layer_stats.count.tolist() == [1.0] * layout.num_layers  # the ids every rank shares
    assert float(opt.last_step.norms[0]) == 0 and float(opt.last_step.norms[1:].min()) > 0
    with pytest.raises(ValueError, match="after the first step"):
        opt.number_layers_globally(whole)
    fresh = stratopt_ds.create_optimizer("stratopt", TinyNet())
    with pytest.raises(ValueError, match="lack this optimizer's"):
        fresh.number_layers_globally(whole[:3])
