"""Exploration benchmark: embedding quality (k-NN species accuracy vs raw-pixel PCA) and speed.

Pipeline: ``milotile.synth`` tomograms -> ingest -> preprocess -> mine (DoG candidates) ->
extract_patches (slab mode, MiLoPYP neighbour shifts) -> ``explore.train`` -> ``explore.embed``.
Candidates within ``match_radius`` voxels of a ground-truth particle get its species.

(a) quality: 5-NN accuracy (stratified 5-fold CV) of the learned embeddings of those candidates,
    next to PCA of the raw pixels of the same (normalised) patches.
(b) speed: patches/s for training and embedding (CPU, and CUDA when present), and the two-view
    augmentation alone: torch batch augmentation vs a MiLoPYP-style per-sample PIL loop
    (8-bit PIL image, flips, brightness/contrast jitter, random resized crop, rot90, to tensor,
    normalise) on the same patches.

    python benchmarks/explore.py --quick
    python benchmarks/explore.py --epochs 30
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("bench.explore")


def build_store(work: Path, n_tomograms: int, size: tuple[int, int, int], bbox: int, seed: int):
    import milotile as mt
    from milotile.stages.mine import mine
    from milotile.stages.patches import extract_patches
    from milotile.stages.preprocess import preprocess
    from milotile.synth import synth

    res = synth(work / "synth", n_tomograms=n_tomograms, size=size, seed=seed, filament=False)
    col = mt.ingest(res.manifest, work / "store.zarr")
    preprocess(col)
    mine(col)
    key = extract_patches(col, bbox=bbox, modes=("slab",), shifts=True, chunk_n=128)
    return col, key, res.ground_truth


def label_candidates(table, gt, radius: float) -> np.ndarray:
    """Species of the nearest ground-truth particle within ``radius`` voxels, else ''."""
    from scipy.spatial import cKDTree

    labels = np.full(len(table), "", dtype=object)
    for name, sub in table.groupby("tomogram"):
        g = gt[gt["tomogram"] == name]
        if g.empty:
            continue
        tree = cKDTree(g[["x", "y", "z"]].to_numpy())
        d, i = tree.query(sub[["x", "y", "z"]].to_numpy())
        ok = d <= radius
        labels[sub.index[ok]] = g["species"].to_numpy()[i[ok]]
    return labels


def knn_cv(x: np.ndarray, y: np.ndarray, k: int = 5, folds: int = 5, seed: int = 0) -> float:
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = min(folds, int(np.min(np.unique(y, return_counts=True)[1])))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    clf = make_pipeline(StandardScaler(), KNeighborsClassifier(k))
    return float(cross_val_score(clf, x, y, cv=cv).mean())


def pil_views(patches: np.ndarray, mean: float, std: float, rng: np.random.Generator) -> torch.Tensor:
    """MiLoPYP-style per-sample augmentation of both views with PIL (the baseline)."""
    from PIL import Image, ImageEnhance

    b = patches.shape[-1]
    out = []
    for p in patches:  # (S, b, b): original + shifted copies
        views = []
        for j, lo in ((0, 0.8), (int(rng.integers(1, len(p))), 0.9)):
            a = p[j]
            a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6)
            img = Image.fromarray((a * 255).astype(np.uint8))
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.5, 1.5))
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.2))
            side = int(round(b * np.sqrt(rng.uniform(lo, 1.0))))
            x0, y0 = rng.integers(0, b - side + 1, 2)
            img = img.resize((b, b), Image.Resampling.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
            img = img.rotate(90 * int(rng.integers(0, 4)))
            t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
            views.append((t - mean) / std)
        out.append(torch.stack(views))
    return torch.stack(out)


def speed_augment(bank, n: int, batch: int, device: torch.device, repeats: int = 3) -> dict:
    from milotile.explore.augment import default_config, make_views

    x = bank.read(0, min(n, bank.n))  # (n, S, 1, b, b)
    strong, weak = default_config("3d", "strong"), default_config("3d", "weak")
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for i in range(0, len(x), batch):
        pil_views(x[i : i + batch, :, 0], 0.5, 0.2, rng)
    pil = len(x) / (time.perf_counter() - t)
    g = torch.Generator(device=device).manual_seed(0)
    xt = torch.from_numpy(x).to(device)
    best = 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(0, len(x), batch):
            make_views(xt[i : i + batch], g, strong, weak, [0.5], [0.2])
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, len(x) / (time.perf_counter() - t))
    return {"pil_per_sample_views_per_s": pil, f"torch_batch_views_per_s_{device.type}": best, "n": len(x)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run (2 tomograms, 8 epochs)")
    ap.add_argument("--n-tomograms", type=int, default=6)
    ap.add_argument("--size", default="64,192,192", help="Z,Y,X of each synthetic tomogram")
    ap.add_argument("--bbox", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--match-radius", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 wins on a shared 2-core machine; PIL is single-threaded too)")
    ap.add_argument("--widths", default="64,128,256",
                    help="trunk widths (MiLoPYP: 64,128,256; narrower trains faster on CPU)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "explore.json"))
    args = ap.parse_args()
    if args.quick:
        args.n_tomograms, args.epochs = 3, 10
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("distributed", "milotile.store", "milotile.stages"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    size = tuple(int(s) for s in args.size.split(","))

    from sklearn.decomposition import PCA

    from milotile.explore import embed, open_bank, train
    from milotile.nn.device import pick_device

    dev = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        t0 = time.perf_counter()
        col, key, gt = build_store(work, args.n_tomograms, size, args.bbox, args.seed)
        t_prep = time.perf_counter() - t0
        bank = open_bank(col, key)
        table = col.read_table(f"patches-{key}")
        labels = label_candidates(table, gt, args.match_radius)
        on_gt = labels != ""
        log.info("%d candidates, %d on ground-truth particles (%s)", bank.n, on_gt.sum(),
                 dict(zip(*np.unique(labels[on_gt], return_counts=True), strict=True)))

        t0 = time.perf_counter()
        enc = train(col, key=key, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                    optimizer=args.optimizer, out=work / "run", seed=args.seed, device=str(dev),
                    save_every=max(args.epochs, 1),
                    model_config={"widths": [int(w) for w in args.widths.split(",")]})
        t_train = time.perf_counter() - t0
        recs = [json.loads(line) for line in (work / "run" / "log.jsonl").read_text().splitlines()]
        train_pps = float(np.median([r["patches_per_s"] for r in recs]))

        t0 = time.perf_counter()
        emb = embed(col, model=enc, key=key, feature="pred")
        t_embed = time.perf_counter() - t0
        feats = {"pred": emb.values()}
        for kind in ("proj", "fc", "trunk"):
            feats[kind] = enc.transform(bank.read(0, bank.n), feature=kind)

        y = labels[on_gt].astype(str)
        raw = bank.read(0, bank.n)[on_gt, 0].reshape(on_gt.sum(), -1)
        raw = (raw - np.asarray(enc.contract["mean"])) / np.asarray(enc.contract["std"])
        quality = {f"simsiam_{k}": knn_cv(v[on_gt], y) for k, v in feats.items()}
        pca_scores = {}
        for nc in (8, 16, 32, 64):
            if nc < min(raw.shape):
                z = PCA(nc, random_state=0).fit_transform(raw)
                pca_scores[nc] = knn_cv(z, y)
        quality.update({f"pca_{k}": v for k, v in pca_scores.items()})
        quality["raw_pixels"] = knn_cv(raw, y)
        chance = float(np.max(np.unique(y, return_counts=True)[1]) / len(y))

        speed = speed_augment(bank, 1024, args.batch_size, torch.device("cpu"))
        if dev.type == "cuda":
            speed.update(speed_augment(bank, 1024, args.batch_size, dev))
        speed.update({
            "train_patches_per_s": train_pps, "embed_patches_per_s": bank.n / t_embed,
            "train_seconds": t_train, "embed_seconds": t_embed, "prepare_seconds": t_prep,
        })

    best_pca = max(pca_scores.values()) if pca_scores else float("nan")
    result = {
        "args": vars(args), "device": str(dev), "torch_threads": torch.get_num_threads(),
        "n_candidates": bank.n, "n_on_gt": int(on_gt.sum()), "chance": chance,
        "knn5_accuracy": quality, "best_pca": best_pca,
        "learned_beats_pca": quality["simsiam_pred"] > best_pca,
        "final_loss": recs[-1]["loss"], "final_output_std": recs[-1]["output_std"], "speed": speed,
    }
    print(json.dumps(result, indent=2, default=str))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
