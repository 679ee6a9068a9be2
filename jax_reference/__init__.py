"""The numerical oracle: MUG-V models and losses in equinox, fp32-first, written for clarity."""
