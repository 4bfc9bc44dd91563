"""Where documents come from: the synthetic corpus, local files, or FineWeb streamed from the hub.

A source is described once (``describe_source``: which files, in which order, and an identity
that changes when any of them changes) and then read as a *stream* of documents
(``iter_documents``): nothing here holds more than one document, or one Parquet batch, at a time,
so reading a 40 GB source costs the same memory as reading a small one.

Every reader names the file and the line (or the column) of a fault: binary data, text that is
not UTF-8, a JSON line without the text field, a Parquet file without the column. Describing a
source already reads each file's first bytes (``SNIFF_BYTES``; a Parquet file's magic at both
ends), so a binary file under a text suffix, or a Parquet file that is not one, fails when the
run is checked, not minutes into a build.
"""
from __future__ import annotations

import codecs
import glob
import itertools
import json
import os
import random
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from .errors import SourceError


# ------------------------------------------------------------------------------------------------
# The synthetic corpus: English-like documents from a small template grammar (offline, seeded)

_SUBJECTS = ["the cat", "the dog", "a bird", "my friend", "the old man", "the teacher",
             "a small child", "the farmer", "her brother", "the king", "our neighbour", "the girl"]
_VERBS = ["sees", "likes", "finds", "carries", "watches", "paints", "buys", "sells", "wants",
          "holds", "follows", "remembers"]
_ADJECTIVES = ["red", "big", "little", "green", "heavy", "quiet", "bright", "old", "new", "warm"]
_NOUNS = ["ball", "house", "apple", "river", "book", "boat", "tree", "song", "garden", "letter",
          "window", "horse"]
_PLACES = ["in the park", "at the market", "near the river", "in the morning", "after dinner",
           "by the sea", "on the hill", "every day"]
_TEMPLATES = ["{s} {v} the {a} {n}.",
              "{s} {v} a {a} {n} {p}.",
              "{S} {v} the {n} because {s2} {v2} it.",
              "when {s} {v} the {a} {n}, {s2} {v2} the {n2}.",
              "{s} said that {s2} {v2} a {a} {n}.",
              "does {s} see the {a} {n}? yes, {s} {v} it {p}."]

SYNTHETIC_SEED = 1234
SYNTHETIC_DOCS = 2000  # documents of 'synthetic' when no --max-docs is given


def _sentence(rng: random.Random) -> str:
    words = dict(s=rng.choice(_SUBJECTS), s2=rng.choice(_SUBJECTS), v=rng.choice(_VERBS),
                 v2=rng.choice(_VERBS), a=rng.choice(_ADJECTIVES), n=rng.choice(_NOUNS),
                 n2=rng.choice(_NOUNS), p=rng.choice(_PLACES))
    words["S"] = words["s"].capitalize()
    text = re.sub(r"\ba ([aeiou])", r"an \1", rng.choice(_TEMPLATES).format(**words))
    return text[0].upper() + text[1:]


def synthetic_documents(num_docs: int = SYNTHETIC_DOCS, seed: int = SYNTHETIC_SEED) -> Iterator[str]:
    """The same seed gives the same documents; the first k of n are the k of a shorter corpus."""
    rng = random.Random(seed)
    for _ in range(num_docs):
        yield " ".join(_sentence(rng) for _ in range(rng.randint(3, 8)))


# ------------------------------------------------------------------------------------------------
# Local files, read as streams


def _binary_fault(path: Path, lineno: int, line: bytes, final: bool = True) -> Optional[str]:
    """Why ``line`` is not UTF-8 text, or None; ``final=False``: the line may be cut short (the
    end of a sniffed head), so a character cut in two at its end is no fault."""
    if b"\x00" in line:
        return f"{path}: line {lineno} holds a NUL byte: binary data, not UTF-8 text"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(line, final=final)
    except UnicodeDecodeError as e:
        return (f"{path}: line {lineno} is not UTF-8 text ({e.reason} at byte {e.start} of the "
                f"line); is it a binary file?")
    return None


def _unreadable(path: Path, e: OSError) -> SourceError:
    return SourceError(f"{path}: cannot be read ({e.strerror or e})")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, one line in memory at a time."""
    try:
        handle = path.open("rb")
    except OSError as e:
        raise _unreadable(path, e) from None
    with handle:
        lineno, lines = 0, iter(handle)
        while True:
            try:  # a read error (EIO, a file cut short on a network disk) names the file too
                raw = next(lines)
            except StopIteration:
                return
            except OSError as e:
                raise _unreadable(path, e) from None
            lineno += 1
            fault = _binary_fault(path, lineno, raw)
            if fault:
                raise SourceError(fault)
            yield lineno, raw.decode("utf-8")


def read_txt(path: Path, text_field: str = "text") -> Iterator[str]:
    """One document per paragraph: blocks of lines separated by blank lines."""
    block: list[str] = []
    for _, line in _lines(path):
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block).strip()
            block = []
    if block:
        yield "".join(block).strip()


def read_jsonl(path: Path, text_field: str = "text") -> Iterator[str]:
    """One document per line: the ``text_field`` of a JSON object."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            text = json.loads(line)[text_field]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SourceError(f"{path}:{lineno}: expected a JSON object with a {text_field!r} "
                              f"field ({type(e).__name__}: {e})") from None
        if not isinstance(text, str):
            raise SourceError(f"{path}:{lineno}: field {text_field!r} holds "
                              f"{type(text).__name__}, not text")
        yield text


