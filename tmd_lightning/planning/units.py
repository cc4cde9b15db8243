"""Byte units of the memory plan: GiB and the bytes per element of the dtypes a run holds its tensors in."""

from __future__ import annotations

from typing import Any

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a dtype given as a torch dtype or its name ("bfloat16", "torch.float32")."""
    return DTYPE_BYTES[str(dtype).removeprefix("torch.")]
