"""distgan: distributed DCGAN training for faces, with ONNX export."""

__version__ = "0.1.0"
