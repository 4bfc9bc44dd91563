"""Tokenizers: bytes, a byte-level BPE trained here, or any Hugging Face tokenizer.

A store carries its tokenizer: ``save_tokenizer`` writes its files into ``STORE/tokenizer/`` and
returns the manifest's ``tokenizer`` entry (kind, name, vocabulary size, EOS id, the files and
their sha256); ``load_tokenizer`` makes it again from there, in the build's worker processes and
for anyone who reads the store. ``encode_documents`` turns a list of documents into one flat
array of ids, each document followed by EOS.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from .errors import TokenizerError
from .sources import hub_offline, hub_reachable

EOS_TOKEN = "<|endoftext|>"
MIN_BPE_VOCAB = 258  # 256 byte symbols + EOS + at least one merge
DEFAULT_BPE_VOCAB = 4096
TOKENIZER_DIR = "tokenizer"


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus EOS = 256. Needs no training and no files."""

    kind = name = "byte"
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

    kind = "bpe"

    def __init__(self, tokenizer, path: Optional[Path] = None, from_cache: bool = False):
        self.tokenizer, self.path, self.from_cache = tokenizer, path, from_cache
        self.vocab_size = tokenizer.get_vocab_size()
        self.name = f"bpe{self.vocab_size}"
        self.eos_id = tokenizer.token_to_id(EOS_TOKEN)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def save(self, directory: Path) -> None:
        self.tokenizer.save(str(directory / "tokenizer.json"))


