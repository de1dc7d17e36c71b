"""Run logs that stay readable and honest (issue 26, items 3 and 5).

- A torn last line of ``metrics.jsonl`` (a run killed mid-write) is cut off when the run resumes,
  with a message, so the next record starts on its own line; the reader skips a torn last line.
- A NaN or infinite loss is written as strict JSON (the strings ``"NaN"``, ``"Infinity"``,
  ``"-Infinity"``) and read back as a float; ``tools/analyze_run.py`` shows it and flags the
  run, and ``tools/experiment.py``'s aggregate says which seeds diverged.

Real files through the package's one sink and one reader (``ds_partitionsel.records``).
"""
from __future__ import annotations

import json
import math

import pytest

from ds_partitionsel.records import EvalRecord, MetricsSink, StepRecord, read_metrics
from real_pool import load_tool

analyze_run = load_tool("analyze_run")
experiment = load_tool("experiment")


def step(i: int, loss: float, method: str = "partitionsel") -> StepRecord:
    return StepRecord(step=i, method=method, train_loss=loss, lr=1e-3, pool_size=8, batch_size=2,
                      domain_counts={"code": 1, "math": 1}, utility=0.5, dropped=0, bytes_sent=0,
                      mode="replicated", time_s={"sketch": 0.1, "solve": 0.01, "comm": 0.0, "train": 0.2,
                                                 "total": 0.31})


def strict(line: str):
    """json.loads that refuses NaN/Infinity (which are not JSON)."""
    def refuse(name):
        raise ValueError(f"bare {name} is not JSON")
    return json.loads(line, parse_constant=refuse)


# ----------------------------------------------------------------------------- item 3: torn last line


def write_run(run_dir, n: int) -> None:
    sink = MetricsSink(str(run_dir), rank=0)
    for i in range(n):
        sink.emit(step(i, 2.0 - 0.1 * i))
    sink.close()


def test_resume_cuts_a_torn_last_line_and_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run, 3)
    log = run / "metrics.jsonl"
    whole = log.read_bytes()
    torn = json.dumps(step(3, 1.7).to_json()).encode()[:37]  # the run died while writing step 3
    log.write_bytes(whole + torn)

    sink = MetricsSink(str(run), rank=0, resume=True)
    err = capsys.readouterr().err
    assert f"warning: {log} ended in a torn record (the last {len(torn)} bytes, without a newline" in err
    assert "dropped that one record before appending" in err
    assert sink.torn_bytes_dropped == len(torn)
    sink.emit(step(3, 1.7))
    sink.close()
    assert log.read_bytes().startswith(whole)
    steps, _ = read_metrics(run)
    assert [s.step for s in steps] == [0, 1, 2, 3]
    assert all(strict(line) for line in log.read_text().splitlines())


def test_resume_keeps_a_whole_record_that_lacks_only_its_newline(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run, 2)
    log = run / "metrics.jsonl"
    log.write_bytes(log.read_bytes().rstrip(b"\n"))
    sink = MetricsSink(str(run), rank=0, resume=True)
    assert sink.torn_bytes_dropped == 0 and "torn" not in capsys.readouterr().err
    sink.emit(step(2, 1.8))
    sink.close()
    assert [s.step for s in read_metrics(run)[0]] == [0, 1, 2]


def test_reader_skips_a_torn_last_line_with_a_warning(tmp_path):
    run = tmp_path / "run"
    write_run(run, 2)
    log = run / "metrics.jsonl"
    log.write_bytes(log.read_bytes() + b'{"step": 2, "method": "partit')
    with pytest.warns(UserWarning, match="metrics.jsonl:3: a torn last line"):
        steps, _ = read_metrics(run)
    assert [s.step for s in steps] == [0, 1]
    # a broken line that is not the last is still an error naming it
    log.write_bytes(b'{"step": 0, "meth\n' + log.read_bytes())
    with pytest.raises(ValueError, match="metrics.jsonl:1: not a metrics record"):
        read_metrics(run)


# ----------------------------------------------------------------------------- item 5: non-finite values


