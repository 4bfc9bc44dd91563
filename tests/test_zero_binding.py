"""Unit tests of the ZeRO binding's rules that need no process group: the loss scales of an
fp16 step (against DeepSpeed's own DynamicLossScaler) and the pipeline's layer names."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from deepspeed.runtime.fp16 import loss_scaler as ds_loss_scaler

from stratopt_ds.zero import binding
from stratopt_ds.zero.partition_map import UnsupportedZeroSetting


def test_loss_scales_follow_deepspeeds_dynamic_scaler_through_overflows_and_growth(monkeypatch):
    """DeepSpeed updates the scale before it unscales: on a clean step where the scale grows,
    the gradients were made with the old scale and are divided by the new one. Driven through
    DeepSpeed's DynamicLossScaler (window 3, hysteresis 2, overflows and clean runs), the scale
    each step was made with is the one observed before the update."""
    monkeypatch.setattr(ds_loss_scaler.dist, "get_rank", lambda *a, **k: 0)
    scaler = ds_loss_scaler.DynamicLossScaler(init_scale=2.0 ** 10, scale_window=3, min_scale=1,
                                              delayed_shift=2, consecutive_hysteresis=False,
                                              raise_error_at_min_scale=False, dtype=torch.float16)
    wrapper = SimpleNamespace(loss_scaler=scaler, custom_loss_scaler=False)
    pattern = [False] * 7 + [True] + [False] * 4 + [True, True] + [False] * 8
    grew = 0
    for overflow in pattern:
        made_with = scaler.cur_scale
        scaler.update_scale(overflow)
        if overflow:
            continue  # DeepSpeed skips the step: no inner step() asks
        wrapper.loss_scale = scaler.cur_scale
        assert binding._loss_scales(wrapper) == (made_with, scaler.cur_scale)
        grew += scaler.cur_scale > made_with
    assert grew >= 3  # the rule was exercised where it matters
    static = SimpleNamespace(loss_scale=128.0, loss_scaler=ds_loss_scaler.LossScaler(128.0))
    assert binding._loss_scales(static) == (128.0, 128.0)
    assert binding._loss_scales(SimpleNamespace()) == (1.0, 1.0)  # bf16 / fp32 wrappers


def test_combined_scale_is_loss_scale_times_deepspeeds_clip_coefficient():
    """DeepSpeed's unscale_and_clip_grads: combined = scale x max(1, (norm*scale_before/scale +
    1e-6) / clip), where _global_grad_norm is the scaled norm over the scale before."""
    scaler = SimpleNamespace(dynamic=False)
    wrapper = SimpleNamespace(loss_scale=512.0, loss_scaler=scaler, clip_grad=0.5, _global_grad_norm=2.0)
    zb = object.__new__(binding.ZeroBinding)
    zb.wrapper = wrapper
    expected = 512.0 * (2.0 + 1e-6) / 0.5
    assert float(zb._combined_scale(torch.device("cpu"))) == pytest.approx(expected, rel=1e-12)
    wrapper._global_grad_norm = 0.1  # under the threshold: the loss scale alone
    assert float(zb._combined_scale(torch.device("cpu"))) == 512.0
    wrapper.clip_grad = 0.0
    assert float(zb._combined_scale(torch.device("cpu"))) == 512.0


def test_pipeline_names_are_gathered_stage_by_stage_and_tied_layers_refused(monkeypatch):
    """Every rank gets the names of stage 0, then stage 1, ... from its pipe group (one rank of
    each stage); a name on two stages (a TiedLayerSpec) is refused."""
    pipe_group = object()

    def gathered(per_rank):
        def all_gather_object(out, obj, group=None):
            assert group is pipe_group and len(out) == len(per_rank)  # the pipe group only
            out[:] = per_rank
        monkeypatch.setattr(binding.dist, "all_gather_object", all_gather_object)
        return SimpleNamespace(get_stage_id=lambda: 0, get_pipe_parallel_world_size=lambda: len(per_rank),
                               get_pipe_parallel_group=lambda: pipe_group)

    opt = SimpleNamespace(param_name={1: "layers.0.w"})
    grid = gathered([(1, ["layers.2.w", "layers.3.w"]), (0, ["layers.0.w", "layers.1.w"])])
    assert binding.model_names(opt, grid) == ["layers.0.w", "layers.1.w", "layers.2.w", "layers.3.w"]
    grid = gathered([(0, ["layers.0.w", "tied_modules.embed.weight"]), (1, ["layers.2.w", "tied_modules.embed.weight"])])
    with pytest.raises(UnsupportedZeroSetting, match=r"TiedLayerSpec: \['tied_modules.embed.weight'\]"):
        binding.model_names(opt, grid)
