"""Batch inference (``write_recommendations``): the cluster's recommendations are those of
``Recoder.recommend`` in this process, in the original ids; a second run replaces the first,
and a failed run leaves the earlier output as it was."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest
import ray

from recoder_dist.data.dataset import RecommendationDataset
from recoder_dist.datasets import load_prepared, open_prepared
from recoder_dist.inference import write_recommendations
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder

pytestmark = pytest.mark.slow  # each test runs Ray Data's inference over the cluster


@pytest.fixture(scope="module")
def trained(prepared_ml100k):
    """An autoencoder trained in this process for 2 epochs on prepared ml-100k."""
    recoder = Recoder(DynamicAutoencoder(hidden_layers=[32]), num_workers=0, seed=0)
    recoder.train(load_prepared(prepared_ml100k).split.train, num_epochs=2, batch_size=100)
    return recoder


def recommendations(folder) -> dict:
    return {row["user"]: row["rank_items"] for row in pq.read_table(folder).to_pylist()}


def reference(recoder, prepared_folder, part: str, k: int) -> dict:
    """``Recoder.recommend`` of every user of the part with input items, in original ids."""
    data = load_prepared(prepared_folder)
    interactions = getattr(data.split, part).interactions
    users = [u for u in range(interactions.shape[0]) if interactions[u].nnz]
    raw_user = {index: raw for raw, index in data.user_id_map.items()}
    raw_item = {index: raw for raw, index in data.item_id_map.items()}
    recommended = recoder.recommend(interactions[users], k)
    return {
        raw_user[u]: [raw_item[i] for i in items]
        for u, items in zip(users, recommended, strict=True)
    }


@pytest.mark.parametrize("part", ["train", "test"])
def test_the_clusters_recommendations_are_recoders(
    ray_session, trained, prepared_ml100k, tmp_path, part
):
    output = tmp_path / "recs"
    count = write_recommendations(
        trained, open_prepared(prepared_ml100k), output, k=10, part=part, workers=2
    )
    expected = reference(trained, prepared_ml100k, part, 10)
    ours = recommendations(output)
    assert count == len(ours) == len(expected)
    assert ours == expected


def test_a_second_run_replaces_the_first(ray_session, trained, prepared_ml100k, tmp_path):
    output = tmp_path / "recs"
    split = open_prepared(prepared_ml100k)
    write_recommendations(trained, split, output, k=10, part="train")
    for left in ("recs.tmp-0badf00d", "recs.old-0badf00d"):  # by runs whose driver was lost
        (tmp_path / left).mkdir()
        (tmp_path / left / "part.parquet").write_bytes(b"half")
    count = write_recommendations(trained, split, output, k=5, part="test")
    assert recommendations(output) == reference(trained, prepared_ml100k, "test", 5)
    assert count == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recs"]  # no sibling left behind


def test_a_failed_run_leaves_the_earlier_output(ray_session, trained, prepared_ml100k, tmp_path):
    """The item id map is damaged after split.json was read: the run fails on the cluster,
    midway, after the scoring started."""
    folder = tmp_path / "split"
    shutil.copytree(prepared_ml100k, folder)
    output = tmp_path / "recs"
    split = open_prepared(folder)
    write_recommendations(trained, split, output, k=10, part="test")
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    with open(split.id_map_path("item"), "w") as f:
        f.write("not an id map")
    with pytest.raises((ValueError, ray.exceptions.RayError), match="not an id map"):
        write_recommendations(trained, split, output, k=5, part="test")
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recs", "split"]


def test_bad_requests_are_refused(ray_session, trained, prepared_ml100k, tmp_path):
    split = open_prepared(prepared_ml100k)
    with pytest.raises(ValueError, match="part must be one of"):
        write_recommendations(trained, split, tmp_path / "o", k=5, part="nope")
    with pytest.raises(ValueError, match="top-k must be >= 1"):
        write_recommendations(trained, split, tmp_path / "o", k=0, part="test")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        write_recommendations(trained, split, tmp_path / "file", k=5, part="test")
    train = load_prepared(prepared_ml100k).split.train
    other = Recoder(DynamicAutoencoder(hidden_layers=[8]), num_workers=0)
    other.train(RecommendationDataset(train.interactions[:, :100]), num_epochs=1, batch_size=500)
    with pytest.raises(ValueError, match="scores 100 items; the split .* has"):
        write_recommendations(other, split, tmp_path / "o", k=5, part="test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
