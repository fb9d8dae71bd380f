"""Public datasets, their loaders, and evaluation splits written to disk by ``prepare``."""

from recoder_dist.datasets.cluster_prepare import prepare_on_cluster
from recoder_dist.datasets.events import load_events
from recoder_dist.datasets.line_format import (
    TrainTest,
    load_citeulike_a,
    load_lightgcn,
    load_train_test,
    read_counted_user_items,
    read_user_items,
)
from recoder_dist.datasets.movielens import (
    RELEASES,
    load_ml100k,
    load_movielens,
    read_ml1m_ratings,
    read_ml100k_ratings,
    read_ratings_csv,
)
from recoder_dist.datasets.prepare import (
    Prepared,
    PreparedFiles,
    StrongSplitConfig,
    WeakSplitConfig,
    load_prepared,
    open_prepared,
    prepare,
)
from recoder_dist.datasets.splits import (
    StrongSplit,
    WeakSplit,
    strong_generalization_split,
    weak_generalization_split,
)

__all__ = [
    "RELEASES",
    "Prepared",
    "PreparedFiles",
    "StrongSplit",
    "StrongSplitConfig",
    "TrainTest",
    "WeakSplit",
    "WeakSplitConfig",
    "load_citeulike_a",
    "load_events",
    "load_lightgcn",
    "load_ml100k",
    "load_movielens",
    "load_prepared",
    "load_train_test",
    "open_prepared",
    "prepare",
    "prepare_on_cluster",
    "read_counted_user_items",
    "read_ml100k_ratings",
    "read_ml1m_ratings",
    "read_ratings_csv",
    "read_user_items",
    "strong_generalization_split",
    "weak_generalization_split",
]
