"""LSQ+ Explorer: LSQ and LSQ+ quantization-aware training for timm image models."""

from lsq.config import METHODS, QuantConfig, make_config
from lsq.convert import float_mode, quant_layers, quantize_model
from lsq.errors import LSQError
from lsq.quantizers import Quantizer, fake_quantize

__all__ = [
    "METHODS",
    "LSQError",
    "QuantConfig",
    "Quantizer",
    "fake_quantize",
    "float_mode",
    "load_model",
    "make_config",
    "quant_layers",
    "quantize_model",
]


def __getattr__(name: str):
    # load_model pulls in timm and the bundled weights' package: import it only when asked for.
    if name == "load_model":
        from lsq.models import load_model

        return load_model
    raise AttributeError(f"module 'lsq' has no attribute {name!r}")
