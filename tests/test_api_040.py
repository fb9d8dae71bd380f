"""recsys-recoder 0.4.0's public names that recoder_dist adds for issue 34, against what 0.4.0
itself returns on the same inputs (tests/data/recoder040_api.json, written by
tests/data/make_recoder040_api_fixtures.py in the reference environment) and hand-worked
cases. No Ray here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recoder_dist.data import (
    Batch,
    BatchCollator,
    RecommendationDataLoader,
    RecommendationDataset,
    UsersInteractions,
)
from recoder_dist.embedding import (
    ANNOY_EXTRA,
    AnnoyEmbeddingsIndex,
    EmbeddingsIndex,
    ExactEmbeddingsIndex,
    MemCacheEmbeddingsIndex,
)
from recoder_dist.metrics import NDCG, Recall, RecommenderEvaluator
from recoder_dist.nn import LinearEmbedding
from recoder_dist.recommender import InferenceRecommender, Recommender, SimilarityRecommender
from recoder_dist.utils import normalize, unzip

FIXTURES = json.loads((Path(__file__).parent / "data" / "recoder040_api.json").read_text())


def _csr(dense) -> sp.csr_matrix:
    return sp.csr_matrix(np.array(dense, dtype=np.float32))


def _as_lists(batch: Batch) -> dict:
    return {
        "users": batch.users.tolist(),
        "items": None if batch.items is None else batch.items.tolist(),
        "indices": batch.indices.tolist(),
        "values": batch.values.tolist(),
        "size": list(batch.size),
    }


# ---------------------------------------------------------------- data


@pytest.mark.parametrize("case", FIXTURES["loader"], ids=lambda c: f"seed{c['seed']}")
def test_loader_yields_recoder040s_batches_in_its_order(case):
    dataset = RecommendationDataset(_csr(case["train"]), _csr(case["target"]))
    torch.manual_seed(case["seed"])  # 0.4.0's RandomSampler draws from torch's global RNG
    loader = RecommendationDataLoader(
        dataset,
        batch_size=case["batch_size"],
        negative_sampling=case["negative_sampling"],
        num_sampling_users=case["num_sampling_users"],
    )
    ours = [[_as_lists(i), _as_lists(t)] for i, t in loader]
    assert ours == case["batches"]
    assert len(loader) == case["length"] == len(ours)


@pytest.mark.parametrize("case", FIXTURES["collate"], ids=lambda c: f"bs{c['batch_size']}")
def test_batch_collator_matches_recoder040(case):
    interactions = UsersInteractions(case["users"], _csr(case["matrix"]))
    batches = BatchCollator(case["batch_size"], case["negative_sampling"]).collate(interactions)
    assert [_as_lists(b) for b in batches] == case["batches"]
    for b in batches:
        assert b.users.dtype == b.indices.dtype == torch.int64
        assert b.values.dtype == torch.float32


def test_batch_collator_by_hand():
    # users 7 and 9 (rows 0, 1) and 4 (row 2); items 1, 3, 5 of 6
    matrix = sp.csr_matrix(np.array([[0, 2, 0, 0, 0, 0], [0, 0, 0, 1, 0, 3], [0, 4, 0, 0, 0, 0]]))
    first, second = BatchCollator(batch_size=2, negative_sampling=True).collate(
        UsersInteractions([7, 9, 4], matrix)
    )
    assert first.items.tolist() == second.items.tolist() == [1, 3, 5]
    assert first.users.tolist() == [7, 9] and second.users.tolist() == [4]
    assert first.indices.tolist() == [[0, 1, 1], [0, 1, 2]]
    assert first.values.tolist() == [2, 1, 3] and first.size == (2, 3)
    assert first.to_dense().tolist() == [[2, 0, 0], [0, 1, 3]]
    assert second.indices.tolist() == [[0], [0]] and second.size == (1, 3)
    (whole,) = BatchCollator(batch_size=3).collate(UsersInteractions([7, 9, 4], matrix))
    assert whole.items is None and torch.equal(whole.to_dense(), torch.tensor(matrix.toarray()))


def test_loader_with_collate_fn_yields_each_group_once():
    matrix = sp.random(11, 5, density=0.5, format="csr", random_state=3)
    loader = RecommendationDataLoader(
        RecommendationDataset(matrix, matrix), batch_size=2, num_sampling_users=4, collate_fn=len
    )
    assert list(loader) == [(4, 4), (4, 4), (3, 3)]
    assert len(loader) == 3


def test_loader_groups_that_batch_size_does_not_divide():
    # 0.4.0 allowed any num_sampling_users >= batch_size; groups of 4 are batches of 3 and 1
    matrix = sp.random(10, 6, density=0.5, format="csr", random_state=4)
    loader = RecommendationDataLoader(
        RecommendationDataset(matrix), batch_size=3, negative_sampling=True, num_sampling_users=4
    )
    sizes = [len(input.users) for input, _ in loader]
    assert sizes == [3, 1, 3, 1, 2] and len(loader) == len(sizes)


def test_loader_worker_processes_give_the_same_batches():
    matrix = sp.random(12, 6, density=0.5, format="csr", random_state=5)
    runs = []
    for workers in (0, 1):
        torch.manual_seed(9)
        loader = RecommendationDataLoader(
            RecommendationDataset(matrix),
            batch_size=3,
            negative_sampling=True,
            num_sampling_users=6,
            num_workers=workers,
        )
        runs.append([_as_lists(i) for i, _ in loader])
    assert runs[0] == runs[1]


def test_data_errors():
    matrix = sp.random(4, 3, density=0.5, format="csr")
    with pytest.raises(ValueError, match="num_sampling_users"):
        RecommendationDataLoader(RecommendationDataset(matrix), batch_size=3, num_sampling_users=2)
    with pytest.raises(TypeError, match="RecommendationDataset"):
        RecommendationDataLoader(matrix, batch_size=3)
    with pytest.raises(ValueError, match="batch_size"):
        BatchCollator(batch_size=0)
    with pytest.raises(ValueError, match="one row per user"):
        UsersInteractions([0, 1], matrix)
    with pytest.raises(TypeError, match="sparse"):
        UsersInteractions([0, 1], np.zeros((2, 3)))
    with pytest.raises(TypeError, match="UsersInteractions"):
        BatchCollator(batch_size=2).collate(matrix)


def test_dataset_indexing_is_recoder040s():
    """0.4.0's ``dataset[index]``: the rows' users and interactions, and their targets."""
    inputs = sp.csr_matrix([[1, 0, 2], [0, 0, 0], [0, 3, 0]], dtype=np.float32)
    targets = sp.csr_matrix([[0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float32)
    dataset = RecommendationDataset(inputs, targets)
    rows, target = dataset[[2, 0]]
    assert rows.users.tolist() == [2, 0] and target.users.tolist() == [2, 0]
    assert rows.interactions_matrix.toarray().tolist() == [[0, 3, 0], [1, 0, 2]]
    assert target.interactions_matrix.toarray().tolist() == [[0, 0, 1], [0, 1, 0]]
    one, none = RecommendationDataset(inputs)[1]
    assert one.users.tolist() == [1] and one.interactions_matrix.nnz == 0 and none is None
    with pytest.raises(IndexError, match=r"rows must be in \[0, 3\)"):
        dataset[[0, 3]]
    with pytest.raises(TypeError, match="row number"):
        dataset[0.5]


# ---------------------------------------------------------------- utils and nn


def test_normalize_and_unzip_match_recoder040():
    x = np.array(FIXTURES["normalize"]["x"])
    np.testing.assert_allclose(normalize(x, axis=1), FIXTURES["normalize"]["rows"], rtol=1e-12)
    assert unzip([(1, "a", 2.5), (2, "b", 3.5)]) == FIXTURES["unzip"]
    assert unzip([]) == []
    np.testing.assert_allclose(normalize(np.array([3.0, 4.0])), [0.6, 0.8])


@pytest.mark.parametrize("case", FIXTURES["linear_embedding"]["cases"], ids=str)
def test_linear_embedding_matches_recoder040(case):
    weight = torch.tensor(FIXTURES["linear_embedding"]["weight"])
    embedding = torch.nn.Embedding.from_pretrained(weight)
    layer = LinearEmbedding(embedding, input_based=case["input_based"])
    with torch.no_grad():
        layer.bias.copy_(torch.tensor(case["bias"]))
    output = layer(torch.tensor(case["items"]), torch.tensor(case["y"]))
    torch.testing.assert_close(output, torch.tensor(case["output"]))


def test_linear_embedding_all_rows_is_the_whole_table():
    embedding = torch.nn.Embedding(5, 3)
    encoder = LinearEmbedding(embedding, input_based=True)
    decoder = LinearEmbedding(embedding, input_based=False, bias=False)
    x = torch.rand(2, 5)
    torch.testing.assert_close(encoder(None, x), x @ embedding.weight + encoder.bias)
    torch.testing.assert_close(decoder(None, torch.ones(1, 3)), embedding.weight.sum(1)[None])
    assert (encoder.in_features, encoder.out_features) == (5, 3)
    assert (decoder.in_features, decoder.out_features) == (3, 5) and decoder.bias is None


# ---------------------------------------------------------------- recommenders


class _History:
    def __init__(self, items):
        self.items = items


@pytest.mark.parametrize("case", FIXTURES["similarity"]["cases"], ids=lambda c: f"n{c['n']}")
def test_similarity_recommender_matches_recoder040(case):
    embeddings = np.array(FIXTURES["similarity"]["embeddings"], dtype=np.float32)
    histories = FIXTURES["similarity"]["histories"]
    recommender = SimilarityRecommender(
        ExactEmbeddingsIndex(embeddings),
        case["num_recommendations"],
        n=case["n"],
        scale=case["scale"],
    )
    expected = case["recommendations"]
    assert [r.tolist() for r in recommender.recommend([_History(h) for h in histories])] == expected
    # the same histories as plain lists, and as a UsersInteractions (columns are the ids)
    assert [r.tolist() for r in recommender.recommend(histories)] == expected
    rows = [i for i, h in enumerate(histories) for _ in h]
    matrix = sp.csr_matrix((np.ones(len(rows)), (rows, sum(histories, []))), shape=(4, 30))
    interactions = UsersInteractions(np.arange(4), matrix)
    assert [r.tolist() for r in recommender.recommend(interactions)] == expected
    # and as a bare matrix (row r is user r), as InferenceRecommender takes it
    assert [r.tolist() for r in recommender.recommend(matrix)] == expected


def test_similarity_recommender_with_n_1_has_no_candidates():
    # an item's nearest item is itself, which is the user's: 0.4.0 failed on the empty pool
    recommender = SimilarityRecommender(ExactEmbeddingsIndex(np.eye(4)), 3)
    assert [r.tolist() for r in recommender.recommend([[0, 1], []])] == [[], []]


def test_recommender_evaluator_matches_recoder040():
    case = FIXTURES["evaluator"]
    lists = {int(u): items for u, items in case["lists"].items()}

    class Fixed(Recommender):
        def recommend(self, users_hist):
            return [lists[u] for u in users_hist.users]

    recall, ndcg = Recall(3), NDCG(5)
    dataset = RecommendationDataset(_csr(case["train"]), _csr(case["target"]))
    torch.manual_seed(case["seed"])
    results = RecommenderEvaluator(Fixed(), [recall, ndcg]).evaluate(
        dataset, batch_size=case["batch_size"]
    )
    # 0.4.0 recorded NaN for the users without target items; recoder_dist leaves them out
    for metric in (recall, ndcg):
        expected = [v for v in case["results"][str(metric)] if not np.isnan(v)]
        np.testing.assert_allclose(results[metric], expected, rtol=1e-12)


def test_recommender_evaluator_num_users_stops_after_the_batch():
    matrix = sp.csr_matrix(np.eye(10, dtype=np.float32))

    class Same(Recommender):
        def recommend(self, users_hist):
            return [[0, 1, 2]] * len(users_hist)

    evaluator = RecommenderEvaluator(Same(), [Recall(3)])
    results = evaluator.evaluate(RecommendationDataset(matrix, matrix), batch_size=4, num_users=5)
    assert len(results[Recall(3)]) == 8  # two batches of 4 reach 5 users
    with pytest.raises(ValueError, match="target"):
        evaluator.evaluate(RecommendationDataset(matrix))
    with pytest.raises(ValueError, match="metrics must be a list of at least one metric"):
        RecommenderEvaluator(Same(), [])
    with pytest.raises(TypeError, match=r"metrics must be a list of metrics, e.g. \[Recall"):
        RecommenderEvaluator(Same(), Recall(3))


def test_inference_recommender_calls_the_model():
    class Model:
        def recommend(self, users_interactions, num_recommendations):
            return [list(range(num_recommendations))] * len(users_interactions)

    interactions = UsersInteractions([3, 4], sp.csr_matrix((2, 5)))
    assert InferenceRecommender(Model(), 2).recommend(interactions) == [[0, 1], [0, 1]]
    with pytest.raises(ValueError, match="num_recommendations"):
        InferenceRecommender(Model(), 0)
    # a count from numpy (np.arange, a config array) is an int too
    assert InferenceRecommender(Model(), np.int64(2)).recommend(interactions) == [[0, 1], [0, 1]]


# ---------------------------------------------------------------- embedding indexes


def test_exact_index_against_a_naive_loop():
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(25, 4)).astype(np.float32)
    ids = [f"item{i}" for i in range(25)]
    index = ExactEmbeddingsIndex(embeddings, id_map={raw: i for i, raw in enumerate(ids)})
    units = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    for i in range(25):
        cosines = [float(units[i] @ units[j]) for j in range(25)]
        naive = sorted(range(25), key=lambda j: (-cosines[j], j))[:6]
        assert index.get_nns_by_id(ids[i], 6) == [ids[j] for j in naive]
        assert index.get_nns_by_embedding(embeddings[i] * 3, 6) == [ids[j] for j in naive]
        assert index.get_similarity(ids[i], ids[naive[1]]) == pytest.approx(
            (cosines[naive[1]] + 1) / 2, abs=1e-6
        )
    np.testing.assert_array_equal(index.get_embedding("item3"), embeddings[3])
    assert index.get_nns_by_id("item0", 100)[0] == "item0"  # more than the catalog: all items
    assert len(index.get_nns_by_id("item0", 100)) == 25
    batch = index.get_nns_by_embeddings(embeddings[:3], 4)
    assert batch == [index.get_nns_by_id(ids[i], 4) for i in range(3)]


def test_exact_index_distances_are_annoys_angular_distance():
    index = ExactEmbeddingsIndex(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    index.include_distances = True
    distances = index.get_nns_by_id(0, 3)
    assert list(distances) == [0, 1, 2]
    np.testing.assert_allclose(list(distances.values()), [0, np.sqrt(2), 2], atol=1e-6)


def test_index_errors():
    index = ExactEmbeddingsIndex(np.eye(3))
    with pytest.raises(ValueError, match="unknown item id 7"):
        index.get_nns_by_id(7, 2)
    with pytest.raises(ValueError, match="n must be a positive int"):
        index.get_nns_by_id(0, 0)
    with pytest.raises(ValueError, match="one-to-one"):
        ExactEmbeddingsIndex(np.eye(3), id_map={"a": 0, "b": 0, "c": 1})
    with pytest.raises(ValueError, match="non-empty"):
        ExactEmbeddingsIndex(np.zeros((0, 3)))
    with pytest.raises(TypeError, match="EmbeddingsIndex"):
        MemCacheEmbeddingsIndex(np.eye(3))
    with pytest.raises(NotImplementedError):
        EmbeddingsIndex().get_nns_by_id(0, 1)


def test_mem_cache_asks_once_per_item_and_n():
    calls = []

    class Counting(ExactEmbeddingsIndex):
        def get_nns_by_id(self, embedding_id, n):
            calls.append((embedding_id, n))
            return super().get_nns_by_id(embedding_id, n)

    cache = MemCacheEmbeddingsIndex(Counting(np.random.default_rng(0).normal(size=(6, 2))))
    first = cache.get_nns_by_id(1, 3)
    assert cache.get_nns_by_id(1, 3) == first and calls == [(1, 3)]
    assert len(cache.get_nns_by_id(1, 5)) == 5 and calls == [(1, 3), (1, 5)]
    assert cache.get_similarity(1, 2) == cache.embedding_index.get_similarity(1, 2)


def test_annoy_index_without_annoy_names_the_extra():
    try:
        import annoy  # noqa: F401

        pytest.skip("annoy is installed")
    except ImportError:
        pass
    index = AnnoyEmbeddingsIndex(np.eye(3))  # constructing needs no annoy
    with pytest.raises(ImportError, match=r"recoder-dist\[annoy\]") as raised:
        index.build()
    assert ANNOY_EXTRA in str(raised.value)
    with pytest.raises(ImportError, match="annoy"):
        AnnoyEmbeddingsIndex().load("nowhere.index")


def test_annoy_index_matches_recoder040_and_the_exact_index(tmp_path):
    pytest.importorskip("annoy", reason=f"annoy is an optional extra: {ANNOY_EXTRA}")
    case = FIXTURES["annoy"]
    embeddings = np.array(FIXTURES["similarity"]["embeddings"], dtype=np.float32)
    index = AnnoyEmbeddingsIndex(embeddings, n_trees=case["n_trees"])
    index.build(index_file=str(tmp_path / "items.index"))
    # the same trees as 0.4.0's (Annoy's default seed), so the same neighbours
    assert [index.get_nns_by_id(i, 5) for i in range(len(embeddings))] == case["nns"]
    assert index.get_similarity(0, 1) == pytest.approx(case["similarity_0_1"], abs=1e-6)
    loaded = AnnoyEmbeddingsIndex()
    loaded.load(str(tmp_path / "items.index"))
    assert [loaded.get_nns_by_id(i, 5) for i in range(len(embeddings))] == case["nns"]

    exact = ExactEmbeddingsIndex(embeddings)
    assert index.get_similarity(0, 1) == pytest.approx(exact.get_similarity(0, 1), abs=1e-5)


def test_annoy_recall_against_the_exact_index():
    """Annoy is approximate: its recall of the exact neighbours is reported, not required to
    be perfect (a floor only catches a broken index)."""
    pytest.importorskip("annoy", reason=f"annoy is an optional extra: {ANNOY_EXTRA}")
    embeddings = np.random.default_rng(2).normal(size=(2000, 16)).astype(np.float32)
    exact = ExactEmbeddingsIndex(embeddings)
    truth = [set(nns) for nns in exact.get_nns_by_embeddings(embeddings, 10)]
    for n_trees in (2, 10):
        index = AnnoyEmbeddingsIndex(embeddings, n_trees=n_trees)
        index.build()
        found = sum(len(set(index.get_nns_by_id(i, 10)) & truth[i]) for i in range(2000))
        recall = found / (10 * 2000)
        print(
            f"Annoy ({n_trees} trees) recall@10 of the exact neighbours, 2000 items: {recall:.3f}"
        )
        assert recall > 0.2


# ---------------------------------------------------------------- Recoder with UsersInteractions

LEGACY = Path(__file__).parent / "data" / "recoder040"


@pytest.mark.parametrize("name", ["ae_8_4", "mf_4"])
def test_recoder_predicts_and_recommends_for_users_interactions(name):
    """0.4.0's model files and its model's outputs on every user (tests/data/recoder040): a
    UsersInteractions of some users, in any order, gets those users' rows of 0.4.0's output
    (a factorization model reads the users' ids, so the ids must be the UsersInteractions')."""
    from recoder_dist.model import Recoder
    from recoder_dist.nn import DynamicAutoencoder, MatrixFactorization

    model = DynamicAutoencoder() if name.startswith("ae") else MatrixFactorization()
    recoder = Recoder(model, num_workers=0, seed=0)
    recoder.init_from_model_file(str(LEGACY / f"{name}.model"))
    with np.load(LEGACY / f"{name}.npz") as saved:
        dense, output = saved["input"], saved["output"]
    users = np.array([17, 3, 9, 0])
    interactions = UsersInteractions(users, sp.csr_matrix(dense[users]))
    scores, dense_input = recoder.predict(interactions, return_input=True)
    np.testing.assert_allclose(scores, output[users], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(dense_input, dense[users])

    recommended = recoder.recommend(interactions, 4)
    masked = np.where(dense[users] > 0, -np.inf, output[users])
    assert recommended == np.argsort(-masked, axis=1, kind="stable")[:, :4].tolist()
    # The same rows as a bare matrix: an autoencoder reads only them; to a factorization
    # model a bare matrix's rows are users 0..n-1, so it takes every user's rows, no fewer.
    if name.startswith("ae"):
        as_matrix = recoder.predict(sp.csr_matrix(dense[users]))
        np.testing.assert_allclose(as_matrix, scores, rtol=1e-6)
    else:
        with pytest.raises(ValueError, match="give all 20 users' rows, or UsersInteractions"):
            recoder.predict(sp.csr_matrix(dense[users]))
        every = recoder.predict(sp.csr_matrix(dense))
        np.testing.assert_allclose(every, output, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="items; the model knows"):
        recoder.predict(UsersInteractions([0], sp.csr_matrix((1, dense.shape[1] + 1))))
