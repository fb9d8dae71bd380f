"""A script written against recsys-recoder 0.4.0's public API (tests/test_script_040.py runs it
on recoder_dist with only ``recoder`` changed to ``recoder_dist`` in the imports).

It runs as is on recsys-recoder 0.4.0 too (the reference environment of
benchmarks/_reference_venv.py): ``env -u PYTHONPATH $REF tests/recoder040_script.py``.
``main(annoy=True)`` also exercises AnnoyEmbeddingsIndex, which needs the ``annoy`` package.
"""

import os
import sys
import tempfile

import numpy as np
import scipy.sparse as sparse
import torch
from recoder import utils
from recoder.data import (
    Batch,
    BatchCollator,
    RecommendationDataLoader,
    RecommendationDataset,
    UsersInteractions,
)
from recoder.embedding import EmbeddingsIndex, MemCacheEmbeddingsIndex
from recoder.metrics import NDCG, Recall, RecommenderEvaluator
from recoder.model import Recoder
from recoder.nn import DynamicAutoencoder, LinearEmbedding
from recoder.recommender import InferenceRecommender, Recommender, SimilarityRecommender

NUM_USERS, NUM_ITEMS, GROUPS = 80, 40, 4


def interactions(rng, users):
    """Users of group g interact with items of group g (half of them, at random)."""
    rows, cols = [], []
    per_group = NUM_ITEMS // GROUPS
    for user in range(users):
        group = user % GROUPS
        items = group * per_group + rng.choice(per_group, size=per_group // 2, replace=False)
        rows.extend([user] * len(items))
        cols.extend(items)
    return sparse.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(users, NUM_ITEMS)
    )


class BruteForceIndex(EmbeddingsIndex):
    """A user's own exact index, written to 0.4.0's EmbeddingsIndex interface."""

    def __init__(self, embeddings):
        self.embeddings = embeddings
        self.units = utils.normalize(embeddings, axis=1)

    def get_embedding(self, embedding_id):
        return self.embeddings[embedding_id]

    def get_nns_by_id(self, embedding_id, n):
        return list(np.argsort(-self.units.dot(self.units[embedding_id]))[:n])


class UserHistory:
    def __init__(self, items):
        self.items = items


def main(annoy=False):
    torch.manual_seed(0)
    rng = np.random.RandomState(0)
    train = interactions(rng, NUM_USERS)
    full = interactions(rng, NUM_USERS)
    # Validation users: half of their items as input, the other half as target.
    val_input = sparse.csr_matrix(full.multiply(rng.rand(*full.shape) < 0.5))
    val_target = sparse.csr_matrix(full - val_input)
    val_input.eliminate_zeros()  # 0.4.0's collator needs no stored zeros
    val_target.eliminate_zeros()
    train_dataset = RecommendationDataset(train)
    val_dataset = RecommendationDataset(val_input, val_target)

    assert utils.unzip([(1, "a"), (2, "b")]) == [[1, 2], ["a", "b"]]

    # The loader: every user once an epoch, each batch scored on its group's items.
    loader = RecommendationDataLoader(
        train_dataset, batch_size=8, negative_sampling=True, num_sampling_users=16
    )
    seen = []
    for input, target in loader:
        assert isinstance(input, Batch) and target is None
        dense = torch.sparse_coo_tensor(input.indices, input.values, input.size).to_dense()
        assert dense.shape == (len(input.users), len(input.items))
        assert torch.equal(
            dense, torch.tensor(train[input.users.numpy()][:, input.items.numpy()].toarray())
        )
        seen.extend(input.users.tolist())
    assert sorted(seen) == list(range(NUM_USERS)) and len(loader) == NUM_USERS // 8

    batches = BatchCollator(batch_size=4).collate(
        UsersInteractions(users=np.arange(10, 20), interactions_matrix=train[10:20])
    )
    assert [len(b.users) for b in batches] == [4, 4, 2] and batches[0].items is None
    assert batches[2].users.tolist() == [18, 19] and batches[2].size == (2, NUM_ITEMS)

    layer = LinearEmbedding(torch.nn.Embedding(NUM_ITEMS, 3), input_based=True)
    assert layer(torch.LongTensor([1, 2]), torch.ones(5, 2)).shape == (5, 3)

    model = DynamicAutoencoder(hidden_layers=[16], activation_type="tanh")
    recoder = Recoder(
        model=model,
        num_items=NUM_ITEMS,
        num_users=NUM_USERS,
        optimizer_type="adam",
        loss="logistic",
        use_cuda=False,
    )
    recoder.train(
        train_dataset=train_dataset,
        val_dataset=val_dataset,
        lr=0.01,
        batch_size=16,
        num_epochs=30,
        negative_sampling=True,
    )

    users_interactions = UsersInteractions(users=np.arange(6), interactions_matrix=val_input[:6])
    scores, dense_input = recoder.predict(users_interactions, return_input=True)
    assert tuple(scores.shape) == (6, NUM_ITEMS) and tuple(dense_input.shape) == (6, NUM_ITEMS)
    recommendations = recoder.recommend(users_interactions, num_recommendations=5)
    for user, items in enumerate(recommendations):
        assert len(items) == 5 and not set(items) & set(val_input[user].indices.tolist())

    recommender = InferenceRecommender(recoder, num_recommendations=5)
    assert isinstance(recommender, Recommender)
    recall_5, ndcg_5 = Recall(k=5), NDCG(k=5)
    results = RecommenderEvaluator(recommender, [recall_5, ndcg_5]).evaluate(
        val_dataset, batch_size=16
    )
    # nanmean: 0.4.0 records NaN for a user without target items (recoder_dist leaves them out)
    recall = np.nanmean(results[recall_5])
    print(f"model: Recall@5 {recall:.3f}, NDCG@5 {np.nanmean(results[ndcg_5]):.3f}")
    # A model that knows the groups recalls about 0.67 (5 of the ~7.5 unseen items of the
    # user's group, ~2.5 of them relevant); 5 random items about 0.13.
    assert recall > 0.5, recall

    # Item similarity over the decoder's item embeddings: items of a group are neighbours.
    embeddings = recoder.model.de_embedding_layer.weight.data.cpu().numpy()
    histories = [UserHistory(val_input[user].indices) for user in range(NUM_USERS)]
    indexes = [BruteForceIndex(embeddings)]
    if annoy:
        from recoder.embedding import AnnoyEmbeddingsIndex

        index_file = os.path.join(tempfile.mkdtemp(), "items.index")
        AnnoyEmbeddingsIndex(embeddings=embeddings, n_trees=20).build(index_file=index_file)
        loaded = AnnoyEmbeddingsIndex()
        loaded.load(index_file=index_file)
        assert loaded.get_nns_by_id(3, 1) == [3]
        assert 0 <= loaded.get_similarity(3, 4) <= 1
        indexes.append(loaded)
    for index in indexes:
        similarity = SimilarityRecommender(
            MemCacheEmbeddingsIndex(index), num_recommendations=5, n=10
        )
        recommended = similarity.recommend(histories)
        group_of = np.arange(NUM_ITEMS) // (NUM_ITEMS // GROUPS)
        in_group = np.mean(
            [np.mean(group_of[items] == user % GROUPS) for user, items in enumerate(recommended)]
        )
        print(f"{type(index).__name__}: {in_group:.3f} of the recommendations in the user's group")
        assert in_group > 0.8, in_group
    return results


if __name__ == "__main__":
    main(annoy="--annoy" in sys.argv)
