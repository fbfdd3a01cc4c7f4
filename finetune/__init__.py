"""Finetune stage: partial-unfreeze fine-tuning on the manifest's splits, with a frozen-prefix activation cache."""
