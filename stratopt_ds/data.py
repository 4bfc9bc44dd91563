"""Text in, packed token windows out: corpora, tokenizers, packing and a resumable batch order.

Read top to bottom:

1. **Documents** (``load_documents``): the built-in synthetic corpus (offline, deterministic), a
   local ``.txt`` / ``.jsonl`` / ``.parquet`` file, or FineWeb streamed from the hub.
2. **Tokenizers** (``get_tokenizer``): bytes (no training), a byte-level BPE trained here and
   cached as JSON, or any hub tokenizer by name.
3. **Packing** (``pack``, ``split_windows``): all documents joined with EOS and cut into windows of
   ``seq_len + 1`` tokens; the last windows are the validation split, whatever the seeds.
4. **Batches** (``BatchIterator``): batch ``k`` is a pure function of ``(data seed, k)``, so a
   run resumed at step ``k`` reads exactly what the uninterrupted run would have read.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

# ------------------------------------------------------------------------------------------------
# 1. Documents

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


def _sentence(rng: random.Random) -> str:
    words = dict(s=rng.choice(_SUBJECTS), s2=rng.choice(_SUBJECTS), v=rng.choice(_VERBS),
                 v2=rng.choice(_VERBS), a=rng.choice(_ADJECTIVES), n=rng.choice(_NOUNS),
                 n2=rng.choice(_NOUNS), p=rng.choice(_PLACES))
    words["S"] = words["s"].capitalize()
    text = re.sub(r"\ba ([aeiou])", r"an \1", rng.choice(_TEMPLATES).format(**words))
    return text[0].upper() + text[1:]


def synthetic_corpus(num_docs: int = 2000, seed: int = SYNTHETIC_SEED) -> list[str]:
    """English-like documents from a small template grammar; the same seed gives the same text."""
    rng = random.Random(seed)
    return [" ".join(_sentence(rng) for _ in range(rng.randint(3, 8))) for _ in range(num_docs)]


def read_txt(path: Path) -> list[str]:
    """One document per paragraph (blocks separated by blank lines)."""
    text = path.read_text(encoding="utf-8")
    return [doc.strip() for doc in re.split(r"\n\s*\n", text) if doc.strip()]


def read_jsonl(path: Path, field: str = "text") -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)[field])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a {field!r} "
                                 f"field ({type(e).__name__}: {e})") from None
    return docs


def read_parquet(path: Path, column: str = "text") -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # datasets brings pyarrow, but fall back to it anyway
        from datasets import Dataset
        table = Dataset.from_parquet(str(path))
        if column not in table.column_names:
            raise ValueError(f"{path}: no {column!r} column; columns: {table.column_names}")
        return list(table[column])
    names = pq.read_schema(path).names
    if column not in names:
        raise ValueError(f"{path}: no {column!r} column; columns: {names}")
    return pq.read_table(path, columns=[column]).column(column).to_pylist()


def iter_fineweb(name: str = "sample-10BT") -> Iterator[str]:
    """FineWeb documents streamed from the Hugging Face hub (needs network access)."""
    from datasets import load_dataset

    dataset = load_dataset("HuggingFaceFW/fineweb", name=name, split="train", streaming=True)
    for row in dataset:
        yield row["text"]


READERS = {".txt": read_txt, ".jsonl": read_jsonl, ".parquet": read_parquet}
HUB_HOST = ("huggingface.co", 443)


def hub_reachable(timeout: float = 3.0) -> bool:
    """True unless offline mode is set or the hub cannot be reached within ``timeout`` seconds."""
    if any(os.environ.get(v, "0").lower() in ("1", "true", "yes")
           for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


# Data sources given by name rather than by a file path.
NAMED_SOURCES = ("synthetic", "fineweb", "auto")


def resolve_source(source: str) -> str:
    """'auto' (the default) is FineWeb when the hub is reachable, else the synthetic corpus."""
    if source != "auto":
        return source
    return "fineweb" if hub_reachable() else "synthetic"


def check_source(source: str) -> None:
    """Raise ValueError / FileNotFoundError for a data source that cannot be read."""
    if source in NAMED_SOURCES:
        return
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {source}")
    if path.suffix not in READERS:
        raise ValueError(f"unsupported data file {source!r}: expected one of "
                         f"{', '.join(READERS)}, 'synthetic' or 'fineweb'")


def load_documents(source: str, max_docs: Optional[int] = None) -> list[str]:
    """Documents of ``source``: 'synthetic', 'fineweb', 'auto' or a .txt/.jsonl/.parquet path."""
    source = resolve_source(source)
    check_source(source)
    if source == "synthetic":
        docs = synthetic_corpus(max_docs or 2000)
    elif source == "fineweb":
        docs = list(itertools.islice(iter_fineweb(), max_docs or 20_000))
    else:
        path = Path(source)
        docs = READERS[path.suffix](path)
    docs = [d for d in docs[:max_docs] if d]
    if not docs:
        raise ValueError(f"data source {source!r} holds no text")
    return docs


# ------------------------------------------------------------------------------------------------
# 2. Tokenizers: encode(text) -> ids, encode_batch(texts), vocab_size, eos_id, name

EOS_TOKEN = "<|endoftext|>"


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus EOS = 256. Needs no training and no files."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE from the ``tokenizers`` library (see :func:`train_bpe`)."""

    def __init__(self, tokenizer, path: Optional[Path] = None, from_cache: bool = False):
        self.tokenizer, self.path, self.from_cache = tokenizer, path, from_cache
        self.name = f"bpe{tokenizer.get_vocab_size()}"
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_id = tokenizer.token_to_id(EOS_TOKEN)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids))