def read_parquet(path: Path, text_field: str = "text") -> Iterator[str]:
    """The ``text_field`` column, one record batch in memory at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{path}: not a readable Parquet file ({e})") from None
    names = reader.schema_arrow.names
    if text_field not in names:
        raise SourceError(f"{path}: no {text_field!r} column; columns: {', '.join(names)}")
    if not pa.types.is_string(reader.schema_arrow.field(text_field).type) and \
            not pa.types.is_large_string(reader.schema_arrow.field(text_field).type):
        raise SourceError(f"{path}: column {text_field!r} is "
                          f"{reader.schema_arrow.field(text_field).type}, not text")
    try:
        for batch in reader.iter_batches(batch_size=1024, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{path}: corrupted Parquet data ({e})") from None


READERS = {".txt": read_txt, ".jsonl": read_jsonl, ".parquet": read_parquet}

SNIFF_BYTES = 1 << 13   # the head of each file read when a source is described
PARQUET_MAGIC = b"PAR1"  # at both ends of every Parquet file
# Formats often renamed .txt / .jsonl by mistake: named, since their bytes alone say little.
_NOT_TEXT = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
             b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip", b"\xff\xfe": "UTF-16",
             b"\xfe\xff": "UTF-16"}


def sniff(path: Path) -> None:
    """Raise SourceError naming ``path`` when its first bytes show it cannot be read as its
    suffix says: binary data in a .txt / .jsonl (a NUL byte, bytes that are not UTF-8, a
    compressed file), a .parquet without Parquet's magic at its start and end. Reads at most
    ``SNIFF_BYTES`` (and a Parquet file's last 4): cheap enough for every file of a source."""
    try:
        with path.open("rb") as handle:
            head = handle.read(SNIFF_BYTES)
            complete = not handle.read(1)
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - len(PARQUET_MAGIC)))
            tail = handle.read()
    except OSError as e:
        raise _unreadable(path, e) from None
    if path.suffix == ".parquet":
        missing = ("start" if not head.startswith(PARQUET_MAGIC) else
                   "end" if tail != PARQUET_MAGIC or size < 12 else None)  # magic, length, magic
        if missing:
            raise SourceError(f"{path}: not a readable Parquet file: no {PARQUET_MAGIC.decode()} "
                              f"magic at its {missing} (truncated, corrupted, or another format; "
                              f"{size:,} bytes)")
        return
    kind = next((name for magic, name in _NOT_TEXT.items() if head.startswith(magic)), None)
    if kind:
        raise SourceError(f"{path}: {kind} data, not UTF-8 text ({path.suffix} files are read "
                          f"as plain UTF-8: decompress or convert it first)")
    lines = head.split(b"\n")
    for lineno, line in enumerate(lines, 1):
        fault = _binary_fault(path, lineno, line, final=complete or lineno < len(lines))
        if fault:
            raise SourceError(fault)


# ------------------------------------------------------------------------------------------------
# FineWeb and the 'auto' default

FINEWEB = "HuggingFaceFW/fineweb"
FINEWEB_CONFIG = "sample-10BT"
HUB_HOST = ("huggingface.co", 443)


def fineweb_dataset(config: str = FINEWEB_CONFIG):
    """FineWeb as a ``datasets`` IterableDataset, streamed from the hub (needs network access)."""
    from datasets import load_dataset

    return load_dataset(FINEWEB, name=config, split="train", streaming=True)


