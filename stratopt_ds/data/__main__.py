"""Build and inspect token stores.

    python -m stratopt_ds.data build SOURCE --tokenizer NAME --out STORE [options]
    python -m stratopt_ds.data info STORE [--verify]

SOURCE: 'fineweb' (streamed from the hub), 'synthetic', a .txt/.jsonl/.parquet file, a directory
of them, or a glob ('data/*.jsonl'). An interrupted build continues from its last complete shard
when the same command runs again.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from .errors import DataError
from .sources import FINEWEB_CONFIG
from .store import (DEFAULT_SHARD_TOKENS, DEFAULT_VAL_TOKENS, BuildSettings, build_store,
                    default_num_proc, open_store)
from .tokenizer import DEFAULT_BPE_VOCAB


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stratopt-data",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="tokenize a source into a store",
                       description=__doc__.split("\n\n", 1)[1])
    b.add_argument("source", metavar="SOURCE")
    b.add_argument("--out", required=True, metavar="STORE", help="the store directory")
    b.add_argument("--tokenizer", default="byte",
                   help="'byte' (default), 'bpe' (trained on a prefix of the source, cached), or "
                        "a Hugging Face tokenizer name or local directory")
    b.add_argument("--num-proc", type=int, default=None,
                   help=f"tokenizer processes (default: all cores, {default_num_proc()} here, but "
                        "1 for 'byte', whose encoding is a copy); the tokens do not depend on it")
    b.add_argument("--max-docs", type=int, default=None, help="read at most N documents")
    b.add_argument("--max-tokens", type=int, default=None,
                   help="stop when the training part holds N tokens")
    b.add_argument("--val-tokens", type=int, default=DEFAULT_VAL_TOKENS,
                   help="the validation part: the source's first N tokens (the document at the "
                        f"boundary goes on in the training part) (default: {DEFAULT_VAL_TOKENS:,}; "
                        "0: none)")
    b.add_argument("--fineweb-config", default=FINEWEB_CONFIG,
                   help=f"FineWeb config of SOURCE 'fineweb' (default: {FINEWEB_CONFIG})")
    b.add_argument("--bpe-vocab", type=int, default=DEFAULT_BPE_VOCAB,
                   help=f"vocabulary of --tokenizer bpe (default: {DEFAULT_BPE_VOCAB})")
    b.add_argument("--bpe-sample-chars", type=int, default=BuildSettings.bpe_sample_chars,
                   help="train the BPE on the source's first documents, this many characters "
                        f"(default: {BuildSettings.bpe_sample_chars:,})")
    b.add_argument("--text-field", default="text", help="field of .jsonl / column of .parquet")
    b.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard file (default: {DEFAULT_SHARD_TOKENS:,})")
    b.add_argument("--cache-dir", default=None,
                   help="where a trained BPE is cached (default: $STRATOPT_CACHE or "
                        "~/.cache/stratopt_ds)")
    b.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    i = sub.add_parser("info", help="print a store's manifest summary")
    i.add_argument("store", metavar="STORE")
    i.add_argument("--verify", action="store_true", help="also compare every shard's checksum")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            if args.num_proc is not None and args.num_proc < 1:
                raise DataError(f"--num-proc must be >= 1, got {args.num_proc}")
            settings = BuildSettings(
                tokenizer=args.tokenizer, bpe_vocab=args.bpe_vocab,
                bpe_sample_chars=args.bpe_sample_chars, max_docs=args.max_docs,
                max_tokens=args.max_tokens, val_tokens=args.val_tokens,
                shard_tokens=args.shard_tokens, text_field=args.text_field,
                fineweb_config=args.fineweb_config)
            store = build_store(args.source, args.out, settings, num_proc=args.num_proc,
                                progress=not args.no_progress, cache_dir=args.cache_dir)
        else:
            store = open_store(args.store, verify=args.verify)
    except (DataError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    print(store.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