class HubTokenizer:
    """Any ``transformers.AutoTokenizer`` (a hub name or a local directory)."""

    def __init__(self, name: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.name, self.vocab_size = name, len(self.tokenizer)
        self.eos_id = self.tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"tokenizer {name!r} has no EOS token to separate documents")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids))


MIN_BPE_VOCAB = 258  # 256 byte symbols + EOS + at least one merge


def default_cache_dir() -> Path:
    return Path(os.environ.get("STRATOPT_CACHE", Path.home() / ".cache" / "stratopt_ds"))


def bpe_cache_path(docs: list[str], vocab_size: int, cache_dir: Path) -> Path:
    """``cache_dir/bpe-<hash>.json``; the hash covers the text itself and the vocabulary size."""
    digest = hashlib.sha256(f"bpe-v1|{vocab_size}|".encode())
    for doc in docs:
        digest.update(doc.encode("utf-8"))
        digest.update(b"\x00")
    return Path(cache_dir) / f"bpe-{digest.hexdigest()[:20]}.json"


def train_bpe(docs: list[str], vocab_size: int, cache_dir: Optional[Path] = None) -> BPETokenizer:
    """Train a byte-level BPE on ``docs``, or load it from the cache if trained before."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"BPE vocab size must be >= {MIN_BPE_VOCAB}, got {vocab_size}")
    path = bpe_cache_path(docs, vocab_size, Path(cache_dir or default_cache_dir()))
    if path.is_file():
        return BPETokenizer(Tokenizer.from_file(str(path)), path, from_cache=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(docs, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)  # atomic: a concurrent run never reads half a file
    return BPETokenizer(tokenizer, path, from_cache=False)


def get_tokenizer(spec: str, docs: list[str], bpe_vocab: int = 4096,
                  cache_dir: Optional[Path] = None):
    """'byte', 'bpe' (trained on ``docs``), or a hub name / local directory for AutoTokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        return train_bpe(docs, bpe_vocab, cache_dir)
    return HubTokenizer(spec)


# ------------------------------------------------------------------------------------------------
# 3. Packing and the validation split


