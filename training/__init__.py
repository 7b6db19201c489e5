"""Training: SFT/QLoRA/DPO with TRL and PEFT, the eval gate, the fine-tuning worker, the demo task."""
