"""Fine-tuning: chat SFT and DPO on the pretraining engine, LoRA / quantized-base LoRA, adapter merging."""
