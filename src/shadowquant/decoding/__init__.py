"""The CPU decoding model: ggml blocks, importance-weighted rounding, its weights, CPU numerics, candidates."""
