"""The token store: built once (in parallel, in order, resumably), read by memory map; the epoch
order; and every bad input refused with a message naming the file and the fault. Offline, CPU."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stratopt_ds import data
from stratopt_ds.data import store as store_module

ROOT = Path(__file__).resolve().parents[1]


def paragraphs(n: int, seed: int = 0) -> list[str]:
    """Documents of varied length, with non-ASCII text (multi-byte UTF-8)."""
    rng = np.random.default_rng(seed)
    words = ["the", "quick", "brown", "fox", "jumps", "über", "naïve", "café", "日本", "lazy", "dog"]
    return [" ".join(rng.choice(words, size=int(rng.integers(3, 60)))) + f" #{i}." for i in range(n)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)),
                    encoding="utf-8")
    return path


def flat_tokens(store: data.TokenStore) -> np.ndarray:
    """The whole store in order: the validation part, then the training part."""
    return np.concatenate([store.part(p).read(0, len(store.part(p))) for p in ("val", "train")])


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.bin"))}


def manifest_without_time(path: Path) -> dict:
    manifest = json.loads((path / data.MANIFEST).read_text())
    manifest.pop("created")
    return manifest


SMALL = dict(val_tokens=300, shard_tokens=997)  # several shards; odd size: windows straddle them


# ------------------------------------------------------------------------------------------------
# Building: the same tokens as one process encoding the documents in order, whatever num_proc


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_store_holds_the_documents_tokenized_in_order_for_1_and_2_processes(
        tmp_path, monkeypatch, tokenizer):
    docs = paragraphs(300)
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    monkeypatch.setattr(store_module, "CHUNK_DOCS", 7)  # many chunks: the order is exercised
    settings = data.BuildSettings(tokenizer=tokenizer, bpe_vocab=300, **SMALL)
    one = data.build_store(str(source), tmp_path / "one", settings, num_proc=1, progress=False,
                           cache_dir=tmp_path / "cache")
    two = data.build_store(str(source), tmp_path / "two", settings, num_proc=2, progress=False,
                           cache_dir=tmp_path / "cache")

    # Independent expectation: each document encoded alone, followed by EOS, in source order.
    if tokenizer == "byte":
        encode, eos = (lambda d: list(d.encode("utf-8"))), 256
    else:
        from tokenizers import Tokenizer
        bpe = Tokenizer.from_file(str(one.path / "tokenizer" / "tokenizer.json"))
        encode, eos = (lambda d: bpe.encode(d).ids), bpe.token_to_id(data.EOS_TOKEN)
        assert one.vocab_size == 300 and one.tokenizer_name == "bpe300"
    expected = np.array([t for d in docs for t in encode(d) + [eos]])
    assert np.array_equal(flat_tokens(one), expected)
    assert shard_bytes(one.path) == shard_bytes(two.path)
    assert manifest_without_time(one.path) == manifest_without_time(two.path)

    m = one.manifest
    assert m["documents"]["val"] + m["documents"]["train"] == m["documents"]["read"] == 300
    assert m["tokens"]["val"] + m["tokens"]["train"] == len(expected)
    assert m["dtype"] == "uint16" and len(m["parts"]["train"]) > 3
    assert m["tokens"]["val"] == 300  # exactly --val-tokens, the source's first tokens
    starts = np.cumsum([0] + [len(encode(d)) + 1 for d in docs])[:-1]
    assert m["documents"]["val"] == int((starts < 300).sum())  # a document counts where it starts
    assert one.tokenizer["files"] == ({} if tokenizer == "byte" else
                                      {"tokenizer.json": m["tokenizer"]["files"]["tokenizer.json"]})


def test_one_long_document_does_not_swallow_the_corpus(tmp_path):
    """A .txt without blank lines is one document: the validation part still takes only the
    first --val-tokens tokens of it, and the document goes on in the training part."""
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line {i} of one long document\n" for i in range(2000)))
    store = data.build_store(str(path), tmp_path / "s", data.BuildSettings(val_tokens=1000),
                             progress=False)
    m = store.manifest
    assert m["tokens"]["val"] == 1000 and m["tokens"]["train"] > 50_000
    assert m["documents"] == {"val": 1, "train": 0, "read": 1}
    text = path.read_text().strip().encode()
    assert np.array_equal(flat_tokens(store), np.frombuffer(text + b"\x00", np.uint8).astype(
        np.uint16) + np.r_[np.zeros(len(text), np.uint16), [256]])


def test_max_tokens_and_max_docs_bound_the_store(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs(200))
    full = data.build_store(str(src), tmp_path / "full", data.BuildSettings(**SMALL), num_proc=1,
                            progress=False)
    cut = data.build_store(str(src), tmp_path / "cut", data.BuildSettings(max_tokens=2500, **SMALL),
                           num_proc=1, progress=False)
    assert cut.manifest["tokens"]["train"] == 2500
    assert np.array_equal(flat_tokens(cut), flat_tokens(full)[:len(flat_tokens(cut))])
    few = data.build_store(str(src), tmp_path / "few", data.BuildSettings(max_docs=50, **SMALL),
                           num_proc=1, progress=False)
    assert few.manifest["documents"]["read"] == 50
    # the validation part does not depend on how much training text follows it
    assert np.array_equal(few.part("val").read(0, len(few.part("val"))),
                          full.part("val").read(0, len(full.part("val"))))


def test_a_complete_store_is_reused_and_other_settings_are_refused(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs(50))
    first = data.build_store(str(src), tmp_path / "s", data.BuildSettings(**SMALL), progress=False)
    mtime = (tmp_path / "s" / data.MANIFEST).stat().st_mtime_ns
    again = data.build_store(str(src), tmp_path / "s", data.BuildSettings(**SMALL), progress=False)
    assert again.fingerprint == first.fingerprint
    assert (tmp_path / "s" / data.MANIFEST).stat().st_mtime_ns == mtime  # not rebuilt
    with pytest.raises(data.StoreError, match="already a complete store of another source"):
        data.build_store(str(src), tmp_path / "s", data.BuildSettings(val_tokens=10), progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(data.StoreError, match="exists and is not a token store"):
        data.build_store(str(src), tmp_path / "other", progress=False)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("mine", [["notes.txt", ".build/cache"], [".build/cache"], ["tokenizer/vocab"]])
def test_a_directory_of_the_users_is_never_built_in_nor_removed(tmp_path, mine):
    """Even one with a .build/ or tokenizer/ of its own (other tools make those)."""
    out = tmp_path / "users"
    for name in mine:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("mine")
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs(5))
    for settings in (data.BuildSettings(val_tokens=10**7), data.BuildSettings(val_tokens=10)):
        with pytest.raises(data.StoreError, match="exists and is not a token store"):
            data.build_store(str(src), out, settings, progress=False)
    assert all((out / name).read_text() == "mine" for name in mine)
    assert not data.is_store(out)


def test_bad_input_in_an_empty_directory_of_the_users_leaves_the_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs(5))
    with pytest.raises(data.StoreError, match="less than --val-tokens"):
        data.build_store(str(src), tmp_path / "empty", data.BuildSettings(val_tokens=10**7),
                         progress=False)
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


BUILD_CMD = [sys.executable, "-m", "stratopt_ds.data", "build", "synthetic", "--max-docs",
             "40000", "--val-tokens", "5000", "--shard-tokens", "50000", "--num-proc", "1",
             "--no-progress"]


def test_a_killed_build_is_refused_then_continues_to_the_same_store(tmp_path):
    reference = subprocess.run(BUILD_CMD + ["--out", str(tmp_path / "ref")], capture_output=True,
                               text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(BUILD_CMD + ["--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = out / ".build" / "state.json"
    deadline = time.time() + 120
    shards = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            shards = len(json.loads(state.read_text())["parts"]["train"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            shards = 0
        if shards >= 5:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 5 <= shards and not (out / data.MANIFEST).exists(), "the build finished before the kill"

    with pytest.raises(data.StoreError, match="incomplete token store .* interrupted"):
        data.open_store(out)
    request = data.DataRequest(str(out), seq_len=16)
    with pytest.raises(data.StoreError, match="incomplete token store"):
        request.check()

    again = subprocess.run(BUILD_CMD + ["--out", str(out)], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "continuing the build" in again.stdout and "complete shard(s)" in again.stdout
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref")
    assert manifest_without_time(out) == manifest_without_time(tmp_path / "ref")
    assert not (out / ".build").exists()
    data.open_store(out, verify=True)


def test_a_resumed_stream_skips_the_files_it_had_read(tmp_path, monkeypatch):
    """The position a build records lets it resume without opening the files before it."""
    from stratopt_ds.data import sources

    for i in range(4):
        write_jsonl(tmp_path / f"part{i}.jsonl", [f"file {i} doc {k}" for k in range(5)])
    source = data.describe_source(str(tmp_path))
    stream = data.DocumentStream(source, max_docs=17)
    docs, positions = [], []
    for doc in stream:
        docs.append(doc)
        positions.append(stream.position())
    assert len(docs) == 17 and positions[11] == {"docs": 12, "file": 2, "in_file": 2}
    opened = []
    real = sources.READERS[".jsonl"]
    monkeypatch.setitem(sources.READERS, ".jsonl", lambda p, f: opened.append(p.name) or real(p, f))
    assert list(data.DocumentStream(source, max_docs=17, start=positions[11])) == docs[12:]
    assert opened == ["part2.jsonl", "part3.jsonl"]


def test_a_resumed_hub_stream_continues_from_the_datasets_state(tmp_path, monkeypatch):
    """FineWeb's position is the streaming dataset's own state_dict (shown offline on a local
    streaming dataset of the same kind)."""
    from datasets import load_dataset

    from stratopt_ds.data import sources

    for i in range(3):
        write_jsonl(tmp_path / f"shard{i}.jsonl", [f"shard {i} row {k}" for k in range(6)])
    files = sorted(str(p) for p in tmp_path.glob("shard*.jsonl"))
    monkeypatch.setattr(sources, "fineweb_dataset", lambda config: load_dataset(
        "json", data_files=files, split="train", streaming=True))
    stream = data.DocumentStream(data.describe_source("fineweb"))
    docs, positions = [], []
    for doc in stream:
        docs.append(doc)
        positions.append(stream.position())
    assert len(docs) == 18 and "state" in positions[8]
    resumed = data.DocumentStream(data.describe_source("fineweb"), start=positions[8])
    assert list(resumed) == docs[9:]


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        found |= {int(c) for c in children}
        todo += [int(c) for c in children]
    return found


def test_killing_a_parallel_build_leaves_no_process_behind(tmp_path):
    """kill -9 of the build process alone (as the OOM killer does): its tokenizer workers and
    their forkserver end too, and the rerun continues to the same store."""
    cmd = [sys.executable, "-m", "stratopt_ds.data", "build", "synthetic", "--tokenizer", "bpe",
           "--bpe-vocab", "300", "--bpe-sample-chars", "20000", "--max-docs", "60000",
           "--val-tokens", "1000", "--shard-tokens", "20000", "--num-proc", "2", "--no-progress",
           "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "s")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state, helpers = tmp_path / "s" / ".build" / "state.json", set()
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        helpers |= descendants(proc.pid)
        if len(helpers) >= 3 and state.is_file() and "train-00001" in state.read_text():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(helpers) >= 3, "no workers seen: the build ended before the kill"
    deadline = time.time() + 20
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() and
                                         "zombie" not in Path(f"/proc/{p}/status").read_text()
                                         for p in helpers):
        time.sleep(0.1)
    alive = [p for p in helpers if Path(f"/proc/{p}").exists()
             and "zombie" not in Path(f"/proc/{p}/status").read_text()]
    for pid in alive:  # the test's own leftovers, by pid, before it fails
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"processes of the killed build still run: {alive}"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "continuing the build" in again.stdout, again.stderr[-2000:]
    assert data.open_store(tmp_path / "s", verify=True).manifest["documents"]["read"] == 60000


# ------------------------------------------------------------------------------------------------
# Reading: windows, the epoch order, resumable batches


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> data.TokenStore:
    base = tmp_path_factory.mktemp("store")
    src = write_jsonl(base / "docs.jsonl", paragraphs(400))
    return data.build_store(str(src), base / "store", data.BuildSettings(**SMALL), progress=False)


def test_windows_straddle_shards_and_match_the_flat_stream(small_store):
    flat = small_store.part("train").read(0, len(small_store.part("train")))
    windows = data.Windows(small_store.part("train"), seq_len=63)
    assert len(windows) == (len(flat) - 1) // 63
    idx = np.arange(len(windows))
    rows = windows.read(idx)
    expected = np.stack([flat[i * 63:i * 63 + 64] for i in idx])
    assert rows.dtype == torch.int64 and np.array_equal(rows.numpy(), expected)
    crossing = [i for i in idx if (i * 63) // 997 != (i * 63 + 63) // 997]
    assert crossing  # some windows do straddle two shards
    assert windows.read(crossing[::-1]).tolist() == expected[crossing[::-1]].tolist()
    with pytest.raises(IndexError):
        windows.read([len(windows)])


@pytest.mark.parametrize("n", [*range(1, 70), 257, 1000, 4096, 4097, 65537])
def test_feistel_permutation_is_a_bijection(n):
    perm = data.Permutation(n, seed=12345)
    values = perm(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))
    assert [int(perm(i)) for i in range(min(n, 40))] == values[:40].tolist()  # one int at a time


def test_feistel_permutation_is_seeded_random_and_per_index():
    n = 100_000
    a = data.epoch_permutation(n, seed=7, epoch=0)(np.arange(n))
    assert np.array_equal(a, data.epoch_permutation(n, 7, 0)(np.arange(n)))  # deterministic
    assert not np.array_equal(a, data.epoch_permutation(n, 7, 1)(np.arange(n)))  # per epoch
    assert not np.array_equal(a, data.epoch_permutation(n, 8, 0)(np.arange(n)))  # per seed
    some = np.array([5, 99_999, 0, 31_337])
    assert np.array_equal(data.epoch_permutation(n, 7, 0)(some), a[some])  # index by index
    # looks shuffled: few fixed points, no correlation between position and value, and every
    # tenth of the windows lands evenly over the epoch
    assert (a == np.arange(n)).sum() < 10
    assert abs(np.corrcoef(a, np.arange(n))[0, 1]) < 0.02
    counts = np.bincount(a[: n // 10] * 10 // n, minlength=10)
    assert counts.min() > 0.8 * n / 100


def test_batches_are_resumable_and_refuse_another_store_or_seed(small_store):
    windows = data.Windows(small_store.part("train"), seq_len=32)
    n = len(windows)
    full = data.BatchIterator(windows, batch_size=7, seed=3, fingerprint=small_store.fingerprint)
    expected = [next(full).rows()[0] for _ in range(2 * n // 7 + 3)]  # crosses two epochs
    first_epoch = np.concatenate([full.indices(k) for k in range(n // 7)])
    assert len(set(first_epoch.tolist())) == len(first_epoch)  # no window twice in an epoch
    resumed = data.BatchIterator(windows, 7, seed=3, fingerprint=small_store.fingerprint)
    for _ in range(12):
        next(resumed)
    state = resumed.state_dict()
    again = data.BatchIterator(windows, 7, seed=3, fingerprint=small_store.fingerprint)
    again.load_state_dict(state)
    assert all(torch.equal(next(again).rows()[0], expected[k]) for k in range(12, len(expected)))
    batch = next(data.BatchIterator(windows, 7, seed=3, fingerprint=small_store.fingerprint))
    x, y = batch.rows()
    assert torch.equal(batch.rows(2, 5)[0], x[2:5]) and torch.equal(x[:, 1:], y[:, :-1])
    assert batch.tokens == 7 * 32
    other = data.BatchIterator(windows, 7, seed=4, fingerprint=small_store.fingerprint)
    assert not torch.equal(next(other).rows()[0], expected[0])
    with pytest.raises(data.DataError, match="seed"):
        other.load_state_dict(state)
    elsewhere = data.BatchIterator(windows, 7, seed=3, fingerprint="another-store")
    with pytest.raises(data.DataError, match="store"):
        elsewhere.load_state_dict(state)


def test_window_sampler_follows_the_epoch_order(small_store):
    windows = data.Windows(small_store.part("train"), seq_len=32)
    sampler = data.WindowSampler(len(windows), seed=3)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(len(windows)))
    it = data.BatchIterator(windows, batch_size=len(windows), seed=3)
    assert epoch0 == next(it).indices.tolist() and list(sampler) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) == next(it).indices.tolist() != epoch0
    item = data.WindowDataset(windows)[5]
    assert torch.equal(item["input_ids"], windows.read([5])[0]) and item["labels"] is item["input_ids"]


def test_reading_keeps_nothing_that_grows_with_the_store(small_store):
    """A rank keeps no per-window structure and no mapping between reads (the store's pages stay
    in the shared page cache, not in the rank's resident memory)."""
    part = data.open_store(small_store.path).part("train")
    batches = data.BatchIterator(data.Windows(part, seq_len=16), batch_size=4, seed=0)
    before = {k: (list(v) if isinstance(v, list) else v) for k, v in vars(part).items()}
    for _ in range(50):
        next(batches).rows()
    assert vars(part) == before and len(part.files) == len(small_store.manifest["parts"]["train"])
    order = vars(batches._perms[0])  # the epoch order is a few keys, not a table of windows
    assert sum(np.asarray(v).size for v in order.values()) < 16


# ------------------------------------------------------------------------------------------------
# Tokenizers


def test_bpe_trains_once_and_is_cached(tmp_path):
    docs = list(data.synthetic_documents(200))
    first = data.train_bpe(docs, 300, cache_dir=tmp_path)
    assert not first.from_cache and first.path.is_file() and first.path.parent == tmp_path
    mtime = first.path.stat().st_mtime_ns
    second = data.train_bpe(docs, 300, cache_dir=tmp_path)
    assert second.from_cache and second.path == first.path and first.path.stat().st_mtime_ns == mtime
    text = docs[0]
    assert second.encode(text) == first.encode(text) and second.decode(second.encode(text)) == text
    assert len(first.encode(text)) < len(text.encode())  # merges actually compress
    from stratopt_ds.data.tokenizer import bpe_cache_path
    assert bpe_cache_path(docs, 301, tmp_path) != first.path
    assert bpe_cache_path(docs[1:], 300, tmp_path) != first.path


def test_a_local_hugging_face_tokenizer_directory(tmp_path, monkeypatch):
    """Any HF tokenizer works by name or directory; offline, a directory saved from our BPE."""
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setattr(store_module, "CHUNK_DOCS", 9)  # enough chunks for the worker processes

    docs = paragraphs(120)
    bpe = data.train_bpe(docs, 320, cache_dir=tmp_path)
    hf_dir = tmp_path / "hf-tok"
    PreTrainedTokenizerFast(tokenizer_object=bpe.tokenizer, eos_token=data.EOS_TOKEN).save_pretrained(hf_dir)
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    store = data.build_store(str(src), tmp_path / "s", data.BuildSettings(tokenizer=str(hf_dir), **SMALL),
                             num_proc=2, progress=False)
    assert store.tokenizer["kind"] == "hf" and "tokenizer.json" in store.tokenizer["files"]
    expected = np.array([t for d in docs for t in bpe.encode(d) + [bpe.eos_id]])
    assert np.array_equal(flat_tokens(store), expected)
    assert store.load_tokenizer().encode(docs[0]) == bpe.encode(docs[0])
    assert data.DataRequest(str(store.path), 16, tokenizer=str(hf_dir), val_windows=8).check() == str(hf_dir)


def test_a_resumed_build_whose_tokenizer_was_changed_fails_without_hanging(tmp_path, monkeypatch):
    """The parent loads (and checks) the tokenizer before starting any worker process."""
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs(400))
    monkeypatch.setattr(store_module, "CHUNK_DOCS", 5)
    settings = data.BuildSettings(tokenizer="bpe", bpe_vocab=300, val_tokens=100, shard_tokens=500)
    real_route = store_module._Build.route
    calls = []

    def route_then_die(self, *args):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt  # stands for a kill: the build keeps its progress
        return real_route(self, *args)

    monkeypatch.setattr(store_module._Build, "route", route_then_die)
    with pytest.raises(KeyboardInterrupt):
        data.build_store(str(src), tmp_path / "s", settings, num_proc=2, progress=False,
                         cache_dir=tmp_path / "cache")
    monkeypatch.setattr(store_module._Build, "route", real_route)
    tok = tmp_path / "s" / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text() + " ")
    with pytest.raises(data.TokenizerError, match="tokenizer.json: checksum mismatch"):
        data.build_store(str(src), tmp_path / "s", settings, num_proc=2, progress=False,
                         cache_dir=tmp_path / "cache")
    assert (tmp_path / "s" / "train-00000.bin").is_file()  # a resumed build keeps its shards


