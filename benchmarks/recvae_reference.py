"""RecVAE (Shenbin et al., "RecVAE: a New Variational Autoencoder for Top-N Recommendations
with Implicit Feedback", WSDM 2020) in plain torch, against EASE on ml-1m's strong splits.

Not a recoder_dist model: a reference that tells whether the model family is worth building
into the framework to pass EASE on ml-1m (issue #33), where the DynamicAutoencoder and MultVAE
reach EASE's level and no further. The authors' recipe: an encoder of five dense layers of 600
(swish, layer norm, each layer fed the sum of the ones before), a code of 200, a linear decoder,
the multinomial likelihood; the KL term against a composite prior (N(0, I), the encoder's
posterior of the last epoch and a wide N(0, e^10), weights 3/20, 3/4, 1/10), weighted by
``gamma`` times the user's number of items; Adam at 5e-4, batches of 500, and each epoch three
passes updating the encoder (input dropout 0.5) then one updating the decoder (no dropout).
The epoch kept is the one with the best validation NDCG@100. ``--prior standard`` puts N(0, I)
in place of the composite prior (an ablation).

    python benchmarks/recvae_reference.py --splits 5 --jobs 2

It prints, for each split (the seeds of ``quality.py --splits``), EASE's and RecVAE's test
NDCG@100 and RecVAE's mean difference from EASE over all splits' test users, paired by user.
"""

from __future__ import annotations

import argparse
import copy
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import markdown_table
from quality import EASE_LAMBDA, ml1m_matrix, ml1m_split, paired_difference, per_user
from torch import nn

from recoder_dist.baselines import EASE
from recoder_dist.metrics import NDCG

REPO = Path(__file__).resolve().parent.parent
PRIOR_WEIGHTS = (3 / 20, 3 / 4, 1 / 10)  # N(0, I), the last epoch's posterior, N(0, e^10)


def log_normal(z, mean, log_var):
    return -0.5 * (log_var + np.log(2 * np.pi) + (z - mean).pow(2) / log_var.exp())


class Encoder(nn.Module):
    def __init__(self, num_items: int, hidden: int, latent: int):
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.Linear(num_items, hidden)] + [nn.Linear(hidden, hidden) for _ in range(4)]
        )
        self.norms = nn.ModuleList(nn.LayerNorm(hidden, eps=0.1) for _ in range(5))
        self.mean, self.log_var = nn.Linear(hidden, latent), nn.Linear(hidden, latent)

    def forward(self, rows, dropout: float):
        h = F.dropout(F.normalize(rows, dim=1), p=dropout, training=self.training)
        outputs = []
        for layer, norm in zip(self.layers, self.norms):
            h = layer(h) + sum(outputs)  # the first layer has no earlier output to add
            outputs.append(norm(h * torch.sigmoid(h)))
            h = outputs[-1]
        return self.mean(h), self.log_var(h)


class RecVAE(nn.Module):
    def __init__(self, num_items: int, hidden: int = 600, latent: int = 200, prior="composite"):
        super().__init__()
        self.composite = prior == "composite"
        self.encoder = Encoder(num_items, hidden, latent)
        self.old_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.decoder = nn.Linear(latent, num_items)

    def forward(self, rows, dropout: float = 0.0):
        mean, log_var = self.encoder(rows, dropout)
        if not self.training:
            return self.decoder(mean), None
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        return self.decoder(z), (z, mean, log_var)

    def loss(self, rows, gamma: float, dropout: float):
        logits, (z, mean, log_var) = self(rows, dropout)
        likelihood = (F.log_softmax(logits, dim=1) * rows).sum(1)
        zero = torch.zeros_like(z)
        kl = (log_normal(z, mean, log_var) - self.log_prior(rows, z, zero)).sum(1)
        return (kl * gamma * rows.sum(1) - likelihood).mean()

    def log_prior(self, rows, z, zero):
        if not self.composite:
            return log_normal(z, zero, zero)
        old_mean, old_log_var = self.old_encoder(rows, 0.0)
        return torch.logsumexp(
            torch.stack(
                [
                    log_normal(z, zero, zero) + np.log(PRIOR_WEIGHTS[0]),
                    log_normal(z, old_mean, old_log_var) + np.log(PRIOR_WEIGHTS[1]),
                    log_normal(z, zero, zero + 10) + np.log(PRIOR_WEIGHTS[2]),
                ]
            ),
            dim=0,
        )


def train_and_score(split_seed: int, epochs: int, gamma: float, lr: float, seed: int, prior: str):
    """One split: EASE's and the best-on-validation RecVAE's per-user test NDCG@100."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    generator = np.random.default_rng(seed)
    split = ml1m_split(ml1m_matrix(REPO.parent / "shared" / "data"), split_seed)
    train = split.train.interactions.astype(np.float32)
    train.data[:] = 1.0
    metric = NDCG(100)
    ease = per_user(EASE(EASE_LAMBDA).fit(train).scores, split.test, metric)

    model = RecVAE(train.shape[1], prior=prior)
    encoder = torch.optim.Adam(model.encoder.parameters(), lr=lr)
    decoder = torch.optim.Adam(model.decoder.parameters(), lr=lr)

    def one_pass(optimizer, dropout):
        model.train()
        order = generator.permutation(train.shape[0])
        for start in range(0, len(order), 500):
            rows = torch.from_numpy(train[order[start : start + 500]].toarray())
            optimizer.zero_grad()
            model.loss(rows, gamma, dropout).backward()
            optimizer.step()

    def scores(rows):
        model.eval()
        with torch.no_grad():
            dense = torch.from_numpy((rows.toarray() > 0).astype(np.float32))
            return model(dense)[0].numpy()

    best, best_state, started = -1.0, None, time.perf_counter()
    for _ in range(epochs):
        for _ in range(3):
            one_pass(encoder, 0.5)
        model.old_encoder.load_state_dict(model.encoder.state_dict())
        one_pass(decoder, 0.0)
        validation = per_user(scores, split.validation, metric).mean()
        if validation > best:
            best, best_state = validation, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return ease, per_user(scores, split.test, metric), best, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--gamma", type=float, default=0.005)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prior", default="composite", choices=["composite", "standard"])
    parser.add_argument("--jobs", type=int, default=1, help="splits trained at once")
    args = parser.parse_args()
    runs = [
        (s, args.epochs, args.gamma, args.lr, args.seed, args.prior) for s in range(args.splits)
    ]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(train_and_score, *zip(*runs)))
    lines, differences = [], []
    for split_seed, (ease, recvae, validation, seconds) in enumerate(results):
        differences.append(recvae - ease)
        lines.append([split_seed, "EASE", f"{ease.mean():.4f}", "", "", ""])
        change = f"{(recvae - ease).mean():+.4f}"
        row = [split_seed, "RecVAE", f"{recvae.mean():.4f}", change, f"{validation:.4f}"]
        lines.append([*row, f"{seconds:.1f}"])
    lines.append(["all", "RecVAE", "", paired_difference(differences), "", ""])
    header = ["split", "model", "NDCG@100", "minus EASE", "validation", "train s"]
    print(markdown_table(header, lines))


if __name__ == "__main__":
    main()
