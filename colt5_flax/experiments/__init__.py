"""Experiments that go beyond one training run: `small_scale` reproduces the directions of
the paper's ablations, length scaling and routing analysis on the demo's task on a CPU
(docs/small_scale.md)."""
