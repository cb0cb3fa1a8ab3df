"""Shared torch pieces: devices, model registry, checkpoints, run logs, backbones."""

from milotile.nn import resnet as _resnet  # noqa: F401  (registers resnet18-trunc)
from milotile.nn.checkpoint import build_model, load_checkpoint, save_checkpoint
from milotile.nn.device import autocast, pick_device, seed_everything
from milotile.nn.registry import available, create, register
from milotile.nn.runlog import RunLog

__all__ = [
    "RunLog",
    "autocast",
    "available",
    "build_model",
    "create",
    "load_checkpoint",
    "pick_device",
    "register",
    "save_checkpoint",
    "seed_everything",
]
