"""Compression beyond quantization: structured pruning and distillation of a registered
model, each variant gated against its parent and registered with lineage, and one
comparison of every variant of a version with its latency and cost.

:mod:`.pruning` removes whole hidden units (a smaller dense network); :mod:`.distillation`
trains a student on the teacher's soft targets; :mod:`.comparison` measures a version and
all its variants through the model runtime and prices them.
"""
