"""PartitionSel minibatch selection for DeepSpeed LLM training.

Data flows one way per step: pool -> sketch -> select -> train.
"""
from ds_partitionsel.budgets import allocate_budgets
from ds_partitionsel.metrics import conflicting_pairs
from ds_partitionsel.selection import METHODS, select
from ds_partitionsel.solver import Selection, partition_omp, partitionsel_terms

__version__ = "0.1.0"
__all__ = ["METHODS", "Selection", "allocate_budgets", "conflicting_pairs", "partition_omp",
           "partitionsel_terms", "select"]
