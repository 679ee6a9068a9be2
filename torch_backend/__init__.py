"""Production path: MUG-V models on Megatron-Core, parallel layouts, data, training, CLI."""
