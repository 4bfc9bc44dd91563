"""Bad data input (issue 15): every entry point refuses a binary or corrupt file, an unusable
directory, a tokenizer that cannot be had offline, or a source too small for the run, when the
run is checked (``DataRequest.check``, through ``stratopt_ds.train.resolve``): exit code 2, one
message naming the option, the file and what is allowed, nothing written. Offline, CPU."""
from __future__ import annotations

import bz2
import errno
import gzip
import io
import json
import lzma
import os
import random
import zipfile
from pathlib import Path

import pytest

from helpers import assert_usage_error
from stratopt_ds import data, models, train
from stratopt_ds.data import __main__ as data_cli

SHM = Path("/dev/shm")
TEXT = "".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog, café über.\n\n"
               for i in range(400))  # about 30 KB of UTF-8 text


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def parquet_bytes(tmp_path: Path, column: str = "text") -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: TEXT.split("\n\n")}), tmp_path / "_ok.parquet")
    payload = (tmp_path / "_ok.parquet").read_bytes()
    (tmp_path / "_ok.parquet").unlink()
    return payload


def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("corpus.txt", TEXT)
    return buffer.getvalue()


def snapshot(paths: list[Path]) -> set[Path]:
    return {p for root in paths if root.is_dir() for p in root.rglob("*")}


@pytest.fixture
def refused(tmp_path, capsys, monkeypatch):
    """``refused(argv, words)``: ``stratopt_ds.train.main`` exits with code 2 naming every word,
    before any data or model work, and leaves nothing: no --out, no store in the cache, no new
    file in /dev/shm."""
    out = tmp_path / "out"
    cache = Path(os.environ["STRATOPT_CACHE"])

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(data.DataRequest, "open", no_work)
    monkeypatch.setattr(data.request, "build_store", no_work)
    monkeypatch.setattr(models, "build_model", no_work)

    def check(argv: list[str], words: list[str]) -> str:
        before = snapshot([SHM, cache])
        full = [*argv, "--out", str(out), "--preset", "tiny", "--steps", "2", "--no-progress"]
        assert_usage_error(train.main, full, words, capsys)
        assert not out.exists() or not any(out.iterdir())
        assert snapshot([SHM, cache]) == before
        return full

    return check


# ------------------------------------------------------------------------------------------------
# Files that are not what their suffix says: refused at check time, naming the file


