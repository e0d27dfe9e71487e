"""The int8 export, the mllm file format and its inspector."""
