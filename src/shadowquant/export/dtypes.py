"""mllm's tensor dtype codes (mllm/Types.hpp), their names and element sizes: one table for the model
file's writers and reader (export/mllm.py) and for what the C++ models allocate (runtimes/profiles.py).
Torch-free."""

DTYPE_FLOAT32 = 0
DTYPE_FLOAT16 = 1
DTYPE_Q4_0 = 2  # ggml blocks of 32 values in 18 bytes (decoding/q4_0.py); mllm's CPU decoding models
DTYPE_Q8_0 = 8  # ggml blocks of 32 values in 34 bytes (decoding/q8_0.py); MLLM_TYPE_Q8_0
DTYPE_INT8 = 16
DTYPE_INT16 = 17
DTYPE_INT32 = 18
# Version 2 only.
DTYPE_BFLOAT16 = 128
DTYPE_UINT8 = 129
DTYPE_UINT16 = 130
DTYPE_UINT32 = 131
DTYPE_INT64 = 132
DTYPE_UINT64 = 133

DTYPE_NAMES: dict[int, str] = {
    DTYPE_FLOAT32: "float32",
    DTYPE_FLOAT16: "float16",
    DTYPE_Q4_0: "q4_0",
    DTYPE_Q8_0: "q8_0",
    DTYPE_INT8: "int8",
    DTYPE_INT16: "int16",
    DTYPE_INT32: "int32",
    DTYPE_BFLOAT16: "bfloat16",
    DTYPE_UINT8: "uint8",
    DTYPE_UINT16: "uint16",
    DTYPE_UINT32: "uint32",
    DTYPE_INT64: "int64",
    DTYPE_UINT64: "uint64",
}

DTYPE_ITEMSIZE: dict[int, int] = {
    DTYPE_FLOAT32: 4,
    DTYPE_FLOAT16: 2,
    DTYPE_INT8: 1,
    DTYPE_INT16: 2,
    DTYPE_INT32: 4,
    DTYPE_BFLOAT16: 2,
    DTYPE_UINT8: 1,
    DTYPE_UINT16: 2,
    DTYPE_UINT32: 4,
    DTYPE_INT64: 8,
    DTYPE_UINT64: 8,
}
