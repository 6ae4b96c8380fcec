"""llorch's server half: a model directory behind an OpenAI-compatible HTTP API on ONNX Runtime.

Never imports torch or `export`, so a serving box needs only the runtime dependencies.
"""
