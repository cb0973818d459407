"""The plain way to do the studio's job, with no studio around it: a transformers Trainer + peft LoRA script
of the kind people write by hand. bench/throughput.py runs it next to `studio train` on the same model, data,
hyperparameters and seed.

It reads an alpaca JSON file, renders each row with the tokenizer's chat template, masks the prompt out of
the labels, pads each batch with DataCollatorForSeq2Seq, and trains LoRA on all linear layers. It counts the
real (non-padding) tokens it hands the model and writes, as JSON: the Trainer's train_runtime, real tokens,
tokens/s, the padding share, peak memory (ru_maxrss) and the losses.

    python bench/baseline_peft.py --model PATH --data datasets/studio_facts.json --out result.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def load_rows(path: Path, tokenizer, cutoff: int) -> list[dict]:
    rows = []
    for r in json.loads(path.read_text()):
        user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        messages = [{"role": "system", "content": r["system"]}] if r.get("system") else []
        messages.append({"role": "user", "content": user})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = prompt + r["output"] + tokenizer.eos_token
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][:cutoff]
        labels = ([-100] * len(prompt_ids) + ids[len(prompt_ids) :])[:cutoff]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows


class CountingCollator:
    """DataCollatorForSeq2Seq, counting real and padded positions as it goes."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        self.inner = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        self.real = self.positions = 0

    def __call__(self, features):
        batch = self.inner(features)
        self.real += int(batch["attention_mask"].sum())
        self.positions += batch["attention_mask"].numel()
        return batch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--cutoff", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--logging-steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.use_cache = False
    lora = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    collator = CountingCollator(tokenizer)
    out_dir = Path(args.out).parent / "baseline-trainer"
    training_args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        max_steps=args.steps,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=load_rows(Path(args.data), tokenizer, args.cutoff),
        data_collator=collator,
    )
    started = time.perf_counter()
    output = trainer.train()
    runtime = output.metrics["train_runtime"]
    result = {
        "train_runtime_s": runtime,
        "wall_train_s": time.perf_counter() - started,
        "real_tokens": collator.real,
        "tokens_per_s": collator.real / runtime,
        "padding_share": 1 - collator.real / collator.positions,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "global_step": trainer.state.global_step,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
