"""The main job (stratopt_ds.train) with its data and model presets. Offline, CPU, < 1 minute."""
from __future__ import annotations

import functools
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from stratopt_ds import data, models, train
from helpers import assert_usage_error, wait_for_logged_step

FAST = ["--no-progress", "--eval-batches", "2"]


def run(tmp_path, *extra: str):
    return train.main(["--out", str(tmp_path / "run"), *FAST, *extra])


def read_metrics(tmp_path) -> list[dict]:
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def write_paragraphs(n: int) -> list[str]:
    return [f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i % 7} times, "
            f"and the dog sleeps." for i in range(n)]


# ------------------------------------------------------------------------------------------------
# The tiny job learns and logs


def test_tiny_stratopt_20_steps_loss_goes_down_and_is_logged(tmp_path):
    s = run(tmp_path, "--steps", "20", "--eval-every", "10")
    losses = s.losses
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first - last > 1.0, (first, last)  # ln(257) = 5.55 at init; ~3.1 after 20 steps
    assert s.val_loss < losses[0] - 1.0
    assert s.skipped_steps == 0 and s.tokens == 20 * 8 * 64
    assert s.hyperparams["t_alpha"] == s.hyperparams["t_beta3"] == 20  # stratopt mixes

    records = read_metrics(tmp_path)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    for r in steps:
        assert r["grad_norm"] > 0 and r["alpha_min"] <= r["alpha_mean"] <= r["alpha_max"]
        assert {"lr", "tokens", "elapsed", "layer_norm_max", "skipped_steps"} <= set(r)
        # per-layer norms in the order of the summary's layers; they add up to the global norm
        assert len(r["layer_norms"]) == len(r["layer_alpha"]) == len(s.layers)
        assert math.sqrt(sum(x * x for x in r["layer_norms"])) == pytest.approx(r["grad_norm"])
        assert max(r["layer_norms"]) == pytest.approx(r["layer_norm_max"])
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20]
    # Warm-up then cosine decay down to 10% of the peak at the last step.
    assert steps[1]["lr"] == pytest.approx(3e-3) and steps[-1]["lr"] == pytest.approx(3e-4)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["losses"] == losses and saved["val_loss"] == s.val_loss


def test_same_seeds_same_run_and_data_seed_changes_order(tmp_path):
    a = train.main([*FAST, "--steps", "3", "--eval-batches", "0"])
    b = train.main([*FAST, "--steps", "3", "--eval-batches", "0"])
    c = train.main([*FAST, "--steps", "3", "--eval-batches", "0", "--data-seed", "1"])
    assert a.losses == b.losses
    assert a.losses[0] != c.losses[0]
    assert a.val_loss is None and a.data_state["step"] == 3


def test_other_optimizer_with_opt_args(tmp_path):
    s = run(tmp_path, "--steps", "4", "--optimizer", "la-sqrt-b1depth-cliplayer",
            "--opt-args", "weight_decay=0.0", '{"betas": [0.9, 0.95]}')
    assert s.hyperparams == {"weight_decay": 0.0, "betas": [0.9, 0.95], "lr": 3e-3}
    assert s.last_loss < s.first_loss


# ------------------------------------------------------------------------------------------------
# Local data files and tokenizers


def test_txt_file_as_data(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(write_paragraphs(40)), encoding="utf-8")
    s = run(tmp_path, "--data", str(path), "--steps", "3", "--seq-len", "32", "--batch-size", "4")
    assert s.data == str(path) and len(s.losses) == 3 and s.val_loss is not None
    # built once into the store cache, with exactly the 64 validation windows asked for
    store = data.open_store(s.store)
    assert store.manifest["source"]["files"][0][0] == str(path.resolve())
    assert (len(store.part("val")) - 1) // 32 >= 64 and store.manifest["documents"]["read"] == 40


def test_jsonl_file_as_data(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": p, "id": i}) + "\n"
                            for i, p in enumerate(write_paragraphs(40))))
    s = run(tmp_path, "--data", str(path), "--steps", "3", "--seq-len", "32", "--batch-size", "4")
    assert len(read_metrics(tmp_path)) == 3 + 1  # 3 steps + the final validation


