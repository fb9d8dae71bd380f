"""Every snippet of the Recoder tutorial runs against recoder_dist, with only the import path
changed (and CPU instead of GPU, fewer epochs), on MovieLens 100K."""

from __future__ import annotations

import glob
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import scipy.sparse as sp

from recoder_dist.datasets import load_ml100k, strong_generalization_split
from recoder_dist.model import Recoder
from tests.conftest import SHARED_DATA, shared_data

TUTORIAL = SHARED_DATA.parent / "seed" / "tutorial.md"
EPOCHS = 3

# The tutorial's own-model snippet is a template whose methods are `pass`; this fills them
# with a small working model (item-item weights as a sparse embedding) and keeps the rest.
OWN_MODEL = """
class YourModel(FactorizationModel):

  def init_model(self, num_items=None, num_users=None):
    import torch
    self.weights = torch.nn.Embedding(num_items, num_items, sparse=True)
    torch.nn.init.zeros_(self.weights.weight)

  def model_params(self):
    return {}

  def load_model_params(self, model_params):
    pass

  def forward(self, input, input_users=None,
              input_items=None, target_users=None,
              target_items=None):
    import torch
    if input_items is None:
      input_items = torch.arange(input.shape[1])
    weights = self.weights(input_items)
    return input @ (weights if target_items is None else weights[:, target_items])

"""


def snippets() -> list[str]:
    if not TUTORIAL.is_file():
        shared_data("ml-100k")  # skips (or fails under CI) with the same rule as the data
    text = TUTORIAL.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    converted = []
    for block in blocks:
        block = block.replace("from recoder.", "from recoder_dist.")
        # use_cuda=True stays: it means GPUs where present, the CPU here.
        block = block.replace("num_epochs=100", f"num_epochs={EPOCHS}")
        block = re.sub(
            r"class YourModel\(FactorizationModel\):.*?(?=\n# Load)", OWN_MODEL, block, flags=re.S
        )
        converted.append(block)
    return converted


def run(block: str, namespace: dict) -> dict:
    exec(compile(block, "<tutorial>", "exec"), namespace)
    return namespace


@pytest.mark.slow
def test_every_tutorial_snippet_runs(ray_session, tmp_path, monkeypatch):
    (
        prepare,
        autoencoder,
        factorization,
        own_model,
        save,
        continue_training,
        sampling,
        sampling_users,
        eval_while_training,
        eval_after,
    ) = snippets()
    monkeypatch.chdir(tmp_path)
    ratings = load_ml100k(shared_data("ml-100k"))
    positives = ratings[ratings.rating >= 4]
    pd.DataFrame({"user": positives.user, "item": positives.item, "score": 1.0}).to_csv(
        "train.csv", index=False
    )

    prepared = run(prepare, {})
    assert prepared["train_matrix"].shape == (942, 1447)
    # Held-out users of the same matrix for the evaluation snippets.
    split = strong_generalization_split(
        prepared["train_matrix"], num_val_users=0, num_test_users=100, seed=0
    )
    sp.save_npz("test_input.npz", split.test.interactions)
    sp.save_npz("test_target.npz", split.test.target)

    ae = run(autoencoder, {})
    assert isinstance(ae["recoder"], Recoder) and ae["recoder"].current_epoch == EPOCHS
    run(factorization, {})
    own = run(own_model, {})
    assert own["recoder"].current_epoch == EPOCHS

    # "Save your model" and the negative-sampling calls continue the autoencoder's session.
    run(save, ae)
    assert ae["recoder"].current_epoch == 2 * EPOCHS
    saved = sorted(glob.glob("models/model__epoch_*.model"))
    assert saved == [f"models/model__epoch_{2 * EPOCHS}.model"]
    shutil.copy(saved[0], "models/your_model")
    continued = run(continue_training, {})
    assert continued["recoder"].current_epoch == 3 * EPOCHS

    run(sampling, ae)
    run(sampling_users, ae)
    assert ae["recoder"].current_epoch == 4 * EPOCHS

    while_training = run(eval_while_training.replace("eval_freq=5", f"eval_freq={EPOCHS}"), {})
    last = while_training["recoder"].history[-1]
    assert {"Recall@20", "Recall@50", "NDCG@100"} <= set(last)

    after = run(eval_after, {})
    results = after["recoder"].evaluate(
        eval_dataset=after["test_dataset"], num_recommendations=100, metrics=after["metrics"]
    )
    assert results["eval_users"] == 100
    assert 0.0 < results["NDCG@100"] <= 1.0
    assert Path("item_id_map.dict").is_file()
