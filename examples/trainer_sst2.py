"""SADRA inside a plain Hugging Face Trainer script: MiniLM on SST-2.

The only SADRA line is ``sadra.auto_lora_config``: it probes the model on a few training batches
and returns a ``peft.LoraConfig`` with per-module ranks at the budget of uniform LoRA r=8.
Everything else is stock transformers + PEFT.

    python examples/trainer_sst2.py --glue-dir ../shared/glue --out runs/example
"""

import argparse
import json
import math

from datasets import Dataset
from peft import get_peft_model
from sklearn.metrics import accuracy_score
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

import sadra


def rows_to_dataset(rows, tokenizer, max_length):
    ds = Dataset.from_dict({"sentence": [r.text_a for r in rows], "label": [r.label for r in rows]})
    return ds.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=max_length), batched=True,
                  remove_columns=["sentence"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue-dir", default=None, help="offline GLUE folder (default: $SADRA_GLUE_DIR)")
    parser.add_argument("--out", default="runs/example")
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--eval-rows", type=int, default=None, help="default: the whole dev set")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--budget", default="lora-r8")
    parser.add_argument("--calibration-batches", type=int, default=4)
    args = parser.parse_args()

    model, tokenizer = sadra.load_model("minilm", num_labels=2, seed=0)
    train_rows = sadra.load_glue("sst2", "train", args.glue_dir)[: args.train_rows]
    dev_rows = sadra.load_glue("sst2", "validation", args.glue_dir)[: args.eval_rows]
    train, dev = rows_to_dataset(train_rows, tokenizer, 64), rows_to_dataset(dev_rows, tokenizer, 64)

    config = sadra.auto_lora_config(model, train, tokenizer=tokenizer, budget=args.budget,
                                    num_batches=args.calibration_batches, task_type="SEQ_CLS", lora_dropout=0.1)
    print(config.sadra_allocation.table())
    model = get_peft_model(model, config)

    steps = math.ceil(len(train) / 16) * args.epochs
    training_args = TrainingArguments(output_dir=f"{args.out}/checkpoints", num_train_epochs=args.epochs,
                                      learning_rate=5e-4, per_device_train_batch_size=16, per_device_eval_batch_size=64,
                                      warmup_steps=int(0.06 * steps), weight_decay=0.01, save_strategy="no",
                                      report_to=[], seed=0)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=dev,
                      data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=lambda p: {"accuracy": accuracy_score(p.label_ids, p.predictions.argmax(-1))})
    trainer.train()
    metrics = trainer.evaluate()
    model.save_pretrained(f"{args.out}/adapter")
    config.sadra_allocation.save(f"{args.out}/allocation.json")
    print(json.dumps({"accuracy": metrics["eval_accuracy"], "loss": metrics["eval_loss"],
                      "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}))


if __name__ == "__main__":
    main()
