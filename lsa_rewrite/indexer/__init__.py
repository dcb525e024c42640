"""The lookahead indexer (docs/indexer.md): model, calibration dump, backbone-free training, metrics.

- ``IndexerConfig``, ``LSAIndexer``, ``check_compatible``, ``default_rank``, ``merge_indexers``, ``nearest_groups`` (``model.py``);
- ``DumpWriter``, ``CalibrationDump``, ``golden_labels`` (``dump.py``);
- ``train_indexer`` (``train.py``), ``SelectionMetrics`` (``metrics.py``).

Importing this package (or any of the modules above) imports torch and safetensors only: training
must run where the model cannot be loaded. Modules that run the model (calibration) are not imported
here.

Example::

    >>> from lsa_rewrite.indexer import train_indexer
    >>> indexer, metrics = train_indexer("dump/", out="indexer.safetensors")
"""

from .dump import CalibrationDump, DumpWriter, default_min_layers, golden_labels, label_rule
from .metrics import BUDGETS, SelectionMetrics
from .model import IndexerConfig, LSAIndexer, check_compatible, default_rank, merge_indexers, nearest_groups
from .train import train_indexer

__all__ = [
    "BUDGETS",
    "CalibrationDump",
    "DumpWriter",
    "IndexerConfig",
    "LSAIndexer",
    "SelectionMetrics",
    "check_compatible",
    "default_min_layers",
    "default_rank",
    "golden_labels",
    "label_rule",
    "merge_indexers",
    "nearest_groups",
    "train_indexer",
]
