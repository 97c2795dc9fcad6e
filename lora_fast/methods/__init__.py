"""LoRA methods built on lora_fast's layers and ops: EigenLoRAx, ICM-LoRA, MTLoRA."""
