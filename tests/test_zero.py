"""ZeRO invariance: real multi-process DeepSpeed runs (CPU, gloo) against single-process runs.

Each launch runs one rank per process over many configurations (tests/dist/zero_worker.py) and
writes a JSON report; the assertions live here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port

pytestmark = pytest.mark.dist  # every test reads deepspeed launches of 1-4 CPU ranks
ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "dist" / "zero_worker.py"
TOL = 1e-5


def launch(world: int, suites: list[str], out_dir: Path, timeout: int = 900) -> list[dict]:
    """Run ``suites`` in order in one launch on ``world`` ranks; every row names its suite.
    Every rank steps with the native CPU kernel (it must build), except the entry-path cases
    ("paths"), which the worker runs with the PyTorch reference."""
    out = out_dir / f"{'-'.join(suites)}-{world}.json"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(world),
           "--master_port", str(free_port()), str(WORKER), "--suite", *suites, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "STRATOPT_OPS": "native"}
    proc = subprocess.run(cmd, cwd=out_dir, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        pytest.fail(f"{suites} at world size {world} failed (rc={proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


# One launch per world size runs every suite that needs it. The order matters: a reshard load
# reads a checkpoint an earlier launch saved (4 ranks -> 2, 2 ranks -> 3).
LAUNCHES = [(1, ["matrix"]), (4, ["matrix", "no_reduce", "reshard_save"]),
            (4, ["model_parallel", "reshard_save_tp", "reshard_load_tp"]),
            (2, ["matrix", "no_reduce", "reshard_save", "reshard_load", "paths"]),
            (3, ["matrix", "no_reduce", "reshard_load"]), (4, ["reshard_load"])]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("zero")
    rows = [r for world, suites in LAUNCHES for r in launch(world, suites, out_dir)]
    return lambda suite: [r for r in rows if r["suite"] == suite]


@pytest.fixture(scope="module")
def matrix(launched):
    return launched("matrix")


def _label(r):
    return f"world={r['world']} {r['cfg']}"


def test_matrix_covers_the_contract(matrix):
    seen = {(r["world"], r["cfg"]["stage"], r["cfg"]["offload"], r["cfg"]["gas"], r["cfg"]["opt"])
            for r in matrix if not r["cfg"].get("bf16") and not r["cfg"].get("ds_clip")}
    opts = {"stratopt", "la-sqrt-b1depth-cliplayer", "la-inverse-b1const-clipglobal"}
    for world in (1, 2, 3, 4):
        for stage in (0, 1, 2, 3):
            for offload in ((False,) if stage == 0 else (False, True)):
                for gas in (1, 2):
                    for opt in opts:
                        assert (world, stage, offload, gas, opt) in seen
    # Some rank holds only padding of a group and still takes part in every collective.
    assert any(r["empty_slots"] > 0 and r["rel_err"] <= TOL for r in matrix if r["world"] == 4)
    bf16_stages = {r["cfg"]["stage"] for r in matrix if r["cfg"].get("bf16")}
    assert {2, 3} <= bf16_stages
    assert {"none", "stage12", "stage3", "bf16"} <= {r["kind"] for r in matrix}
    # The model is laid out so that layers straddle ranks and partitions carry padding.
    for world in (2, 3, 4):
        for stage in (1, 2, 3):
            rows = [r for r in matrix if r["world"] == world and r["cfg"]["stage"] == stage]
            # two groups: each of the world-1 boundaries per group cuts a layer (all of them at stage 3)
            assert max(r["straddling_layers"] for r in rows) >= min(3, 2 * (world - 1)), (world, stage)
            assert max(r["padding"] for r in rows) > 0, (world, stage)


def test_parameters_equal_single_process_reference(matrix):
    bad = [f"{_label(r)}: rel_err={r['rel_err']:.2e} gbar_rel_err={r['gbar_rel_err']:.2e}"
           for r in matrix if not (r["rel_err"] <= TOL and r["gbar_rel_err"] <= TOL)]
    assert not bad, "\n".join(bad)


def test_layer_norms_bitwise_equal_on_ranks_and_match_reference(matrix):
    for r in matrix:
        assert r["norms_same_on_ranks"], _label(r)
        assert r["norm_rel_err"] <= TOL, f"{_label(r)}: {r['norm_rel_err']:.2e}"


def test_exactly_one_allreduce_per_step(matrix):
    for r in matrix:  # a step DeepSpeed skips (fp16 overflow) never reaches the optimizer
        sharded = r["kind"] != "none"
        expected = r["steps"] - r["skipped_by_deepspeed"] if (sharded and r["world"] > 1) else 0
        assert r["allreduce_calls"] == expected, _label(r)


def test_fp16_loss_scaling_overflow_steps_never_reach_the_optimizer(matrix):
    """fp16 with dynamic loss scaling at ZeRO 1/2, 2 and 4 ranks: the forced overflow steps (one
    rank's loss x 1e30) are skipped by DeepSpeed and leave gbar and the update counters alone;
    the norms are of the unscaled gradients (the waiting groups divided by the loss scale too),
    with clipping, with offload, and where the scale grows (DeepSpeed then unscales by the new
    scale: the reference divides by what DeepSpeed divided by)."""
    fp16 = [r for r in matrix if r["cfg"].get("fp16")]
    assert {(r["world"], r["cfg"]["stage"], r["cfg"]["opt"]) for r in fp16} >= {
        (w, s, o) for w in (2, 4) for s in (1, 2) for o in ("stratopt", "la-sqrt-b1depth-cliplayer")}
    assert any(r["cfg"].get("ds_clip") for r in fp16) and any(r["cfg"]["offload"] for r in fp16)
    grew = [r for r in fp16 if any(after > before for before, after in r["loss_scales"])]
    assert grew and all(r["cfg"].get("scale_window") for r in grew)
    for r in fp16:
        overflowed = [step for step, (before, after) in enumerate(r["loss_scales"]) if after < before]
        assert set(r["cfg"].get("overflow_at", ())) <= set(overflowed), _label(r)
        assert r["skipped_by_deepspeed"] == len(overflowed) and r["skipped_by_us"] == 0, _label(r)
        assert r["layer_counts"] == r["ref_layer_counts"] == [r["steps"] - len(overflowed)] * len(
            r["layer_counts"]), _label(r)
        assert r["rel_err"] <= TOL and r["gbar_rel_err"] <= TOL, _label(r)


def test_hpz_secondary_partition_leaves_the_optimizer_fragments_alone(matrix):
    """ZeRO++ hpZ (zero_hpz_partition_size=2 at 4 ranks) keeps a secondary copy of the
    parameters within groups of 2 ranks, for the all-gathers of forward and backward. The
    optimizer's fp32 partitions stay over the whole data-parallel group: each rank holds the
    very fragments it holds under plain ZeRO-3, and the one norm all-reduce stays over the
    data-parallel group; the parameters equal plain ZeRO-3's and the single process's."""
    hpz = [r for r in matrix if r["cfg"].get("zero_extra", {}).get("zero_hpz_partition_size")]
    assert {(r["world"], r["cfg"]["opt"]) for r in hpz} == {
        (4, "stratopt"), (4, "la-sqrt-b1depth-cliplayer")}  # the second: block granularity
    for r in hpz:
        plain_cfg = {k: v for k, v in r["cfg"].items() if k != "zero_extra"}
        plain = next(p for p in matrix if p["world"] == r["world"] and p["cfg"] == plain_cfg)
        assert r["secondary_partitions"] > 0 and plain["secondary_partitions"] == 0, _label(r)
        assert r["fragments"] == plain["fragments"], _label(r)
        assert r["rel_err"] == plain["rel_err"] and r["rel_err"] <= TOL, _label(r)


def test_pipeline_parallel_norms_cover_every_stage(launched):
    """PP2 x DP2 at ZeRO-1 (4 ranks, DeepSpeed's PipelineEngine): each stage holds its own
    layers, sharded over its data-parallel pair. The layers are numbered over the whole pipeline
    (same ids, same L on every rank) and one all-reduce over all 4 ranks a step gives every
    layer's exact norm: the parameters, norms and gbar equal the unsplit single process's, also
    with block granularity and with global clipping. Reduced over each stage's data-parallel
    group only, the global clip sees half the layers and the comparison fails."""
    rows = [r for r in launched("model_parallel") if r["cfg"].get("pipeline") and not r["cfg"].get("data_norms_only")]
    assert {(r["world"], r["cfg"]["opt"], r["cfg"].get("granularity")) for r in rows} == {
        (4, "stratopt", "tensor"), (4, "la-sqrt-b1depth-cliplayer", "block"),
        (4, "la-inverse-b1const-clipglobal", "tensor")}
    for r in rows:
        assert r["rel_err"] <= TOL and r["norm_rel_err"] <= TOL and r["gbar_rel_err"] <= TOL, _label(r)
        assert r["norms_same_on_ranks"] and r["allreduce_calls"] == r["steps"], _label(r)
        assert r["straddling_layers"] > 0, _label(r)  # a layer split over a stage's two ranks
    (stage_only,) = [r for r in launched("model_parallel") if r["cfg"].get("pipeline") and r["cfg"].get("data_norms_only")]
    assert stage_only["rel_err"] > 100 * TOL and not stage_only["norms_same_on_ranks"]


def test_tensor_parallel_norms_count_split_tensors_everywhere_and_replicated_ones_once(launched):
    """TP2 x DP2 (AutoTP, ZeRO 1 and 2, 4 ranks): each block's up/down projections are split
    across the TP pair (column and row parallel), its norm and down bias whole on both. A split
    tensor's slices count on both TP ranks, a replicated one on TP rank 0 only, then one
    all-reduce over all 4 ranks: norms, gbar and parameters equal the unsplit model's, also with
    a block layer straddling the TP ranks and with global clipping. (Counting the replicated
    tensors on both TP ranks, checked by hand: norms off by up to sqrt(2)-1 = 0.414.) Reduced
    over the data-parallel group only, each rank sees half of every split layer and fails."""
    rows = [r for r in launched("model_parallel") if r["cfg"].get("tp")]
    exact = [r for r in rows if not r["cfg"].get("data_norms_only")]
    assert {(r["cfg"]["stage"], r["cfg"]["opt"], r["cfg"]["granularity"]) for r in exact} == {
        (s, o, g) for s in (1, 2) for o, g in (("stratopt", "tensor"), ("la-sqrt-b1depth-cliplayer", "block"),
                                               ("la-inverse-b1const-clipglobal", "tensor"))}
    for r in exact:
        assert r["world"] == 4 and r["kind"] == "stage12", _label(r)
        assert r["rel_err"] <= TOL and r["norm_rel_err"] <= TOL and r["gbar_rel_err"] <= TOL, _label(r)
        assert r["norms_same_on_ranks"] and r["allreduce_calls"] == r["steps"], _label(r)
    (data_only,) = [r for r in rows if r["cfg"].get("data_norms_only")]
    assert data_only["rel_err"] > 100 * TOL and not data_only["norms_same_on_ranks"]


def test_disabling_the_norm_reduction_is_detected(launched):
    """Per-partition norms must make the same comparison fail: the test can see them."""
    rows = launched("no_reduce")
    assert {r["world"] for r in rows} == {2, 3, 4}  # 4: ZeRO++ hpZ
    assert any(r["cfg"].get("fp16") for r in rows)
    for r in rows:
        assert r["rel_err"] > 100 * TOL, _label(r)
        assert not r["norms_same_on_ranks"], _label(r)


@pytest.fixture(scope="module")
def paths(launched):
    rows = launched("paths")
    return {(r["case"], r["cfg"]["stage"], r["cfg"].get("offload"), bool(r["cfg"].get("bf16"))): r for r in rows}


def test_json_config_through_stratopt_initialize(paths):
    for key in (("json_ours", 2, False, False), ("json_ours", 3, True, False)):
        r = paths[key]
        assert r["bound"] and r["rel_err"] <= TOL, r
        assert r["engine_clipping"] == 0.0, "the optimizer clips itself: DeepSpeed's clip must be off"


def test_torch_optim_alias_through_plain_deepspeed_binds_itself(paths):
    for key in (("torch_alias", 3, False, False), ("torch_alias", 1, True, False)):
        r = paths[key]
        assert r["bound"] and r["inner"] == r["cfg"]["type"] and r["rel_err"] <= TOL, r


def test_checkpoint_resume_is_bit_identical_and_zero_to_fp32_recovers(paths):
    for key in (("checkpoint", 2, False, False), ("checkpoint", 3, True, False), ("checkpoint", 1, False, True)):
        r = paths[key]
        assert r["bit_identical"] and r["gbar_identical"], r
        if key[3] is False:
            assert r["zero_to_fp32_equal"] and r["zero_to_fp32_names"] == [], r


def test_unsupported_settings_give_clear_errors(paths):
    assert "round_robin_gradients" in paths[("unsupported", 2, False, False)]["error"]
    assert "zero_optimization.stage=0" in paths[("unsupported", 0, False, True)]["error"]


def test_resume_at_another_world_size_continues_the_reference(launched):
    """Save at step 8 (2 or 4 ranks), resume at 3 or 2 ranks (even another stage), also from a
    2-stage pipeline x 2 data-parallel ranks to the unsplit model on 2 ranks, and from TP2 x DP2
    (AutoTP: column- and row-parallel slices) to the unsplit model on 4 ranks and back: the run
    still equals the single-process reference after 20 steps."""
    rows = launched("reshard_load") + launched("reshard_load_tp")
    assert sorted(r["case"] for r in rows) == sorted(
        ["s2_2to3", "s1_2to_s3_3", "s3off_4to2", "pp2dp2_to_dp2", "tp2dp2_to_dp4", "dp4_to_tp2dp2"])
    for r in rows:
        assert r["rel_err"] <= TOL, r
