"""The token store: documents tokenized once into flat shards that every rank memory-maps.

Layout of a store directory::

    manifest.json        written last and atomically: a store without it is never read
    tokenizer/           the tokenizer's files (none for 'byte'), hashed in the manifest
    val-00000.bin ...    the validation part: the source's first --val-tokens tokens
    train-00000.bin ...  the training part: every later document
    .build/              only while building: progress of an interrupted build

A shard is a headerless array of token ids (``uint16`` when the vocabulary fits, else ``uint32``,
as in nanoGPT's ``.bin`` files), every document followed by EOS, cut at exactly
``shard_tokens`` tokens (the last shard of a part may be shorter), so that token ``i`` of a part
lies in shard ``i // shard_tokens``: a reader needs no index that grows with the store.

**Building** (``build_store``) reads the source as a stream, tokenizes chunks of documents in
``num_proc`` worker processes and writes them back *in order*, so the tokens never depend on
``num_proc``. Memory is bounded by the in-flight chunks and one shard's buffer, whatever the
source's size. After each complete shard the build records its progress in ``.build/``; a build
that is killed continues from its last complete shard when run again with the same settings.

**Reading** (``open_store``) checks the manifest's format version and every shard's size against
it (``verify=True`` also compares checksums) and opens shards with ``np.memmap`` only when a read
touches them.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import signal
import threading
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
from tqdm import tqdm

from .errors import DataError, StoreError
from .sources import FINEWEB_CONFIG, DocumentStream, Source, describe_source
from .tokenizer import (DEFAULT_BPE_VOCAB, MIN_BPE_VOCAB, TOKENIZER_DIR, encode_documents,
                        load_tokenizer, make_tokenizer, save_tokenizer, token_dtype)

FORMAT = "stratopt-token-store"
VERSION = 1
MANIFEST = "manifest.json"
BUILD_DIR = ".build"
PARTS = ("val", "train")
DEFAULT_SHARD_TOKENS = 1 << 27   # 256 MB of uint16: a few seconds of work lost to a kill
DEFAULT_VAL_TOKENS = 1 << 20
CHUNK_CHARS = 1 << 20            # text per task sent to a worker
CHUNK_DOCS = 4096


# ------------------------------------------------------------------------------------------------
# What a build is asked to do


@dataclass(frozen=True)
class BuildSettings:
    """Everything besides the source that the tokens depend on (``num_proc`` is not: it changes
    only the speed). Each value is checked here, and an error names its option."""

    tokenizer: str = "byte"                 # 'byte', 'bpe', or a hub name / local directory
    bpe_vocab: int = DEFAULT_BPE_VOCAB
    bpe_sample_chars: int = 16 << 20        # the source prefix the BPE is trained on
    max_docs: Optional[int] = None          # documents read from the source, at most
    max_tokens: Optional[int] = None        # tokens of the training part, at most
    val_tokens: int = DEFAULT_VAL_TOKENS    # the validation part: the source's first tokens
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    text_field: str = "text"                # of .jsonl objects and .parquet columns
    fineweb_config: str = FINEWEB_CONFIG

    def __post_init__(self):
        for option, value, low in [("--bpe-vocab", self.bpe_vocab, MIN_BPE_VOCAB),
                                   ("--bpe-sample-chars", self.bpe_sample_chars, 1),
                                   ("--max-docs", self.max_docs, 1),
                                   ("--max-tokens", self.max_tokens, 1),
                                   ("--val-tokens", self.val_tokens, 0),
                                   ("--shard-tokens", self.shard_tokens, 1)]:
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < low):
                raise DataError(f"{option} must be an integer >= {low}, got {value!r}")
        if not self.tokenizer:
            raise DataError("--tokenizer must name a tokenizer: 'byte', 'bpe', a hub name or a "
                            "local directory")

    def identity(self) -> dict:
        """The settings as a cache key sees them (the BPE's own values only for 'bpe')."""
        out = asdict(self)
        if self.tokenizer != "bpe":
            out.pop("bpe_vocab"), out.pop("bpe_sample_chars")
        return out


def build_key(source: Source, settings: BuildSettings) -> str:
    """A hash of the format, the source's identity and the settings: equal keys, equal tokens."""
    description = {"format": FORMAT, "version": VERSION,
                   "source": source.identity(settings.fineweb_config),
                   "settings": settings.identity()}
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------------------------
# Writing


def _write_atomic(path: Path, payload: bytes) -> None:
    """Write through a temporary name, flush to disk, then rename: readers see all or nothing."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    _write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


class PartWriter:
    """One part's shards, written as the ids arrive: the open shard is a temporary file that is
    renamed to its final name once it holds ``shard_tokens`` ids (or the part ends), with its
    sha256 computed on the way. Memory: the ids of one call, whatever the shard size."""

    def __init__(self, directory: Path, part: str, dtype: np.dtype, shard_tokens: int,
                 shards: Iterable[dict] = (), pending: Optional[np.ndarray] = None):
        self.directory, self.part, self.dtype = directory, part, dtype
        self.shard_tokens = shard_tokens
        self.shards = list(shards)
        self.file, self.digest, self.buffered = None, None, 0
        if pending is not None and len(pending):
            self._append(pending)

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self.buffered

    def _names(self) -> tuple[Path, Path]:
        name = f"{self.part}-{len(self.shards):05d}.bin"
        return self.directory / name, self.directory / f".{name}.tmp"

    def pending(self) -> np.ndarray:
        """The ids of the open shard (read back: fewer than one chunk's when a state is saved)."""
        if self.file is None:
            return np.zeros(0, self.dtype)
        self.file.flush()
        return np.fromfile(self._names()[1], dtype=self.dtype)

    def add(self, ids: np.ndarray) -> bool:
        """Append ids; True when a shard was completed."""
        completed = False
        while len(ids):
            room = self.shard_tokens - self.buffered
            self._append(ids[:room])
            ids = ids[room:]
            if self.buffered == self.shard_tokens:
                self._finish()
                completed = True
        return completed

    def close(self) -> bool:
        """Finish the last, shorter shard; True when there was one."""
        if not self.buffered:
            return False
        self._finish()
        return True

    def _append(self, ids: np.ndarray) -> None:
        if self.file is None:
            self.file, self.digest = open(self._names()[1], "wb"), hashlib.sha256()
        payload = np.ascontiguousarray(ids, dtype=self.dtype).tobytes()
        self.file.write(payload)
        self.digest.update(payload)
        self.buffered += len(ids)

    def _finish(self) -> None:
        final, tmp = self._names()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(tmp, final)
        self.shards.append({"file": final.name, "tokens": self.buffered,
                            "sha256": self.digest.hexdigest()})
        self.file, self.digest, self.buffered = None, None, 0


def _chunks(stream: DocumentStream) -> Iterator[tuple[list[str], dict]]:
    """(documents, the stream's position after them): about CHUNK_CHARS characters, the unit of
    work of one worker."""
    chunk, size = [], 0
    for doc in stream:
        chunk.append(doc)
        size += len(doc)
        if size >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCS:
            yield chunk, stream.position()
            chunk, size = [], 0
    if chunk:
        yield chunk, stream.position()


_worker_state: dict = {}


def _init_worker(directory: str, info: dict) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    # The training run's stop signal (slurm's time-limit warning reaches every process of the
    # job) is the run's to act on, after the build: a worker must not die of it mid-build.
    for name in ("SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    _exit_with_the_build()
    _worker_state["tok"] = load_tokenizer(Path(directory), info)
    _worker_state["dtype"] = token_dtype(info["vocab_size"])


def _exit_with_the_build() -> None:
    """A worker ends when the build process ends, however it ends (kill -9, OOM): without this
    a worker blocked on sending a result would wait forever, and keep the forkserver alive."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-the-build").start()


def _encode_chunk(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode_documents(_worker_state["tok"], docs, _worker_state["dtype"])


def _process_context():
    """forkserver where there is one: workers fork from a clean server that has imported this
    module (and torch, through the package) once, so starting N workers costs one import and
    their pages are shared; spawn elsewhere. Never fork from the parent itself: it may have used
    the tokenizers' thread pool (BPE training), which a forked child inherits locked."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def _stop_forkserver() -> None:
    """After the build: the server (with torch imported) need not sit beside a training run.
    Best effort, through the method CPython's own tests use; the next use starts a new one."""
    from multiprocessing import forkserver

    stop = getattr(getattr(forkserver, "_forkserver", None), "_stop", None)
    if stop is not None:
        with contextlib.suppress(OSError, ChildProcessError):
            stop()


def encode_in_order(chunks: Iterator[tuple[list[str], dict]], directory: Path, info: dict,
                    num_proc: int) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
    """(ids, lengths, position) per chunk, in the chunks' order, from ``num_proc`` processes.

    At most two chunks per process are in flight, so a slow writer holds back the reader
    instead of letting tokenized text pile up in memory (``Pool.imap`` would read the whole
    source ahead). A worker that dies (killed, out of memory) fails the build instead of
    leaving it waiting for a result that never comes.
    """
    tok = load_tokenizer(directory, info)  # here first: a bad tokenizer fails before any worker
    dtype = token_dtype(info["vocab_size"])
    head = list(itertools.islice(chunks, 2 * num_proc))
    if num_proc <= 1 or len(head) < 2 * num_proc:  # or a small source: no processes to start
        for docs, position in itertools.chain(head, chunks):
            yield (*encode_documents(tok, docs, dtype), position)
        return
    try:
        with ProcessPoolExecutor(num_proc, mp_context=_process_context(),
                                 initializer=_init_worker, initargs=(str(directory), info)) as pool:
            inflight: deque = deque()
            try:
                for docs, position in itertools.chain(head, chunks):
                    inflight.append((pool.submit(_encode_chunk, docs), position))
                    if len(inflight) >= 2 * num_proc:
                        future, where = inflight.popleft()
                        yield (*future.result(), where)
                while inflight:
                    future, where = inflight.popleft()
                    yield (*future.result(), where)
            except BrokenProcessPool as e:
                raise RuntimeError(f"a tokenizer process died ({e}); the build keeps its last "
                                   f"complete shard: run it again to continue") from None
            finally:
                for future, _ in inflight:
                    future.cancel()
    finally:
        _stop_forkserver()


def default_num_proc(tokenizer: str = "bpe") -> int:
    """All cores, except for 'byte': its encoding is a copy, faster than sending the text to
    another process (bench/data_store.py: 55 M tokens/s in one process, 14-25 with two)."""
    if tokenizer == "byte":
        return 1
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Build:
    """One run of a build: fresh, or continuing an interrupted one from its ``.build/state``."""

    def __init__(self, source: Source, out: Path, settings: BuildSettings, key: str,
                 num_proc: int, progress: bool, cache_dir: Optional[Path]):
        self.source, self.out, self.settings, self.key = source, out, settings, key
        self.num_proc, self.progress, self.cache_dir = num_proc, progress, cache_dir
        self.state_dir = out / BUILD_DIR

    # -- progress on disk ------------------------------------------------------------------------

    @staticmethod
    def read_state(out: Path) -> Optional[dict]:
        path = out / BUILD_DIR / "state.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # killed while the first state was written: start afresh

    def save_state(self, state: dict, writers: dict[str, PartWriter]) -> None:
        """Pending ids first, under names of this state's shard count, then the state itself:
        a kill at any point leaves the previous state and the files it names intact."""
        count = sum(len(w.shards) for w in writers.values())
        old = dict(state["pending"])
        for part, writer in writers.items():
            state["parts"][part] = list(writer.shards)
            state["pending"][part] = name = f"pending-{part}-{count}.npy"
            buffer = io.BytesIO()
            np.save(buffer, writer.pending())
            _write_atomic(self.state_dir / name, buffer.getvalue())
        _write_json(self.state_dir / "state.json", state)
        for part, name in old.items():
            if name != state["pending"][part]:
                (self.state_dir / name).unlink(missing_ok=True)

    # -- the build -------------------------------------------------------------------------------

    def stream(self, start: Optional[dict] = None) -> DocumentStream:
        s = self.settings
        return DocumentStream(self.source, s.max_docs, s.text_field, s.fineweb_config, start)

    def sample(self) -> list[str]:
        """The first documents, about ``bpe_sample_chars`` characters of them (BPE training)."""
        docs, size = [], 0
        for doc in self.stream():
            docs.append(doc)
            size += len(doc)
            if size >= self.settings.bpe_sample_chars:
                break
        return docs

    def run(self) -> dict:
        s = self.settings
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = self.read_state(self.out)
        if state is None:
            tok = make_tokenizer(s.tokenizer, self.sample, s.bpe_vocab, self.cache_dir)
            info = save_tokenizer(tok, self.out / TOKENIZER_DIR)
            state = {"key": self.key, "tokenizer": info, "position": None,
                     "documents": {"val": 0, "train": 0}, "val_done": s.val_tokens == 0,
                     "max_token_id": -1, "parts": {"val": [], "train": []}, "pending": {}}
            _write_json(self.state_dir / "state.json", state)
        elif state["position"]:
            print(f"continuing the build of {self.out} after "
                  f"{sum(len(v) for v in state['parts'].values())} complete shard(s) "
                  f"({state['position']['docs']:,} documents read)", flush=True)
        info = state["tokenizer"]
        dtype = token_dtype(info["vocab_size"])
        writers = {part: PartWriter(self.out, part, dtype, s.shard_tokens, state["parts"][part],
                                    self._pending(state, part)) for part in PARTS}
        val, train = writers["val"], writers["train"]

        total = None if s.max_tokens is None else s.max_tokens + s.val_tokens
        bar = tqdm(total=total, initial=val.tokens + train.tokens, unit="tok", unit_scale=True,
                   desc=f"build {self.out.name}", disable=not self.progress, dynamic_ncols=True,
                   smoothing=0.1)
        chunks = _chunks(self.stream(state["position"]))
        try:
            for ids, lengths, position in encode_in_order(chunks, self.out / TOKENIZER_DIR, info,
                                                          self.num_proc):
                if s.max_tokens is not None and train.tokens >= s.max_tokens:
                    break
                completed, routed = self.route(ids, lengths, state, val, train)
                state["position"] = position
                if completed:
                    self.save_state(state, writers)
                bar.update(routed)
        finally:
            bar.close()
        if not state["val_done"] and s.val_tokens:
            raise StoreError(f"{self.source.spec}: the source holds only {val.tokens:,} tokens "
                             f"({state['documents']['val']:,} documents), less than --val-tokens "
                             f"{s.val_tokens:,} for the validation part alone; give a smaller "
                             f"--val-tokens or more text")
        train.close()
        if not train.shards:
            raise StoreError(f"{self.source.spec}: no text is left for the training part after "
                             f"the validation part ({val.tokens:,} tokens); give a smaller "
                             f"--val-tokens or more text")
        state["parts"] = {part: w.shards for part, w in writers.items()}
        return state

    def route(self, ids: np.ndarray, lengths: np.ndarray, state: dict, val: PartWriter,
              train: PartWriter) -> tuple[bool, int]:
        """The first ``val_tokens`` tokens to the validation part (the document at the boundary
        goes on in the training part: one long document cannot swallow the corpus), the rest to
        the training part, cut at ``max_tokens``. A document counts in the part where it starts.
        Returns (a shard was completed, tokens routed)."""
        s = self.settings
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        cut, completed = 0, False
        if not state["val_done"]:
            cut = min(s.val_tokens - val.tokens, len(ids))
            completed = val.add(ids[:cut])
            state["documents"]["val"] += int(np.searchsorted(starts, cut, side="left"))
            if val.tokens >= s.val_tokens:
                completed = val.close() or completed
                state["val_done"] = True
        rest = ids[cut:]
        if s.max_tokens is not None:
            rest = rest[:max(0, s.max_tokens - train.tokens)]
        state["documents"]["train"] += int(np.searchsorted(starts, cut + len(rest), side="left")
                                           - np.searchsorted(starts, cut, side="left"))
        routed = cut + len(rest)
        if routed:
            state["max_token_id"] = max(state["max_token_id"], int(ids[:routed].max()))
        completed = train.add(rest) or completed
        return completed, routed

    def _pending(self, state: dict, part: str) -> Optional[np.ndarray]:
        name = state["pending"].get(part)
        return np.load(self.state_dir / name) if name else None


def build_store(source: str | Source, out: str | Path, settings: Optional[BuildSettings] = None,
                num_proc: Optional[int] = None, progress: bool = True,
                cache_dir: Optional[Path] = None) -> "TokenStore":
    """Tokenize ``source`` into a store at ``out``; return it opened.

    A complete store of the same source and settings is returned as it is; an interrupted build
    of them is continued. A directory that holds anything else is refused. On bad input (an
    unreadable file, an empty source) the partial store is removed: nothing half-written stays.
    """
    settings = settings or BuildSettings()
    src = describe_source(source) if isinstance(source, str) else source
    key = build_key(src, settings)
    out = Path(out)
    if (out / MANIFEST).is_file():
        store = open_store(out)
        if store.manifest["key"] != key:
            raise StoreError(f"{out}: already a complete store of another source or other settings "
                             f"(source {store.manifest['source']['spec']!r}, tokenizer "
                             f"{store.tokenizer_name!r}); give another --out or delete it")
        return store
    state = _Build.read_state(out)
    if state is not None and (state.get("key") != key or "position" not in state):
        raise StoreError(f"{out}: holds an interrupted build of another source or other "
                         f"settings; give another --out, or delete it to start afresh")
    if state is None and out.exists() and not _only_store_files(out):
        raise StoreError(f"{out}: exists and is not a token store; give a new or empty directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    build = _Build(src, out, settings, key, num_proc or default_num_proc(settings.tokenizer),
                   progress, cache_dir)
    try:
        state = build.run()
    except DataError:
        if not state:  # bad input in a fresh build: nothing half-written stays behind
            _remove_store_files(out, created)
        raise  # a resumed build keeps its complete shards: it is refused until finished
    manifest = {
        "format": FORMAT, "version": VERSION, "key": key,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"spec": src.spec, **src.identity(settings.fineweb_config)},
        "settings": asdict(settings), "tokenizer": state["tokenizer"],
        "dtype": token_dtype(state["tokenizer"]["vocab_size"]).name,
        "shard_tokens": settings.shard_tokens, "max_token_id": state["max_token_id"],
        "documents": {**state["documents"],
                      "read": state["documents"]["val"] + state["documents"]["train"]},
        "tokens": {part: sum(x["tokens"] for x in state["parts"][part]) for part in PARTS},
        "parts": state["parts"],
    }
    manifest["fingerprint"] = _fingerprint(manifest)
    _write_json(out / MANIFEST, manifest)  # last: from here on the store is complete
    shutil.rmtree(out / BUILD_DIR, ignore_errors=True)
    return open_store(out)


_STORE_FILE = re.compile(rf"^\.?(?:{'|'.join(PARTS)})-\d{{5}}\.bin(?:\.tmp)?$|^\.{MANIFEST}\.tmp$")


_BUILD_FILE = re.compile(r"^\.?(?:state\.json|pending-(?:val|train)-\d+\.npy)(?:\.tmp)?$")


def _only_store_files(out: Path) -> bool:
    """Nothing in ``out`` but what a build writes (an empty directory too): safe to build in,
    and safe to clean. A ``tokenizer/`` counts only beside our ``.build/``."""
    names = {p.name for p in out.iterdir()}
    build = out / BUILD_DIR
    if BUILD_DIR in names and not (build.is_dir() and
                                   all(_BUILD_FILE.match(p.name) for p in build.iterdir())):
        return False
    if TOKENIZER_DIR in names and BUILD_DIR not in names:
        return False
    return all(n in (TOKENIZER_DIR, BUILD_DIR) or _STORE_FILE.match(n) for n in names)


def _remove_store_files(out: Path, created: bool) -> None:
    """Remove what a build wrote in ``out`` (only that), and ``out`` itself if the build made it."""
    for path in out.iterdir():
        if path.name in (TOKENIZER_DIR, BUILD_DIR):
            shutil.rmtree(path, ignore_errors=True)
        elif _STORE_FILE.match(path.name):
            path.unlink(missing_ok=True)
    if created and not any(out.iterdir()):
        out.rmdir()


def _fingerprint(manifest: dict) -> str:
    """Content identity: the tokenizer's files and every shard's checksum, in order."""
    digest = hashlib.sha256(json.dumps(manifest["tokenizer"], sort_keys=True).encode())
    for part in PARTS:
        for shard in manifest["parts"][part]:
            digest.update(f"{part}:{shard['tokens']}:{shard['sha256']};".encode())
    return digest.hexdigest()[:24]


# ------------------------------------------------------------------------------------------------
# Reading


class TokenPart:
    """One part of a store (train or val): its shards read as one flat array of token ids.

    Every read maps the shards it needs and lets the mapping go once the tokens are copied out
    (as nanoGPT re-opens its memmap per batch): pages of a store read at random stay in the
    shared page cache, not in the process's resident set, so a rank's memory does not grow with
    the store or with the steps it has taken.
    """

    def __init__(self, directory: Path, shards: list[dict], dtype: np.dtype, shard_tokens: int):
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.files = [directory / s["file"] for s in shards]
        self.size = sum(s["tokens"] for s in shards)

    def __len__(self) -> int:
        return self.size

    def shard(self, i: int) -> np.memmap:
        return np.memmap(self.files[i], dtype=self.dtype, mode="r")

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` as a new array."""
        if not 0 <= start <= stop <= self.size:
            raise IndexError(f"tokens [{start}, {stop}) outside a part of {self.size} tokens")
        pieces = []
        while start < stop:
            i, lo = divmod(start, self.shard_tokens)
            hi = min(stop - i * self.shard_tokens, self.shard_tokens)
            pieces.append(np.array(self.shard(i)[lo:hi]))
            start = i * self.shard_tokens + hi
        return np.concatenate(pieces) if pieces else np.zeros(0, self.dtype)

    def gather(self, starts: np.ndarray, length: int) -> np.ndarray:
        """``[len(starts), length]``: the runs of ``length`` tokens from each start. Runs inside
        one shard are read with one fancy index per shard; the rare run across two, one by one."""
        out = np.empty((len(starts), length), dtype=self.dtype)
        starts = np.asarray(starts, dtype=np.int64)
        shard_of, local = np.divmod(starts, self.shard_tokens)
        inside = local + length <= self.shard_tokens
        offsets = np.arange(length)
        for i in np.unique(shard_of[inside]):
            rows = np.nonzero(inside & (shard_of == i))[0]
            out[rows] = self.shard(int(i))[local[rows, None] + offsets]
        for row in np.nonzero(~inside)[0]:
            out[row] = self.read(int(starts[row]), int(starts[row]) + length)
        return out


class TokenStore:
    """A complete store, opened for reading (see ``open_store``)."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = Path(path), manifest
        self.tokenizer = manifest["tokenizer"]
        self.dtype = np.dtype(manifest["dtype"])
        self._parts: dict[str, TokenPart] = {}

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer["name"]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer["vocab_size"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def part(self, name: str) -> TokenPart:
        if name not in self._parts:
            self._parts[name] = TokenPart(self.path, self.manifest["parts"][name], self.dtype,
                                          self.manifest["shard_tokens"])
        return self._parts[name]

    def load_tokenizer(self):
        return load_tokenizer(self.path / TOKENIZER_DIR, self.tokenizer)

    def check_model_vocab(self, vocab_size: int) -> None:
        """A model's embedding must have a row for every id in the store."""
        if self.manifest["max_token_id"] >= vocab_size:
            raise StoreError(f"{self.path}: token ids up to {self.manifest['max_token_id']:,} "
                             f"({self.tokenizer_name}, vocab {self.vocab_size:,}) do not fit a model "
                             f"with a vocabulary of {vocab_size:,}")

    def verify(self) -> None:
        """Compare every shard's sha256 with the manifest (reads the whole store)."""
        for part in PARTS:
            for shard in self.manifest["parts"][part]:
                path = self.path / shard["file"]
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        digest.update(block)
                if digest.hexdigest() != shard["sha256"]:
                    raise StoreError(f"{path}: checksum mismatch: the shard is corrupted (sha256 "
                                     f"{digest.hexdigest()[:16]}..., the manifest says "
                                     f"{shard['sha256'][:16]}...); rebuild the store")
        self.load_tokenizer()

    def summary(self) -> str:
        m = self.manifest
        return (f"{self.path}: {m['source']['spec']} | {self.tokenizer_name} (vocab "
                f"{self.vocab_size:,}) | train {m['tokens']['train']:,} tokens "
                f"({m['documents']['train']:,} docs) | val {m['tokens']['val']:,} tokens "
                f"({m['documents']['val']:,} docs) | {len(m['parts']['train'])} + "
                f"{len(m['parts']['val'])} shards of {m['shard_tokens']:,} {m['dtype']}")


def is_store(path: str | Path) -> bool:
    """A directory with our manifest, or the progress of an interrupted build (and nothing else):
    a directory of source files that happens to hold another tool's manifest.json is a source."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / MANIFEST).is_file():
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except ValueError:  # unreadable: ours if the rest looks like a store
            return (path / TOKENIZER_DIR).is_dir() or any(path.glob("train-*.bin"))
        return isinstance(manifest, dict) and manifest.get("format") == FORMAT
    return (path / BUILD_DIR).is_dir() and _only_store_files(path)


def open_store(path: str | Path, verify: bool = False) -> TokenStore:
    """Open a complete store; every fault raises StoreError naming the file and what is wrong."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        if (path / BUILD_DIR).is_dir():
            raise StoreError(f"{path}: incomplete token store (no {MANIFEST}): its build was "
                             f"interrupted; run the same build again to finish it")
        if not path.is_dir():
            raise StoreError(f"{path}: no such token store")
        raise StoreError(f"{path}: not a token store (no {MANIFEST}); make one with "
                         f"python -m stratopt_ds.data build SOURCE --out {path}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{manifest_path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{manifest_path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise StoreError(f"{manifest_path}: store format version {manifest.get('version')!r}; "
                         f"this stratopt_ds reads version {VERSION}: rebuild the store with "
                         f"python -m stratopt_ds.data build")
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for part in PARTS:
        shards = manifest["parts"][part]
        for i, shard in enumerate(shards):
            file = path / shard["file"]
            if not file.is_file():
                raise StoreError(f"{file}: shard missing (the manifest lists it with "
                                 f"{shard['tokens']:,} tokens)")
            expected = shard["tokens"] * itemsize
            if file.stat().st_size != expected:
                raise StoreError(f"{file}: {file.stat().st_size:,} bytes, the manifest says "
                                 f"{shard['tokens']:,} tokens = {expected:,} bytes: the shard is "
                                 f"truncated or corrupted; rebuild the store")
            if i < len(shards) - 1 and shard["tokens"] != manifest["shard_tokens"]:
                raise StoreError(f"{manifest_path}: shard {shard['file']} holds "
                                 f"{shard['tokens']:,} tokens, not {manifest['shard_tokens']:,}")
    store = TokenStore(path, manifest)
    if verify:
        store.verify()
    return store
