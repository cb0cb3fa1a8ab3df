"""Atlas quality against the truth: the best single-cluster selection per species and the oracle's cluster."""

from __future__ import annotations

import numpy as np
import pandas as pd

from milotile.explore.evaluate import best_cluster_selection, enriched_clusters, purest_cluster


def _atlas() -> tuple[pd.DataFrame, np.ndarray]:
    # cluster 0: 6 background + 2 'a'; cluster 1: 3 'a' + 1 'b'; cluster 2: 4 'b'; cluster -1: 1 'a' (unassigned)
    cluster = np.array([0] * 8 + [1] * 4 + [2] * 4 + [-1])
    species = np.array([None] * 6 + ["a"] * 2 + ["a"] * 3 + ["b"] + ["b"] * 4 + ["a"], dtype=object)
    return pd.DataFrame({"id": np.arange(len(cluster)), "cluster": cluster}), species


def test_best_cluster_selection_counts_background_and_unassigned() -> None:
    table, species = _atlas()
    best = best_cluster_selection(table["cluster"].to_numpy(), species)
    # 'a': cluster 1 (P 3/4, R 3/6) beats cluster 0 (P 2/8, R 2/6); the unassigned 'a' still counts in recall
    assert best["a"]["cluster"] == 1
    assert best["a"]["precision"] == 0.75 and best["a"]["recall"] == 0.5 and best["a"]["n_species"] == 6
    assert best["b"] == {"cluster": 2, "f1": round(2 * 1.0 * 0.8 / 1.8, 4), "precision": 1.0, "recall": 0.8,
                         "size": 4, "hits": 4, "n_species": 5}
    assert set(best) == {"a", "b"}  # the background is no species


def test_purest_cluster_and_rule() -> None:
    table, species = _atlas()
    assert purest_cluster(table, species, "a") == 1
    assert purest_cluster(table, species, "a", min_hits=4) is None
    assert purest_cluster(table, species, "b") == 2
    assert enriched_clusters(table, species, "a") == [1]  # >= 50 %: cluster 1 only
    assert sorted(enriched_clusters(table, species, "b")) == [2]


def test_rule_and_oracle_at_the_subcluster_level() -> None:
    table, species = _atlas()
    table["subcluster"] = np.array([0, 0, 0, 1, 1, 1, 2, 2] + [3] * 4 + [4] * 4 + [-1])  # cluster 0 split in 3
    assert purest_cluster(table, species, "a", column="subcluster") == 2  # 2 of 2 'a'
    assert sorted(enriched_clusters(table, species, "a", column="subcluster")) == [2, 3]
