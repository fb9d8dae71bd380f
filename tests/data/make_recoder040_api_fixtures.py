"""Writes ``tests/data/recoder040_api.json``: what recsys-recoder 0.4.0's data loader,
collator, utils, LinearEmbedding, SimilarityRecommender, RecommenderEvaluator and Annoy index
return on small fixed inputs, for tests/test_api_040.py to compare against without 0.4.0.

Run it with the interpreter of the reference environment (see benchmarks/_reference_venv.py,
which also installs annoy there), from the repository root:

    REF=$(cd benchmarks && python -c "import _reference_venv as r; print(r.reference_python())")
    env -u PYTHONPATH $REF tests/data/make_recoder040_api_fixtures.py
"""

import json
import os

import numpy as np
import scipy.sparse as sparse
import torch
from recoder import utils
from recoder.data import (
    BatchCollator,
    RecommendationDataLoader,
    RecommendationDataset,
    UsersInteractions,
)
from recoder.embedding import AnnoyEmbeddingsIndex, EmbeddingsIndex
from recoder.metrics import NDCG, Recall, RecommenderEvaluator
from recoder.nn import LinearEmbedding
from recoder.recommender import SimilarityRecommender

HERE = os.path.dirname(os.path.abspath(__file__))


def matrix(seed, users=13, items=9, density=0.35):
    m = sparse.random(users, items, density=density, format="csr", random_state=seed)
    m.data = np.round(m.data * 4 + 1).astype(np.float32)
    return m


def dense(m):
    return m.toarray().tolist()


def batch(b):
    return {
        "users": b.users.tolist(),
        "items": None if b.items is None else b.items.tolist(),
        "indices": b.indices.tolist(),
        "values": b.values.tolist(),
        "size": list(b.size),
    }


class BruteForceIndex(EmbeddingsIndex):
    """An exact cosine index with 0.4.0's interface (0.4.0 has only Annoy's)."""

    def __init__(self, embeddings):
        self.embeddings = embeddings
        self.units = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)

    def get_embedding(self, embedding_id):
        return self.embeddings[embedding_id]

    def get_nns_by_id(self, embedding_id, n):
        scores = self.units @ self.units[embedding_id]
        return np.argsort(-scores, kind="stable")[:n].tolist()


class Fixed:
    """A recommender that recommends items in a fixed order per user."""

    def __init__(self, lists):
        self.lists = lists

    def recommend(self, users_interactions):
        return [self.lists[u] for u in users_interactions.users]


def main():
    out = {}

    loader_cases = []
    for seed, negative_sampling, batch_size, num_sampling_users in [
        (0, True, 3, 6),
        (1, False, 3, 0),
        (2, True, 4, 0),
        (3, True, 2, 8),
    ]:
        train, target = matrix(seed), matrix(seed + 100)
        torch.manual_seed(seed)
        dl = RecommendationDataLoader(
            RecommendationDataset(train, target),
            batch_size=batch_size,
            negative_sampling=negative_sampling,
            num_sampling_users=num_sampling_users,
        )
        batches = [[batch(i), batch(t)] for i, t in dl]
        loader_cases.append(
            dict(
                seed=seed,
                negative_sampling=negative_sampling,
                batch_size=batch_size,
                num_sampling_users=num_sampling_users,
                train=dense(train),
                target=dense(target),
                length=len(dl),
                batches=batches,
            )
        )
    out["loader"] = loader_cases

    m = matrix(7, users=5)
    users = [40, 3, 17, 8, 21]
    out["collate"] = [
        dict(
            users=users,
            matrix=dense(m),
            batch_size=bs,
            negative_sampling=ns,
            batches=[batch(b) for b in BatchCollator(bs, ns).collate(UsersInteractions(users, m))],
        )
        for bs, ns in [(2, True), (2, False), (5, True)]
    ]

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3))
    out["normalize"] = dict(x=x.tolist(), rows=utils.normalize(x, axis=1).tolist())
    out["unzip"] = utils.unzip([(1, "a", 2.5), (2, "b", 3.5)])

    torch.manual_seed(0)
    emb = torch.nn.Embedding(6, 3)
    cases = []
    for input_based in (True, False):
        layer = LinearEmbedding(emb, input_based=input_based)
        torch.nn.init.uniform_(layer.bias)
        items = torch.LongTensor([4, 1, 2])
        y = torch.rand(2, 3)
        cases.append(
            dict(
                input_based=input_based,
                bias=layer.bias.tolist(),
                items=items.tolist(),
                y=y.tolist(),
                output=layer(items, y).tolist(),
            )
        )
    out["linear_embedding"] = dict(weight=emb.weight.tolist(), cases=cases)

    embeddings = rng.normal(size=(30, 5)).astype(np.float32)
    histories = [[0, 3, 7], [5], [10, 11, 12, 13], [29, 1]]

    class History:
        def __init__(self, items):
            self.items = items

    sim = []
    for n, scale, k in [(3, 1, 4), (5, 2, 3), (2, 1, 2)]:
        rec = SimilarityRecommender(BruteForceIndex(embeddings), k, n=n, scale=scale)
        sim.append(
            dict(
                n=n,
                scale=scale,
                num_recommendations=k,
                recommendations=[
                    r.tolist() for r in rec.recommend([History(h) for h in histories])
                ],
            )
        )
    out["similarity"] = dict(embeddings=embeddings.tolist(), histories=histories, cases=sim)

    annoy = AnnoyEmbeddingsIndex(embeddings, n_trees=10)
    annoy.build()
    out["annoy"] = dict(
        n_trees=10,
        nns=[annoy.get_nns_by_id(i, 5) for i in range(len(embeddings))],
        similarity_0_1=annoy.get_similarity(0, 1),
    )

    train, target = matrix(11, users=12, items=10), matrix(12, users=12, items=10)
    lists = {u: rng.permutation(10)[:5].tolist() for u in range(12)}
    torch.manual_seed(5)
    results = RecommenderEvaluator(Fixed(lists), [Recall(3), NDCG(5)]).evaluate(
        RecommendationDataset(train, target), batch_size=5
    )
    out["evaluator"] = dict(
        train=dense(train),
        target=dense(target),
        lists={str(u): v for u, v in lists.items()},
        seed=5,
        batch_size=5,
        results={str(m): [float(v) for v in vals] for m, vals in results.items()},
    )

    out["torch"] = torch.__version__
    with open(os.path.join(HERE, "recoder040_api.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
