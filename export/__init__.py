"""llorch's exporter: Llama-family checkpoints → ONNX model directories (never torch)."""

__version__ = "0.1.0"
