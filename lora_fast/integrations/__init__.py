"""Adapters between lora_fast and other libraries (PEFT; serving stacks)."""
