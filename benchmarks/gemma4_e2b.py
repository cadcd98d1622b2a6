"""CPU speed and memory of Gemma 4 E2B's released shape, with its per-layer embeddings (PLE) read
from the file per token and, for comparison, loaded into RAM (`--ple-in-ram`).

No Gemma 4 weights are reachable here, so this writes a random-weight GGUF of E2B's text decoder
(35 layers, hidden 1536, 8 heads / 1 KV head of 256 (sliding) or 512 (full) values, 4 sliding : 1
full, the last 20 layers sharing KV with a 12288-wide FFN, a 262144 x 35 x 256 per-layer table,
262144-token vocabulary) with the keys our converter writes, every matrix in `--quant`'s blocks,
and runs `pocketlm bench` on it in fresh processes, alternating the two modes.

    python benchmarks/gemma4_e2b.py --rounds 3 [--quant q8_0] [--keep e2b.gguf]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from gemma3n_ple import bench
from gpu_bench import random_tensor

E2B = {
    "model_type": "gemma4_text",
    "vocab_size": 262144,
    "vocab_size_per_layer_input": 262144,
    "hidden_size": 1536,
    "intermediate_size": 6144,
    "num_hidden_layers": 35,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "global_head_dim": 512,
    "layer_types": (["sliding_attention"] * 4 + ["full_attention"]) * 7,
    "sliding_window": 512,
    "num_kv_shared_layers": 20,
    "use_double_wide_mlp": True,
    "hidden_size_per_layer_input": 256,
    "final_logit_softcapping": 30.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131072,
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {
            "rope_type": "proportional",
            "partial_rotary_factor": 0.25,
            "rope_theta": 1000000.0,
        },
    },
}


def tensors(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, numpy shape) of every tensor of the text decoder."""
    d, per_layer, n = c["hidden_size"], c["hidden_size_per_layer_input"], c["num_hidden_layers"]
    first_shared = n - c["num_kv_shared_layers"]
    out = [
        ("token_embd.weight", (c["vocab_size"], d)),
        ("per_layer_token_embd.weight", (c["vocab_size_per_layer_input"], n * per_layer)),
        ("per_layer_model_proj.weight", (n * per_layer, d)),
        ("per_layer_proj_norm.weight", (per_layer,)),
        ("output_norm.weight", (d,)),
    ]
    for i, layer_type in enumerate(c["layer_types"]):
        hd = c["head_dim"] if layer_type == "sliding_attention" else c["global_head_dim"]
        q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
        ffn = c["intermediate_size"] * (2 if i >= first_shared else 1)
        p = f"blk.{i}"
        out += [
            (f"{p}.attn_q.weight", (q, d)),
            (f"{p}.attn_output.weight", (d, q)),
            (f"{p}.attn_q_norm.weight", (hd,)),
        ]
        if i < first_shared:
            out += [
                (f"{p}.attn_k.weight", (kv, d)),
                (f"{p}.attn_v.weight", (kv, d)),
                (f"{p}.attn_k_norm.weight", (hd,)),
            ]
        out += [
            (f"{p}.ffn_gate.weight", (ffn, d)),
            (f"{p}.ffn_up.weight", (ffn, d)),
            (f"{p}.ffn_down.weight", (d, ffn)),
        ]
        out += [(f"{p}.inp_gate.weight", (per_layer, d)), (f"{p}.proj.weight", (d, per_layer))]
        for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm", "post_norm"):
            out.append((f"{p}.{norm}.weight", (d,)))
        out.append((f"{p}.layer_output_scale.weight", (1,)))
    return out


def build(path: Path, quant: str) -> None:
    from pocketlm.convert.architectures import mapping_for
    from pocketlm.formats.gguf import GGUFWriter, arch_key
    from pocketlm.formats.quants import GGMLType

    mapping = mapping_for(E2B)
    writer = GGUFWriter()
    writer.add("general.architecture", "gemma4")
    writer.add("general.name", "random Gemma 4 E2B shape")
    for key, value in mapping.metadata().items():
        writer.add(arch_key("gemma4", key), value)
    vocab = [f"<0x{i:02X}>" for i in range(256)] + [f"<unused{i}>" for i in range(256, E2B["vocab_size"])]
    writer.add("tokenizer.ggml.model", "llama")
    writer.add("tokenizer.ggml.tokens", vocab)
    writer.add("tokenizer.ggml.scores", np.zeros(len(vocab), np.float32))
    writer.add("tokenizer.ggml.token_type", np.array([6] * 256 + [5] * (len(vocab) - 256), np.int32))
    writer.add("tokenizer.ggml.add_bos_token", False)
    rng = np.random.default_rng(0)
    tensor_type = GGMLType[quant.upper()]
    for name, shape in tensors(E2B):
        if len(shape) == 1:  # norms near 1, output scales near 1
            values = (1 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
            writer.add_tensor(
                name,
                GGMLType.F32,
                shape,
                lambda v=values: v.view(np.uint8),
            )
        else:
            writer.add_tensor(name, tensor_type, shape, lambda s=shape: random_tensor(tensor_type, s, rng))
    factors = np.array([1.0] * 64 + [1e30] * 192, np.float32)
    writer.add_tensor("rope_freqs.weight", GGMLType.F32, factors.shape, lambda: factors.view(np.uint8))
    writer.write(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quant", default="q8_0", choices=["q8_0", "q4_0", "q4_1"])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument(
        "--keep", type=Path, help="write the file here and keep it (default: a temporary folder)"
    )
    args = parser.parse_args()
    from compare_llamacpp import machine

    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "e2b.gguf"
        if not path.exists():
            build(path, args.quant)
        print(f"CPU: {machine()}\nfile {path.stat().st_size / 1e9:.2f} GB")
        runs = {"streamed": [], "in RAM": []}
        for r in range(args.rounds):
            for mode in ("streamed", "in RAM") if r % 2 == 0 else ("in RAM", "streamed"):
                flags = ("--ple-in-ram",) if mode == "in RAM" else ()
                runs[mode].append(bench(path, *flags, prompt=args.prompt_tokens, gen=args.gen_tokens))
                print(
                    f"  round {r + 1} {mode}: decode {runs[mode][-1]['decode_tokens_per_second']:.2f} tok/s",
                    file=sys.stderr,
                )
    first = runs["streamed"][0]
    resident, streamed = first["params_resident"] / 1e9, first["params_streamed"] / 1e9
    print(f"parameters: {resident:.2f} B in memory, {streamed:.2f} B read from storage")
    print(
        f"{'PLE':<10} {'peak RSS MB':>12} {'prefill tok/s':>14} {'decode tok/s':>13}   (medians of {args.rounds}, 2 threads)"
    )
    for mode, results in runs.items():
        keys = ("peak_rss_mb", "prefill_tokens_per_second", "decode_tokens_per_second")
        med = {k: statistics.median(r[k] for r in results) for k in keys}
        rss, prefill, decode = (med[k] for k in keys)
        print(f"{mode:<10} {rss:>12.0f} {prefill:>14.1f} {decode:>13.2f}")


if __name__ == "__main__":
    main()
