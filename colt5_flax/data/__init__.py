"""Data: seqio tasks (SCROLLS, UL2 pretraining, the synthetic retrieval task), the SCROLLS
metrics and the vocabularies.

Importing this package (or `colt5_flax.data.tasks`) registers the tasks; see `tasks` for
their names. Registration reads no file and touches no network.
"""

from colt5_flax.data import metrics, scrolls, synthetic, tasks, ul2, vocabularies
from colt5_flax.data.metrics import scrolls_metric
from colt5_flax.data.synthetic import register_synthetic_task, relevant_mask_for
from colt5_flax.data.tasks import (
    EncDecFeatureConverterWithPassthrough,
    get_task,
    registered_task_names,
)
from colt5_flax.data.vocabularies import get_vocabulary

__all__ = [
    "EncDecFeatureConverterWithPassthrough",
    "get_task",
    "get_vocabulary",
    "metrics",
    "register_synthetic_task",
    "registered_task_names",
    "relevant_mask_for",
    "scrolls",
    "scrolls_metric",
    "synthetic",
    "tasks",
    "ul2",
    "vocabularies",
]
