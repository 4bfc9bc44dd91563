"""``--data`` as every entry point reads it: one data path, always through a store.

``DataRequest`` gathers the data options of a run (``--data``, ``--tokenizer``, ``--seq-len``,
...). ``check()`` validates them cheaply, before any process group or weight exists; ``open()``
returns the store and its windows:

* ``--data STORE_DIR`` opens the store as it is; the tokenizer comes from it, so a conflicting
  ``--tokenizer`` (or a build option such as ``--max-docs``) is an error;
* ``--data`` naming a source (a file, directory or glob, ``synthetic``, ``fineweb``) builds a
  store first, into a cache keyed by the source's identity, the tokenizer and the settings
  (``$STRATOPT_CACHE/stores/``), and then reads it the same way. Every process of a job calls
  ``open()``: the first to take the store's lock builds it and the others wait for it, so a node
  builds once (once in all if the cache is on a shared file system).
"""
from __future__ import annotations

import contextlib
import fcntl
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from .batches import Windows
from .errors import DataError, SourceError, StoreError
from .sources import Source, describe_source, iter_documents
from .store import MANIFEST, BuildSettings, TokenStore, build_key, build_store, is_store, open_store
from .tokenizer import check_tokenizer_name, default_cache_dir, matches


@dataclass
class TrainingData:
    store: TokenStore
    train: Windows   # every window of the training part
    val: Windows     # the first val_windows windows of the validation part, the same for every run


