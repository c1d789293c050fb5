"""Recovery fine-tuning of a pruned model's surviving weights: DeepSpeed ZeRO inside Ray Train."""
