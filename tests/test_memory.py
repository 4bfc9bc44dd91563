"""The memory planner (stratopt_ds.memory) against DeepSpeed's own model-state estimators."""
import subprocess
import sys

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from stratopt_ds import available_optimizers, memory, models
from stratopt_ds.optim import preset_defaults
from helpers import assert_usage_error

SHAPES = {name: (models.count_parameters(memory.preset_shape(name)),
                 memory.largest_layer_params(memory.preset_shape(name))) for name in ("134m", "1b", "7b")}
CLUSTERS = [(1, 1), (1, 4), (1, 8), (2, 8), (8, 8)]


def close(ours, theirs):  # DeepSpeed truncates to int bytes
    return abs(ours - theirs) <= 1


@pytest.mark.parametrize("factor", [1.5, 1.0])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("nodes,gpus", CLUSTERS)
@pytest.mark.parametrize("name", SHAPES)
def test_adamw_zero2_matches_deepspeed(name, nodes, gpus, offload, factor):
    total, largest = SHAPES[name]
    ours = memory.plan(total, largest, nodes, gpus, 2, offload, "adamw", factor)
    cpu, gpu = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=offload,
                                                     additional_buffer_factor=factor)
    assert close(ours.gpu, gpu)
    if nodes == 1 or not offload:
        assert close(ours.cpu_per_node, cpu)
    else:  # documented: DeepSpeed neither divides by nodes nor takes the build peak per node
        assert close(ours.cpu_per_node, total * max(4 * gpus, 16 / nodes) * factor)
        assert ours.cpu_per_node < cpu


@pytest.mark.parametrize("factor", [1.5, 1.0])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("nodes,gpus", CLUSTERS)
@pytest.mark.parametrize("name", SHAPES)
def test_adamw_zero3_matches_deepspeed(name, nodes, gpus, offload, factor):
    total, largest = SHAPES[name]
    ours = memory.plan(total, largest, nodes, gpus, 3, offload, "adamw", factor)
    cpu, gpu, layer = estimate_zero3_model_states_mem_needs(
        total, largest, gpus, nodes, cpu_offload=offload, cpu_offload_params=False, zero_init=True,
        additional_buffer_factor=factor)
    assert ours.layer == layer
    assert close(ours.gpu, gpu)
    if not offload or ours.cpu_states >= ours.cpu_build:
        assert close(ours.cpu_per_node, cpu)
    else:  # documented: a small model on many nodes, where building one layer per rank dominates
        assert close(ours.cpu_per_node, 4 * largest * gpus * factor) and ours.cpu_per_node > cpu


@pytest.mark.parametrize("nodes,gpus", CLUSTERS)
def test_stratopt_keeps_exactly_one_more_fp32_state_than_adamw(nodes, gpus):
    total, largest = SHAPES["7b"]
    pairs = zip(memory.plans(total, largest, nodes, gpus, "adamw"),
                memory.plans(total, largest, nodes, gpus, "stratopt"))
    for adamw, strat in pairs:
        part = 1 if adamw.stage == 0 else nodes * gpus
        extra = 4 * total / part
        assert strat.states - adamw.states == pytest.approx(extra)
        assert strat.gpu - adamw.gpu == pytest.approx(0 if adamw.offload else extra)
        assert strat.cpu_states - adamw.cpu_states == pytest.approx(gpus * extra if adamw.offload else 0)
        for field in ("params", "grads16", "grads32", "master", "layer", "cpu_build"):
            assert getattr(strat, field) == getattr(adamw, field)


def test_state_bytes_follow_mix_alpha():
    for name in available_optimizers():
        assert memory.state_bytes(name) == (12 if preset_defaults(name)["mix_alpha"] > 0 else 8), name
    assert memory.state_bytes("stratopt") == 12 and memory.state_bytes("stratopt-nomix") == 8


def test_shapes_agree_with_deepspeed_on_a_built_model_and_llama_7b():
    from deepspeed.runtime.zero.stage3 import model_to_params

    model = models.build_model("tiny")  # the only preset built here
    assert model_to_params(model) == (models.count_parameters(memory.preset_shape("tiny")),
                                      memory.largest_layer_params(memory.preset_shape("tiny")))
    assert models.count_parameters(models.llama_config("7b")) == SHAPES["7b"][0] == 6_738_415_616
    assert SHAPES["7b"][1] == 32000 * 4096
    assert abs(models.count_parameters(memory.preset_shape("3b")) / models.NOMINAL_PARAMS["3b"] - 1) < 0.02


def test_stage_zero_has_no_offload_and_counts_are_checked():
    with pytest.raises(ValueError, match="stage 1, 2 or 3"):
        memory.plan(10, 1, 1, 1, 0, offload=True)
    with pytest.raises(ValueError, match="stage must be"):
        memory.plan(10, 1, 1, 1, 4)
    with pytest.raises(ValueError, match=">= 1"):
        memory.plan(10, 1, 0, 8, 2)


