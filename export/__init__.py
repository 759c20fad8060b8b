"""Host side: Hugging Face model -> emulator -> PEFT -> ONNX Runtime training artifacts -> device bundle."""

from export.api import build_peft_model, export_bundle
from export.config import EmulatorConfig, ExportConfig
from export.errors import ExportError

__all__ = ["EmulatorConfig", "ExportConfig", "ExportError", "build_peft_model", "export_bundle"]
