"""Text in, token windows out: one data path, through a tokenized, memory-mapped token store.

1. **Sources** (``sources``): the synthetic corpus, local ``.txt`` / ``.jsonl`` / ``.parquet``
   files (a file, a directory or a glob), or FineWeb streamed from the hub, read as streams.
2. **Tokenizers** (``tokenizer``): bytes, a byte-level BPE trained on a prefix of the source
   (cached), or any Hugging Face tokenizer; a store carries its own.
3. **Stores** (``store``): ``build_store`` tokenizes a source once, in parallel and in order,
   into fixed-size shards of token ids plus a manifest written last; ``open_store`` memory-maps
   them. ``python -m stratopt_ds.data build SOURCE --tokenizer NAME --out STORE``.
4. **Windows and batches** (``batches``): windows of ``seq_len + 1`` tokens; each epoch visits
   them in a seeded Feistel order computed per index; batch ``k`` is a pure function of (store,
   data seed, k), so a resumed run reads exactly what the uninterrupted one would have.
5. **Requests** (``request``): ``DataRequest`` is what every entry point (``stratopt_ds.train``,
   ``examples/hf_train.py``, the accelerate example, the study harness) does with ``--data``: open
   a store, or build the source into a content-keyed cache first and open that.
"""
from .batches import (Batch, BatchIterator, Permutation, WindowDataset, Windows, WindowSampler,
                      epoch_permutation)
from .errors import DataError, SourceError, StoreError, TokenizerError
from .request import DataRequest, TrainingData
from .sources import (NAMED_SOURCES, READERS, DocumentStream, Source, describe_source, hub_reachable,
                      iter_documents, resolve_source, synthetic_documents)
from .store import (DEFAULT_SHARD_TOKENS, DEFAULT_VAL_TOKENS, MANIFEST, BuildSettings, TokenPart,
                    TokenStore, build_store, is_store, open_store)
from .tokenizer import (DEFAULT_BPE_VOCAB, EOS_TOKEN, MIN_BPE_VOCAB, ByteTokenizer,
                        encode_documents, train_bpe)

__all__ = [
    "Batch", "BatchIterator", "Permutation", "WindowDataset", "Windows", "WindowSampler",
    "epoch_permutation", "DataError", "SourceError", "StoreError", "TokenizerError",
    "DataRequest", "TrainingData", "NAMED_SOURCES", "READERS", "Source", "describe_source",
    "DocumentStream", "hub_reachable", "iter_documents", "resolve_source", "synthetic_documents",
    "DEFAULT_SHARD_TOKENS", "DEFAULT_VAL_TOKENS", "MANIFEST", "BuildSettings", "TokenPart",
    "TokenStore", "build_store", "is_store", "open_store", "DEFAULT_BPE_VOCAB", "EOS_TOKEN",
    "MIN_BPE_VOCAB", "ByteTokenizer", "encode_documents", "train_bpe",
]
