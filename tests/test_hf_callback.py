"""stratopt_ds.integrations.hf_callback: per-layer optimizer statistics in the HF Trainer's logs.

Short in-process StratTrainer runs (CPU, tiny model, no network): the ``stratopt/...`` keys reach
``log_history`` and the reporting callbacks at every ``logging_steps`` with the optimizer's own
values at those steps; the callback touches no tensor on other steps and reads with one host copy
when it logs; a transformers optimizer gets nothing extra.
"""
from __future__ import annotations

import math
import types

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import TrainerCallback

from stratopt_ds import create_optimizer, models
from stratopt_ds.integrations.hf import StratTrainer, StratTrainingArguments
from stratopt_ds.integrations.hf_callback import (LayerStatsCallback, find_stratopt_optimizer, install_layer_stats,
                                     layer_stats_logs, read_layer_stats, unwrap_stratopt)

SEQ, VOCAB, STEPS, LOG_EVERY = 16, 257, 6, 2
SUMMARY_KEYS = {f"stratopt/{k}" for k in (
    "grad_norm", "layer_norm_min", "layer_norm_median", "layer_norm_max", "alpha_min", "alpha_median",
    "alpha_max", "clipped_layers", "clip_count", "skipped_steps")}
# Tensor methods that copy a value to the host (a device synchronisation on a GPU).
HOST_READS = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"}


class Snapshots(TrainerCallback):
    """Passed as ``callbacks=``, so it sits where the reporting callbacks sit: records the logs it
    is handed and, after every optimizer step, a copy of the optimizer's statistics."""

    def __init__(self):
        self.trainer = None
        self.steps: dict[int, dict[str, torch.Tensor]] = {}
        self.logs: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        opt = self.trainer.built_optimizer
        if hasattr(opt, "last_step"):
            ls, st = opt.last_step, opt.layer_stats
            self.steps[state.global_step] = {
                "norms": ls.norms.clone(), "alpha": ls.alpha.clone(), "clip_coef": ls.clip_coef.clone(),
                "clip_count": st.clip_count.clone(), "skipped_steps": st.skipped_steps.clone(),
                "names": list(opt.layer_map.layout.layer_names)}

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


class TorchCalls(TorchFunctionMode):
    """Records the name of every torch function and Tensor method called inside it."""

    def __init__(self, sink: list[str]):
        super().__init__()
        self.sink = sink

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.sink.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def spy_on_tensor_calls(callback: TrainerCallback, trainer) -> dict[int, list[str]]:
    """Wrap every event of ``callback``: the tensor calls it makes, by the Trainer's global step."""
    calls: dict[int, list[str]] = {}
    for event in [name for name in dir(TrainerCallback) if name.startswith("on_")]:
        method = getattr(callback, event)

        def spied(*args, _method=method, **kwargs):
            sink: list[str] = []
            with TorchCalls(sink):
                result = _method(*args, **kwargs)
            if sink:
                calls.setdefault(trainer.state.global_step, []).extend(sink)
            return result

        setattr(callback, event, spied)
    return calls


def windows(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (SEQ + 1,), generator=gen)
        out.append({"input_ids": ids, "labels": ids})
    return out


def run_trainer(tmp_path, optim: str, optim_args=None, spy: bool = True):
    args = StratTrainingArguments(
        output_dir=str(tmp_path), report_to="none", optim=optim, optim_args=optim_args, max_steps=STEPS,
        logging_steps=LOG_EVERY, per_device_train_batch_size=2, learning_rate=3e-3, save_strategy="no",
        disable_tqdm=True, use_cpu=True, seed=0)
    snaps = Snapshots()
    trainer = StratTrainer(model=models.build_model("tiny", VOCAB, SEQ + 1, seed=0), args=args,
                           train_dataset=windows(STEPS * 2), callbacks=[snaps])
    snaps.trainer = trainer
    calls = spy_on_tensor_calls(trainer.layer_stats_callback, trainer) if spy else None
    trainer.train()
    return trainer, snaps, calls


def train_logs(history: list[dict]) -> dict[int, dict]:
    return {entry["step"]: entry for entry in history if "loss" in entry}


