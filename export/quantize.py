"""int8 dynamic quantization of inference graphs (for devices that only predict)."""

from __future__ import annotations

from pathlib import Path


def quantize_int8(src: str | Path, dst: str | Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
