"""Experiment configs: each file has `get_config(arg)`; `arg` picks a preset
(`--config configs/train.py:cifar10`). Configs inherit by importing each other."""
