"""lora_fast benchmarks: `python -m benchmarks.<name>` from the repository root, or `lora-fast bench`."""
