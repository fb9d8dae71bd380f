"""Runs inside the recsys-recoder 0.4.0 environment (see ``_reference_venv.py``): trains or
evaluates with recsys-recoder's own ``Recoder`` and prints ``RESULT {json}``.

Per-epoch times are read at the model's ``train()`` call, which recsys-recoder makes at the
start of every epoch (and nowhere else when there is no validation set), and once more when
``train`` returns: wall time (``perf_counter``) and this process's CPU time.
"""

import json
import sys
import time


def _model(params: dict):
    from recoder.nn import DynamicAutoencoder

    return DynamicAutoencoder(**params)


def train(job: dict) -> dict:
    import scipy.sparse as sp
    from recoder.data import RecommendationDataset
    from recoder.model import Recoder

    matrix = sp.load_npz(job["matrix"]).tocsr()
    model = _model(job["model"])
    stamps = []
    train_mode = model.train

    def stamped_train(mode=True):
        stamps.append((time.perf_counter(), time.process_time()))
        return train_mode(mode)

    model.train = stamped_train
    trainer = Recoder(model=model, optimizer_type="adam", loss="logloss")
    trainer.train(RecommendationDataset(matrix), num_epochs=job["epochs"], **job["train"])
    stamps.append((time.perf_counter(), time.process_time()))
    return {
        "wall": [b[0] - a[0] for a, b in zip(stamps, stamps[1:])],
        "cpu": [b[1] - a[1] for a, b in zip(stamps, stamps[1:])],
    }


def train_save(job: dict) -> dict:
    """Trains a fresh model with recsys-recoder's ``Recoder`` (seeded) and saves it with its own
    ``save_state``; returns the wall and CPU seconds of the ``train`` call and the file."""
    import numpy as np
    import scipy.sparse as sp
    import torch
    from recoder.data import RecommendationDataset
    from recoder.model import Recoder

    torch.manual_seed(job["seed"])
    np.random.seed(job["seed"])
    matrix = sp.load_npz(job["matrix"]).tocsr()
    trainer = Recoder(model=_model(job["model"]), optimizer_type="adam", loss="logloss")
    start = time.perf_counter(), time.process_time()
    trainer.train(RecommendationDataset(matrix), num_epochs=job["epochs"], **job["train"])
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    return {"wall": wall, "cpu": cpu, "model_file": trainer.save_state(job["prefix"])}


def evaluate(job: dict) -> dict:
    """recsys-recoder's evaluator (``Recoder.evaluate``'s path) on weights given in our names."""
    import numpy as np
    import scipy.sparse as sp
    import torch
    from recoder.data import RecommendationDataset
    from recoder.metrics import NDCG, Recall, RecommenderEvaluator
    from recoder.model import Recoder
    from recoder.recommender import InferenceRecommender

    inputs, targets = (sp.load_npz(job[k]).tocsr() for k in ("input", "target"))
    model = _model(job["model"])
    model.init_model(num_items=inputs.shape[1], num_users=inputs.shape[0])
    _load_our_weights(model, np.load(job["weights"]))
    trainer = Recoder(model=model, optimizer_type="adam", loss="logloss")
    model.eval()
    metrics = [Recall(20), Recall(50), NDCG(100)]
    evaluator = RecommenderEvaluator(InferenceRecommender(trainer, job["k"]), metrics)
    dataset = RecommendationDataset(inputs, targets)
    wall, cpu = [], []
    for _ in range(job["repeats"]):
        start = time.perf_counter(), time.process_time()
        with torch.no_grad():
            results = evaluator.evaluate(dataset, batch_size=job["batch_size"])
        wall.append(time.perf_counter() - start[0])
        cpu.append(time.process_time() - start[1])
    return {
        "wall": wall,
        "cpu": cpu,
        "users": len(results[metrics[0]]),
        "metrics": {str(m): float(np.mean(results[m])) for m in metrics},
    }


def collate(job: dict) -> dict:
    """Epochs of recsys-recoder's training data path: its ``RecommendationDataLoader`` (dataset
    indexing and ``BatchCollator``), and the same plus ``to_dense`` as its training step does."""
    import scipy.sparse as sp
    import torch
    from recoder.data import RecommendationDataLoader, RecommendationDataset

    dataset = RecommendationDataset(sp.load_npz(job["matrix"]).tocsr())
    times = {"loader": [], "loader + to_dense": []}
    for _ in range(job["repeats"]):
        for side, dense in (("loader", False), ("loader + to_dense", True)):
            loader = RecommendationDataLoader(
                dataset, batch_size=job["batch_size"], negative_sampling=True
            )
            start = time.perf_counter()
            for batch, _ in loader:
                if dense:
                    torch.sparse_coo_tensor(batch.indices, batch.values, batch.size).to_dense()
            times[side].append(time.perf_counter() - start)
    return times


def _load_our_weights(model, weights) -> None:
    """recoder_dist's DynamicAutoencoder([h]) names -> recsys-recoder's (one hidden layer)."""
    import torch

    ours = {
        "en_embedding_layer.weight": weights["encoder_embedding.weight"],
        "__en_linear_embedding_layer.bias": weights["encoder_bias"],
        "de_embedding_layer.weight": weights["decoder_embedding.weight"],
        "__de_linear_embedding_layer.bias": weights["decoder_bias.weight"][:, 0],
    }
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = next(k for k in ours if name.endswith(k))
            param.copy_(torch.from_numpy(ours[key]))


def main() -> None:
    job = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(job["threads"])
    tasks = {"train": train, "train_save": train_save, "evaluate": evaluate, "collate": collate}
    result = tasks[job["task"]](job)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
