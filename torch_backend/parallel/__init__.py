"""Launch (torchrun / single process) and the Megatron-Core CPU compatibility layer."""
