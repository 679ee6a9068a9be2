"""Framework-free specs of mugv: configs, parameter schemas, shape and FLOP arithmetic, and the
loss/sampler formulas written once over an array namespace. Imports neither torch nor jax."""