def test_a_source_directory_with_a_manifest_of_another_tool_is_a_source(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", paragraphs(200))
    (tmp_path / "manifest.json").write_text('{"name": "my dataset", "version": 3}')
    assert not data.is_store(tmp_path)
    request = data.DataRequest(str(tmp_path), 16, val_windows=4, cache_dir=str(tmp_path / ".c"))
    assert request.check() == "byte" and len(request.open().train) > 0


def test_an_unknown_hub_tokenizer_offline_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs(20))
    with pytest.raises(data.TokenizerError, match=r"--tokenizer 'no-such/tokenizer-xyz'.*offline"):
        data.build_store(str(src), tmp_path / "s", data.BuildSettings(tokenizer="no-such/tokenizer-xyz"),
                         progress=False)
    assert not (tmp_path / "s").exists()  # nothing half-written stays


# ------------------------------------------------------------------------------------------------
# Requests: a store as it is, a source through the cache


@pytest.mark.dist
def test_a_source_is_built_once_into_the_cache_by_whichever_process_comes_first(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs(3000))
    code = ("import sys; from stratopt_ds import data; "
            "s = data.DataRequest(sys.argv[1], 32, val_windows=8, cache_dir=sys.argv[2]).store(); "
            "print(s.path, s.fingerprint)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(src), str(tmp_path / "cache")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len({o[0] for o in outs}) == 1  # the same store, the same content, for every process
    stores = [p for p in (tmp_path / "cache" / "stores").glob("docs.jsonl-byte-*") if p.is_dir()]
    assert len(stores) == 1 and str(stores[0]) == outs[0][0].split()[0]
    # a later request of the same source and settings opens it without building
    path = stores[0]
    mtime = (path / data.MANIFEST).stat().st_mtime_ns
    again = data.DataRequest(str(src), 32, val_windows=8, cache_dir=str(tmp_path / "cache")).open()
    assert again.store.path == path and (path / data.MANIFEST).stat().st_mtime_ns == mtime
    assert len(again.val) == 8  # the source's store holds exactly the validation windows asked for
    # editing the source gives a new identity: a new store
    src.write_text(src.read_text() + json.dumps({"text": "one more"}) + "\n")
    newer = data.DataRequest(str(src), 32, val_windows=8, cache_dir=str(tmp_path / "cache")).store()
    assert newer.path != path


def test_a_store_brings_its_tokenizer(small_store):
    ok = data.DataRequest(str(small_store.path), seq_len=16, tokenizer="byte", val_windows=4)
    assert ok.check() == "byte"
    for kwargs, words in [
            ({"tokenizer": "bpe"}, "--tokenizer bpe conflicts with the tokenizer of the store"),
            ({"bpe_vocab": 512}, "--tokenizer bpe --bpe-vocab 512 conflicts"),
            ({"max_docs": 10}, "--max-docs applies when --data is a source")]:
        with pytest.raises(data.DataError, match=words):
            data.DataRequest(str(small_store.path), seq_len=16, **kwargs).check()


# ------------------------------------------------------------------------------------------------
# Bad input: a clear message naming the file and the fault, and no half-written store


@pytest.fixture
def store_copy(tmp_path, small_store) -> Path:
    import shutil
    path = tmp_path / "copy"
    shutil.copytree(small_store.path, path)
    return path


def test_a_missing_shard_is_named(store_copy):
    (store_copy / "train-00001.bin").unlink()
    with pytest.raises(data.StoreError, match=r"train-00001.bin: shard missing"):
        data.open_store(store_copy)


def test_a_truncated_shard_is_named(store_copy):
    path = store_copy / "train-00002.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(data.StoreError, match=r"train-00002.bin: 1,992 bytes, the manifest says "
                                              r"997 tokens = 1,994 bytes: the shard is truncated"):
        data.open_store(store_copy)


