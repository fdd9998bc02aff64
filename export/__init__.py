"""Export the trained generator to ONNX, and run it anywhere with onnxruntime.

`python -m export onnx` (needs torch), `python -m export generate` (onnxruntime, numpy and Pillow
only), `python -m export bench` (onnxruntime vs PyTorch).
"""
