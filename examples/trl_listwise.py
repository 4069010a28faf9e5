"""Listwise preference training with TRL + prefrank: ranked completions instead of chosen/rejected pairs.

A TRL DPO script with three lines changed (the import, `loss=` in the config, and the dataset columns). It runs
offline on CPU in well under a minute: the model is a tiny random Llama built from a config and the tokenizer
is trained in code — swap in `AutoModelForCausalLM.from_pretrained(...)` / `AutoTokenizer.from_pretrained(...)`
for a real run.

    python examples/trl_listwise.py --loss plackett_luce      # or dpo, sdpo, smpro
"""

import argparse
import tempfile

from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from prefrank.integrations.trl import ListwiseConfig, ListwiseTrainer
from prefrank.train.model import build_tokenizer  # offline stand-in for AutoTokenizer.from_pretrained(...)

# Ranked completions per prompt (UltraFeedback-style): ranks 0 = best, equal ranks = a tie, K may vary per row
ROWS = [
    {"prompt": "The sky is", "completions": [" blue.", " green.", " made of cheese.", " purple."],
     "ranks": [0, 1, 2, 1]},
    {"prompt": "Two plus two is", "completions": [" four.", " five.", " a fish."], "ranks": [0, 1, 2]},
    {"prompt": "Water boils at", "completions": [" 3 degrees.", " 100 degrees."], "ranks": [1, 0]},
    {"prompt": "The capital of France is", "completions": [" Paris.", " Lyon.", " Berlin.", " the moon."],
     "ranks": [0, 1, 1, 2]},
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default="plackett_luce", choices=["dpo", "plackett_luce", "sdpo", "smpro"])
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--output-dir", default=None)
    options = parser.parse_args(argv)

    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(  # stand-in for AutoModelForCausalLM.from_pretrained(...)
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id))

    with tempfile.TemporaryDirectory() as scratch:
        args = ListwiseConfig(
            output_dir=options.output_dir or scratch,
            loss=options.loss,               # the one new option: "dpo" | "plackett_luce" | "sdpo" | "smpro"
            beta=0.1,
            per_device_train_batch_size=2,
            max_steps=options.max_steps,
            learning_rate=1e-3,
            logging_steps=2,
            gradient_checkpointing=False,
            bf16=False,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
        )
        trainer = ListwiseTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(ROWS),
                                  processing_class=tokenizer)
        trainer.train()
    last = [entry for entry in trainer.state.log_history if "rewards/margins" in entry][-1]
    print(f"loss={options.loss} final: " + ", ".join(
        f"{key}={last[key]:.4f}" for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                                             "rewards/accuracies")))


if __name__ == "__main__":
    main()
