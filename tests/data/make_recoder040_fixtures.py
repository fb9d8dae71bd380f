"""Writes the recsys-recoder 0.4.0 fixtures that tests/test_metrics.py and tests/test_legacy.py
compare against, so that the tests themselves never need 0.4.0.

Run it with the interpreter of the reference environment (recsys-recoder 0.4.0 with the two
compatibility edits, see benchmarks/_reference_venv.py), from the repository root:

    REF=$(cd benchmarks && python -c "import _reference_venv as r; print(r.reference_python())")
    $REF tests/data/make_recoder040_fixtures.py

It writes:

1. ``tests/data/recoder040_metrics.json``: 0.4.0's ``average_precision``, ``recall``, ``dcg``
   and ``ndcg`` on random cases (distinct recommended items, distinct non-empty relevant sets,
   k shorter and longer than the list).
2. ``tests/data/recoder040/{name}.model``: small models (20 users x 30 items) trained one
   epoch by 0.4.0's own ``Recoder`` and written by its ``save_state``, and ``{name}.npz``: the
   input rows (``input``: the training matrix, dense) and 0.4.0's ``model(input)`` in eval mode
   on all items (``output``) and on a subset of items (``items``, ``output_items``).
"""

import json
import os
import shutil
import sys
import tempfile

import numpy as np
import recoder
import scipy.sparse as sparse
import torch
from recoder.data import RecommendationDataset
from recoder.metrics import average_precision, dcg, ndcg, recall
from recoder.model import Recoder
from recoder.nn import DynamicAutoencoder, MatrixFactorization

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_USERS, NUM_ITEMS = 20, 30

# name -> (model, Recoder keyword arguments)
MODELS = {
    "ae_8": (
        lambda: DynamicAutoencoder(hidden_layers=[8], activation_type="tanh", noise_prob=0.2),
        dict(optimizer_type="sgd", loss="mse", loss_params={"confidence": 2.0}),
    ),
    "ae_8_constrained": (
        lambda: DynamicAutoencoder(
            hidden_layers=[8], activation_type="sigmoid", is_constrained=True
        ),
        dict(optimizer_type="adam", loss="logistic"),
    ),
    "ae_8_4": (
        lambda: DynamicAutoencoder(hidden_layers=[8, 4], activation_type="tanh", dropout_prob=0.3),
        dict(optimizer_type="adam", loss="logloss"),
    ),
    "ae_8_4_constrained_sparse": (
        lambda: DynamicAutoencoder(
            hidden_layers=[8, 4], activation_type="relu", is_constrained=True, sparse=True
        ),
        dict(optimizer_type="adam", loss="logloss"),
    ),
    "mf_4": (
        lambda: MatrixFactorization(embedding_size=4, activation_type="none", dropout_prob=0.1),
        dict(optimizer_type="adam", loss="logistic"),
    ),
    # 0.4.0 applies the activation to user embeddings only; recoder_dist refuses this file.
    "mf_4_tanh": (
        lambda: MatrixFactorization(embedding_size=4, activation_type="tanh"),
        dict(optimizer_type="sgd", loss="mse"),
    ),
}


def metric_cases(seed=0, num_cases=60):
    rng = np.random.RandomState(seed)
    cases = []
    for _ in range(num_cases):
        x = rng.choice(30, size=rng.randint(0, 25), replace=False)
        y = rng.choice(30, size=rng.randint(1, 20), replace=False)
        k = int(rng.choice([1, 3, 5, 10, 20, 40]))
        cases.append(
            dict(
                x=x.tolist(),
                y=y.tolist(),
                k=k,
                average_precision=float(average_precision(x, y, k)),
                average_precision_unnormalized=float(average_precision(x, y, k, normalize=False)),
                recall=float(recall(x, y, k)),
                recall_unnormalized=float(recall(x, y, k, normalize=False)),
                dcg=float(dcg(x, y, k)),
                ndcg=float(ndcg(x, y, k)),
            )
        )
    return cases


def interactions(seed=0):
    rng = np.random.RandomState(seed)
    dense = (rng.rand(NUM_USERS, NUM_ITEMS) < 0.2).astype(np.float32)
    dense[np.arange(NUM_USERS), rng.randint(0, NUM_ITEMS, NUM_USERS)] = 1  # no empty user
    return sparse.csr_matrix(dense)


def write_model(name, make_model, recoder_kwargs, matrix, folder):
    torch.manual_seed(0)
    np.random.seed(0)
    model = make_model()
    trainer = Recoder(model=model, **recoder_kwargs)
    trainer.train(
        train_dataset=RecommendationDataset(matrix),
        lr=0.01,
        batch_size=5,
        num_epochs=1,
        negative_sampling=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        written = trainer.save_state(os.path.join(tmp, name))
        shutil.copyfile(written, os.path.join(folder, name + ".model"))

    model.eval()
    dense = torch.from_numpy(matrix.toarray())
    users = torch.arange(NUM_USERS)
    items = torch.LongTensor([0, 3, 4, 8, 11, 12, 17, 21, 25, 29])
    with torch.no_grad():
        output = model(dense, input_users=users, target_users=users)
        output_items = model(
            dense[:, items],
            input_users=users,
            input_items=items,
            target_users=users,
            target_items=items,
        )
    np.savez(
        os.path.join(folder, name + ".npz"),
        input=dense.numpy(),
        output=output.numpy(),
        items=items.numpy(),
        output_items=output_items.numpy(),
    )


def main():
    if recoder.__version__ != "0.4.0":
        sys.exit(f"needs recsys-recoder 0.4.0, found {recoder.__version__}")
    with open(os.path.join(HERE, "recoder040_metrics.json"), "w") as f:
        json.dump(dict(recoder_version=recoder.__version__, cases=metric_cases()), f, indent=1)
        f.write("\n")

    folder = os.path.join(HERE, "recoder040")
    os.makedirs(folder, exist_ok=True)
    matrix = interactions()
    for name, (make_model, recoder_kwargs) in MODELS.items():
        write_model(name, make_model, recoder_kwargs, matrix, folder)
    print("wrote", folder, "and recoder040_metrics.json")


if __name__ == "__main__":
    main()
