"""The exploration model's recipe object (:class:`milotile.explore.recipe.ExploreRecipe`)."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
from test_explore import TINY, write_bank

from milotile import cli
from milotile.commands.recipe_options import add_recipe_options, recipe_from_args
from milotile.errors import InputError
from milotile.explore.recipe import CPU_WIDTHS, FIXED_ON_RESUME, ExploreRecipe
from milotile.explore.train import checkpoint_recipe, train
from milotile.nn.checkpoint import load_checkpoint
from milotile.recipe import option_meta

FAST = dict(epochs=1, batch_size=8, model_config=TINY, save_every=1)


def _train_args(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["explore", "train", "s.zarr", *argv])


def test_cli_defaults_are_the_recipe_and_every_flag_still_parses() -> None:
    assert recipe_from_args(ExploreRecipe, _train_args()) == ExploreRecipe()
    args = _train_args("--bbox", "12", "--epochs", "3", "--batch-size", "16", "--widths", "16,32,64", "--lr", "0.1",
                       "--optimizer", "adamw", "--weight-decay", "0", "--no-cosine", "--save-every", "2",
                       "--seed", "5", "--feature", "trunk", "--no-tta", "--strong-aug", '{"noise": 0.5}',
                       "--weak-aug", '{"crop_scale": [0.9, 1.0]}', "--mode", "3d", "--key", "k", "--out", "r",
                       "--resume", "--device", "cpu", "--weights", "w.pt", "--nproc", "2")
    r = recipe_from_args(ExploreRecipe, args)
    assert r.changed() == {"bbox": 12, "epochs": 3, "batch_size": 16, "widths": [16, 32, 64], "lr": 0.1,
                           "optimizer": "adamw", "weight_decay": 0.0, "cosine": False, "save_every": 2, "seed": 5,
                           "feature": "trunk", "tta": False, "strong_aug": {"noise": 0.5},
                           "weak_aug": {"crop_scale": [0.9, 1.0]}}
    assert r.weak_aug == {"crop_scale": (0.9, 1.0)}  # JSON lists normalised to tuples
    assert (args.mode, args.key, args.out, args.resume, args.device, args.weights, args.nproc) == (
        "3d", "k", "r", True, "cpu", "w.pt", 2)  # run-time options stay arguments
    for bad in (["--widths", "16,32"], ["--optimizer", "lbfgs"], ["--strong-aug", "noise=1"], ["--feature", "x"]):
        with pytest.raises(SystemExit):
            _train_args(*bad)


def test_cli_options_are_generated_from_the_fields() -> None:
    p = argparse.ArgumentParser()
    add_recipe_options(p, ExploreRecipe)
    flags = {a.dest: a for a in p._actions if a.dest != "help"}
    cli_fields = [f.name for f in dataclasses.fields(ExploreRecipe) if option_meta(f)["cli"]]
    assert sorted(flags) == sorted(cli_fields) and {"dim", "amp", "model_config"}.isdisjoint(flags)
    text = p.format_help()
    assert "(default 20)" in text and "(default 0.05)" in text and "(default 317)" in text and "--no-cosine" in text
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    explore = next(a for a in sub.choices["explore"]._actions if isinstance(a, argparse._SubParsersAction))
    spelled = {s for a in explore.choices["train"]._actions for s in a.option_strings}
    before = {"--mode", "--key", "--bbox", "--epochs", "--batch-size", "--widths", "--lr", "--optimizer",
              "--weight-decay", "--no-cosine", "--out", "--resume", "--save-every", "--seed", "--device", "--weights",
              "--feature", "--tta", "--no-tta", "--strong-aug", "--weak-aug", "--nproc"}
    assert before <= spelled  # every spelling of the hand-written options still parses


def test_recipe_validates_once_with_named_fields() -> None:
    for bad, match in (({"epochs": 0}, "epochs must be at least 1"), ({"batch_size": 1}, "batch_size"),
                       ({"bbox": 0}, "bbox"), ({"lr": 0}, "lr"), ({"weight_decay": -1}, "weight_decay"),
                       ({"optimizer": "lbfgs"}, "optimizer"), ({"feature": "pool"}, "feature"),
                       ({"widths": (8, 16)}, "widths"), ({"save_every": 0}, "save_every"), ({"tta": 1}, "tta"),
                       ({"strong_aug": "noise"}, "strong_aug"), ({"seed": 1.5}, "seed"),
                       ({"objective": "byol"}, "objective"), ({"temperature": 0}, "temperature"),
                       ({"widths": (8, 16, 32), "model_config": {"widths": [4, 8, 16]}}, "disagree")):
        with pytest.raises(InputError, match=match):
            ExploreRecipe(**bad)
    with pytest.raises(InputError, match=r"'epoch' \(did you mean 'epochs'\?\)"):
        ExploreRecipe().replace(epoch=3)


def test_recipe_round_trips_and_resolves() -> None:
    r = ExploreRecipe(model_config={"widths": [8, 16, 32], "blocks": [1, 1, 1]}, strong_aug={"crop_scale": [0.8, 1]},
                      lr=0.1)
    assert r.widths == (8, 16, 32) and r.model_config == {"blocks": (1, 1, 1)}  # widths live in one field
    back = ExploreRecipe.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == r and back.changed() == {"widths": [8, 16, 32], "model_config": {"blocks": [1, 1, 1]},
                                             "strong_aug": {"crop_scale": [0.8, 1]}, "lr": 0.1}
    res = ExploreRecipe().resolved(bbox=16, batch_size=32, device_type="cpu")
    assert (res.bbox, res.batch_size, res.widths) == (16, 32, CPU_WIDTHS)
    assert ExploreRecipe().network_config("cuda") == {"dim": 128, "widths": [64, 128, 256]}
    assert set(FIXED_ON_RESUME) < set(ExploreRecipe.field_names())


def test_overrides_and_checkpoint_round_trip(tmp_path) -> None:
    col, _, _ = write_bank(tmp_path / "s.zarr", n=16)
    base = ExploreRecipe(lr=0.02, **FAST)
    enc = train(col, None, base, out=tmp_path / "run", device="cpu", seed=4, tta=False)  # overrides on a recipe
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    stored = checkpoint_recipe(ck)
    assert stored == base.replace(seed=4, tta=False).resolved(bbox=16, batch_size=8, device_type="cpu")
    assert ck["contract"]["recipe"] == stored.to_dict() and enc.contract["tta"] is False
    assert ck["config"]["widths"] == [8, 16, 32] and ck["config"]["blocks"] == [1, 1, 1]
    opts = json.loads((tmp_path / "run" / "options.json").read_text())
    assert opts["recipe"] == stored.to_dict() and opts["lr"] == 0.02 and opts["seed"] == 4
    with pytest.raises(InputError, match="did you mean 'epochs'"):
        train(col, epoch=1, out=tmp_path / "r2", device="cpu")
    with pytest.raises(InputError, match="must be an ExploreRecipe"):
        train(col, None, {"epochs": 1}, out=tmp_path / "r2", device="cpu")
    # a checkpoint from before recipes (no contract recipe): rebuilt from its stored options
    old = {**ck, "contract": {k: v for k, v in ck["contract"].items() if k != "recipe"}}
    assert checkpoint_recipe(old) == stored.replace(strong_aug=opts["strong_aug"], weak_aug=opts["weak_aug"])


def test_resume_keeps_the_stored_recipe_and_refuses_changed_fixed_fields(tmp_path) -> None:
    col, _, _ = write_bank(tmp_path / "s.zarr", n=16)
    out = tmp_path / "run"
    train(col, out=out, device="cpu", lr=0.02, seed=3, **FAST)
    for name, value in (("lr", 0.1), ("seed", 4), ("batch_size", 4), ("widths", (4, 8, 16)), ("optimizer", "adamw")):
        assert name in FIXED_ON_RESUME
        with pytest.raises(InputError, match=rf"cannot resume .* with {name}=.*started with {name}="):
            train(col, out=out, resume=True, device="cpu", epochs=2, **{name: value})
    enc = train(col, out=out, resume=True, device="cpu", epochs=2, feature="trunk")  # nothing else given: stored
    ck = load_checkpoint(out / "last.pt")
    r = checkpoint_recipe(ck)
    assert ck["epoch"] == 2 and r.epochs == 2 and r.lr == 0.02 and r.seed == 3 and r.batch_size == 8
    assert r.widths == (8, 16, 32) and r.feature == "trunk" and enc.contract["feature"] == "trunk"
    assert [json.loads(x)["epoch"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    rc = cli.main(["explore", "train", str(tmp_path / "s.zarr"), "--out", str(out), "--resume", "--lr", "0.3",
                   "--epochs", "3", "--device", "cpu"])
    assert rc == 2  # the CLI prints the InputError
