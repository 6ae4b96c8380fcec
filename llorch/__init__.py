"""llorch: an OpenAI-compatible LLM server on ONNX Runtime, with a torch-free exporter."""

__version__ = "0.1.0"
