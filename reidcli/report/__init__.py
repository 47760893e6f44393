"""Ablation runner, comparison tables and pictures."""
