"""The exploration model's training recipe: every hyper-parameter of :func:`milotile.explore.train` in one place.

:class:`ExploreRecipe` is read by ``explore train`` (its options are built from the fields), by the
benchmarks (a variant is ``ExploreRecipe().replace(...)``) and stored, resolved, in every checkpoint's
contract (``contract["recipe"]``), so that a run can be repeated, and ``--resume`` continues it with the
recipe it started with. The defaults are the recipe measured on ``benchmarks/explore.py``; the field
help says which figure chose each one. ``None`` marks a default that depends on the bank or the device
(patch side, batch size, trunk widths); :meth:`ExploreRecipe.resolved` fills them in when a run starts.

This module imports no torch (the CLI builds its options from it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
from typing import Any

from milotile.errors import InputError
from milotile.recipe import Recipe, option

__all__ = ["CPU_WIDTHS", "FEATURES", "FIXED_ON_RESUME", "GPU_WIDTHS", "OBJECTIVES", "OPTIMIZERS", "ExploreRecipe",
           "json_object"]

#: Optimisers of :func:`milotile.explore.train` (``sgd``: momentum 0.9 + weight decay; ``sgd-plain``: MiLoPYP's).
OPTIMIZERS = ("sgd", "sgd-plain", "adamw")
#: Training objectives (:func:`milotile.explore.model.pair_loss`): ``simsiam`` (MiLoPYP's: two views pulled together,
#: stop-gradient; the default) or ``ntxent`` (SimCLR's: the other patches of the batch are negatives). Measured in
#: ``results/explore_objective_session15.json``: ntxent led on the look-alike preset (balanced 5-NN on all 5 settings,
#: by 0.01-0.20) and on the hard preset's purity (0.717 against 0.674), lost in 2d3d mode (0.81 against 0.86), and on
#: the demo's data (3 species of different sizes) its atlas purity fell from 0.99 to 0.65 and the label-free picker
#: from 0.98 to 0.55, with 4 or 12 epochs and batches of 128 or 32: the default stays SimSiam.
OBJECTIVES = ("simsiam", "ntxent")
#: Outputs :meth:`milotile.explore.Encoder.embed` can return (see :class:`milotile.explore.model.SimSiam`).
FEATURES = ("pred", "proj", "fc", "trunk", "centre")
#: Trunk widths when training on the CPU: a quarter of the FLOPs of MiLoPYP's (64, 128, 256), with the same
#: k-NN species accuracy in benchmarks/explore.py (0.98 at SNR 0.04 / 0.15).
CPU_WIDTHS = (32, 64, 128)
#: Trunk widths on a GPU (MiLoPYP's).
GPU_WIDTHS = (64, 128, 256)
#: Fields a resumed run takes from its checkpoint (network, data order, optimiser and schedule); the others
#: (epochs, save_every, feature, tta, amp) may change when resuming.
FIXED_ON_RESUME = ("bbox", "batch_size", "widths", "dim", "model_config", "optimizer", "lr", "weight_decay",
                   "cosine", "seed", "strong_aug", "weak_aug", "objective", "temperature")


def json_object(text: str) -> dict:
    """Parse a JSON object option (argparse type)."""
    try:
        val = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r} ({exc.msg})") from exc
    if not isinstance(val, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return val


def _widths(text: str) -> tuple[int, int, int]:
    try:
        vals = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        vals = ()
    if len(vals) != 3 or any(v != int(v) for v in vals):
        raise argparse.ArgumentTypeError(f"--widths must be three comma-separated integers, got {text!r}")
    return tuple(int(v) for v in vals)  # type: ignore[return-value]


_AUG_HELP = ("overrides of the {view} view's augmentation, e.g. '{{\"noise\": 0.5, \"rotate_deg\": 180}}' "
             "(fields of milotile.explore.AugmentConfig; default: the mode's recipe)")


@dataclasses.dataclass(frozen=True)
class ExploreRecipe(Recipe):
    """Hyper-parameters of the SimSiam exploration model (see :func:`milotile.explore.train`).

    ``None`` means "follow the bank / the device" (:meth:`resolved` fills them in).
    """

    bbox: int | None = option(None, "patch side in pixels; smaller than the bank = centre crop (default: the bank's)",
                              parse=int)
    epochs: int = option(20, "number of epochs")
    batch_size: int | None = option(None, "patches per step (default: 256 on a GPU; on the CPU the largest batch "
                                          "<= 256 whose activations fit MILOTILE_TRAIN_MEMORY_MB=256, i.e. < 1 GiB "
                                          "RSS)", parse=int)
    widths: tuple[int, int, int] | None = option(None, "trunk channels per stage (default 64,128,256 on a GPU as "
                                                       "MiLoPYP; 32,64,128 on the CPU, a quarter of the FLOPs with "
                                                       "the same embedding accuracy in benchmarks/explore.py)",
                                                 parse=_widths, metavar="W1,W2,W3")
    lr: float = option(0.05, "base learning rate")
    optimizer: str = option("sgd", "sgd: momentum 0.9 + weight decay; sgd-plain: MiLoPYP's plain SGD",
                            choices=OPTIMIZERS)
    weight_decay: float = option(1e-4, "weight decay")
    cosine: bool = option(True, "cosine decay of the learning rate to lr*1e-3; --no-cosine: constant learning rate")
    objective: str = option("simsiam", "simsiam: two views of a patch pulled together (MiLoPYP's); ntxent: SimCLR's "
                                       "contrastive loss, the batch's other patches as negatives: better where many "
                                       "species look alike (look-alike preset: species 5-NN +0.01 to +0.20 on all 5 "
                                       "settings), worse on the demo's three species (atlas purity 0.65 against 0.99) "
                                       "and in 2d3d mode",
                            choices=OBJECTIVES)
    temperature: float = option(0.2, "temperature of the ntxent objective")
    save_every: int = option(10, "keep a checkpoint every N epochs")
    seed: int = option(317, "random seed (initialisation, data order, augmentation)")
    feature: str = option("centre", "default embedding output stored with the model (default centre: the "
                                    "backbone's last map pooled over its central third and over the ring around "
                                    "it, best on the hard benchmark; trunk: globally pooled; MiLoPYP stores pred)",
                          choices=FEATURES)
    tta: bool = option(True, "embeddings average over the 8 flips/90° rotations of each patch by default "
                             "(default: yes; --no-tta embeds 8x faster)")
    strong_aug: dict | None = option(None, _AUG_HELP.format(view="strong"), parse=json_object, metavar="JSON")
    weak_aug: dict | None = option(None, _AUG_HELP.format(view="weak"), parse=json_object, metavar="JSON")
    dim: int = option(128, "embedding width (128 as MiLoPYP)", cli=False)
    amp: bool = option(True, "mixed precision of the convolutional trunk (head and loss stay fp32): bf16/fp16 on "
                             "CUDA; bf16 on CPUs with native bf16 (AMX, AVX512-BF16) unless MILOTILE_CPU_BF16=0",
                       cli=False)
    model_config: dict | None = option(None, "extra builder keywords of the network (blocks, pred_dim)", cli=False)

    def validate(self) -> None:
        """Check every field once; normalise sequences (tuples) and move ``model_config["widths"]`` to ``widths``."""
        if self.bbox is not None:
            _check_int(self.bbox, "bbox", 1, "a positive number of pixels")
            self._set("bbox", int(self.bbox))
        _check_int(self.epochs, "epochs", 1, "at least 1")
        if self.batch_size is not None:
            _check_int(self.batch_size, "batch_size", 2, "at least 2 (BatchNorm)")
        _check_int(self.save_every, "save_every", 1, "at least 1")
        _check_int(self.dim, "dim", 1, "a positive integer")
        if not _integer(self.seed):
            raise InputError(f"seed must be an integer, got {self.seed!r}.")
        for name in ("epochs", "batch_size", "save_every", "dim", "seed"):
            if getattr(self, name) is not None:
                self._set(name, int(getattr(self, name)))
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}.")
        if self.objective not in OBJECTIVES:
            raise InputError(f"unknown objective {self.objective!r}; use one of {', '.join(OBJECTIVES)}.")
        if not (_number(self.temperature) and float(self.temperature) > 0):
            raise InputError(f"temperature must be a positive number, got {self.temperature!r}.")
        if self.feature not in FEATURES:
            raise InputError(f"unknown embedding feature {self.feature!r}; use one of {', '.join(FEATURES)}.")
        if not (_number(self.lr) and float(self.lr) > 0):
            raise InputError(f"lr must be a positive number, got {self.lr!r}.")
        if not (_number(self.weight_decay) and float(self.weight_decay) >= 0):
            raise InputError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}.")
        for name in ("cosine", "tta", "amp"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        cfg = self._dict_option("model_config")
        if cfg is not None and "widths" in cfg:
            w = cfg.pop("widths")
            if self.widths is not None and tuple(self.widths) != tuple(w):
                raise InputError(f"widths {tuple(self.widths)!r} and model_config widths {tuple(w)!r} disagree.")
            self._set("widths", w)
            self._set("model_config", cfg or None)
        if self.widths is not None:
            w = tuple(self.widths) if isinstance(self.widths, (list, tuple)) else ()
            if len(w) != 3 or not all(_integer(v) and int(v) >= 1 for v in w):
                raise InputError(f"widths must be three positive integers (one per trunk stage), got {self.widths!r}.")
            self._set("widths", tuple(int(v) for v in w))
        for name in ("strong_aug", "weak_aug"):
            self._dict_option(name)

    def _dict_option(self, name: str) -> dict | None:
        """Check that the field ``name`` is None or a dict with string keys; store a copy with tuples for lists."""
        val = getattr(self, name)
        if val is None:
            return None
        if not isinstance(val, dict) or not all(isinstance(k, str) for k in val):
            raise InputError(f"{name} must be a dict of option names to values, got {val!r}.")
        val = {k: _tuples(v) for k, v in val.items()}
        self._set(name, val)
        return val

    def network_config(self, device_type: str) -> dict[str, Any]:
        """Builder keywords of ``simsiam-<mode>`` (:func:`milotile.nn.registry.create`) on ``device_type``."""
        widths = self.widths if self.widths is not None else (CPU_WIDTHS if device_type == "cpu" else GPU_WIDTHS)
        extra = {k: _lists(v) for k, v in (self.model_config or {}).items()}
        return {"dim": int(self.dim), **extra, "widths": [int(w) for w in widths]}

    def resolved(self, *, bbox: int, batch_size: int, device_type: str) -> ExploreRecipe:
        """The recipe with the bank- and device-dependent defaults filled in (what a run trains with)."""
        widths = tuple(self.network_config(device_type)["widths"])
        return self.replace(bbox=int(bbox), batch_size=int(batch_size), widths=widths)


def _tuples(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_tuples(x) for x in v)
    return v


def _lists(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_lists(x) for x in v]
    return v


def _number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _integer(v: Any) -> bool:
    return _number(v) and float(v) == int(v)


def _check_int(v: Any, name: str, low: int, what: str) -> None:
    if not _integer(v) or int(v) < low:
        raise InputError(f"{name} must be {what}, got {v!r}.")
