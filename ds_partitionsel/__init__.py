"""PartitionSel minibatch selection for DeepSpeed LLM training.

Data flows one way per step: pool -> sketch -> select -> train.
"""
__version__ = "0.1.0"