def hub_offline() -> bool:
    """Offline mode is set (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(v, "0").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """True unless offline mode is set or the hub cannot be reached within ``timeout`` seconds."""
    if hub_offline():
        return False
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


# Sources given by name rather than by a path.
NAMED_SOURCES = ("synthetic", "fineweb", "auto")


def resolve_source(source: str) -> str:
    """'auto' is FineWeb when the hub is reachable, else the synthetic corpus."""
    if source != "auto":
        return source
    return "fineweb" if hub_reachable() else "synthetic"


# ------------------------------------------------------------------------------------------------
# Describing a source: its files in order, and an identity for cache keys


@dataclass(frozen=True)
class Source:
    spec: str                      # as the user gave it
    kind: str                      # 'synthetic', 'fineweb' or 'files'
    files: tuple[Path, ...] = ()   # 'files': in reading order

    def identity(self, fineweb_config: str = FINEWEB_CONFIG) -> dict:
        """What the tokens depend on. Files count by path, size and modification time: an edit
        gives a new identity (and so a new cached store) without reading the whole file."""
        if self.kind == "synthetic":
            return {"kind": "synthetic", "seed": SYNTHETIC_SEED, "generator": 1}
        if self.kind == "fineweb":
            return {"kind": "fineweb", "dataset": FINEWEB, "config": fineweb_config}
        files = []
        for path in self.files:
            st = path.stat()
            files.append([str(path), st.st_size, st.st_mtime_ns])
        return {"kind": "files", "files": files}

    @property
    def slug(self) -> str:
        """A short readable name for cache directories."""
        if self.kind != "files":
            return self.kind
        stem = Path(self.spec.rstrip("/")).name or "files"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:40] or "files"


def _check_file(path: Path, where: str) -> None:
    if path.suffix not in READERS:
        raise SourceError(f"{where}: unsupported file {str(path)!r}: expected one of "
                          f"{', '.join(READERS)}, a directory or glob of them, 'synthetic' or "
                          f"'fineweb'")
    if not os.access(path, os.R_OK):
        raise SourceError(f"{path}: cannot be read (permission denied)")
    sniff(path)


def describe_source(spec: str) -> Source:
    """A named source, a file, a directory (its supported files, recursively, sorted) or a glob.

    Raises SourceError (or FileNotFoundError for a path that does not exist) naming the input.
    """
    spec = resolve_source(spec)
    if spec in ("synthetic", "fineweb"):
        return Source(spec, spec)
    if any(ch in spec for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not matches:
            raise FileNotFoundError(f"no files match {spec!r}")
        for path in matches:
            _check_file(path, f"glob {spec!r}")
        return Source(spec, "files", tuple(p.resolve() for p in matches))
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in READERS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            others = sorted(p.name for p in path.iterdir())
            holds = (f"only {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}"
                     if others else "it is empty")
            raise SourceError(f"{spec}: a directory, but neither a token store (no manifest.json) "
                              f"nor a folder of sources: it holds no {'/'.join(READERS)} files "
                              f"({holds})")
        for p in files:
            _check_file(p, f"directory {spec!r}")
        return Source(spec, "files", tuple(p.resolve() for p in files))
    if not path.exists():
        if path.suffix in READERS:
            raise FileNotFoundError(f"data file not found: {spec}")
        raise FileNotFoundError(f"no such data file, directory or token store: {spec} (make a "
                                f"store with python -m stratopt_ds.data build SOURCE --out {spec})")
    _check_file(path, "data")
    return Source(spec, "files", (path.resolve(),))


class DocumentStream:
    """The source's non-empty documents in order (at most ``max_docs``), and where the next one
    starts: ``position()`` between two documents, ``start=`` a position to begin at.

    A build records the position with its progress, so a resumed build neither tokenizes nor
    reads again what it had done: files before the position are not opened, and FineWeb resumes
    from the ``datasets`` stream's own state. Only the documents read into the current file are
    read once more (parsed, not tokenized).
    """

    def __init__(self, source: Source, max_docs: Optional[int] = None, text_field: str = "text",
                 fineweb_config: str = FINEWEB_CONFIG, start: Optional[dict] = None):
        self.source, self.max_docs, self.text_field = source, max_docs, text_field
        self.fineweb_config = fineweb_config
        start = start or {}
        self.docs = start.get("docs", 0)             # documents yielded, from the source's start
        self.file, self.in_file = start.get("file", 0), start.get("in_file", 0)
        self._resume_state = start.get("state")
        self._dataset = None

    def position(self) -> dict:
        where: dict = {"docs": self.docs}
        if self.source.kind == "files":
            where.update(file=self.file, in_file=self.in_file)
        elif self.source.kind == "fineweb" and self._dataset is not None:
            where["state"] = self._dataset.state_dict()
        return where

    def __iter__(self) -> Iterator[str]:
        if self.max_docs is not None and self.docs >= self.max_docs:
            return
        for doc in self._documents():
            self.docs += 1
            yield doc
            if self.max_docs is not None and self.docs >= self.max_docs:
                return  # before reading on: position() is right after the last document

    def _documents(self) -> Iterator[str]:
        if self.source.kind == "synthetic":
            yield from itertools.islice(synthetic_documents(self.max_docs or SYNTHETIC_DOCS),
                                        self.docs, None)
        elif self.source.kind == "fineweb":
            self._dataset = fineweb_dataset(self.fineweb_config)
            if self._resume_state is not None:
                self._dataset.load_state_dict(self._resume_state)
            elif self.docs:
                raise SourceError("cannot resume a FineWeb build without the stream's state")
            for row in self._dataset:
                if row[self.text_field]:
                    yield row[self.text_field]
        else:
            skip = self.in_file
            for self.file in range(self.file, len(self.source.files)):
                path = self.source.files[self.file]
                docs = (d for d in READERS[path.suffix](path, self.text_field) if d)
                self.in_file = skip
                for doc in itertools.islice(docs, skip, None):
                    self.in_file += 1
                    yield doc
                skip = 0
            self.file, self.in_file = len(self.source.files), 0


def iter_documents(source: Source, max_docs: Optional[int] = None, text_field: str = "text",
                   fineweb_config: str = FINEWEB_CONFIG) -> Iterator[str]:
    """The source's non-empty documents in order, at most ``max_docs`` of them."""
    return iter(DocumentStream(source, max_docs, text_field, fineweb_config))
