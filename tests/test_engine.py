"""Calibration statistics, the QAT loop and the analysis on toy networks with known inputs."""

import math

import pytest
import torch
from helpers import Toy

from lsq import LSQError, make_config, quantize_model
from lsq.analysis import layer_table, model_metrics, sensitivity
from lsq.calibrate import ActStats, calibrate, collect_stats
from lsq.convert import quant_layers
from lsq.metrics import sqnr_db
from lsq.train import TrainConfig, train


def toy_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g) * 2 + 1  # N(1, 2): a known input distribution


def test_calibration_records_min_max_histogram_and_negative_fraction():
    torch.manual_seed(0)
    model = Toy().eval()
    quantize_model(model, make_config("lsq+", 4, 4))
    data = toy_data()
    stats = collect_stats(model, data.split(16))
    st = stats["conv1"]
    assert st.min == float(data.min()) and st.max == float(data.max())
    assert st.count == data.numel()
    assert st.negative_fraction == pytest.approx(float((data < 0).float().mean()))
    assert st.mean == pytest.approx(float(data.mean()), abs=1e-5)
    # Histogram counts every value once, over a range that covers all of them.
    assert float(st.hist.sum()) == data.numel()
    edges = st.hist_edges()
    assert float(edges[0]) <= st.min and float(edges[-1]) >= st.max
    centers = (edges[:-1] + edges[1:]) / 2
    hist_mean = float((centers * st.hist).sum() / st.hist.sum())
    assert hist_mean == pytest.approx(1.0, abs=0.15)
    # conv2 sees ReLU outputs: nothing negative.
    assert stats["conv2"].min >= 0 and stats["conv2"].negative_fraction == 0


def test_histogram_range_grows_and_stays_exact():
    st = ActStats()
    gen = torch.Generator().manual_seed(0)
    parts = [torch.rand(1000) * 0.1, torch.rand(1000) * 50 - 60, torch.rand(1000) * 300]
    for p in parts:
        st.update(p, gen)
    allv = torch.cat(parts)
    assert float(st.hist.sum()) == allv.numel()
    edges = st.hist_edges()
    assert float(edges[0]) <= float(allv.min()) and float(edges[-1]) >= float(allv.max())
    # Counts per bin equal a histogram computed on all data at once with the final edges.
    idx = torch.bucketize(allv.double(), edges[1:-1], right=True)
    expected = torch.bincount(idx, minlength=len(edges) - 1).double()
    assert (expected - st.hist).abs().sum() <= 4  # values exactly on an edge may fall either side


def test_sample_stays_within_its_memory_bound_and_is_uniform():
    st = ActStats(sample_size=10_000)
    gen = torch.Generator().manual_seed(0)
    for i in range(20):
        st.update(torch.full((50_000,), float(i)), gen)
    assert st.sample.numel() <= 10_000
    # Each of the 20 batches holds 1/20 of the data and of the sample (uniform over all seen).
    counts = torch.bincount(st.sample.long(), minlength=20).float() / st.sample.numel()
    assert counts.min() > 0.03 and counts.max() < 0.07


def test_lsq_auto_mode_picks_signed_where_inputs_go_negative():
    torch.manual_seed(0)
    model = Toy().eval()
    quantize_model(model, make_config("lsq", 4, 4))
    _, report = calibrate(model, toy_data().split(32), make_config("lsq", 4, 4))
    by_name = {r.name: r for r in report}
    assert by_name["conv1"].signed and not by_name["conv2"].signed
    assert all(math.isfinite(r.mse) for r in report)


def test_nan_input_is_refused_in_words():
    model = Toy().eval()
    quantize_model(model, make_config())
    x = toy_data()
    x[0, 0, 0, 0] = math.nan
    with pytest.raises(LSQError, match="NaN"):
        collect_stats(model, [x])


def small_setup(method="lsq+", bits=3, seed=0):
    torch.manual_seed(seed)
    teacher = Toy().eval()
    model = Toy().eval()
    model.load_state_dict(teacher.state_dict())
    cfg = make_config(method, bits, bits, first_last_bits=None)
    quantize_model(model, cfg)
    data = toy_data(64, seed)
    calibrate(model, data.split(32), cfg)
    return teacher, model, data, toy_data(32, seed + 100)


def test_short_qat_lowers_the_distillation_loss_and_moves_the_quantizers():
    teacher, model, train_views, eval_views = small_setup()
    before = {n: float(q.input_quant.scale.detach()) for n, q in quant_layers(model).items()}
    offsets = {n: float(q.input_quant.offset.detach()) for n, q in quant_layers(model).items()}
    cfg = TrainConfig(steps=40, batch_size=32, lr_weights=1e-3, lr_act_quant=1e-2, eval_every=40)
    events = list(train(model, teacher, train_views, eval_views, cfg))
    steps = [e for e in events if e.kind == "step"]
    assert events[-1].kind == "done" and len(steps) == 40
    first = sum(e.loss for e in steps[:5]) / 5
    last = sum(e.loss for e in steps[-5:]) / 5
    assert last < first
    after = {n: float(q.input_quant.scale.detach()) for n, q in quant_layers(model).items()}
    assert any(after[n] != before[n] for n in before)
    assert any(
        float(q.input_quant.offset.detach()) != offsets[n] for n, q in quant_layers(model).items()
    )
    assert steps[-1].agreement is not None and set(steps[-1].quantizers) == set(before)


