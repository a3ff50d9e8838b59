"""`python -m lsq doctor`: on the CPU, at the tiny size, every path is ok and the table names
each one; a path that raises is its own row (the exception's first line) with exit status 1,
and the paths after it still run; `--device cuda` without a GPU is one line and exit status 2;
the default flow is the app's "Run the default".
"""

import pytest
import torch

import lsq.doctor as doctor
from lsq.cli import main
from lsq.config import make_config, resolve_weight_init


def table_rows(out: str) -> dict[str, list[str]]:
    """The doctor's table: path -> [status, seconds, notes]."""
    rows = {}
    for line in out.splitlines():
        if line.startswith("| ") and not line.startswith("| path |"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow  # every path at the tiny size, two torchrun commands: ~40 s on 2 cores
def test_every_path_is_ok_on_the_cpu_at_the_tiny_size(capsys):
    assert main(["doctor", "--device", "cpu", "--tiny"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    threads = torch.get_num_threads()
    assert out.startswith(f"lsq doctor: cpu, {threads} thread{'s' * (threads > 1)}, torch ")
    rows = table_rows(out)
    assert list(rows) == list(doctor.PATHS)
    for path, (status, seconds, notes) in rows.items():
        assert status == "ok", (path, status)
        assert float(seconds) > 0 and notes, path
    assert "lsq+ " in rows["default flow"][2] and "minmax " in rows["default flow"][2]
    assert "QAT steps: agreement" in rows["low-bit recipe"][2]
    assert "ONNX Runtime vs fake-quant on 8 views" in rows["export"][2]
    assert "killed after the step-2 checkpoint, resumed to step 4" in rows[doctor.PATHS[3]][2]
    assert "QAT step vs float step (test_efficientnet, batch 4, 64 px, fp32): float " in out
    assert "peak GPU memory: - (cpu)" in out
    assert out.rstrip().splitlines()[-1].endswith("s: every path ok")
    assert "[5/5] QAT step vs float step: ok" in captured.err  # progress goes to stderr


def test_a_path_that_raises_is_its_row_and_the_others_still_run(monkeypatch, capsys):
    """Every path replaced by a stand-in; the export raises: its row carries the exception's
    first line, the torchrun and step-time paths after it still run, exit status 1."""
    ran = []

    def stand_in(name):
        def check(self):
            ran.append(name)
            if name == "export":
                raise RuntimeError("the exporter broke | here\nsecond line, not shown")
            return f"{name} fine"

        return check

    for name in doctor.METHODS.values():
        monkeypatch.setattr(doctor.Checks, name, stand_in(name))
    assert main(["doctor", "--device", "cpu"]) == 1  # cpu: the tiny size without --tiny
    out = capsys.readouterr().out
    assert ran == list(doctor.METHODS.values())
    rows = table_rows(out)
    assert list(rows) == list(doctor.PATHS)
    assert rows["export"][0] == "failed: RuntimeError: the exporter broke \\| here"
    assert "second line" not in out
    for path in doctor.PATHS:
        if path != "export":
            assert rows[path][0] == "ok" and rows[path][2] == f"{doctor.METHODS[path]} fine"
    assert out.rstrip().splitlines()[-1].endswith("s: some path failed")

    # The step-time path failing leaves its lines as dashes; an LSQError is its own words.
    def no_steps(self):
        raise doctor.LSQError("no time to measure")

    monkeypatch.setattr(doctor.Checks, "export", stand_in("fine export"))
    monkeypatch.setattr(doctor.Checks, "step_times", no_steps)
    assert main(["doctor", "--device", "cpu", "--tiny"]) == 1
    out = capsys.readouterr().out
    assert table_rows(out)["QAT step vs float step"][0] == "failed: no time to measure"
    assert "QAT step vs float step: - (the path failed)\npeak GPU memory: -\n" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_one_line_and_exit_status_2(capsys):
    assert main(["doctor", "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before any work
    err = captured.err.strip()
    assert err == "error: device 'cuda' was asked for, but no CUDA GPU is available; use cpu"


def test_the_default_flow_is_the_apps_run_the_default():
    from lsq.explorer import Settings

    app = Settings()
    assert app.methods == doctor.DEFAULT_METHODS
    assert (app.w_bits, app.a_bits) == doctor.DEFAULT_BITS
    assert app.data == doctor.FULL.data and app.model == doctor.ModelSpec()
    w = app.w_bits
    for m in app.methods:
        assert app.config(m) == make_config(m, w, app.a_bits, weight_init=resolve_weight_init(m, w))


def test_markdown_table_keeps_each_row_on_one_line():
    text = doctor.markdown_table(["a", "b"], [["x|y", "two\nlines"], [1.5, ""]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | two lines |", "| 1.5 |  |"]
