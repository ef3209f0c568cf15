"""Runtimes the exported graphs run on: ONNX Runtime (here, on CPU) and TensorRT (on a GPU)."""