def quantiles(x: torch.Tensor) -> tuple[float, float, float]:
    x = x.double()
    return float(x.min()), float(torch.quantile(x, 0.5)), float(x.max())


@pytest.fixture(scope="module")
def stratopt_run(tmp_path_factory):
    # clip_tau=1: a layer is clipped whenever its norm exceeds its running mean, so clip counts move
    return run_trainer(tmp_path_factory.mktemp("cb"), "stratopt", "clip_tau=1.0")


def test_callback_is_installed_ahead_of_the_reporting_callbacks(stratopt_run):
    trainer, _, _ = stratopt_run
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names.index("LayerStatsCallback") == names.index("DefaultFlowCallback") + 1
    assert names.index("LayerStatsCallback") < names.index("Snapshots")
    assert find_stratopt_optimizer(trainer) is trainer.built_optimizer


def test_logging_steps_record_the_optimizers_own_statistics(stratopt_run):
    trainer, snaps, _ = stratopt_run
    logged = train_logs(trainer.state.log_history)
    assert sorted(logged) == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    names = snaps.steps[STEPS]["names"]
    assert len(names) == 21  # tiny Llama, one layer per tensor: under the per-layer limit (32)
    for step, entry in logged.items():
        ref = snaps.steps[step]  # the statistics right after this step's optimizer step
        norms, alpha = ref["norms"], ref["alpha"]
        expected = {"stratopt/grad_norm": float(norms.norm()),
                    "stratopt/clipped_layers": int((ref["clip_coef"] < 1).sum()),
                    "stratopt/clip_count": int(ref["clip_count"].sum()),
                    "stratopt/skipped_steps": int(ref["skipped_steps"])}
        for key, values in (("layer_norm", norms), ("alpha", alpha)):
            expected.update(zip((f"stratopt/{key}_{s}" for s in ("min", "median", "max")), quantiles(values)))
            expected.update((f"stratopt/{key}/{name}", float(v)) for name, v in zip(names, values))
        got = {k: v for k, v in entry.items() if k.startswith("stratopt/")}
        assert set(got) == set(expected), set(got) ^ set(expected)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-12), (step, key)
        assert type(got["stratopt/clip_count"]) is int and type(got["stratopt/alpha_max"]) is float
    # the run exercises the statistics: layers get clipped, alpha spreads over layers
    assert logged[STEPS]["stratopt/clip_count"] > 0
    assert any(e["stratopt/clipped_layers"] > 0 for e in logged.values())
    assert logged[STEPS]["stratopt/alpha_min"] < logged[STEPS]["stratopt/alpha_max"]
    assert logged[STEPS]["stratopt/skipped_steps"] == 0
    # only training logs get them: not the end-of-training summary
    assert not any(k.startswith("stratopt/") for e in trainer.state.log_history if "loss" not in e for k in e)


def test_reporting_callbacks_receive_the_keys(stratopt_run):
    trainer, snaps, _ = stratopt_run
    reported = [logs for logs in snaps.logs if "loss" in logs]
    assert len(reported) == STEPS // LOG_EVERY
    for logs, entry in zip(reported, train_logs(trainer.state.log_history).values()):
        ours = {k: v for k, v in logs.items() if k.startswith("stratopt/")}
        assert SUMMARY_KEYS <= set(ours)
        assert ours == {k: v for k, v in entry.items() if k.startswith("stratopt/")}


