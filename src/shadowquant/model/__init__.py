"""The model: its family, loading, Mixtral's experts as Linears, the exact transforms, tiny test models."""
