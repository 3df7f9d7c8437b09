"""Registered trainers: importing this package fills `fewclip.registry.TRAINERS`."""

from trainers import clip_lora, linear_probe, zeroshot  # noqa: F401
