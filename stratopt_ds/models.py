"""Model presets as data: LLaMA-architecture configs from a CPU toy up to 7B parameters.

A preset is a plain dict of ``transformers.LlamaConfig`` keywords plus a few training defaults
(``lr``, ``batch_size``, ``seq_len``). The parameter count of a preset is computed from the
config alone (:func:`count_parameters`), so ``1b`` can be sized without allocating 4 GB; ``3b``
and ``7b`` exist for the memory planner (:mod:`stratopt_ds.memory`) and are never built here.

The names are the parameter counts at the preset's own vocabulary; a different tokenizer changes
the embedding size (``build_model(..., vocab_size=...)``).
"""
from __future__ import annotations

from typing import Any, Optional

# Keys of a preset that are training defaults, not LlamaConfig keywords.
TRAIN_KEYS = ("lr", "batch_size", "seq_len", "pad_vocab_to")

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # A few hundred thousand parameters at a byte vocabulary: 20 steps take seconds on a CPU.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, intermediate_size=172, vocab_size=257,
                 tie_word_embeddings=False,
                 lr=3e-3, batch_size=8, seq_len=64, pad_vocab_to=1),
    # 134.2M: GPT-2-small shape with a SwiGLU MLP and tied 50304-token embeddings.
    "134m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, intermediate_size=2432, vocab_size=50304,
                 tie_word_embeddings=True,
                 lr=6e-4, batch_size=32, seq_len=1024, pad_vocab_to=64),
    # 500.6M: 22 blocks of width 1280, tied 50304-token embeddings.
    "500m": dict(hidden_size=1280, num_hidden_layers=22, num_attention_heads=20,
                 num_key_value_heads=20, intermediate_size=3456, vocab_size=50304,
                 tie_word_embeddings=True,
                 lr=4e-4, batch_size=16, seq_len=2048, pad_vocab_to=64),
    # 1001.5M: 20 blocks of width 2048 with grouped-query attention (8 KV heads), untied
    # 32000-token embeddings (the LLaMA-2 tokenizer size).
    "1b": dict(hidden_size=2048, num_hidden_layers=20, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=5376, vocab_size=32000,
               tie_word_embeddings=False,
               lr=3e-4, batch_size=8, seq_len=2048, pad_vocab_to=64),
    # Planning-only shapes (python -m stratopt_ds.memory): nothing here or in the tests builds them.
    # 3.43B: the OpenLLaMA-3B shape.
    "3b": dict(hidden_size=3200, num_hidden_layers=26, num_attention_heads=32,
               num_key_value_heads=32, intermediate_size=8640, vocab_size=32000,
               tie_word_embeddings=False,
               lr=3e-4, batch_size=4, seq_len=2048, pad_vocab_to=64),
    # 6.74B: the LLaMA-7B shape.
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
               tie_word_embeddings=False,
               lr=3e-4, batch_size=4, seq_len=2048, pad_vocab_to=64),
}

# The parameter count each name promises (count_parameters must be within 2% of it).
NOMINAL_PARAMS = {"134m": 134e6, "500m": 500e6, "1b": 1e9, "3b": 3.43e9, "7b": 6.74e9}


def preset(name: str) -> dict[str, Any]:
    """A copy of preset ``name``; an unknown name raises ValueError listing the known ones."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(MODEL_PRESETS)}")
    return dict(MODEL_PRESETS[name])


def padded_vocab(vocab_size: int, multiple: int) -> int:
    """Round the vocabulary up to a multiple (50257 -> 50304 for 64), as nanoGPT does."""
    return -(-vocab_size // multiple) * multiple


def llama_config(name: str, vocab_size: Optional[int] = None, seq_len: Optional[int] = None):
    """The ``LlamaConfig`` of a preset, for a tokenizer's vocabulary and a context length."""
    from transformers import LlamaConfig

    p = preset(name)
    vocab = padded_vocab(vocab_size, p["pad_vocab_to"]) if vocab_size else p["vocab_size"]
    kwargs = {k: v for k, v in p.items() if k not in TRAIN_KEYS}
    kwargs.update(vocab_size=vocab, max_position_embeddings=seq_len or p["seq_len"],
                  bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=False)
    return LlamaConfig(**kwargs)


def count_parameters(config) -> int:
    """Trainable parameters of ``LlamaForCausalLM(config)``, from the config alone."""
    d, ff, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    attn = d * q + 2 * d * kv + q * d
    if config.attention_bias:
        attn += q + 2 * kv + d
    mlp = 3 * d * ff + ((2 * ff + d) if config.mlp_bias else 0)
    block = attn + mlp + 2 * d                       # + input and post-attention RMSNorm
    embeddings = vocab * d * (1 if config.tie_word_embeddings else 2)
    return embeddings + config.num_hidden_layers * block + d  # + final RMSNorm


def build_model(name: str, vocab_size: Optional[int] = None, seq_len: Optional[int] = None,
                seed: int = 0):
    """A freshly initialised ``LlamaForCausalLM``; the same seed gives the same weights."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(name, vocab_size, seq_len)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