def test_cli_prints_every_stage_for_7b_on_64_gpus():
    proc = subprocess.run([sys.executable, "-m", "stratopt_ds.memory", "--preset", "7b", "--nodes", "8",
                           "--gpus-per-node", "8"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out, layouts = proc.stdout.split("With tensor")
    assert "6.74B parameters" in out and "64 GPUs" in out and "12 B/param" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"], ["3"])]
    assert [(r[0], r[1]) for r in rows] == [("0", "-"), ("1", "-"), ("2", "-"), ("3", "-"),
                                            ("1", "cpu"), ("2", "cpu"), ("3", "cpu")]
    rows = [line.split() for line in layouts.splitlines() if line.split()[:1] in (["1"], ["2"], ["4"], ["8"])]
    seen = {(int(r[0]), int(r[1]), int(r[2])) for r in rows}  # tp, pp, stage
    assert {(2, 1, 1), (2, 1, 2), (8, 1, 1), (1, 2, 1), (1, 8, 1), (4, 2, 1)} <= seen
    assert all(stage == 1 for tp, pp, stage in seen if pp > 1) and all(tp <= 8 for tp, _, _ in seen)


def test_rank_params_split_what_hf_tp_plan_splits_and_stages_hold_their_blocks():
    """Against the built tiny LLaMA: AutoTP splits the tensors HF's LLaMA ``tp_plan`` names
    (q/k/v/o, gate/up/down, lm_head), the rest stays whole; a pipeline stage holds its blocks plus
    the embedding (first) or the final norm and head (last). tp = pp = 1: the whole model."""
    import re

    model = models.build_model("tiny")
    shape = memory.preset_shape("tiny")
    plan = {**model.config.base_model_tp_plan, "lm_head": "colwise_rep"}
    patterns = [re.compile(p.replace(".", r"\.").replace("*", r"\d+")) for p in plan]
    named = {n: p.numel() for n, p in model.named_parameters()}
    assert memory.rank_params(shape) == sum(named.values()) == models.count_parameters(shape)
    for tp in (2, 4):
        split = sum(v for n, v in named.items() if any(p.search(n) for p in patterns))
        assert 0 < split < sum(named.values())
        whole = sum(named.values()) - split
        assert abs(memory.rank_params(shape, tp) - (split / tp + whole)) <= 2 * shape.num_hidden_layers + 1

    def block(name):
        m = re.search(r"layers\.(\d+)\.", name)
        return int(m[1]) if m else None

    first = sum(v for n, v in named.items() if block(n) == 0 or "embed" in n)
    last = sum(v for n, v in named.items() if block(n) == 1 or "lm_head" in n or n == "model.norm.weight")
    assert memory.rank_params(shape, 1, 2) == max(first, last)


def test_model_parallel_layouts_partition_over_the_data_parallel_ranks():
    shape = memory.preset_shape("7b")
    total, largest = SHAPES["7b"]
    base = memory.plan(total, largest, 1, 8, 1, optimizer="stratopt")
    for tp, pp in ((2, 1), (1, 2), (2, 2), (8, 1)):
        per_rank = memory.rank_params(shape, tp, pp)
        row = memory.plan(total, largest, 1, 8, 1, False, "stratopt", 1.5, tp, pp, per_rank)
        dp = 8 // (tp * pp)
        assert row.params == 2 * per_rank and row.master == pytest.approx(4 * per_rank / dp)
        assert row.gpu < base.gpu and row.tp == tp and row.pp == pp
    with pytest.raises(ValueError, match="stage 2 with tp=1, pp=2"):
        memory.plan(total, largest, 1, 8, 2, tp=1, pp=2, params_per_rank=1)
    with pytest.raises(ValueError, match="stage 3 with tp=2"):
        memory.plan(total, largest, 1, 8, 3, tp=2, params_per_rank=1)
    with pytest.raises(ValueError, match="does not divide the 8 GPUs"):
        memory.plan(total, largest, 1, 8, 1, tp=3, params_per_rank=1)


def test_plan_module_runs_the_planner_for_one_layout():
    proc = subprocess.run([sys.executable, "-m", "stratopt_ds.plan", "--preset", "7b", "--tp", "4",
                           "--pp", "2", "--nodes", "2"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "tp=4 x pp=2" in proc.stdout and "ZeRO over 2 data-parallel ranks" in proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:2] == ["4", "2"]]
    assert [(r[2], r[3]) for r in rows] == [("1", "-"), ("1", "cpu")]
    assert "With tensor" not in proc.stdout


def test_cli_never_builds_the_model(monkeypatch, capsys):
    def no_build(*args, **kwargs):
        raise AssertionError("the planner built a model")

    monkeypatch.setattr(models, "build_model", no_build)
    monkeypatch.setattr(models, "llama_config", no_build)
    memory.main(["--preset", "7b", "--optimizer", "adamw", "--offload"])
    out = capsys.readouterr().out
    assert "8 B/param" in out and " 0        -" not in out


@pytest.mark.parametrize("argv,words", [
    (["--preset", "13b"], ["--preset", "'13b'", "tiny, 134m, 500m, 1b, 3b, 7b"]),
    (["--preset", "7b", "--nodes", "0"], ["--nodes must be >= 1, got 0"]),
    (["--preset", "7b", "--gpus-per-node", "-2"], ["--gpus-per-node must be >= 1, got -2"]),
    (["--preset", "7b", "--optimizer", "sgd"], ["--optimizer", "'sgd'", "stratopt"]),
    (["--preset", "7b", "--cpu-buffer-factor", "0"], ["--cpu-buffer-factor must be > 0"]),
    (["--preset", "7b", "--nodes", "two"], ["--nodes", "invalid int value"]),
    (["--preset", "7b", "--tp", "3"], ["--tp 3 x --pp 1 must divide the 8 GPUs"]),
    (["--preset", "7b", "--pp", "0"], ["--pp must be >= 1, got 0"]),
    (["--preset", "tiny", "--pp", "4", "--gpus-per-node", "4"], ["--pp 4", "only 2 blocks"]),
])
def test_cli_errors_name_the_option(argv, words, capsys):
    assert_usage_error(memory.main, argv, words, capsys)
