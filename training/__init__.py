"""Training: data formats and checks, SFT/QLoRA/DPO with TRL and PEFT, the eval gate, the demo task."""