BAD_FILES = {  # name -> (content, words of the message besides --data and the path)
    "random.txt": (random_bytes(5000), ["not UTF-8 text"]),
    "random.jsonl": (random_bytes(5000, seed=1), ["not UTF-8 text"]),
    "gzip.txt": (gzip.compress(TEXT.encode()), ["gzip data", "not UTF-8 text", "decompress"]),
    "gzip.jsonl": (gzip.compress(b'{"text": "a"}\n' * 100), ["gzip data", "decompress"]),
    "bzip2.txt": (bz2.compress(TEXT.encode()), ["bzip2 data", "not UTF-8 text"]),
    "xz.txt": (lzma.compress(TEXT.encode()), ["xz data", "not UTF-8 text"]),
    "zip.txt": (zip_bytes(), ["zip data", "not UTF-8 text"]),
    "zstd.txt": (b"\x28\xb5\x2f\xfd" + random_bytes(100), ["zstd data"]),
    "utf16.txt": (TEXT.encode("utf-16"), ["UTF-16 data", "convert it"]),
    "latin1.txt": ("café\n".encode("latin-1") * 10, ["line 1 is not UTF-8 text"]),
    "nul-line3.jsonl": (b'{"text": "a"}\n{"text": "b"}\n{"text": "\x00"}\n', ["line 3 holds a NUL byte"]),
    "random.parquet": (random_bytes(5000, seed=2), ["not a readable Parquet file", "PAR1", "start"]),
    "empty.parquet": (b"", ["not a readable Parquet file", "PAR1"]),
    "text.parquet": (TEXT.encode(), ["not a readable Parquet file", "PAR1"]),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_a_file_that_is_not_what_its_suffix_says_is_refused_by_the_cli(tmp_path, refused, name):
    content, words = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    refused(["--data", str(path)], ["--data", str(path), *words])


def test_a_truncated_parquet_file_is_refused(tmp_path, refused):
    payload = parquet_bytes(tmp_path)
    path = tmp_path / "cut.parquet"
    path.write_bytes(payload[: len(payload) // 2])  # a copy that stopped half way
    refused(["--data", str(path)], [f"--data {path}", "not a readable Parquet file", "PAR1 magic at its end"])


def test_a_parquet_file_corrupt_inside_is_refused(tmp_path, refused):
    """The magic at both ends, garbage between: found by reading the footer at check time."""
    path = tmp_path / "inside.parquet"
    path.write_bytes(b"PAR1" + random_bytes(3000, seed=3) + b"PAR1")
    refused(["--data", str(path)], [f"--data {path}", "not a readable Parquet file"])


def test_a_parquet_file_without_the_text_column_is_refused(tmp_path, refused):
    path = tmp_path / "body.parquet"
    path.write_bytes(parquet_bytes(tmp_path, column="body"))
    refused(["--data", str(path)], [f"--data {path}", "no 'text' column", "columns: body"])


@pytest.mark.parametrize("content, words", [
    (b"just some text\nnot json\n", ["body.jsonl:1", "expected a JSON object"]),
    (b'{"text": "ok"}\n{"body": "no text field"}\n', ["body.jsonl:2", "'text' field"]),
    (b'{"text": 3}\n', ["body.jsonl:1", "holds int, not text"]),
])
def test_a_jsonl_file_that_is_not_json_lines_of_text_is_refused(tmp_path, refused, content, words):
    path = tmp_path / "body.jsonl"
    path.write_bytes(content)
    refused(["--data", str(path)], ["--data", *words])


def test_a_binary_file_inside_a_directory_is_named(tmp_path, refused):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT)
    (folder / "b.txt").write_bytes(random_bytes(4000))
    refused(["--data", str(folder)], [f"--data {folder}", str(folder / "b.txt"), "not UTF-8 text"])


def test_a_binary_file_matched_by_a_glob_is_named(tmp_path, refused):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "z.txt").write_bytes(gzip.compress(b"x" * 1000))
    pattern = str(tmp_path / "*.txt")
    refused(["--data", pattern], ["--data", str(tmp_path / "z.txt"), "gzip data"])


# ------------------------------------------------------------------------------------------------
# Directories that are neither a token store nor a folder of sources


@pytest.mark.parametrize("entries, holds", [
    ({}, "(it is empty)"),
    ({"notes.csv": "a,b\n", "README.md": "hi"}, "(only README.md, notes.csv)"),
    ({"manifest.json": '{"name": "another tool"}'}, "(only manifest.json)"),
    ({"sub/deeper/x.md": "hi"}, "(only sub)"),
    ({".hidden.txt": TEXT}, "(only .hidden.txt)"),
])
def test_a_directory_without_sources_is_named_as_such(tmp_path, refused, entries, holds):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, text in entries.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    refused(["--data", str(folder)],
            [f"--data {folder}: a directory, but neither a token store (no manifest.json) nor a "
             f"folder of sources: it holds no .txt/.jsonl/.parquet files {holds}"])


# ------------------------------------------------------------------------------------------------
# Tokenizers that cannot be had: named at check time, without network


ALTERNATIVES = ["'byte'", "'bpe'", "local directory"]


def test_an_unknown_hub_tokenizer_offline_is_refused(tmp_path, refused, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused(["--data", "synthetic", "--tokenizer", "no-such-org/no-such-tok"],
            ["--tokenizer 'no-such-org/no-such-tok'", "not in the Hugging Face cache",
             "offline mode is set", *ALTERNATIVES])


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_each_offline_switch_counts(tmp_path, refused, monkeypatch, variable):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "1")
    monkeypatch.setattr(data.tokenizer, "hub_reachable",
                        lambda *a: pytest.fail("offline: the network must not be tried"))
    refused(["--data", "synthetic", "--tokenizer", "org/tok"],
            ["--tokenizer 'org/tok'", "offline mode is set"])


def test_an_unknown_hub_tokenizer_with_the_hub_unreachable_is_refused(tmp_path, refused, monkeypatch):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(data.tokenizer, "hub_reachable", lambda *a: False)  # no network here
    refused(["--data", "synthetic", "--tokenizer", "no-such-org/no-such-tok"],
            ["--tokenizer 'no-such-org/no-such-tok'", "the hub cannot be reached", *ALTERNATIVES])


@pytest.mark.parametrize("name, words", [
    ("/no/such/tokenizer/dir", ["no such directory", "not a hub name"]),
    ("./relative/missing", ["no such directory", "not a hub name"]),
    ("bad name!!", ["not a hub name (org/name)"]),
    ("a/b/c", ["not a hub name"]),
])
def test_a_tokenizer_that_is_neither_a_directory_nor_a_hub_name(tmp_path, refused, name, words):
    refused(["--data", "synthetic", "--tokenizer", name], [f"--tokenizer {name!r}", *words, *ALTERNATIVES])


def test_a_tokenizer_directory_without_tokenizer_files(tmp_path, refused):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    refused(["--data", "synthetic", "--tokenizer", str(folder)],
            [f"--tokenizer {folder}", "a directory without tokenizer files", "tokenizer.json",
             *ALTERNATIVES])


def test_a_cached_hub_tokenizer_passes_the_check_offline(tmp_path, monkeypatch):
    """In the Hugging Face cache: accepted without network (the build loads it from there)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = tmp_path / "hub"
    snap = hub / "models--some-org--some-tok" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "tokenizer.json").write_text("{}")
    (hub / "models--some-org--some-tok" / "refs").mkdir()
    (hub / "models--some-org--some-tok" / "refs" / "main").write_text("0" * 40)
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    request = data.DataRequest("synthetic", 16, tokenizer="some-org/some-tok", val_windows=2)
    assert request.check() == "some-org/some-tok"
    with pytest.raises(data.TokenizerError, match="not in the Hugging Face cache"):
        data.DataRequest("synthetic", 16, tokenizer="some-org/other-tok", val_windows=2).check()


# ------------------------------------------------------------------------------------------------
# A source too small for the run: the validation windows and one training window


@pytest.mark.parametrize("extra, words", [
    ([], ["holds 2,"]),                                   # 'byte': exact
    (["--tokenizer", "bpe"], ["holds at most 2,"]),       # 'bpe': an upper bound
])
def test_a_source_too_small_for_seq_len_is_refused(tmp_path, refused, extra, words):
    path = tmp_path / "small.txt"
    path.write_text(TEXT[:2500])
    refused(["--data", str(path), "--seq-len", "64", "--val-windows", "64", *extra],
            ["--seq-len 64", f"--data {path}", *words, "a run needs 4,162", "--val-windows 64",
             "shorter --seq-len"])


def test_a_synthetic_source_cut_by_max_docs_is_refused(tmp_path, refused):
    refused(["--data", "synthetic", "--max-docs", "2", "--seq-len", "64", "--val-windows", "16"],
            ["--seq-len 64", "--data synthetic (--max-docs 2)", "a run needs 1,090"])


def test_too_many_validation_windows_for_the_source_is_refused(tmp_path, refused):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    refused(["--data", str(path), "--seq-len", "32", "--val-windows", "5000"],
            ["--seq-len 32", "--val-windows 5000", "a run needs 160,034"])


def test_max_tokens_below_one_training_window_is_refused():
    with pytest.raises(data.DataError, match=r"--max-tokens 64 leaves no training window of "
                                             r"--seq-len 64 \(\+1\) tokens"):
        data.DataRequest("synthetic", 64, max_tokens=64, val_windows=2).check()


def test_the_size_check_agrees_exactly_with_the_store_a_byte_source_builds(tmp_path):
    """Exact for 'byte': the check passes exactly when the built store holds the validation
    windows and a training window."""
    path = tmp_path / "tiny.txt"
    path.write_text("hello world\n\nsecond doc here\n\nthird café\n")
    outcomes = []
    for seq_len in range(1, 25):
        request = data.DataRequest(str(path), seq_len, val_windows=1, cache_dir=str(tmp_path / "c"))
        try:
            request.check()
            passes = True
        except data.DataError as e:
            assert f"--seq-len {seq_len}: --data {path} holds 40 tokens" in str(e)
            passes = False
        try:
            opened = request.open(progress=False)
            fits = len(opened.train) >= 1 and len(opened.val) == 1
        except data.DataError:
            fits = False
        assert passes == fits, seq_len
        outcomes.append(passes)
    assert outcomes.index(False) == 19  # 20 validation tokens + 20 of training > 40: refused


# ------------------------------------------------------------------------------------------------
# Good files pass the check: the sniff has no false alarm


@pytest.mark.parametrize("name, content", [
    ("bom.txt", "\ufeff".encode() + TEXT.encode()),                    # a UTF-8 byte order mark
    ("crlf.txt", TEXT.replace("\n", "\r\n").encode()),
    ("cut.txt", b"a" * (8192 - 1) + "é".encode() + b"\n\n" + TEXT.encode()),  # é across 8 KB
    ("emoji.jsonl", b"".join(json.dumps({"text": f"{i} \U0001F600 caf\u00e9 " * 30},
                                        ensure_ascii=False).encode() + b"\n" for i in range(300))),
    ("ok.parquet", None),
])
def test_good_files_pass_the_check(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(parquet_bytes(tmp_path) if content is None else content)
    assert data.DataRequest(str(path), 32, val_windows=4).check() == "byte"


# ------------------------------------------------------------------------------------------------
# Reading errors at build time name the file (the check reads only a file's first bytes)


def test_binary_data_past_the_checked_head_fails_the_build_naming_file_and_line(tmp_path):
    path = tmp_path / "late.txt"
    path.write_bytes(TEXT.encode() + b"tail \xff\xfe binary\n")
    line = TEXT.count("\n") + 1
    assert data.DataRequest(str(path), 16, val_windows=2).check() == "byte"  # the head is text
    out = tmp_path / "store"
    with pytest.raises(data.SourceError, match=rf"late.txt: line {line} is not UTF-8 text"):
        data.build_store(str(path), out, data.BuildSettings(val_tokens=100), progress=False)
    assert not out.exists()


def test_a_read_error_in_the_middle_of_a_file_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "disk.txt"
    path.write_text(TEXT)

    class FailingFile(io.BytesIO):  # the first lines, then EIO (a disk or network file system)
        def __iter__(self):
            yield b"first line\n"
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: FailingFile())
    with pytest.raises(data.SourceError, match=r"disk.txt: cannot be read \(Input/output error\)"):
        list(data.sources.read_txt(path))


# ------------------------------------------------------------------------------------------------
# The data command line: the same checks, exit code 2, no store directory


@pytest.mark.parametrize("name, content, words", [
    ("random.txt", random_bytes(3000), ["random.txt", "not UTF-8 text"]),
    ("gz.jsonl", gzip.compress(b'{"text": "a"}\n'), ["gz.jsonl", "gzip data"]),
    ("random.parquet", random_bytes(3000), ["random.parquet", "not a readable Parquet file"]),
])
def test_the_data_build_command_refuses_bad_files(tmp_path, capsys, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "store"
    with pytest.raises(SystemExit) as exc:
        data_cli.main(["build", str(path), "--out", str(out), "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not out.exists()
