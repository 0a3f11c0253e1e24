"""Evaluation harness integration (lm-eval model class, local tasks, the lm-eval sub-command)."""
