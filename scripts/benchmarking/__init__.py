"""scripts/benchmark.py's parts: cases (ours, built from the gin model files), the PyTorch
peers, timing and memory measurement, and the report (table, plot)."""
