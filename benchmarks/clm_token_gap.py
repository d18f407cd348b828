"""Where a compressed causal LM's perplexity gap to its control lies, token by token, on both of the example's texts.

    python benchmarks/clm_token_gap.py outputs/clm_dkm            # after `make demo-llm` (its output folder)
    python benchmarks/clm_token_gap.py OUT --compressed compressed-4bit compressed-3bit --threads 2

OUT is the causal-LM example's output folder: its `dense/` model and the palettized checkpoints named by
--compressed. The control (the example's 4-bit recipe without clustering: lr 3e-4, cosine, 20 steps of 4 x 128, seed
42) is retrained here, since the example does not keep it; --learning_rate / --max_steps give another recipe's.
Every model's next-token loss on the example's held-out texts (BBC News, tweets; the same 8,192 tokens of each) is
split by what the target token is: the end of a document (EOS), the first token of a document (after an EOS), its
2nd-4th tokens, and the rest. Prints, per text and category, the share of tokens, each model's mean loss (nats) and
what each compressed model's gap to the control contributes to the mean over all tokens (the log of the perplexity
ratio is their sum).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def categories(blocks, eos: int) -> dict:
    """{name: (n, size - 1) bool mask of the predicted tokens}; every predicted token is in exactly one."""
    import torch

    targets, previous = blocks[:, 1:], blocks[:, :-1]
    # tokens since the last EOS; a block's tokens before its first EOS are counted as far from any document start
    since_eos = torch.full_like(blocks, blocks.shape[1])
    for i in range(1, blocks.shape[1]):
        since_eos[:, i] = torch.where(blocks[:, i - 1] == eos, 0, since_eos[:, i - 1] + 1)
    end, first = targets == eos, previous == eos
    early = (since_eos[:, 1:] >= 1) & (since_eos[:, 1:] <= 3) & ~end
    return {
        "end of document (EOS)": end,
        "first token of a document": first & ~end,
        "2nd-4th token": early,
        "the rest": ~(end | first | early),
    }


def token_losses(model, blocks, batch_size: int = 8):
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            x = blocks[start : start + batch_size]
            logits = model(input_ids=x).logits[:, :-1].float()
            out.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none"))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the causal-LM example's output folder")
    parser.add_argument("--compressed", nargs="+", default=["compressed-4bit"])
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    out = Path(args.out)
    for name in ["dense", *args.compressed]:
        if not (out / name / "config.json").is_file():
            sys.exit(f"{out / name}: no model folder (run the example first: make demo-llm)")

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "examples"))
    from causal_lm.run_clm_dkm import bbc_news, to_blocks, tweets
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    import dkm_hf  # noqa: F401  (the palettized checkpoints' loader)

    tokenizer = AutoTokenizer.from_pretrained(out / "dense")
    train_texts, held_texts = bbc_news(args.seed)
    train = to_blocks(tokenizer, train_texts, 128)
    texts = {"BBC News (held out)": to_blocks(tokenizer, held_texts, 128)[:64]}
    other = tweets()
    if other:
        texts["tweets"] = to_blocks(tokenizer, other, 128)[:64]

    models = {"dense": AutoModelForCausalLM.from_pretrained(out / "dense")}
    control = AutoModelForCausalLM.from_pretrained(out / "dense")
    training = TrainingArguments(
        output_dir=str(out / "token-gap-control-run"), learning_rate=args.learning_rate, lr_scheduler_type="cosine",
        max_steps=args.max_steps, per_device_train_batch_size=4, weight_decay=0.0, seed=args.seed, report_to="none",
        save_strategy="no", logging_steps=5, dataloader_pin_memory=False,
    )  # fmt: skip
    dataset = [{"input_ids": row, "labels": row} for row in train]
    Trainer(model=control, args=training, train_dataset=dataset, data_collator=default_data_collator).train()
    models["control"] = control
    for name in args.compressed:
        models[name] = AutoModelForCausalLM.from_pretrained(out / name)

    for text, blocks in texts.items():
        losses = {name: token_losses(model, blocks) for name, model in models.items()}
        count = blocks[:, 1:].numel()
        print(f"\n{text}: perplexity " + ", ".join(f"{n} {math.exp(v.mean()):.2f}" for n, v in losses.items()))
        header = ["tokens", "share"] + [f"{n} (nats)" for n in models] + [f"{n} - control" for n in args.compressed]
        print("| " + " | ".join(header) + " |\n|---|" + "---:|" * (len(header) - 1))
        masks = categories(blocks, tokenizer.eos_token_id)
        for name, mask in {**masks, "all": torch.ones_like(blocks[:, 1:], dtype=torch.bool)}.items():
            cells = [name, f"{mask.sum().item() / count:.3f}"]
            cells += [f"{v[mask].mean().item():.3f}" for v in losses.values()]
            gap = [(losses[n][mask].sum() - losses["control"][mask].sum()).item() / count for n in args.compressed]
            print("| " + " | ".join(cells + [f"{g:+.4f}" for g in gap]) + " |")


if __name__ == "__main__":
    main()
