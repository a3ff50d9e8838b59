"""LSQ+ Explorer: LSQ and LSQ+ quantization-aware training for timm image models."""

from lsq.config import METHODS, QuantConfig, make_config
from lsq.convert import float_mode, quant_layers, quantize_model
from lsq.errors import LSQError
from lsq.models import load_model
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
