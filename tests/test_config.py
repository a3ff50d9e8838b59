import dataclasses

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


@pytest.mark.parametrize(
    "method, w_bits, choice, expected",
    [
        ("lsq+", 8, "auto", "mse"),
        ("lsq+", 6, "auto", "mse"),
        ("lsq+", 5, "auto", "3sigma"),
        ("lsq", 4, "auto", "lsq"),
        ("minmax", 2, "auto", "maxabs"),
        ("lsq+", 8, "method", "3sigma"),
        ("lsq", 3, "maxabs", "maxabs"),
    ],
)
def test_weight_init_auto_is_the_methods_rule_below_6_bits_and_mse_from_6(
    method, w_bits, choice, expected
):
    from lsq.config import make_config, resolve_weight_init

    assert resolve_weight_init(method, w_bits, choice) == expected
    assert make_config(method, w_bits, 4, weight_init=choice).weight_init == expected


def test_the_cli_and_the_app_build_the_same_config_for_the_same_bits():
    from lsq.cli import build_parser, run_config
    from lsq.explorer import Settings

    for w, a in [(8, 4), (4, 4), (6, 3)]:
        for method in ("lsq+", "lsq", "minmax"):
            args = build_parser().parse_args(
                ["run", "--method", method, "--w-bits", str(w), "--a-bits", str(a)]
            )
            app = Settings(w_bits=w, a_bits=a, methods=(method,)).config(method)
            assert run_config(args) == app, (method, w, a)


def test_the_cli_maps_each_training_option_to_its_own_field():
    """``lsq run``'s options become the TrainConfig the run trains with: with no option, the
    defaults (those the Train page starts from); each rate to its own field (a swap fails)."""
    from lsq.cli import build_parser, train_config
    from lsq.train import TrainConfig

    default = TrainConfig()
    got = train_config(build_parser().parse_args(["run"]), default.steps)
    assert dataclasses.replace(got, device=default.device) == default
    args = ["run", "--lr", "0.5", "--lr-act", "0.25", "--lr-wq", "0.125", "--batch-size", "3"]
    got = train_config(build_parser().parse_args([*args, "--seed", "7"]), 9)
    assert (got.lr_weights, got.lr_act_quant, got.lr_weight_quant) == (0.5, 0.25, 0.125)
    assert (got.batch_size, got.seed, got.steps) == (3, 7, 9)


@pytest.mark.parametrize(
    "value, lo, hi, expected",
    [(3, 1, 5, 3), (4.0, None, None, 4), (0, 0, None, 0), (10, None, 10, 10)],
)
def test_whole_number_accepts(value, lo, hi, expected):
    from lsq.validate import whole_number

    got = whole_number(value, "n", lo, hi)
    assert got == expected and type(got) is int


@pytest.mark.parametrize(
    "value, lo, hi, words",
    [
        (True, None, None, "n must be a whole number, got True"),
        (2.5, 1, 5, "n must be a whole number from 1 to 5, got 2.5"),
        ("3", 1, None, "n must be a whole number of at least 1, got '3'"),
        (0, 1, 5, "from 1 to 5, got 0"),
        (6, 1, 5, "from 1 to 5, got 6"),
        (11, None, 10, "of at most 10, got 11"),
    ],
)
def test_whole_number_refuses_in_words(value, lo, hi, words):
    from lsq.validate import whole_number

    with pytest.raises(LSQError) as caught:
        whole_number(value, "n", lo, hi)
    assert words in str(caught.value)


@pytest.mark.parametrize(
    "value, lo, hi, words",
    [
        (True, 0, 1, "x must be a finite number, got True"),
        (float("nan"), 0, 1, "x must be a finite number, got nan"),
        (float("inf"), None, None, "x must be a finite number, got inf"),
        ("0.1", 0, 1, "x must be a finite number, got '0.1'"),
        (-1e-9, 0, 1e6, "x must be from 0 to 1e+06, got -1e-09"),
        (1.5, 0, 1, "x must be from 0 to 1, got 1.5"),
        (-2, 0, None, "x must be at least 0, got -2"),
        (3, None, 2, "x must be at most 2, got 3"),
    ],
)
def test_finite_number_refuses_in_words(value, lo, hi, words):
    from lsq.validate import finite_number

    with pytest.raises(LSQError) as caught:
        finite_number(value, "x", lo, hi)
    assert str(caught.value) == words
    for ok in (0, 0.5, 1):  # inside the bounds, unchanged
        assert finite_number(ok, "x", 0, 1) is ok