def test_a_store_directory_as_data(tmp_path):
    store = data.build_store("synthetic", tmp_path / "store",
                             data.BuildSettings(max_docs=300, val_tokens=2000), progress=False)
    s = run(tmp_path, "--data", str(store.path), "--steps", "3", "--seq-len", "32",
            "--val-windows", "16")
    assert s.store == str(store.path) and s.store_fingerprint == store.fingerprint
    assert s.tokenizer == "byte" and s.data_state["store"] == store.fingerprint
    first = s.losses
    again = run(tmp_path, "--data", str(store.path), "--steps", "3", "--seq-len", "32",
                "--val-windows", "16")
    assert again.losses == first


def test_train_with_bpe_tokenizer(tmp_path):
    s = run(tmp_path, "--tokenizer", "bpe", "--bpe-vocab", "300", "--cache-dir", str(tmp_path),
            "--max-docs", "300", "--steps", "2")
    assert s.tokenizer == "bpe300" and len(list(tmp_path.glob("bpe-*.json"))) == 1


# ------------------------------------------------------------------------------------------------
# Packing, validation split and the resumable batch order


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = train.lr_schedule(opt, warmup_steps=4, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] == pytest.approx(0.1)


def test_parse_opt_args():
    assert train.parse_opt_args(['{"beta3": 0.99}', "clip=global", "betas=[0.9,0.95]"]) == {
        "beta3": 0.99, "clip": "global", "betas": [0.9, 0.95]}
    with pytest.raises(ValueError, match="key=value"):
        train.parse_opt_args(["beta3"])


# ------------------------------------------------------------------------------------------------
# Bad options fail before any work, naming the option


def assert_refused_before_any_work(argv, words, capsys, monkeypatch):
    """main(argv) exits with a usage error naming every word, before data or model exist."""
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(data.DataRequest, "open", no_work)
    monkeypatch.setattr(data.request, "build_store", no_work)
    monkeypatch.setattr(models, "build_model", no_work)
    assert_usage_error(train.main, argv, words, capsys)


