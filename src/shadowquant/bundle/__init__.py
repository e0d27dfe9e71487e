"""The phone bundle: assembly, mllm tokenizer files, the C++ it ships."""