def pack(token_docs: Iterable[list[int]], eos_id: int, seq_len: int) -> torch.Tensor:
    """Concatenate the documents, each followed by EOS, and cut into ``seq_len + 1`` windows.

    Returns an int32 tensor ``[num_windows, seq_len + 1]``; the incomplete tail is dropped.
    Inputs are ``w[:, :-1]``, targets ``w[:, 1:]``.
    """
    pieces = []
    for ids in token_docs:
        pieces.append(np.asarray(ids, dtype=np.int32))
        pieces.append(np.array([eos_id], dtype=np.int32))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    num_windows = len(stream) // (seq_len + 1)
    return torch.from_numpy(stream[: num_windows * (seq_len + 1)].reshape(num_windows, seq_len + 1))


def split_windows(windows: torch.Tensor, val_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val): the last windows are validation, at most a tenth of them, at least one.

    Depends only on the corpus, never on a seed, so every run is scored on the same text.
    """
    if len(windows) < 2:
        raise ValueError(f"the corpus packs into {len(windows)} window(s) of "
                         f"{windows.shape[1]} tokens; need at least 2 (more text or a "
                         "shorter --seq-len)")
    n_val = max(1, min(val_windows, len(windows) // 10))
    return windows[:-n_val], windows[-n_val:]


@dataclass
class Corpus:
    tokenizer: object
    train: torch.Tensor  # [num_train_windows, seq_len + 1] int32
    val: torch.Tensor    # [num_val_windows, seq_len + 1] int32
    num_docs: int
    num_tokens: int


def prepare_corpus(source: str, tokenizer: str = "byte", seq_len: int = 64,
                   val_windows: int = 64, bpe_vocab: int = 4096,
                   cache_dir: Optional[Path] = None, max_docs: Optional[int] = None) -> Corpus:
    """Documents -> tokenizer -> packed windows -> (train, val)."""
    docs = load_documents(source, max_docs)
    tok = get_tokenizer(tokenizer, docs, bpe_vocab, cache_dir)
    windows = pack(tok.encode_batch(docs), tok.eos_id, seq_len)
    train, val = split_windows(windows, val_windows)
    return Corpus(tok, train, val, len(docs), windows.numel())


# ------------------------------------------------------------------------------------------------
# 4. Batches


class BatchIterator:
    """Endless shuffled batches of training windows, resumable at any step.

    The windows are read in epochs, each a permutation drawn from ``(seed, epoch)``; batch ``k``
    holds the samples ``k*B .. k*B+B-1`` of that endless sequence (a batch may straddle two
    epochs). ``state_dict()`` reports the position and ``load_state_dict`` restores it.
    """

    def __init__(self, windows: torch.Tensor, batch_size: int, seed: int, step: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.windows, self.batch_size, self.seed, self.step = windows, batch_size, seed, step
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}  # keep 2
            self._perms[epoch] = torch.randperm(len(self.windows), generator=g)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        """Window indices of batch ``step``."""
        n = len(self.windows)
        samples = range(step * self.batch_size, (step + 1) * self.batch_size)
        return torch.stack([self._perm(s // n)[s % n] for s in samples])

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both int64 ``[batch_size, seq_len]``."""
        batch = self.windows[self.indices(self.step)].long()
        self.step += 1
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "num_windows": len(self.windows)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "batch_size", "num_windows"):
            if state[key] != mine[key]:
                raise ValueError(f"cannot resume the data order: {key}={state[key]} in the saved "
                                 f"state, {mine[key]} here")
        self.step = int(state["step"])


def val_batches(windows: torch.Tensor, batch_size: int, max_batches: int):
    """The validation windows in order, as at most ``max_batches`` (inputs, targets) pairs."""
    for start in range(0, min(len(windows), batch_size * max_batches), batch_size):
        batch = windows[start:start + batch_size].long()
        yield batch[:, :-1], batch[:, 1:]
