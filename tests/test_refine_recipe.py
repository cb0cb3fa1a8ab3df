"""The picker's recipe object, labelled negatives and fine-tuning (``init_from``)."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest
import torch

import milotile as mt
from milotile.commands.recipe_options import add_recipe_options, recipe_from_args
from milotile.errors import InputError
from milotile.refine.losses import pu_focal_loss
from milotile.refine.recipe import PickerRecipe, default_epochs
from milotile.refine.targets import NEGATIVE, UNLABELED, crop_targets, target_geometry
from milotile.refine.train import train

TINY = {"start_filts": 4, "stem_ch": 4, "feat_dim": 8}
FAST = dict(bbox=12, arch_config=TINY, crop=(4, 32, 32), batch_size=2, seed=3, random_fraction=0.25, repeats=1)


# ----------------------------------------------------------------------------------------- recipe
def test_recipe_validates_once_with_named_fields() -> None:
    assert PickerRecipe().arch == "unet4" and PickerRecipe(arch="unet_5").arch == "unet5"
    for bad, match in (({"bbox": 0}, "bbox"), ({"epochs": 0}, "epochs"), ({"tau": 1.5}, "tau"),
                       ({"crop": (4, 8, 8)}, "crop"), ({"pu_risk": "upu"}, "pu_risk"), ({"tta": 9}, "tta"),
                       ({"negative_weight": -1}, "negative_weight"), ({"arch": "vgg"}, "architecture"),
                       ({"negative_crops": -1}, r"negative_crops must be a number >= 0, got -1"),
                       ({"negative_crops": "all"}, "negative_crops")):
        with pytest.raises(InputError, match=match):
            PickerRecipe(**bad)
    with pytest.raises(InputError, match=r"'epoch' \(did you mean 'epochs'\?\)"):
        PickerRecipe().replace(epoch=3)


def test_recipe_round_trips_and_resolves() -> None:
    r = PickerRecipe(bbox=24, tau="auto", crop=[8, 48, 48])
    assert r.crop == (8, 48, 48)
    back = PickerRecipe.from_dict(r.to_dict())
    assert back == r and back.changed() == {"bbox": 24.0, "tau": "auto", "crop": [8, 48, 48]}
    res = PickerRecipe(bbox=24).resolved(6)
    assert res.z_dilation == 4 and res.crop == (20, 64, 64) and res.epochs == default_epochs(6, 5) == 15
    assert PickerRecipe.from_dict({"bbox": 10, "from_the_future": 1}).bbox == 10.0  # unknown keys: logged, skipped


def test_cli_options_are_the_recipe() -> None:
    p = argparse.ArgumentParser()
    add_recipe_options(p, PickerRecipe)
    assert recipe_from_args(PickerRecipe, p.parse_args([])) == PickerRecipe()
    args = p.parse_args(["--bbox", "12", "--no-shape-check", "--crop", "4,32,32", "--tau", "auto",
                         "--negative-weight", "3"])
    assert recipe_from_args(PickerRecipe, args).changed() == {"bbox": 12.0, "shape_check": False, "crop": [4, 32, 32],
                                                               "tau": "auto", "negative_weight": 3.0}
    text = p.format_help()
    assert "(default 16.0)" in text and "(default 317)" in text and "--negatives FILE" not in text  # a run option


# -------------------------------------------------------------------------------------- negatives
def test_negative_targets_mark_the_core_and_yield_to_particles() -> None:
    geom = target_geometry(12)
    pos = np.array([[4.0, 20.0, 20.0]])
    neg = np.array([[4.0, 20.0, 44.0], [4.0, 20.0, 23.0]])  # the second overlaps the particle
    t = crop_targets(pos, None, (0, 0, 0), (8, 32, 32), geom, negatives_zyx=neg)
    assert t[0, 4, 10, 22] == NEGATIVE  # output voxel (y 20, x 44) of the first negative
    assert t[0, 4, 10, 10] == 1.0  # the particle keeps its hard positive
    assert (t[0][t[0] > 0]).size > 0 and not ((t[0] > 0) & (t[0] == NEGATIVE)).any()
    assert t[0, 4, 10, 16] == UNLABELED  # between them: unlabeled
    val = crop_targets(pos, None, (0, 0, 0), (8, 32, 32), geom, unlabeled=False, negatives_zyx=neg)
    assert (val >= 0).all()


def test_negative_term_penalises_confident_negatives() -> None:
    tgt = torch.full((1, 1, 2, 8, 8), UNLABELED)
    tgt[0, 0, 0, 2:4, 2:4] = 1.0
    tgt[0, 0, 1, 5:7, 5:7] = NEGATIVE
    logits = torch.zeros_like(tgt, requires_grad=True)
    with torch.no_grad():
        logits[0, 0, 1, 5:7, 5:7] = 3.0  # the net calls the negatives particles
    l0, p0 = pu_focal_loss(logits, tgt, 0.01, negative_weight=0.0)
    l1, p1 = pu_focal_loss(logits, tgt, 0.01, negative_weight=10.0)
    assert p0["neg_loss"] == 0.0 and p1["neg_loss"] > 0 and float(l1.detach()) > float(l0.detach())
    l1.backward()
    assert (logits.grad[0, 0, 1, 5:7, 5:7] > 0).all()  # descent lowers them


@pytest.fixture(scope="module")
def two_species(tmp_path_factory):
    from milotile.synth import synth

    root = tmp_path_factory.mktemp("negatives")
    res = synth(root / "synth", seed=5, n_tomograms=1, size=(40, 128, 128), species=["ribosome", "proteasome"],
                n_particles=24, filament=False, snr=2.0)
    return root, mt.ingest(res.manifest, root / "store.zarr"), res.ground_truth


def _score_at(picker, col, pts: pd.DataFrame) -> np.ndarray:
    from milotile.refine.predict import pick
    from milotile.refine.threshold import label_scores

    picks = pick(col, picker, threshold=0.01, max_picks=None, write_heatmaps=False, table=None, shape_check=False)
    return label_scores(picks, pts, 4.0)


@pytest.mark.slow
def test_negatives_teach_the_picker_what_not_to_pick(two_species, tmp_path) -> None:
    # checked on synth seeds 5, 6 and 7: held-out proteasome medians 0.26 / 0.53 / 0.62 without the
    # negatives, 0.00 / 0.00 / 0.21 with them; held-out ribosomes 0.23 / 0.23 / 0.61 with them
    root, col, gt = two_species
    ribo, prot = gt[gt.species == "ribosome"], gt[gt.species == "proteasome"]
    lab, neg = ribo.iloc[:6], prot.iloc[:6]
    # the medians below were checked with fp32 training of these 4-filter networks and 4 TTA views (bf16 training:
    # test_refine_train; with the default 2 views the 6 held-out ribosomes median 0.06 on this seed)
    kw = dict(FAST, bbox=16, epochs=8, device="cpu", shape_check=False, repeats=3, cpu_bf16=False, tta=4)
    plain = train(col, lab, out=tmp_path / "plain", **kw)
    with_neg = train(col, lab, negatives=neg, out=tmp_path / "neg", **kw)  # the default weight, 5
    assert with_neg.contract["train_negatives"][0][0] == "tomo_000" and len(with_neg.contract["train_negatives"]) == 6
    assert with_neg.contract["recipe"]["negative_weight"] == PickerRecipe().negative_weight == 5.0
    held_prot, held_ribo = prot.iloc[6:], ribo.iloc[6:]
    s_plain, s_neg = _score_at(plain, col, held_prot), _score_at(with_neg, col, held_prot)
    r_neg = _score_at(with_neg, col, held_ribo)
    # the look-alike species it was told about scores lower, the target still scores above it
    assert np.median(s_neg) < np.median(s_plain) - 0.05, (np.median(s_neg), np.median(s_plain))
    assert np.median(r_neg) > np.median(s_neg) + 0.1, (np.median(r_neg), np.median(s_neg))


def test_fine_tuning_starts_from_the_checkpoint(two_species, tmp_path) -> None:
    root, col, gt = two_species
    lab = gt[gt.species == "ribosome"].iloc[:4]
    first = train(col, lab, out=tmp_path / "a", epochs=1, device="cpu", **{k: v for k, v in FAST.items()})
    again = train(col, lab, init_from=tmp_path / "a", out=tmp_path / "b", lr=1e-12, epochs=1, device="cpu",
                  negatives=gt[gt.species == "proteasome"].iloc[:2])
    for (k, v), v2 in zip(first.model.named_parameters(), again.model.parameters(), strict=True):
        assert torch.allclose(v, v2, atol=1e-6), k  # the weights (not BatchNorm's running statistics)
    assert again.contract["init_from"].endswith("best.pt") and again.contract["recipe"]["bbox"] == 12.0
    assert again.contract["crop"] == first.contract["crop"]
    with pytest.raises(InputError, match="bbox=20.0.*trained with bbox=12.0"):
        train(col, lab, init_from=tmp_path / "a", out=tmp_path / "c", bbox=20, device="cpu")
    with pytest.raises(InputError, match="no checkpoint"):
        train(col, lab, init_from=tmp_path / "nowhere", out=tmp_path / "d", device="cpu")


def test_default_recipe_uses_bf16_and_at_most_15_epochs() -> None:
    """The defaults chosen on benchmarks/refine_hard.py --curve (refine_curve_bf16train.json): bf16 autocast where
    the CPU has it, 15 epochs for 6 labels, 2 TTA views; ``--no-cpu-bf16`` trains and picks in fp32."""
    from milotile.refine.recipe import MAX_DEFAULT_EPOCHS

    r = PickerRecipe()
    assert r.cpu_bf16 is True and MAX_DEFAULT_EPOCHS == 15 and r.tta == 2
    assert r.resolved(6).epochs == 15 and r.resolved(18).epochs == 7 and r.resolved(2).epochs == 15
    p = argparse.ArgumentParser()
    add_recipe_options(p, PickerRecipe)
    assert recipe_from_args(PickerRecipe, p.parse_args(["--no-cpu-bf16"])).cpu_bf16 is False