@dataclass
class DataRequest:
    """The data options of a run. ``None`` means "not given": the store's value, or a default."""

    data: str
    seq_len: int
    tokenizer: Optional[str] = None      # a source's tokenizer ('byte' if None); a store's must match
    bpe_vocab: Optional[int] = None
    max_docs: Optional[int] = None       # build options: only with a source
    max_tokens: Optional[int] = None
    val_windows: int = 64                # validation windows (a source's store holds exactly them)
    evaluate: bool = True                # False: the validation part is not read
    run_tokens: Optional[int] = None     # tokens the run trains on: a FineWeb build's default size
    cache_dir: Optional[str] = None

    @property
    def from_store(self) -> bool:
        return is_store(self.data)

    # -- checks: cheap, before any work ----------------------------------------------------------

    def check(self) -> str:
        """Raise DataError (or FileNotFoundError) naming the option at fault; return the name of
        the tokenizer the run will use (the store's, or the one a source is built with).

        A source is checked without building it: its files' first bytes (``describe_source``),
        the tokenizer (without network where the hub is offline), and that it holds enough text
        for the validation windows and one training window (``check_source_size``)."""
        if self.from_store:
            store = open_store(self.data)
            self.check_store(store)
            return store.tokenizer_name
        try:
            source = describe_source(self.data)
        except (SourceError, FileNotFoundError) as e:
            raise _as_data_option(e, self.data) from None
        settings = self.build_settings(source)
        check_tokenizer_name(settings.tokenizer)
        self.check_source_size(source, settings)
        return settings.tokenizer

    def check_source_size(self, source: Source, settings: BuildSettings) -> None:
        """The store built from ``source`` must hold the validation part (``val_windows`` windows,
        the source's first tokens) and one training window after it. Counted by reading the
        documents only until there are enough (cheap: the need is a few windows): exact for
        'byte' (a token per byte, and EOS per document), an upper bound for 'bpe' (each of its
        tokens holds at least one byte). Not checked for a hub tokenizer, whose tokens per byte
        are not bounded, nor for FineWeb (streamed, and far larger)."""
        if source.kind == "fineweb" or settings.tokenizer not in ("byte", "bpe"):
            return
        s = self.seq_len
        if settings.max_tokens is not None and settings.max_tokens < s + 1:
            raise DataError(f"--max-tokens {settings.max_tokens} leaves no training window of "
                            f"--seq-len {s} (+1) tokens")
        need = settings.val_tokens + s + 1
        have = 0
        try:
            for doc in iter_documents(source, settings.max_docs, settings.text_field):
                have += len(doc.encode("utf-8")) + 1
                if have >= need:
                    return
        except SourceError as e:
            raise _as_data_option(e, self.data) from None
        bound = "" if settings.tokenizer == "byte" else "at most "
        docs = f" (--max-docs {settings.max_docs})" if settings.max_docs is not None else ""
        raise DataError(f"--seq-len {s}: --data {self.data}{docs} holds {bound}{have:,} tokens "
                        f"with --tokenizer {settings.tokenizer}, and a run needs {need:,}: "
                        f"--val-windows {self.val_windows} windows of {s} tokens (+1) to evaluate "
                        f"on, then one training window of {s + 1}; give a shorter --seq-len, "
                        f"fewer --val-windows, or more text")

    def check_store(self, store: TokenStore) -> None:
        for option, value in (("--max-docs", self.max_docs), ("--max-tokens", self.max_tokens)):
            if value is not None:
                raise DataError(f"{option} applies when --data is a source to build; {store.path} "
                                f"is a built store")
        request = self.tokenizer or ("bpe" if self.bpe_vocab is not None else None)
        if request is not None and not matches(request, store.tokenizer, self.bpe_vocab):
            given = f"--tokenizer {request}" + (f" --bpe-vocab {self.bpe_vocab}"
                                                if self.bpe_vocab is not None else "")
            raise DataError(f"{given} conflicts with the tokenizer of the store {store.path}: "
                            f"{store.tokenizer_name} (vocab {store.vocab_size:,}); the tokenizer "
                            f"comes from the store: leave --tokenizer out")
        s = self.seq_len
        train = len(store.part("train"))
        if (train - 1) // s < 1:
            raise StoreError(f"--seq-len {s} is longer than the training part of {store.path} "
                             f"({train:,} tokens)")
        if not self.evaluate:
            return
        val = len(store.part("val"))
        if val < s + 1:
            raise StoreError(f"--seq-len {s} is longer than the validation part of {store.path} "
                             f"({val:,} tokens); build the store with a larger --val-tokens, or "
                             f"evaluate less (--eval-batches 0)")
        if (val - 1) // s < self.val_windows:
            raise StoreError(f"--val-windows {self.val_windows} of --seq-len {s} needs "
                             f"{self.val_windows * s + 1:,} validation tokens; the store "
                             f"{store.path} holds {val:,} ({(val - 1) // s} windows)")

    def build_settings(self, source: Source) -> BuildSettings:
        """How a source is built: the validation part holds exactly ``val_windows`` windows, so
        the windows evaluated are fixed by the source and the options, never by a seed."""
        max_tokens = self.max_tokens
        if max_tokens is None and self.max_docs is None and self.run_tokens is not None and \
                source.kind == "fineweb":
            max_tokens = self.run_tokens + 1  # one pass of the run, no text seen twice
        return BuildSettings(tokenizer=self.tokenizer or "byte",
                             bpe_vocab=self.bpe_vocab or BuildSettings.bpe_vocab,
                             max_docs=self.max_docs, max_tokens=max_tokens,
                             val_tokens=self.val_windows * self.seq_len + 1)

    # -- opening ---------------------------------------------------------------------------------

    def store(self, progress: bool = True) -> TokenStore:
        """The store: opened, or built into the cache first (once, whoever gets there first)."""
        if self.from_store:
            return open_store(self.data)
        source = describe_source(self.data)
        settings = self.build_settings(source)
        cache = Path(self.cache_dir or default_cache_dir())
        tokenizer = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(settings.tokenizer).name)[:40]
        directory = cache / "stores" / f"{source.slug}-{tokenizer}-{build_key(source, settings)}"
        if (directory / MANIFEST).is_file():
            return open_store(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(directory.with_name(directory.name + ".lock"), directory):
            return build_store(source, directory, settings, progress=progress, cache_dir=cache)

    def open(self, progress: bool = True) -> TrainingData:
        store = self.store(progress)
        if self.from_store:  # a store from the cache was built for this request: it fits
            self.check_store(store)
        return TrainingData(store, Windows(store.part("train"), self.seq_len),
                            Windows(store.part("val"), self.seq_len, limit=self.val_windows))


def _as_data_option(e: Exception, data: str) -> Exception:
    """The error of a source, named as the entry points name it: '--data X: ...', with X once
    (a message about X itself starts with X; one about a file inside X names that file)."""
    message = str(e)
    for name in dict.fromkeys((data, str(Path(data)))):
        if message.startswith(f"{name}: "):
            message = message[len(name) + 2:]
            break
    return type(e)(f"--data {data}: {message}")


@contextlib.contextmanager
def _exclusive(lock_path: Path, what: Path) -> Iterator[None]:
    """An exclusive lock on ``lock_path`` (released by the kernel if the holder dies)."""
    with open(lock_path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to build {what}", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