class HubTokenizer:
    """Any ``transformers.AutoTokenizer``: a hub name (cached or online) or a local directory."""

    kind = "hf"

    def __init__(self, name: str, tokenizer=None):
        if tokenizer is None:
            tokenizer = _auto_tokenizer(name)
        self.tokenizer, self.name = tokenizer, name
        self.tokenizer.model_max_length = int(1e30)  # documents are longer than a context: fine
        self.vocab_size, self.eos_id = len(tokenizer), tokenizer.eos_token_id
        if self.eos_id is None:
            raise TokenizerError(f"tokenizer {name!r} has no EOS token to separate documents")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def save(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(str(directory))


# What --tokenizer accepts, for the messages.
ALTERNATIVES = ("expected 'byte', 'bpe' (trained on the source), a local directory of tokenizer "
                "files, or a Hugging Face hub name (org/name) that is cached or reachable")
# Any of these makes a directory (or a cached hub repository) a tokenizer AutoTokenizer can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "spiece.model", "tokenizer.model")


def _auto_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        where = ("not in the Hugging Face cache (offline mode)" if hub_offline()
                 else "not loadable from the hub")
        raise TokenizerError(
            f"--tokenizer {name!r}: not 'byte' or 'bpe', not a local tokenizer directory, and "
            f"{where} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); {ALTERNATIVES}") from None


def check_tokenizer_name(spec: str) -> None:
    """Raise TokenizerError unless ``--tokenizer spec`` can be had when the store is built:
    'byte', 'bpe', a directory holding tokenizer files, or a hub name in the Hugging Face cache
    or, when not cached, with the hub reachable. Without a download, and without any network
    where offline mode is set; a hub name that is reachable is only loaded by the build."""
    if spec in ("byte", "bpe"):
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise TokenizerError(f"--tokenizer {spec}: a directory without tokenizer files (none "
                                 f"of {', '.join(TOKENIZER_FILES)}); {ALTERNATIVES}")
        return
    try:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:
        raise TokenizerError(f"--tokenizer {spec!r}: a hub tokenizer needs transformers (pip "
                             f"install 'stratopt-ds[train]'); {ALTERNATIVES}") from None
    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise TokenizerError(f"--tokenizer {spec!r}: no such directory, and not a hub name "
                             f"(org/name); {ALTERNATIVES}") from None
    if any(isinstance(try_to_load_from_cache(spec, name), str) for name in TOKENIZER_FILES):
        return
    if hub_offline() or not hub_reachable():
        why = "offline mode is set" if hub_offline() else "the hub cannot be reached"
        raise TokenizerError(f"--tokenizer {spec!r}: not a local directory, and not in the Hugging "
                             f"Face cache while {why}; {ALTERNATIVES} (load it once where the hub "
                             f"is reachable, or save it to a directory and give that)")


# ------------------------------------------------------------------------------------------------
# BPE training, cached by the text it was trained on


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
        raise TokenizerError(f"BPE vocab size must be >= {MIN_BPE_VOCAB}, got {vocab_size}")
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


def make_tokenizer(spec: str, sample: Callable[[], list[str]], bpe_vocab: int = DEFAULT_BPE_VOCAB,
                   cache_dir: Optional[Path] = None):
    """'byte', 'bpe' (trained on ``sample()``, a prefix of the source), or a hub name / local
    directory for ``AutoTokenizer``."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        docs = sample()
        if not docs:
            raise TokenizerError("--tokenizer bpe: the source holds no text to train on")
        return train_bpe(docs, bpe_vocab, cache_dir)
    return HubTokenizer(spec)


# ------------------------------------------------------------------------------------------------
# A store's tokenizer: saved with it, loaded from it


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_tokenizer(tok, directory: Path) -> dict:
    """Write the tokenizer's files to ``directory`` (replaced); return the manifest entry."""
    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    if tok.kind != "byte":
        tok.save(directory)
    files = {p.relative_to(directory).as_posix(): _sha256(p)
             for p in sorted(directory.rglob("*")) if p.is_file()}
    return {"kind": tok.kind, "name": tok.name, "vocab_size": int(tok.vocab_size),
            "eos_id": int(tok.eos_id), "files": files}


def load_tokenizer(directory: Path, info: dict):
    """The tokenizer that ``save_tokenizer`` wrote; its files must match the recorded hashes."""
    directory = Path(directory)
    for name, digest in info["files"].items():
        path = directory / name
        if not path.is_file():
            raise TokenizerError(f"{path}: missing (the store's manifest lists it)")
        if _sha256(path) != digest:
            raise TokenizerError(f"{path}: checksum mismatch: not the file the store was built with")
    if info["kind"] == "byte":
        return ByteTokenizer()
    if info["kind"] == "bpe":
        from tokenizers import Tokenizer

        return BPETokenizer(Tokenizer.from_file(str(directory / "tokenizer.json")))
    from transformers import AutoTokenizer

    return HubTokenizer(info["name"], AutoTokenizer.from_pretrained(str(directory)))


def matches(request: str, info: dict, bpe_vocab: Optional[int] = None) -> bool:
    """Does ``--tokenizer request`` (and ``--bpe-vocab``) name the store's tokenizer?"""
    if info["kind"] == "bpe" and request == "bpe":
        return bpe_vocab is None or bpe_vocab == info["vocab_size"]
    if request == info["name"]:
        return True
    return info["kind"] == "hf" and Path(request).is_dir() and Path(info["name"]).is_dir() and \
        Path(request).resolve() == Path(info["name"]).resolve()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (GPT-2's 50,257), uint32 otherwise (Llama 3's 128,256)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_documents(tok, docs: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(ids, lengths): the documents' ids, each followed by EOS, as one array; per document its
    length including the EOS."""
    if tok.kind == "byte":  # vectorised: no Python list of ints
        encoded = [d.encode("utf-8") for d in docs]
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
        body = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(dtype)
        ids = np.insert(body, np.cumsum(lengths), tok.eos_id)
        return ids, lengths + 1
    pieces = []
    for ids in tok.encode_batch(docs):
        pieces.append(np.asarray(ids, dtype=dtype))
        pieces.append(np.asarray([tok.eos_id], dtype=dtype))
    lengths = np.asarray([len(p) for p in pieces[0::2]], dtype=np.int64) + 1
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    return ids, lengths