def test_a_corrupted_shard_is_found_by_verify(store_copy):
    path = store_copy / "train-00003.bin"
    raw = bytearray(path.read_bytes())
    raw[10] ^= 0xFF
    path.write_bytes(bytes(raw))
    data.open_store(store_copy)  # sizes agree: only the checksums can tell
    with pytest.raises(data.StoreError, match=r"train-00003.bin: checksum mismatch"):
        data.open_store(store_copy, verify=True)
    proc = subprocess.run([sys.executable, "-m", "stratopt_ds.data", "info", str(store_copy), "--verify"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "train-00003.bin: checksum mismatch" in proc.stderr


def test_a_manifest_of_another_format_version(store_copy):
    manifest = json.loads((store_copy / data.MANIFEST).read_text())
    manifest["version"] = 99
    (store_copy / data.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(data.StoreError, match=r"manifest.json: store format version 99; this "
                                              r"stratopt_ds reads version 1: rebuild"):
        data.open_store(store_copy)


def test_a_store_that_does_not_fit_the_model_or_the_run(small_store):
    with pytest.raises(data.StoreError, match=r"token ids up to 256 \(byte, vocab 257\) do not fit "
                                              r"a model with a vocabulary of 200"):
        small_store.check_model_vocab(200)
    small_store.check_model_vocab(257)
    val = len(small_store.part("val"))
    with pytest.raises(data.StoreError, match=rf"--seq-len {val} is longer than the validation "
                                              rf"part of .* \({val:,} tokens\)"):
        data.DataRequest(str(small_store.path), seq_len=val).check()
    data.DataRequest(str(small_store.path), seq_len=val, evaluate=False).check()  # no evaluation
    with pytest.raises(data.StoreError, match=r"--val-windows 100 of --seq-len 16 needs 1,601"):
        data.DataRequest(str(small_store.path), seq_len=16, val_windows=100).check()


@pytest.mark.parametrize("name, content, words", [
    ("empty.txt", b"\n\n   \n", "no text is left for the training part"),
    ("binary.txt", b"hello\nwor\x00ld\n", "binary.txt: line 2 holds a NUL byte"),
    ("latin1.txt", "caf\xe9\n".encode("latin-1"), "latin1.txt: line 1 is not UTF-8 text"),
    ("bad.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', "bad.jsonl:2: expected a JSON object with a 'text'"),
    ("bad.parquet", b"PAR1 this is not parquet", "bad.parquet: not a readable Parquet file"),
    ("notes.csv", b"a,b\n", "unsupported file"),
])
def test_bad_sources_are_named_and_leave_nothing(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "store"
    with pytest.raises(data.DataError, match=words.replace("(", r"\(").replace("'", "'")):
        data.build_store(str(path), out, data.BuildSettings(val_tokens=0), progress=False)
    assert not out.exists()


def test_missing_and_unusable_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.txt"):
        data.describe_source(str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="no files match"):
        data.describe_source(str(tmp_path / "*.jsonl"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(data.SourceError, match="holds no .txt/.jsonl/.parquet files"):
        data.describe_source(str(tmp_path / "empty_dir"))
    with pytest.raises(data.StoreError, match="not a token store|no such token store"):
        data.open_store(tmp_path / "empty_dir")
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs(5))
    with pytest.raises(data.StoreError, match=r"holds only \d+ tokens .* less than --val-tokens 100,000"):
        data.build_store(str(src), tmp_path / "s", data.BuildSettings(val_tokens=100_000), progress=False)
    with pytest.raises(data.DataError, match="--max-tokens must be an integer >= 1, got 0"):
        data.BuildSettings(max_tokens=0)


def test_a_directory_and_a_glob_of_files_read_in_sorted_order(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    write_jsonl(tmp_path / "d" / "b.jsonl", ["second file"])
    write_jsonl(tmp_path / "d" / "a.jsonl", ["first file"])
    (tmp_path / "d" / "sub" / "c.txt").write_text("third\n\nfourth\n")
    (tmp_path / "d" / "README.md").write_text("not data")
    source = data.describe_source(str(tmp_path / "d"))
    assert list(data.iter_documents(source)) == ["first file", "second file", "third", "fourth"]
    assert list(data.iter_documents(data.describe_source(str(tmp_path / "d" / "*.jsonl")))) == [
        "first file", "second file"]


def test_parquet_is_read_in_batches(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = paragraphs(3000)
    pq.write_table(pa.table({"text": docs, "n": list(range(3000))}), tmp_path / "d.parquet",
                   row_group_size=500)
    assert list(data.iter_documents(data.describe_source(str(tmp_path / "d.parquet")))) == docs
    pq.write_table(pa.table({"body": docs[:3]}), tmp_path / "e.parquet")
    with pytest.raises(data.SourceError, match="e.parquet: no 'text' column; columns: body"):
        list(data.iter_documents(data.describe_source(str(tmp_path / "e.parquet"))))


def test_command_line_build_and_info(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs(200))
    out = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-m", "stratopt_ds.data", "build", str(src), "--out", str(out),
                           "--tokenizer", "byte", "--val-tokens", "500", "--num-proc", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tok/s" in proc.stderr  # the progress bar shows the build's throughput
    assert f"{out}: {src} | byte (vocab 257)" in proc.stdout
    info = subprocess.run([sys.executable, "-m", "stratopt_ds.data", "info", str(out), "--verify"],
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0 and info.stdout == proc.stdout
    bad = subprocess.run([sys.executable, "-m", "stratopt_ds.data", "build", str(tmp_path / "x.txt"),
                          "--out", str(tmp_path / "y")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "error: data file not found" in bad.stderr
    assert not (tmp_path / "y").exists()
