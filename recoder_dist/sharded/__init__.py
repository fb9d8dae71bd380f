"""Hybrid parallelism's building blocks: item tables sharded by row over the ranks.

Plain torch and ``torch.distributed`` (no Ray): every item table keeps only its owner's rows
(``ownership``), made and saved shard by shard (``tables``); the encoder's pooling runs where
the rows are (``encoder``); the decoder scores each owner's items for every user of the step and
computes the loss there (``decoder``). Only dense collectives of sizes known to both sides are
used (``comm``): NCCL and gloo do all of them. ``model`` is what the sharded models share;
``autoencoder`` composes the blocks into DynamicAutoencoder's step (the dense layers
data-parallel), ``factorization`` into MatrixFactorization's (its user table sharded too);
``replicas`` shards within groups of ranks and replicates across them (the 2D layout).
"""

from recoder_dist.sharded.autoencoder import ShardedAutoencoder
from recoder_dist.sharded.decoder import sharded_loss
from recoder_dist.sharded.encoder import sharded_pooling
from recoder_dist.sharded.factorization import ShardedFactorization
from recoder_dist.sharded.model import ShardedModel
from recoder_dist.sharded.ownership import Ownership
from recoder_dist.sharded.routes import EntryRoutes, route_entries
from recoder_dist.sharded.tables import ShardedTable, reshard_rows

__all__ = [
    "EntryRoutes",
    "Ownership",
    "ShardedAutoencoder",
    "ShardedFactorization",
    "ShardedModel",
    "ShardedTable",
    "route_entries",
    "sharded_loss",
    "reshard_rows",
    "sharded_pooling",
]
