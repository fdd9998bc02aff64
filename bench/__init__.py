"""distgan's benchmark: `python -m bench` measures the data pipeline, the training step and
inference against plain PyTorch references, side by side in one run (bench/README.md)."""