def test_no_tensor_access_on_steps_that_do_not_log(stratopt_run):
    """The callback calls no torch function at all on a non-logging step, and on a logging step
    reads the host exactly once (one .tolist() of one concatenated tensor)."""
    _, _, calls = stratopt_run
    logging_steps = set(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert set(calls) == logging_steps, calls
    for step in logging_steps:
        assert [c for c in calls[step] if c in HOST_READS] == ["tolist"], (step, calls[step])


def test_a_transformers_optimizer_logs_nothing_extra(tmp_path):
    trainer, snaps, calls = run_trainer(tmp_path, "adamw_torch")
    assert type(trainer.optimizer.optimizer) is torch.optim.AdamW  # accelerate's wrapper around it
    assert find_stratopt_optimizer(trainer) is None
    logged = train_logs(trainer.state.log_history)
    assert sorted(logged) == [2, 4, 6]
    assert not [k for e in trainer.state.log_history for k in e if k.startswith("stratopt/")]
    assert not [k for logs in snaps.logs for k in logs if k.startswith("stratopt/")]
    assert calls == {}


# ------------------------------------------------------------------------------------------------
# The pieces, without a Trainer


def test_many_layers_log_only_the_summaries():
    n = 200  # a 1B model with one layer per tensor
    stats = {"names": [f"layer{i}" for i in range(n)], "norms": [float(i + 1) for i in range(n)],
             "alpha": [1.0] * n, "clipped_layers": 3, "clip_count": 17, "skipped_steps": 1}
    logs = layer_stats_logs(stats)
    assert set(logs) == SUMMARY_KEYS
    assert logs["stratopt/layer_norm_median"] == 100.5 and logs["stratopt/layer_norm_max"] == 200.0
    assert logs["stratopt/grad_norm"] == pytest.approx(math.sqrt(sum((i + 1) ** 2 for i in range(n))))
    assert len(layer_stats_logs(stats, per_layer_max=None)) == len(SUMMARY_KEYS) + 2 * n
    assert set(layer_stats_logs(stats, per_layer_max=0)) == SUMMARY_KEYS
    small = {**stats, "names": ["a", "b"], "norms": [3.0, 4.0], "alpha": [0.5, 2.0]}
    assert layer_stats_logs(small, per_layer_max=2)["stratopt/alpha/b"] == 2.0
    with pytest.raises(ValueError, match="per_layer_max=-1"):
        LayerStatsCallback(None, per_layer_max=-1)


def test_a_skipped_step_logs_nan_summaries_and_counts_it():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    opt = create_optimizer("stratopt", model)
    assert read_layer_stats(opt) is None  # nothing before the first step
    model(torch.ones(2, 3)).sum().backward()
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    logs = layer_stats_logs(read_layer_stats(opt))
    assert math.isnan(logs["stratopt/layer_norm_median"]) and math.isnan(logs["stratopt/grad_norm"])
    assert logs["stratopt/alpha_max"] == 1.0 and logs["stratopt/skipped_steps"] == 1


def test_finds_our_optimizer_inside_wrappers():
    opt = create_optimizer("stratopt", torch.nn.Linear(2, 2))
    ns = types.SimpleNamespace
    assert unwrap_stratopt(opt) is opt
    assert unwrap_stratopt(ns(optimizer=ns(optimizer=opt))) is opt  # accelerate -> ZeRO wrapper -> ours
    assert unwrap_stratopt(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)) is None
    assert unwrap_stratopt(None) is None
    # DeepSpeed: the engine's client optimizer first
    engine = ns(basic_optimizer=opt)
    assert find_stratopt_optimizer(ns(model_wrapped=engine, optimizer=ns(optimizer=None))) is opt
    assert find_stratopt_optimizer(ns(model_wrapped=None, optimizer=ns(optimizer=opt))) is opt


def test_only_world_process_zero_logs():
    model = torch.nn.Linear(2, 2)
    opt = create_optimizer("stratopt", model)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    trainer = types.SimpleNamespace(model_wrapped=None, optimizer=opt)
    callback = LayerStatsCallback(trainer)
    for zero in (False, True):
        state = types.SimpleNamespace(is_world_process_zero=zero, log_history=[])
        logs = {"loss": 1.0}
        state.log_history.append({**logs, "step": 1})
        callback.on_log(None, state, None, logs=logs)
        assert ("stratopt/alpha_max" in logs) is zero
        assert ("stratopt/alpha_max" in state.log_history[-1]) is zero


def test_install_puts_it_after_the_default_flow_callback():
    from transformers import DefaultFlowCallback

    handler = types.SimpleNamespace(callbacks=[DefaultFlowCallback(), TrainerCallback(), TrainerCallback()])
    callback = install_layer_stats(types.SimpleNamespace(callback_handler=handler), per_layer_max=5)
    assert handler.callbacks[1] is callback and callback.per_layer_max == 5
