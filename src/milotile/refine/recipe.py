"""The picker's training recipe: every hyper-parameter of :func:`milotile.refine.train` in one place.

:class:`PickerRecipe` is read by ``refine train`` (its options are built from the fields), by the
benchmarks (a recipe variant is ``PickerRecipe().replace(...)``) and stored, resolved, in every
checkpoint's contract (``contract["recipe"]``), so a run can be repeated or fine-tuned from it.
The defaults are the recipe measured on ``benchmarks/refine_hard.py`` (hard and look-alike presets);
the field docs say which figure chose each one.

This module imports no torch (the CLI builds its options from it).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from typing import Any

from milotile.errors import InputError
from milotile.recipe import Recipe, option

__all__ = [
    "ARCH_ALIASES",
    "ARCHS",
    "DEFAULT_UNET",
    "LABELLED_CROP_BUDGET",
    "MAX_DEFAULT_EPOCHS",
    "PU_RISKS",
    "RECENTRE",
    "PickerRecipe",
    "default_epochs",
    "default_z_context",
]

#: Architectures of the picker and their MiLoPYP spellings.
ARCHS = ("unet4", "unet5", "ressmall")
ARCH_ALIASES = {"unet_4": "unet4", "unet_5": "unet5", "ressmall_18": "ressmall"}
#: When the picker moves its labels onto their particles' density centres (:func:`milotile.refine.labels.recentre_labels`).
RECENTRE = ("auto", "on", "off")
#: How the negative risk of the PU loss is kept non-negative (:func:`milotile.refine.losses.pu_focal_loss`).
PU_RISKS = ("clip", "nnpu", "pn")
#: Network of the default recipe (measured on benchmarks/refine_hard.py, issue 15): a 16-filter U-Net;
#: the z dilation of its 3D head (and the crop depth) follow the particle size (:func:`default_z_context`).
DEFAULT_UNET = {"start_filts": 16}
#: Labelled crops (labels × repeats × epochs) the default number of epochs aims at.
LABELLED_CROP_BUDGET = 600
#: Most epochs of the default recipe. 15 (was 20): on the hard benchmark (big species, 6 labels, seeds 0 and 1,
#: bf16 training and picking, TTA 4) F1 at the automatic / best threshold was 0.656 / 0.895 after 15 epochs
#: against 0.661 / 0.902 for the 20-epoch fp32 default, with 75 % of the epochs
#: (``benchmarks/results/refine_curve_bf16train.json``; 10 and 12 epochs lost 0.03 of best-threshold F1).
MAX_DEFAULT_EPOCHS = 15


def _tau(text: str) -> float | str:
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--tau must be a number in (0, 1) or 'auto', got {text!r}") from exc


def _ints3(text: str) -> tuple[int, int, int]:
    try:
        vals = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        vals = ()
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"--crop must be three comma-separated integers Z,Y,X, got {text!r}")
    return vals  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class PickerRecipe(Recipe):
    """Hyper-parameters of the positive-unlabeled picker (see :func:`milotile.refine.train`).

    ``None`` means "follow the particle size / the number of labels" (:meth:`resolved` fills them in).
    """

    bbox: float = option(16.0, "particle box in level-0 voxels (sets the target Gaussian and the z context)")
    epochs: int | None = option(None, "epochs (default: about 600 labelled crops, 6-15 epochs: 15 for 6 labels, "
                                      "7 for 18)", parse=int)
    arch: str = option("unet4", "architecture", choices=ARCHS + tuple(ARCH_ALIASES))
    start_filts: int | None = option(None, "U-Net width of the first level (default 16)", parse=int)
    z_dilation: int | None = option(None, "z dilation of the 3D head: 1 = 7 slices of z context, 2 = 11, 4 = 19 "
                                          "(default from --bbox: clip(round(bbox/6), 2, 4))", parse=int)
    arch_config: dict | None = option(None, "extra builder keywords of the network", cli=False)
    batch_size: int = option(4, "crops per step")
    crop: tuple[int, int, int] | None = option(None, "model-input crop (default DEPTH,64,64 with DEPTH = 4 z-dilation "
                                                     "+ 4; z in compressed slices with --compress)",
                                               parse=_ints3, metavar="Z,Y,X")
    lr: float = option(1e-3, "Adam learning rate")
    tau: float | str = option(0.01, "PU class prior, or 'auto': estimated from the labelled tomograms", parse=_tau)
    pu_risk: str = option("clip", "non-negative correction of the PU risk (clip as MiLoPYP)", choices=PU_RISKS)
    #: chosen on the look-alike tuning settings 0-2 (9 labels + 9 negatives, best-threshold F1 with weights
    #: 0 / 1 / 5: 0.128 / 0.180 / 0.300, 0.393 / 0.400 / 0.423, 0.426 / 0.458 / 0.482)
    negative_weight: float = option(5.0, "weight of the labelled-negative term (--negatives) next to the PU risk")
    negative_crops: float = option(0.0, "negative-anchored crops per epoch, at most this multiple of the labelled "
                                        "crops, drawn anew each epoch (0 = one per negative and repeat)")
    temp: float = option(0.07, "InfoNCE temperature")
    cr_weight: float = option(0.1, "contrastive weight")
    unsup_weight: float = option(0.1, "weight of the unlabeled voxels in the contrastive term", cli=False)
    consistency_weight: float = option(1.0, "weight of the flip-consistency term", cli=False)
    contrastive: bool = option(False, "MiLoPYP's voxel contrastive + flip-consistency terms (two views: twice the "
                                      "cost)")
    thresh: float = option(0.8, "target value from which voxels are hard positives")
    gauss: float = option(0.0, "Gaussian pre-filter sigma (0 = off)")
    compress: bool = option(False, "max-compress slice pairs along z")
    compress_how: str = option("max", "how slice pairs are compressed", choices=("max", "mean"), cli=False)
    clip: tuple[float, float] = option((-3.0, 3.0), "clip range in standard deviations of the filtered volume",
                                       cli=False)
    seed: int = option(317, "random seed (crops, augmentation, initialisation)")
    val_fraction: float | None = option(None, "fraction of the labels held out as a validation region when there "
                                              "are no --val-labels (default 0: none)", parse=float)
    val_radius: float | None = option(None, "validation matching radius (default bbox / 4)", cli=False)
    val_every: int = option(1, "validate every N epochs", cli=False)
    random_fraction: float = option(0.25, "random crops per epoch relative to the labelled crops", cli=False)
    repeats: int = option(5, "crops per labelled particle and epoch")
    max_pos: int = option(256, "per-crop cap of contrastive positives", cli=False)
    n_unlabeled: int = option(256, "per-crop cap of contrastive unlabeled voxels", cli=False)
    amp: bool = option(True, "mixed precision on CUDA", cli=False)
    # bf16 autocast (training and picking) holds F1 on the hard benchmark (big species, 6 labels, seeds 0 and 1): the
    # 20-epoch networks picked with TTA 1 gave F1 at the automatic / best threshold 0.796 / 0.873 and 0.575 / 0.842 in
    # fp32, 0.817 / 0.873 and 0.575 / 0.840 in bf16 (refine_pick_variants_paired.json); 15 epochs trained and picked
    # in bf16 with TTA 4 gave 0.896 / 0.905 and 0.416 / 0.885 against the fp32 default's 0.829 / 0.908 and
    # 0.494 / 0.897 (refine_curve_bf16train.json). A training epoch takes 4.2 instead of 7.8 CPU s, a TTA view of
    # 25 M voxels 10.5 instead of ~21 CPU s (with channels-last activations). CPUs without native bf16 stay in fp32.
    cpu_bf16: bool = option(True, "bf16 autocast on CPUs with AMX / AVX512-BF16 when training and picking (recorded "
                                  "in the contract; MILOTILE_CPU_BF16=0 turns it off)")
    #: 2 (was 4): on the same 15-epoch bf16 networks (hard benchmark, big species, 6 labels, seeds 0 and 1) F1 at the
    #: automatic / best threshold was 0.855 / 0.884 and 0.568 / 0.875 with 2 views, 0.896 / 0.905 and 0.416 / 0.885
    #: with 4, 0.814 / 0.873 and 0.652 / 0.857 with 1 (the 20-epoch fp32 default with 4: 0.829 / 0.908 and
    #: 0.494 / 0.897), at 24 / 45 / 13 CPU s for 25 M voxels (refine_curve_bf16train.json): 2 views keep the
    #: automatic-threshold F1 and lose 0.016 of best-threshold F1 to 4 for 1.9x the speed (>= 1.5 M voxels/s on 2 cores)
    tta: int = option(2, "in-plane symmetries averaged when predicting (1-8; 1 = none)")
    self_training: int = option(0, "rounds in which confident picks of the labelled tomograms become extra positives",
                                metavar="ROUNDS")
    #: Off by default (0): measured on the worst cases of benchmarks/refine_hard.py, the calibrated threshold's gap to
    #: the best threshold's F1 was 0.089 against the fixed shift's 0.106 on look-alike setting 1 seed 1, but 0.585
    #: against 0.239 on the hard preset's seed 1 (big species, 6 labels; refine_thrcal_*.json), and holding a third
    #: of 6 labels out costs training signal; calibrating after 0.8 of the epochs was worse (0.144 / 0.484,
    #: refine_thrcal08_*.json). ``--calibration-holdout 0.33`` turns it on.
    calibration_holdout: float = option(0.0, "fraction of each class's labels (at least 2; classes with 4 or more "
                                              "labels) left out of the loss until the threshold calibration "
                                              "(0 = none: the automatic threshold then uses a fixed label shift)")
    calibration_epochs: float = option(0.5, "fraction of the epochs trained before the threshold calibration "
                                            "(then every label is trained on)")
    #: "auto" = on for atlas selections only. On the hard preset's label-free start (seed 0, 200 atlas candidates of
    #: the r 12 species, every one 5-7 voxels off its particle's centre) recentring took F1 at the automatic / best
    #: threshold from 0.443 / 0.527 to 0.706 / 0.715 and training from 527 to 222 s (200 labels -> 99); on 6 exact
    #: manual labels (seeds 0-2) it tied the best-threshold F1 of the big species (0.857 / 0.896 / 0.671 against
    #: 0.879 / 0.893 / 0.679), raised the small species' on two seeds of three (0.672 / 0.653 / 0.608 against
    #: 0.639 / 0.574 / 0.629) and lowered the big species' automatic-threshold F1 (0.329 / 0.614 / 0.337 against
    #: 0.857 / 0.652 / 0.440; results/recentre_session13.json). Once `mine` recentred the candidates (its default
    #: since session 14) auto leaves their selection as it is: on look-alike setting 1 a second mean shift, in the
    #: smaller bbox/2 window, moved labels 0.5-3 voxels from their centres to 4-6 (onto lobes) and the picker learned
    #: the offset (F1 0.0 at every threshold).
    recentre: str = option("auto", "move each label to the centre of its particle's density (a mean shift within "
                                   "bbox/2 on the tomogram) and merge labels closer than bbox/4 before training: on, "
                                   "off, or auto = on for atlas selections of candidates mined without --recentre "
                                   "(DoG peaks sit off-centre on large particles), off for other labels",
                           choices=RECENTRE)
    shape_check: bool = option(True, "fit the shape check (radial profiles of the labels; `refine pick` lowers the "
                                     "scores of peaks unlike them)")

    def validate(self) -> None:
        """Check every field once; normalise aliases and sequences."""
        self._set("arch", ARCH_ALIASES.get(self.arch, self.arch))
        if self.arch not in ARCHS:
            raise InputError(f"Unknown picker architecture (arch) {self.arch!r}; choose one of {', '.join(ARCHS)}.")
        if not _positive(self.bbox):
            raise InputError(f"bbox must be a positive number of voxels, got {self.bbox!r}.")
        self._set("bbox", float(self.bbox))
        for name in ("epochs", "start_filts", "z_dilation"):
            v = getattr(self, name)
            if v is not None and (not _integer(v) or int(v) < 1):
                raise InputError(f"{name} must be a positive integer, got {v!r}.")
        for name in ("batch_size", "repeats", "val_every", "tta", "max_pos", "n_unlabeled"):
            v = getattr(self, name)
            if not _integer(v) or int(v) < 1:
                raise InputError(f"{name} must be a positive integer, got {v!r}.")
        if not 1 <= int(self.tta) <= 8:
            raise InputError(f"tta must be between 1 and 8 symmetries, got {self.tta!r}.")
        if not _integer(self.self_training) or int(self.self_training) < 0:
            raise InputError(f"self_training must be a non-negative number of rounds, got {self.self_training!r}.")
        if self.crop is not None:
            crop = tuple(self.crop)
            if len(crop) != 3 or not all(_integer(c) for c in crop) or min(crop) < 1 or min(crop[1:]) < 16:
                raise InputError(f"crop must be (z, y, x) with y and x at least 16, got {self.crop!r}.")
            self._set("crop", tuple(int(c) for c in crop))
        if self.tau != "auto" and not (_number(self.tau) and 0.0 < float(self.tau) < 1.0):
            raise InputError(f"tau (class prior) must lie in (0, 1) or be 'auto', got {self.tau!r}.")
        if self.recentre not in RECENTRE:
            raise InputError(f"recentre must be one of {', '.join(RECENTRE)}, got {self.recentre!r}.")
        if self.pu_risk not in PU_RISKS:
            raise InputError(f"pu_risk must be one of {', '.join(PU_RISKS)}, got {self.pu_risk!r}.")
        for name in ("lr", "temp"):
            if not _positive(getattr(self, name)):
                raise InputError(f"{name} must be a positive number, got {getattr(self, name)!r}.")
        for name in ("negative_weight", "negative_crops", "cr_weight", "unsup_weight", "consistency_weight", "gauss", "random_fraction"):
            v = getattr(self, name)
            if not (_number(v) and float(v) >= 0):
                raise InputError(f"{name} must be a number >= 0, got {v!r}.")
        if not (_number(self.thresh) and 0.0 < float(self.thresh) <= 1.0):
            raise InputError(f"thresh must lie in (0, 1], got {self.thresh!r}.")
        if self.val_fraction is not None and not (_number(self.val_fraction) and 0 <= float(self.val_fraction) < 1):
            raise InputError(f"val_fraction must lie in [0, 1), got {self.val_fraction!r}.")
        if not (_number(self.calibration_holdout) and 0.0 <= float(self.calibration_holdout) < 1.0):
            raise InputError(f"calibration_holdout must lie in [0, 1), got {self.calibration_holdout!r}.")
        if not (_number(self.calibration_epochs) and 0.0 < float(self.calibration_epochs) < 1.0):
            raise InputError(f"calibration_epochs must lie in (0, 1), got {self.calibration_epochs!r}.")
        if self.compress_how not in ("max", "mean"):
            raise InputError(f"compress_how must be 'max' or 'mean', got {self.compress_how!r}.")
        clip = tuple(self.clip)
        if len(clip) != 2 or not all(_number(c) for c in clip) or not clip[0] < clip[1]:
            raise InputError(f"clip must be (low, high) with low < high, got {self.clip!r}.")
        self._set("clip", (float(clip[0]), float(clip[1])))

    def network_config(self, n_classes: int) -> dict[str, Any]:
        """Builder keywords of the network (:func:`milotile.nn.registry.create`)."""
        z_dil, _ = default_z_context(self.bbox, self.compress)
        cfg: dict[str, Any] = {**(DEFAULT_UNET if self.arch.startswith("unet") else {}), "z_dilation": z_dil}
        cfg.update(self.arch_config or {})
        cfg.update({k: int(v) for k, v in (("start_filts", self.start_filts), ("z_dilation", self.z_dilation))
                    if v is not None})
        return {"n_classes": int(n_classes), **cfg}

    def resolved(self, n_labels: int) -> PickerRecipe:
        """The recipe with the size- and label-dependent defaults filled in (what a run trains with)."""
        z_dil, depth = default_z_context(self.bbox, self.compress)
        z_dil = int(self.z_dilation) if self.z_dilation is not None else int((self.arch_config or {}).get("z_dilation", z_dil))
        crop = self.crop if self.crop is not None else (4 * z_dil + 4, 64, 64)
        epochs = self.epochs if self.epochs is not None else default_epochs(n_labels, self.repeats)
        return self.replace(crop=crop, epochs=int(epochs), z_dilation=z_dil)


def default_z_context(bbox: float, compress: bool = False) -> tuple[int, int]:
    """Head z dilation and crop depth of the default recipe for particles of box ``bbox``.

    The 3D head sees ``4 · z_dilation + 3`` slices, so ``z_dilation = clip(round(bbox / 6), 2, 4)``
    lets it cover most of the particle's depth (the missing wedge stretches it further): 2 (11 slices)
    for a 10-voxel box, 4 (19 slices) for a 24-voxel box; the crop depth ``4 · z_dilation + 4`` keeps a
    few slices of it valid. On the hard benchmark (radius-12 species, 18 labels, three seeds, with the
    shape check) z dilation 4 with 20-slice crops gave F1 0.905 / 0.877 / 0.789 against 0.870 / 0.859 /
    0.776 with 2 and 12 slices, at 2.3× the training time. With ``compress`` the box counts in
    compressed slices (half).
    """
    b = float(bbox) / (2.0 if compress else 1.0)
    if not b > 0:
        raise InputError(f"bbox must be positive, got {bbox!r}.")
    zd = min(max(round(b / 6.0), 2), 4)
    return zd, 4 * zd + 4


def default_epochs(n_labels: int, repeats: int) -> int:
    """Epochs of the default recipe: about :data:`LABELLED_CROP_BUDGET` labelled crops, 6 to
    :data:`MAX_DEFAULT_EPOCHS` epochs."""
    return min(max(round(LABELLED_CROP_BUDGET / max(int(n_labels) * max(int(repeats), 1), 1)), 6), MAX_DEFAULT_EPOCHS)


def _number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _positive(v: Any) -> bool:
    return _number(v) and float(v) > 0


def _integer(v: Any) -> bool:
    return _number(v) and float(v) == int(v)
