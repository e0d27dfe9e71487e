"""Shadow-outlier W8A8 quantization of causal LMs for the mllm QNN backend."""

__version__ = "0.1.0"