def test_nonfinite_values_are_written_as_json_and_read_back(tmp_path):
    run = tmp_path / "run"
    sink = MetricsSink(str(run), rank=0)
    sink.emit(step(0, 2.0))
    sink.emit(step(1, math.nan))
    sink.emit(step(2, math.inf))
    sink.emit(EvalRecord(step=2, method="partitionsel", eval_loss={"code": math.nan, "math": -math.inf,
                                                                   "mean": math.nan}))
    sink.close()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    parsed = [strict(line) for line in lines]  # every line is JSON
    assert parsed[1]["train_loss"] == "NaN" and parsed[2]["train_loss"] == "Infinity"
    assert parsed[3]["eval_loss"] == {"code": "NaN", "math": "-Infinity", "mean": "NaN"}
    steps, evals = read_metrics(run)
    assert steps[0].train_loss == 2.0 and math.isnan(steps[1].train_loss) and steps[2].train_loss == math.inf
    assert math.isnan(evals[0].eval_loss["code"]) and evals[0].eval_loss["math"] == -math.inf
    # older logs with bare NaN still read
    (run / "old.jsonl").write_text(json.dumps(step(0, math.nan).to_json()) + "\n")
    assert math.isnan(read_metrics(run / "old.jsonl")[0][0].train_loss)


def test_summary_json_writer_is_strict_json(tmp_path):
    from ds_partitionsel.records import loads, write_json

    path = tmp_path / "summary.json"
    write_json(path, {"final_train_loss": math.nan, "steps": 3, "losses": [1.0, math.inf]})
    assert strict(path.read_text()) == {"final_train_loss": "NaN", "steps": 3, "losses": [1.0, "Infinity"]}
    back = loads(path.read_text())
    assert math.isnan(back["final_train_loss"]) and back["losses"] == [1.0, math.inf]


@pytest.fixture
def diverged(tmp_path):
    """Two runs: ``ok`` trains; ``bad`` diverges at step 6 (NaN from there, eval NaN)."""
    runs = {}
    for name, nan_from in (("ok", None), ("bad", 6)):
        run = tmp_path / name
        sink = MetricsSink(str(run), rank=0)
        for i in range(10):
            sink.emit(step(i, math.nan if nan_from is not None and i >= nan_from else 2.0 - 0.1 * i, method=name))
            if i in (4, 9):
                nan = nan_from is not None and i >= nan_from
                sink.emit(EvalRecord(step=i, method=name, eval_loss={
                    "code": math.nan if nan else 1.5, "math": 1.2, "mean": math.nan if nan else 1.35}))
        sink.close()
        runs[name] = run
    return runs


def test_analyze_run_shows_and_flags_divergence(diverged, tmp_path, capsys):
    out = tmp_path / "report"
    assert analyze_run.main([str(diverged["ok"]), str(diverged["bad"]), "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert f"warning: {diverged['bad'] / 'metrics.jsonl'}: the run diverged: train_loss is not finite from step 6 " \
           f"(4 records)" in cap.err
    assert "eval code is not finite from step 9 (1 records)" in cap.err
    assert "ok" not in cap.err.split("warning:")[-1].split(":")[0]
    summary = (out / "summary.md").read_text()
    row = next(line for line in summary.splitlines() if line.startswith("| bad"))
    assert "**(diverged: non-finite from step 6)**" in row
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "nan"  # train loss (last 10%): not the last finite loss
    assert cells[3] == "nan" and cells[4] == "1.2" and cells[5] == "nan"  # eval code, math, mean at step 9
    ok_row = next(line for line in summary.splitlines() if line.startswith("| ok"))
    assert "diverged" not in ok_row and "nan" not in ok_row
    assert "Warning: non-finite values (NaN or infinite; the run diverged)" in summary
    rows = {r["run"]: r for r in analyze_run.analyze([diverged["bad"]], tmp_path / "r2")["rows"]}
    assert rows["bad"]["non_finite"]["train_loss"] == (6, 4)


def test_experiment_aggregate_names_the_diverged_seeds(diverged):
    recs = {name: experiment.read_records(run / "metrics.jsonl") for name, run in diverged.items()}
    found = {"f12p5": {"partitionsel": {1: recs["ok"], 2: recs["bad"]}, "random": {1: recs["ok"], 2: recs["ok"]}}}
    table = experiment.aggregate(found, {})
    rows = table["f12p5"]["methods"]
    assert rows["partitionsel"]["diverged"] == {2: 6} and rows["random"]["diverged"] == {}
    assert math.isnan(rows["partitionsel"]["eval_loss"]["mean"]["mean"])  # shown, not averaged away
    md = experiment.table_markdown(table)
    line = next(x for x in md.splitlines() if x.startswith("| **partitionsel**"))
    assert "(diverged: seed 2 from step 6)" in line and "nan" in line
    assert "diverged" not in next(x for x in md.splitlines() if x.startswith("| random"))
