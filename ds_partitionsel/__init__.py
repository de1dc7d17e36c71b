"""PartitionSel minibatch selection for DeepSpeed LLM training.

Data flows one way per step: pool -> sketch -> select -> train.

The solver API is imported eagerly; the heavier layers load on first use:
``ds_partitionsel.initialize`` (DeepSpeed engine), ``GradientSketcher`` (hooks, transformers),
``CandidatePool`` (pool reader) and the ``distributed`` module.
"""
import importlib

from ds_partitionsel.budgets import allocate_budgets
from ds_partitionsel.metrics import conflicting_pairs
from ds_partitionsel.selection import METHODS, select, select_gram
from ds_partitionsel.solver import Selection, partition_omp, partitionsel_terms

__version__ = "0.1.0"

_LAZY = {"initialize": "ds_partitionsel.engine", "PartitionSelEngine": "ds_partitionsel.engine",
         "GradientSketcher": "ds_partitionsel.sketch", "CandidatePool": "ds_partitionsel.data",
         "distributed": "ds_partitionsel.distributed"}

__all__ = ["METHODS", "Selection", "allocate_budgets", "conflicting_pairs", "partition_omp",
           "partitionsel_terms", "select", "select_gram", *_LAZY]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'ds_partitionsel' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    return module if name == "distributed" else getattr(module, name)