def test_a_nan_loss_stops_with_a_message_and_keeps_the_last_good_state():
    teacher, model, train_views, eval_views = small_setup()
    cfg = TrainConfig(steps=10, batch_size=32, eval_every=100)
    gen = train(model, teacher, train_views, eval_views, cfg)
    events = [next(gen), next(gen), next(gen)]  # eval at 0, steps 1 and 2
    assert [e.kind for e in events] == ["eval", "step", "step"]
    good = {k: v.clone() for k, v in model.state_dict().items()}
    # Sabotage: the next update produces NaN weights, so the loss after it is NaN.
    for p in model.parameters():
        if p.requires_grad and p.grad is not None:
            p.grad.fill_(math.nan)
    with torch.no_grad():
        model.fc.layer.weight.fill_(math.nan)
    rest = list(gen)
    assert rest[-1].kind == "error" and "last good state" in rest[-1].message
    state = model.state_dict()
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    # The sabotaged (NaN) weight was replaced by the state before the last good update.
    assert torch.isfinite(model.fc.layer.weight).all()
    assert not torch.equal(state["fc.layer.weight"], good["fc.layer.weight"])
    assert torch.isfinite(model(eval_views)).all()


def test_stop_between_steps():
    teacher, model, train_views, eval_views = small_setup()
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3

    events = list(
        train(model, teacher, train_views, eval_views, TrainConfig(steps=50), should_stop=stop)
    )
    assert events[-1].kind == "stopped" and events[-1].step == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": 0},
        {"steps": -5},
        {"batch_size": 0},
        {"lr_weights": math.nan},
        {"optimizer": "rmsprop"},
        {"device": "tpu"},
    ],
)
def test_bad_training_settings_are_refused(kwargs):
    with pytest.raises(LSQError):
        TrainConfig(**kwargs)


def test_analysis_ranks_a_layer_with_a_bad_range_worst():
    teacher, model, train_views, eval_views = small_setup("lsq+", 4)
    layers = quant_layers(model)
    collect = collect_stats(model, train_views.split(32))
    # Sabotage conv2's input range: a tiny range clips almost everything.
    layers["conv2"].input_quant.set_range(torch.tensor(1e-4), torch.tensor(0.0))
    table = layer_table(model, collect, eval_views)
    worst = table.sort_values("input_sqnr_db").iloc[0]
    assert worst["layer"] == "conv2"
    others = table[table.layer != "conv2"]
    assert worst["clipped_above"] > 0.3 > others["clipped_above"].max()
    assert set(table.columns) >= {"weight_sqnr_db", "output_sqnr_db", "negative_fraction"}
    # The same outputs on the training views, as their own column: the table of those views.
    both = layer_table(model, collect, eval_views, calib_views=train_views[:16])
    own = layer_table(model, collect, train_views[:16])
    assert both["calib_output_sqnr_db"].tolist() == own["output_sqnr_db"].tolist()
    assert both["output_sqnr_db"].tolist() == table["output_sqnr_db"].tolist()
    assert (both["calib_output_sqnr_db"] != both["output_sqnr_db"]).any()
    t_logits = teacher(eval_views).detach()
    sens = sensitivity(model, eval_views, t_logits, by="layer")
    acts = sens[sens.part == "activations"].sort_values("kl", ascending=False)
    assert acts.iloc[0]["unit"] == "conv2"


def test_model_metrics_against_known_answers():
    """Agreement, confident agreement, KL and logit SQNR on logits whose answers are known."""
    torch.manual_seed(0)
    model = Toy().eval()
    views = toy_data(8)
    with torch.no_grad():
        own = model(views)
    same = model_metrics(model, views, own)
    assert same["agreement"] == 1.0 and same["logit_sqnr_db"] == math.inf
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["views"] == 8.0
    # A teacher that is confident (top probability ~1) on a class the model never picks, on
    # views 0..2, and agrees (confidently) with the model's top-1 on the other five.
    top = own.argmax(-1)
    teacher = torch.zeros_like(own)
    teacher[torch.arange(8), top] = 50.0
    wrong = (top[:3] + 1) % own.shape[1]
    teacher[:3] = 0.0
    teacher[torch.arange(3), wrong] = 50.0
    m = model_metrics(model, views, teacher)
    assert m["agreement"] == 5 / 8 and m["confident_agreement"] == 5 / 8
    expected_kl = torch.nn.functional.kl_div(
        own.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    assert m["kl"] == pytest.approx(float(expected_kl), rel=1e-5)
    # Unsure teacher views (top probability < 0.5) are left out of confident agreement.
    unsure = teacher.clone()
    unsure[:3] = 0.0
    assert model_metrics(model, views, unsure)["confident_agreement"] == 1.0


def test_sqnr():
    x = torch.tensor([1.0, 2.0, 3.0])
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, x * 1.1) == pytest.approx(20.0)
    assert sqnr_db(x, torch.zeros(3)) == pytest.approx(0.0)  # noise as large as the signal
    assert sqnr_db(torch.zeros(3), x) == -math.inf
