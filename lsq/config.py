"""QuantConfig, the vocabulary of the library, and the named method presets.

A config says how every conv/linear layer of a model is quantized: bits, the activation grid
(LSQ+ asymmetric, unsigned, signed, or chosen per layer from calibration), the initializers, and
whether ranges are learned. Presets name the configurations the paper compares.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lsq.errors import LSQError
from lsq.quantizers import check_bits

#: How activation (layer input) quantizers are built.
#: asymmetric: LSQ+ — unsigned grid [0, 2^b-1] plus a learnable continuous offset.
#: unsigned:   LSQ — [0, 2^b-1], negatives clipped to 0.
#: signed:     LSQ with a sign bit — [-2^(b-1), 2^(b-1)-1].
#: auto:       LSQ in practice — unsigned, or signed where calibration saw negative inputs.
ACT_MODES = ("asymmetric", "unsigned", "signed", "auto")

#: Activation initializers: mse (LSQ+: argmin of the quantization MSE over scale and offset),
#: lsq (2 mean|x| / sqrt(qmax)), minmax (the observed range, nothing clipped).
ACT_INITS = ("mse", "lsq", "minmax")

#: Weight initializers (per output channel when per-channel): 3sigma (LSQ+: max(|mu-3sd|,
#: |mu+3sd|) / 2^(b-1)), lsq (2 mean|w| / sqrt(qmax)), maxabs (max|w| / qmax, nothing clipped),
#: mse (argmin of the quantization MSE over the clipping range).
WEIGHT_INITS = ("3sigma", "lsq", "maxabs", "mse")

#: Weight-init choices of the app and the CLI: "auto" (the default of both), "method" (always the
#: method's own rule) or one initializer for every method.
WEIGHT_INIT_CHOICES = ("auto", "method", *WEIGHT_INITS)
#: From this many weight bits "auto" uses the MSE search: the 3-sigma and LSQ rules clip too hard
#: there (on the bundled model they halve top-1 agreement at W8).
HIGH_BITS = 6


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model. Frozen: derive variants with ``with_``."""

    method: str = "lsq+"
    w_bits: int = 4
    a_bits: int = 4
    act_mode: str = "asymmetric"
    act_init: str = "mse"
    weight_init: str = "3sigma"
    per_channel_weights: bool = True
    learnable: bool = True
    grad_scaling: bool = True
    #: Bits of the first conv and the last linear layer (weights and inputs); None: no exception.
    first_last_bits: int | None = 8
    quantize_weights: bool = True
    quantize_acts: bool = True
    fold_bn: bool = False
    #: Gradient steps that refine the MSE activation search (0: the search alone).
    mse_refine_steps: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "w_bits", check_bits(self.w_bits, "weight bits"))
        object.__setattr__(self, "a_bits", check_bits(self.a_bits, "activation bits"))
        if self.first_last_bits is not None:
            fl = check_bits(self.first_last_bits, "first/last layer bits")
            object.__setattr__(self, "first_last_bits", fl)
        _check_choice("act_mode", self.act_mode, ACT_MODES)
        _check_choice("act_init", self.act_init, ACT_INITS)
        _check_choice("weight_init", self.weight_init, WEIGHT_INITS)
        if isinstance(self.mse_refine_steps, bool) or not isinstance(self.mse_refine_steps, int):
            raise LSQError(
                f"mse_refine_steps must be a whole number, got {self.mse_refine_steps!r}"
            )
        if not 0 <= self.mse_refine_steps <= 10_000:
            raise LSQError(f"mse_refine_steps must be from 0 to 10000, got {self.mse_refine_steps}")

    def with_(self, **changes: Any) -> QuantConfig:
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise LSQError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def bits_for(self, is_first_or_last: bool) -> tuple[int, int]:
        """(weight bits, activation bits) for a layer."""
        if is_first_or_last and self.first_last_bits is not None:
            return self.first_last_bits, self.first_last_bits
        return self.w_bits, self.a_bits

    @property
    def label(self) -> str:
        """Short name for tables and run folders, e.g. ``lsq+ W4A4``."""
        w = f"W{self.w_bits}" if self.quantize_weights else "Wfp"
        a = f"A{self.a_bits}" if self.quantize_acts else "Afp"
        return f"{self.method} {w}{a}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """Rebuild from ``to_dict`` output (e.g. a run's config.json); unknown keys are an error."""
        if not isinstance(data, dict):
            raise LSQError("a quantization config must be a JSON object")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise LSQError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return cls(**data)


def _check_choice(field: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise LSQError(f"{field} must be one of {', '.join(choices)}; got {value!r}")


#: The methods the paper compares, as configs at W4A4 (change bits with ``make_config``).
METHODS: dict[str, QuantConfig] = {
    # LSQ+: asymmetric activations with a learnable offset, MSE init; weights from mean ± 3 sigma.
    "lsq+": QuantConfig("lsq+", act_mode="asymmetric", act_init="mse", weight_init="3sigma"),
    # LSQ as used in practice: unsigned inputs, signed where calibration saw negatives.
    "lsq": QuantConfig("lsq", act_mode="auto", act_init="lsq", weight_init="lsq"),
    # The paper's "LSQ clips negatives" configuration: unsigned everywhere.
    "lsq-unsigned": QuantConfig(
        "lsq-unsigned", act_mode="unsigned", act_init="lsq", weight_init="lsq"
    ),
    # LSQ spending a sign bit on every input.
    "lsq-signed": QuantConfig("lsq-signed", act_mode="signed", act_init="lsq", weight_init="lsq"),
    # Static ranges from the observed min/max; nothing learned.
    "minmax": QuantConfig(
        "minmax", act_mode="asymmetric", act_init="minmax", weight_init="maxabs", learnable=False
    ),
}


def make_config(
    method: str = "lsq+", w_bits: int = 4, a_bits: int = 4, **changes: Any
) -> QuantConfig:
    """The preset ``method`` at the given bits, with optional field changes.

    A ``weight_init`` of "auto" or "method" is resolved here (``resolve_weight_init``).
    """
    if method not in METHODS:
        raise LSQError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if changes.get("weight_init") in ("auto", "method"):
        changes["weight_init"] = resolve_weight_init(method, w_bits, changes["weight_init"])
    return METHODS[method].with_(w_bits=w_bits, a_bits=a_bits, **changes)


def resolve_weight_init(method: str, w_bits: int, choice: str = "auto") -> str:
    """The weight initializer a weight-init ``choice`` means for ``method`` at ``w_bits``.

    auto: the method's own rule below ``HIGH_BITS``, an MSE search from there; method: the
    method's own rule; anything else names the initializer itself.
    """
    _check_choice("weight init", choice, WEIGHT_INIT_CHOICES)
    if method not in METHODS:
        raise LSQError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if choice == "auto":
        return (
            "mse" if check_bits(w_bits, "weight bits") >= HIGH_BITS else METHODS[method].weight_init
        )
    if choice == "method":
        return METHODS[method].weight_init
    return choice