@pytest.mark.parametrize("argv, words", [
    (["--optimizer", "nope"], ["--optimizer", "'nope'", "stratopt", "adamw"]),
    (["--data", "/no/such/file.txt"], ["--data", "/no/such/file.txt", "not found"]),
    (["--preset", "huge"], ["--preset", "'huge'", "tiny", "134m", "1b"]),
    (["--steps", "0"], ["--steps", ">= 1", "got 0"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--lr", "-1"], ["--lr"]),
    (["--opt-args", "beta3=2"], ["--opt-args", "beta3"]),
    (["--opt-args", "nonsense=1"], ["--opt-args", "nonsense"]),
    (["--opt-args", "lr=0.1"], ["--opt-args", "--lr"]),
    (["--data", __file__], [f"--data {__file__}", "unsupported file", ".jsonl"]),
    (["--stop-signal", "TERM"], ["--stop-signal", "'TERM'", "USR1, USR2 or none"]),
])
def test_bad_options_exit_with_a_clear_message(argv, words, capsys, monkeypatch):
    assert_refused_before_any_work(argv, words, capsys, monkeypatch)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    return data.build_store("synthetic", tmp_path_factory.mktemp("d") / "store",
                            data.BuildSettings(max_docs=300, val_tokens=1000), progress=False)


def test_bad_store_requests_exit_before_any_work(tiny_store, tmp_path, capsys, monkeypatch):
    store = str(tiny_store.path)
    for argv, words in [
            (["--data", store, "--tokenizer", "bpe"],
             ["--tokenizer bpe conflicts with the tokenizer of the store", "byte", "leave --tokenizer out"]),
            (["--data", store, "--max-docs", "5"], ["--max-docs applies when --data is a source"]),
            (["--data", store, "--seq-len", "2000"], ["--seq-len 2000 is longer than the validation part"]),
            (["--data", store, "--seq-len", "64"], ["--val-windows 64 of --seq-len 64 needs 4,097"])]:
        assert_refused_before_any_work(argv, words, capsys, monkeypatch)
    half = tmp_path / "half"
    (half / ".build").mkdir(parents=True)
    assert_refused_before_any_work(["--data", str(half)], [f"--data {half}", "incomplete token store"],
                                   capsys, monkeypatch)


def write_ds_config(tmp_path, **overrides) -> str:
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
              "zero_optimization": {"stage": 2},
              "optimizer": {"type": "StratOpt", "params": {"lr": 1e-3, "clip": "layer"}}}
    config.update(overrides)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("overrides, extra, words", [
    ({"optimizer": {"type": "Adam", "params": {}}}, [],
     ["optimizer.type 'Adam'", "not a stratopt_ds optimizer", "stratopt"]),
    ({"optimizer": {"type": "StratOpt2", "params": {}}}, [], ["'StratOpt2'", "available"]),
    ({}, ["--optimizer", "adamw"], ["--optimizer 'adamw'", "conflicts", "'StratOpt'"]),
    ({"gradient_clipping": 1.0}, [], ["conflicting clipping", "gradient_clipping=1.0",
                                      "clip='layer'"]),
    ({}, ["--opt-args", "clip=global"], []),  # still clips itself: no engine clipping set, fine
    ({"optimizer": {"type": "StratOpt", "params": {"max_grad_norm": 1.0}}}, [],
     ["optimizer.params", "max_grad_norm"]),
    ({}, ["--batch-size", "6"], ["--batch-size 6", "ranks x gradient_accumulation_steps = 2 x 2"]),
])
def test_bad_deepspeed_settings_fail_before_any_process_group(tmp_path, overrides, extra, words,
                                                              capsys, monkeypatch):
    """The launcher sets WORLD_SIZE; every check runs before deepspeed.init_distributed."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["--deepspeed_config", write_ds_config(tmp_path, **overrides), "--batch-size", "16",
            *extra]
    if not words:
        run = train.resolve_args(argv)  # accepted
        assert run.config.optimizer == "stratopt" and run.hyperparams["clip"] == "global"
        assert run.config.lr == 1e-3 and run.ranks == 2  # the config's lr when --lr is not given
        return
    assert_refused_before_any_work(argv, words, capsys, monkeypatch)
    assert not torch.distributed.is_initialized()


def test_command_line_entry_reports_bad_steps():
    proc = subprocess.run([sys.executable, "-m", "stratopt_ds.train", "--steps", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--steps must be >= 1, got 0" in proc.stderr


# ------------------------------------------------------------------------------------------------
# Model presets


@pytest.mark.parametrize("name", ["134m", "500m", "1b"])
def test_preset_parameter_count_matches_its_name(name):
    count = models.count_parameters(models.llama_config(name))
    nominal = models.NOMINAL_PARAMS[name]
    assert abs(count - nominal) / nominal < 0.02, (name, count)


def test_tiny_preset_builds_and_count_is_exact():
    model = models.build_model("tiny", vocab_size=257, seq_len=64, seed=0)
    assert sum(p.numel() for p in model.parameters()) == models.count_parameters(model.config)
    again = models.build_model("tiny", vocab_size=257, seq_len=64, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    logits = model(input_ids=torch.zeros(2, 8, dtype=torch.long)).logits
    assert logits.shape == (2, 8, 257)
    assert models.llama_config("134m", vocab_size=50257).vocab_size == 50304  # padded to 64


def test_unknown_preset_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'huge'.*tiny, 134m, 500m, 1b"):
        models.build_model("huge")


# ------------------------------------------------------------------------------------------------
# Checkpoints, --resume after a kill, divergence


def store_train_cmd(out, *extra: str, store) -> list[str]:
    return [sys.executable, "-m", "stratopt_ds.train", "--out", str(out), "--steps", "40",
            "--save-every", "5", "--eval-every", "10", "--no-progress", "--eval-batches", "2",
            "--no-tensorboard", "--data", str(store), *extra]


def test_resume_after_kill_and_after_the_stop_signal_continues_the_same_run(tmp_path):
    """Kill -9 a run mid-way; --resume goes on from the last periodic checkpoint. SIGUSR2 (the
    stop signal) on the resumed run: it saves a checkpoint of the step it is in and exits 75;
    --resume again finishes. The steps, data position and loss curve are the uninterrupted run's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    store = data.build_store("synthetic", tmp_path / "store", data.BuildSettings(val_tokens=10_000),
                             progress=False)
    train_cmd = functools.partial(store_train_cmd, store=store.path)
    reference = subprocess.run(train_cmd(tmp_path / "ref"), capture_output=True, text=True,
                               timeout=300, env=env)
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and int(latest.read_text().strip()[5:]) >= 15:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"
    killed_at = int(latest.read_text().strip()[5:])
    assert 15 <= killed_at < 40

    stopped = subprocess.Popen(train_cmd(out, "--resume"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    logged = wait_for_logged_step(out, 0, timeout=0)  # the killed run's last step logged
    wait_for_logged_step(out, logged + 3, stopped)  # new steps: the handler is in place
    stopped.send_signal(signal.SIGUSR2)
    stdout, stderr = stopped.communicate(timeout=120)
    assert stopped.returncode == train.EXIT_STOPPED, stdout[-2000:] + stderr[-2000:]
    stopped_at = int(latest.read_text().strip()[5:])  # the step it was in: no periodic one
    assert killed_at + 3 <= stopped_at < 40 and f"stopped after step {stopped_at} on SIGUSR2" in stdout
    assert not (out / "summary.json").exists()

    resumed = subprocess.run(train_cmd(out, "--resume"), capture_output=True, text=True,
                             timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {stopped_at}" in resumed.stdout
    a = json.loads((tmp_path / "ref" / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert b["resumed_from"] == stopped_at and b["steps_done"] == 40
    assert b["losses"] == a["losses"]  # bit-identical loss curve
    assert b["val_losses"] == a["val_losses"]
    assert b["data_state"] == a["data_state"] and b["tokens"] == a["tokens"]
    assert b["data_state"]["store"] == store.fingerprint
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(1, 41))  # the killed run's extra records were dropped
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert kept == ["step_35", "step_40"]  # --keep-checkpoints 2


def test_resume_refuses_another_run_and_a_missing_checkpoint(tmp_path, capsys):
    run(tmp_path, "--steps", "4", "--save-every", "2", "--no-tensorboard")
    with pytest.raises(SystemExit):
        run(tmp_path, "--steps", "4", "--resume", "--seed", "5")
    err = capsys.readouterr().err
    assert "different run" in err and "seed: 0 in the checkpoint, 5 now" in err
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path / "empty"), "--resume"])
    assert "no complete checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--resume"])
    assert "need --out" in capsys.readouterr().err


