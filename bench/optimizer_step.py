"""One optimizer step on the parameter layouts of the model presets, side by side.

    python bench/optimizer_step.py --presets 134m 1b --layers-1b 5 --steps 5

Parameters are allocated as plain fp32 tensors with the preset's LLaMA shapes (no model is
built), one layer per tensor (``granularity="tensor"``), gradients fixed random. The timed
region is ``opt.step()`` only (median over ``--steps`` after one warm-up step).

CPU rows: StratOpt (default, and mix_alpha=0), our AdamW (LayerwiseAdamW), all on the native
kernel; torch.optim.AdamW(fused=True); DeepSpeedCPUAdam (JIT-builds its op; the reason is printed
if it cannot). With CUDA (``--device cuda``): the same StratOpt rows vs torch fused AdamW and
DeepSpeed FusedAdam.

Effective GB/s counts the bytes the algorithm must move per parameter (fp32 everything):
AdamW p,g,m,v read + p,m,v written = 28 B; + m2 read/written = 36 B; StratOpt/our AdamW also read
g once more for the per-layer norms: +4 B.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import stratopt_ds  # noqa: E402
from stratopt_ds import models  # noqa: E402
from stratopt_ds.ops import builder, use_backend  # noqa: E402


def layout(preset: str, layers: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every LlamaForCausalLM tensor of a preset, from the config dict alone."""
    p = models.preset(preset)
    if layers is not None:
        p["num_hidden_layers"] = layers
    d, ff, vocab = p["hidden_size"], p["intermediate_size"], p["vocab_size"]
    heads, kv_heads = p["num_attention_heads"], p["num_key_value_heads"]
    hd = d // heads
    q, kv = heads * hd, kv_heads * hd
    shapes = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(p["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        shapes += [(pre + "self_attn.q_proj.weight", (q, d)), (pre + "self_attn.k_proj.weight", (kv, d)),
                   (pre + "self_attn.v_proj.weight", (kv, d)), (pre + "self_attn.o_proj.weight", (d, q)),
                   (pre + "mlp.gate_proj.weight", (ff, d)), (pre + "mlp.up_proj.weight", (ff, d)),
                   (pre + "mlp.down_proj.weight", (d, ff)), (pre + "input_layernorm.weight", (d,)),
                   (pre + "post_attention_layernorm.weight", (d,))]
    shapes.append(("model.norm.weight", (d,)))
    if not p["tie_word_embeddings"]:
        shapes.append(("lm_head.weight", (vocab, d)))
    cfg = SimpleNamespace(hidden_size=d, intermediate_size=ff, vocab_size=vocab,
                          num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hd,
                          attention_bias=False, mlp_bias=False, num_hidden_layers=p["num_hidden_layers"],
                          tie_word_embeddings=p["tie_word_embeddings"])
    total = sum(torch.Size(s).numel() for _, s in shapes)
    assert total == models.count_parameters(cfg), (total, models.count_parameters(cfg))
    return shapes


def make_params(shapes, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = []
    for _, shape in shapes:
        p = torch.nn.Parameter(torch.empty(shape, device=device).normal_(0, 0.02, generator=None))
        p.grad = torch.randn(shape, generator=gen).mul_(1e-3).to(device)
        params.append(p)
    return params


def groups(shapes, params, wd=0.1):
    decay = [(n, p) for (n, _), p in zip(shapes, params) if p.ndim >= 2]
    no = [(n, p) for (n, _), p in zip(shapes, params) if p.ndim < 2]
    return [{"params": [p for _, p in decay], "param_names": [n for n, _ in decay], "weight_decay": wd},
            {"params": [p for _, p in no], "param_names": [n for n, _ in no], "weight_decay": 0.0}]


def plain_groups(g):
    return [{k: v for k, v in x.items() if k != "param_names"} for x in g]


def time_steps(opt, steps, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    opt.step()  # warm-up: states allocated, ops loaded
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def candidates(device):
    """name -> (bytes per param, factory(groups) -> optimizer or raises)."""
    rows = {
        "StratOpt (mix_alpha=5, native)": (40, lambda g: stratopt_ds.create_optimizer("stratopt", g)),
        "StratOpt (mix_alpha=0, native)": (32, lambda g: stratopt_ds.create_optimizer("stratopt", g, mix_alpha=0.0)),
        "our AdamW (LayerwiseAdamW, native)": (32, lambda g: stratopt_ds.create_optimizer("adamw", g)),
        "torch AdamW(fused=True)": (28, lambda g: torch.optim.AdamW(plain_groups(g), lr=3e-4, fused=True)),
    }
    if device.type == "cpu":
        def ds_cpu(g):
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam(plain_groups(g), lr=3e-4, adamw_mode=True)
        rows["DeepSpeedCPUAdam"] = (28, ds_cpu)
    else:
        def ds_fused(g):
            from deepspeed.ops.adam import FusedAdam
            return FusedAdam(plain_groups(g), lr=3e-4, adam_w_mode=True)
        rows["DeepSpeed FusedAdam"] = (28, ds_fused)
    return rows


def run(preset, layers, steps, device, only):
    shapes = layout(preset, layers)
    n = sum(torch.Size(s).numel() for _, s in shapes)
    label = preset if layers is None else f"{preset} ({layers} of {models.preset(preset)['num_hidden_layers']} blocks)"
    print(f"\n## {label}: {n / 1e6:.1f}M parameters in {len(shapes)} tensors, device {device}, "
          f"threads {torch.get_num_threads()}")
    print(f"| optimizer | ms/step | Mparam/s | B/param | eff. GB/s |")
    print(f"|---|---:|---:|---:|---:|")
    results = {}
    for name, (bpp, factory) in candidates(device).items():
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        params = make_params(shapes, device)
        try:
            with use_backend("native"):
                opt = factory(groups(shapes, params))
                sec = time_steps(opt, steps, device)
        except Exception as exc:  # e.g. DeepSpeed's op cannot build here: say why
            print(f"| {name} | n/a: {type(exc).__name__}: {str(exc).splitlines()[0][:160]} | | | |")
            del params
            gc.collect()
            continue
        results[name] = n / sec / 1e6
        print(f"| {name} | {sec * 1e3:.1f} | {n / sec / 1e6:.1f} | {bpp} | {bpp * n / sec / 1e9:.2f} |",
              flush=True)
        del opt, params
        gc.collect()
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["134m"])
    ap.add_argument("--layers-1b", type=int, default=None,
                    help="blocks of the 1b layout to allocate (all 20 need ~20 GB per optimizer)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", nargs="*", default=None, help="substrings of optimizer rows to run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    mod = builder.load("cpu" if device.type == "cpu" else "cuda")
    print(f"native op: {'loaded' if mod else builder.why_unavailable(device.type)}"
          + (f", isa {mod.isa()}" if mod is not None and device.type == "cpu" else ""))
    for preset in args.presets:
        res = run(preset, args.layers_1b if preset == "1b" else None, args.steps, device, args.only)
        ref = res.get("DeepSpeedCPUAdam") or res.get("DeepSpeed FusedAdam")
        nomix = res.get("StratOpt (mix_alpha=0, native)")
        ours, torch_fused = res.get("our AdamW (LayerwiseAdamW, native)"), res.get("torch AdamW(fused=True)")
        if ref and nomix:
            print(f"target StratOpt(mix_alpha=0) >= 0.85x DeepSpeed: {nomix / ref:.2f}x "
                  f"-> {'met' if nomix / ref >= 0.85 else 'NOT met'}")
        if ours and torch_fused:
            print(f"target our AdamW >= 1.0x torch fused: {ours / torch_fused:.2f}x "
                  f"-> {'met' if ours / torch_fused >= 1.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
