import pytest

from lsq import METHODS, LSQError, QuantConfig, make_config


def test_presets_are_the_papers_configurations():
    assert set(METHODS) == {"lsq+", "lsq", "lsq-unsigned", "lsq-signed", "minmax"}
    plus = METHODS["lsq+"]
    assert (plus.act_mode, plus.act_init, plus.weight_init) == ("asymmetric", "mse", "3sigma")
    assert METHODS["lsq"].act_mode == "auto" and METHODS["lsq"].act_init == "lsq"
    assert METHODS["lsq-unsigned"].act_mode == "unsigned"
    assert METHODS["lsq-signed"].act_mode == "signed"
    assert not METHODS["minmax"].learnable and METHODS["minmax"].act_init == "minmax"
    assert all(c.first_last_bits == 8 for c in METHODS.values())


def test_make_config_and_round_trip():
    c = make_config("lsq", 3, 2, per_channel_weights=False)
    assert (c.method, c.w_bits, c.a_bits, c.per_channel_weights) == ("lsq", 3, 2, False)
    assert QuantConfig.from_dict(c.to_dict()) == c
    assert c.label == "lsq W3A2"
    assert c.bits_for(True) == (8, 8) and c.bits_for(False) == (3, 2)
    assert c.with_(first_last_bits=None).bits_for(True) == (3, 2)


@pytest.mark.parametrize("bits", [1, 9, 0, -3, 2.5, "4", True, None])
def test_bits_outside_2_to_8_are_refused_in_words(bits):
    with pytest.raises(LSQError, match="bits"):
        make_config("lsq+", bits, 4)
    with pytest.raises(LSQError, match="bits"):
        make_config("lsq+", 4, bits)


def test_whole_float_bits_are_accepted():
    assert make_config("lsq+", 4.0, 8.0).w_bits == 4


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"act_mode": "weird"}, "act_mode must be one of"),
        ({"act_init": "x"}, "act_init must be one of"),
        ({"weight_init": "x"}, "weight_init must be one of"),
        ({"mse_refine_steps": -1}, "mse_refine_steps"),
        ({"nonsense": 1}, "unknown config field"),
    ],
)
def test_bad_fields_are_named(kwargs, words):
    with pytest.raises(LSQError, match=words):
        make_config("lsq+", 4, 4, **kwargs)


def test_unknown_method_lists_the_choices():
    with pytest.raises(LSQError, match="lsq\\+, lsq, lsq-unsigned"):
        make_config("lsqq")
    with pytest.raises(LSQError, match="unknown config field"):
        QuantConfig.from_dict({"w_bits": 4, "colour": "red"})
