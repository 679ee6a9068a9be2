"""The training engine on Megatron-Core: step, loop, checkpoint/resume, failure handling, metrics."""
