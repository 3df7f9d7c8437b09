"""Registered trainers: importing this package fills `fewclip.registry.TRAINERS`."""

from trainers import amlpf, camvla, clip_lora, linear_probe, savlt, vit_teacher, zeroshot  # noqa: F401
