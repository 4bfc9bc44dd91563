"""Bad optimizer input (issue 15): a parameter group with an unknown key or mismatched
``param_names`` is refused when added, naming the group, the key and what is allowed; a group
value made bad after construction (``lr = nan`` from a scheduler or a user) is refused at
``step()`` with the weights and the state untouched, without a host-device sync; the keys that
torch's schedulers, torch optimizers and DeepSpeed put into groups still pass."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import stratopt_ds
from stratopt_ds.optim import LayerwiseAdam, named_param_groups

from helpers import TinyNet, compute_grads


def model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def snapshot(net: nn.Module, opt: LayerwiseAdam) -> dict:
    """Weights, per-parameter states and layer statistics, copied."""
    states = {name: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
              for name, p in net.named_parameters()}
    return {"weights": {k: v.detach().clone() for k, v in net.named_parameters()},
            "states": states, "stats": opt.layer_stats.state_dict()}


def assert_same(a: dict, b: dict) -> None:
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key
        assert a["states"][key].keys() == b["states"][key].keys()
        for k in a["states"][key]:
            assert torch.equal(a["states"][key][k], b["states"][key][k]), (key, k)
    for k in a["stats"]:
        assert torch.equal(a["stats"][k], b["stats"][k]), k


# ------------------------------------------------------------------------------------------------
# Unknown group keys: refused when the group is added, naming the key and the allowed keys


@pytest.mark.parametrize("key, value, words", [
    ("wieght_decay", 0.1, ["unknown key 'wieght_decay'", "did you mean 'weight_decay'?"]),
    ("learning_rate", 1e-3, ["unknown key 'learning_rate'"]),
    ("beta", (0.9, 0.99), ["unknown key 'beta'", "did you mean 'betas'?"]),
    ("momentum", 0.9, ["unknown key 'momentum'"]),
    ("weight_decay_rate", 0.1, ["unknown key 'weight_decay_rate'", "did you mean 'weight_decay'?"]),
    ("maximize", True, ["maximize=True is not supported", "allowed here: False"]),
    ("amsgrad", True, ["amsgrad=True is not supported"]),
    ("differentiable", True, ["differentiable=True is not supported"]),
    ("decoupled_weight_decay", False, ["decoupled_weight_decay=False", "allowed here: True"]),
    ("foreach", "yes", ["foreach='yes' is not supported", "None or False or True"]),
])
def test_an_unknown_or_unsupported_group_key_is_refused(key, value, words):
    net = model()
    groups = named_param_groups(net, 0.1)
    groups[1][key] = value
    with pytest.raises(ValueError) as exc:
        stratopt_ds.create_optimizer("stratopt", groups)
    message = str(exc.value)
    assert message.startswith("parameter group 1: ")
    for word in words:
        assert word in message, (word, message)
    if "unknown key" in message:
        assert "allowed: params, param_names, lr, betas, eps, weight_decay" in message


def test_a_group_added_later_with_an_unknown_key_leaves_the_optimizer_as_it_was():
    net = model()
    opt = stratopt_ds.create_optimizer("adamw", list(net.blocks.parameters()))
    extra = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="parameter group 1: unknown key 'lr_mult'"):
        opt.add_param_group({"params": [extra], "lr_mult": 2.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [extra], "lr": 1e-3})  # the same group, spelled right
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("extra", [
    {"initial_lr": 1e-3},                                 # set by hand to resume a scheduler
    {"name": "decay", "moe": False},                      # DeepSpeed's MoE groups
    {"foreach": True, "fused": None, "capturable": False, "differentiable": False,
     "maximize": False, "amsgrad": False, "decoupled_weight_decay": True},
    {"max_lr": 1e-2, "min_lr": 1e-5, "base_momentum": 0.85, "max_momentum": 0.95, "swa_lr": 1e-3},
])
def test_keys_others_put_into_groups_are_accepted(extra):
    net = model()
    groups = [{**g, **extra} for g in named_param_groups(net, 0.1)]
    opt = stratopt_ds.create_optimizer("stratopt", groups)
    compute_grads(net, 0)
    opt.step()
    assert all(g[k] == v for g in opt.param_groups for k, v in extra.items())


def test_groups_of_a_torch_adamw_are_accepted_as_they_are():
    net = model()
    torch_groups = torch.optim.AdamW(named_param_groups(net, 0.1), lr=1e-3).param_groups
    opt = LayerwiseAdam([dict(g) for g in torch_groups])
    compute_grads(net, 0)
    opt.step()
    assert opt.param_groups[0]["lr"] == 1e-3


def make_scheduler(kind: str, opt):
    sched = torch.optim.lr_scheduler
    if kind == "lambda":
        return sched.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    if kind == "onecycle":
        return sched.OneCycleLR(opt, max_lr=1e-2, total_steps=20)
    if kind == "cyclic":
        return sched.CyclicLR(opt, base_lr=1e-4, max_lr=1e-2, step_size_up=3)
    if kind == "swa":
        return torch.optim.swa_utils.SWALR(opt, swa_lr=1e-3, anneal_epochs=2)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["lambda", "onecycle", "cyclic", "swa"])
def test_schedulers_that_add_group_keys_still_work(kind):
    """Their keys (initial_lr, max_lr, base_momentum, swa_lr, ...) pass: stepping, a state dict
    round trip, a copy, and a group added afterwards."""
    net = model()
    opt = stratopt_ds.create_optimizer("stratopt", net, lr=1e-3)
    scheduler = make_scheduler(kind, opt)
    for step in range(4):
        compute_grads(net, step)
        opt.step()
        scheduler.step()
    clone = copy.deepcopy(opt)
    clone.load_state_dict(opt.state_dict())
    compute_grads(net, 5)
    clone.step()
    fresh = stratopt_ds.create_optimizer("stratopt", [dict(g) for g in opt.param_groups])
    assert len(fresh.param_groups) == 2


# ------------------------------------------------------------------------------------------------
# param_names that do not pair up with params


@pytest.mark.parametrize("names, words", [
    (lambda ns: ns[:-1], ["has 3 names for 4 parameters"]),
    (lambda ns: ns + ["extra"], ["has 5 names for 4 parameters"]),
    (lambda ns: [], ["has 0 names for 4 parameters"]),
    (lambda ns: [1, 2, 3, 4], ["'param_names' must be a list of strings"]),
    (lambda ns: "abcd", ["'param_names' must be a list of strings", "got str"]),
])
def test_param_names_that_do_not_pair_with_params_are_refused(names, words):
    net = model()
    groups = named_param_groups(net, 0.1)
    assert len(groups[1]["params"]) != len(groups[0]["params"])  # the index matters
    groups[0]["param_names"] = names(groups[0]["param_names"][:4])
    groups[0]["params"] = groups[0]["params"][:4]
    with pytest.raises(ValueError) as exc:
        stratopt_ds.create_optimizer("adamw", groups)
    assert str(exc.value).startswith("parameter group 0: ")
    for word in words:
        assert word in str(exc.value), str(exc.value)


# ------------------------------------------------------------------------------------------------
# Values made bad after construction: refused at step(), nothing changed


@pytest.mark.parametrize("group", [0, 1])
@pytest.mark.parametrize("key, value, words", [
    ("lr", float("nan"), ["invalid lr=nan", "[0.0, inf)"]),
    ("lr", float("inf"), ["invalid lr=inf"]),
    ("lr", -1e-3, ["invalid lr=-0.001"]),
    ("lr", "1e-3", ["invalid lr='1e-3'"]),
    ("lr", None, ["invalid lr=None"]),
    ("weight_decay", float("nan"), ["invalid weight_decay=nan"]),
    ("eps", 0.0, ["invalid eps=0.0"]),
    ("betas", (1.0, 0.999), ["invalid betas[0]=1.0"]),
])
def test_a_bad_group_value_set_after_construction_is_refused_at_step(group, key, value, words):
    net = model()
    opt = stratopt_ds.create_optimizer("stratopt", net, lr=1e-3)
    for step in range(3):
        compute_grads(net, step)
        opt.step()
    before = snapshot(net, opt)
    opt.param_groups[group][key] = value
    compute_grads(net, 3)
    with pytest.raises(ValueError) as exc:
        opt.step()
    message = str(exc.value)
    assert message.startswith(f"param_groups[{group}]: ") and "refused at step()" in message
    for word in words:
        assert word in message, (word, message)
    assert_same(before, snapshot(net, opt))
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_a_closure_step_with_a_nan_lr_is_refused_too():
    net = model()
    opt = stratopt_ds.create_optimizer("adamw", net)
    compute_grads(net, 0)
    opt.step()
    before = snapshot(net, opt)
    opt.param_groups[0]["lr"] = float("nan")

    def closure():
        compute_grads(net, 1)
        return 0.0

    with pytest.raises(ValueError, match=r"param_groups\[0\]: invalid lr=nan"):
        opt.step(closure)
    assert_same(before, snapshot(net, opt))


def test_a_nan_lr_from_a_loaded_state_dict_is_refused_at_step():
    net = model()
    opt = stratopt_ds.create_optimizer("adamw", net)
    compute_grads(net, 0)
    opt.step()
    saved = opt.state_dict()
    saved["param_groups"][1]["lr"] = float("nan")
    opt.load_state_dict(saved)
    before = snapshot(net, opt)
    compute_grads(net, 1)
    with pytest.raises(ValueError, match=r"param_groups\[1\]: invalid lr=nan"):
        opt.step()
    assert_same(before, snapshot(net, opt))


def test_a_scheduler_writing_numpy_floats_keeps_working():
    """A scheduler may write np.float32 (NumPy 2 keeps that type for np.float32 * float)."""
    np = pytest.importorskip("numpy")
    net = model()
    opt = stratopt_ds.create_optimizer("adamw", net)
    opt.param_groups[0]["lr"] = np.float32(1e-3)
    compute_grads(net, 0)
    opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1e-3])
def test_a_bad_tensor_lr_skips_the_step_on_the_device(bad):
    """A tensor lr is never read on the host: a bad value skips the group's step (weights, states
    and step counters untouched) and counts in skipped_steps; a good value steps again."""
    net = model()
    lr = torch.tensor(1e-3, dtype=torch.float64)
    opt = stratopt_ds.create_optimizer("adamw", [{"params": list(net.parameters()), "lr": lr}])
    compute_grads(net, 0)
    opt.step()
    before = snapshot(net, opt)
    lr.fill_(bad)
    compute_grads(net, 1)
    opt.step()
    after = snapshot(net, opt)
    assert opt.skipped_steps == 1
    assert all(torch.equal(before["weights"][k], after["weights"][k]) for k in before["weights"])
    assert all(torch.equal(before["states"][k][s], after["states"][k][s])
               for k in before["states"] for s in before["states"][k])
    lr.fill_(1e-3)
    opt.step()
    assert opt.skipped_steps == 1
    assert not torch.equal(before["weights"]["head.weight"], net.head.weight)


@pytest.mark.parametrize("lr", [1e-3, torch.tensor(1e-3, dtype=torch.float64)])
def test_the_step_reads_no_tensor_on_the_host(lr, monkeypatch):
    """The checks add no host-device sync: no .item() or .tolist() of any tensor in a step."""
    net = model()
    opt = stratopt_ds.create_optimizer("stratopt", [{"params": list(net.parameters()), "lr": lr}],
                                       clip="layer")
    compute_grads(net, 0)
    opt.step()

    def sync(*args, **kwargs):
        raise AssertionError("a host-device sync in step()")

    monkeypatch.setattr(torch.Tensor, "item", sync)
    monkeypatch.setattr(torch.Tensor, "tolist", sync)
    for step in range(1, 3):
        compute_grads(net, step)
        opt.step()