def test_divergence_stops_the_run_and_exits_3(tmp_path):
    cmd = [sys.executable, "-m", "stratopt_ds.train", "--out", str(tmp_path / "run"), "--steps",
           "60", "--optimizer", "adamw", "--lr", "1e4", "--diverge-after", "5", "--no-progress",
           "--no-tensorboard", "--eval-batches", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == train.EXIT_DIVERGED, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps_done"] < 60
    assert summary["skipped_steps"] >= 5


def test_tensorboard_events_are_written(tmp_path):
    run(tmp_path, "--steps", "3")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "val/loss" in tags and any(t.startswith("layer_norms/") for t in tags)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]


def test_data_auto_is_fineweb_only_when_the_hub_answers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert data.resolve_source("auto") == "synthetic"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []

    class Conn:
        def close(self):
            pass

    def reachable(addr, timeout):
        calls.append(addr)
        return Conn()

    def unreachable(addr, timeout):
        raise OSError("no route")

    monkeypatch.setattr(data.sources.socket, "create_connection", reachable)
    assert data.resolve_source("auto") == "fineweb" and calls == [("huggingface.co", 443)]
    monkeypatch.setattr(data.sources.socket, "create_connection", unreachable)
    assert data.resolve_source("auto") == "synthetic"
    assert data.resolve_source("some.txt") == "some.txt"


def test_evaluation_in_chunks_equals_one_pass(tiny_store):
    torch.manual_seed(0)
    model = models.build_model("tiny", 257, 16, seed=0)
    windows = data.Windows(tiny_store.part("val"), 16, limit=12)
    whole = train.evaluate(model, windows, 6, 2, torch.device("cpu"))
    chunked = train.evaluate(model, windows, 6, 2, torch.device("cpu"), chunk=4)
    assert chunked == pytest.approx(whole, rel=1e-6)
    assert train.evaluate(model, windows, 6, 1, torch.device("cpu")) != pytest.approx(whole, rel=1e-6)


def test_run_summary_round_trips_and_reads_other_versions(tmp_path):
    """summary.json is a RunSummary: written atomically, read back equal; a file of another
    version (a missing field, an unknown one) still loads; a cut-short file reads as none."""
    from stratopt_ds.summary import RunSummary

    s = RunSummary(status="diverged", optimizer="stratopt", steps=10, steps_done=4, losses=[1.0, None],
                   val_losses=[[2, 3.5]], layers=["a", "b"], clip_counts={"a": 1})
    path = tmp_path / "summary.json"
    s.write(path)
    assert RunSummary.read(path) == s and not (tmp_path / "summary.json.tmp").exists()
    raw = s.to_dict()
    del raw["layers"]
    raw["from_the_future"] = 1
    path.write_text(json.dumps(raw))
    old = RunSummary.read(path)
    assert old.layers == [] and old.steps_done == 4
    path.write_text('{"status": "ok", "val_lo')
    assert RunSummary.read(path) is None and RunSummary.read(tmp_path / "none.json") is None
