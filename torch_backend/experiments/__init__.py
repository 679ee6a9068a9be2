"""Experiments composed of jobs: the end-to-end demo, the preference experiment on it, the
held-out-attribute fine-tuning experiment. Nothing below imports them."""
