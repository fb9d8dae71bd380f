"""Named training settings: the command line's ``train --preset NAME``, in flag names.

Each preset says where it comes from; figures are in ``benchmarks/RESULTS.md``. Flags given on
the command line (or in ``--config``) override a preset's.
"""

from __future__ import annotations

# What every preset below shares: Adam at 1e-3, sparse embeddings.
_COMMON = dict(sparse=True, optimizer="adam", lr=1e-3)
# recsys-recoder 0.4.0's autoencoder: one tanh layer of 200, input noise 0.5, the multinomial loss.
_AUTOENCODER = dict(
    _COMMON, model="autoencoder", hidden=[200], activation="tanh", noise=0.5, loss="logloss"
)
_MF = dict(_COMMON, model="mf", embedding_size=200)
# MultVAE as Liang et al. 2018 train it: [600, 200], input dropout 0.5, the KL weight annealed
# to 0.2, the multinomial loss, dense tables.
_VAE = dict(
    _COMMON,
    model="vae",
    hidden=[600, 200],
    activation="tanh",
    noise=0.5,
    loss="logloss",
    sparse=False,
)

PRESETS: dict[str, dict] = {
    # recsys-recoder 0.4.0's ML-20M script: what benchmarks/parity.py trains both libraries
    # with (100 epochs; its milestones at 60% and 80% of them).
    "recoder-0.4.0": dict(
        _AUTOENCODER,
        weight_decay=2e-5,
        batch_size=500,
        negative_sampling=True,
        epochs=100,
        lr_milestones=[60, 80],
    ),
    # Gowalla (LightGCN's split), chosen on 20% of each user's training items held out
    # (benchmarks/quality.py): tied weights, every item scored, 24 epochs.
    "gowalla": dict(
        _AUTOENCODER,
        constrained=True,
        batch_size=500,
        negative_sampling=False,
        epochs=24,
    ),
    # The autoencoder on ml-1m-implicit (strong split, 600 validation users): the best of Tune
    # sweeps (tune/sweep.py; benchmarks/RESULTS.md, 2026-12-05 and 2026-12-07) by validation
    # NDCG@100: tied dense weights, every item scored, weight decay 6e-3 (L2 in Adam; AdamW's
    # decoupled decay did worse), 100 epochs of 5 steps. At EASE's level, not above it, over
    # five splits' test users (RESULTS.md, 2026-12-07, session 17).
    "ml-1m": dict(
        _AUTOENCODER,
        hidden=[600],
        constrained=True,
        sparse=False,
        weight_decay=6e-3,
        batch_size=1000,
        negative_sampling=False,
        epochs=100,
    ),
    # MultVAE on ml-1m-implicit (strong split, 600 validation users): chosen by validation
    # NDCG@100 by hand and by a Tune sweep (benchmarks/RESULTS.md, 2026-12-07), every item
    # scored, 60 epochs of 10 steps, the KL weight at its cap from step 2,000 on. Below the
    # autoencoder's `ml-1m` preset and EASE on this split.
    "vae-ml-1m": dict(
        _VAE,
        model_param={"anneal_cap": 0.2, "anneal_steps": 2000},
        batch_size=500,
        negative_sampling=False,
        epochs=60,
    ),
    # MatrixFactorization on Gowalla (LightGCN's split), chosen on 20% of each user's training
    # items held out (benchmarks/quality.py): the multinomial loss over the items of sampling
    # groups of 3,000 users, 35 epochs. Sizes are per worker, as the flags': on N workers,
    # divide batch_size and sampling_users by N to keep the same global groups.
    "mf-gowalla": dict(
        _MF,
        loss="logloss",
        batch_size=500,
        negative_sampling=True,
        sampling_users=3000,
        epochs=35,
    ),
    # MatrixFactorization on ml-1m (strong split, chosen on the 600 validation users folded in
    # by ridge regression onto the item embeddings): squared error over every item, 20 epochs.
    "mf-ml-1m": dict(
        _MF,
        loss="mse",
        batch_size=100,
        negative_sampling=False,
        epochs=20,
    ),
}


def preset(name: str) -> dict:
    """The flags of preset ``name``.

    Raises:
        ValueError: an unknown name (the known ones listed).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return dict(PRESETS[name])
