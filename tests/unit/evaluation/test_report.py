"""``eval report``: medians, ranges and ratios to native; latency inverted; reference columns;
JSON, text, HTML and a real matplotlib plot; bad inputs refused by name."""

from __future__ import annotations

import json

import pytest

from coreslice import cli
from coreslice.errors import UsageError
from coreslice.evaluation import report, results
from coreslice.evaluation.results import ResultSet


def rs(workload, mode, values, variant=None, metrics=None, emulated=False):
    """A result set whose i-th run has values[metric][i] for every metric."""
    metrics = metrics or {"x": {"unit": "u", "higher_is_better": True}}
    n = len(next(iter(values.values())))
    runs = [{"started": "t", "seconds": 1.0, "metrics": {m: v[i] for m, v in values.items()}} for i in range(n)]
    return ResultSet(workload, mode, variant, metrics, runs, {"emulated": emulated})


def write(d, *sets):
    for s in sets:
        results.save(d, s)


def test_medians_ranges_and_ratios_to_native(tmp_path):
    lat = {"iops": {"unit": "IOPS", "higher_is_better": True}, "p99_latency_us": {"unit": "us", "higher_is_better": False}}
    write(tmp_path / "native", rs("cpu", "native", {"x": [100.0, 90.0, 110.0]}),
          rs("storage", "native", {"iops": [1000.0, 1000.0], "p99_latency_us": [50.0, 50.0]}, metrics=lat))
    write(tmp_path / "slice", rs("cpu", "slice", {"x": [99.0, 101.0, 100.5, 80.0, 100.0]}),
          rs("storage", "slice", {"iops": [990.0, 1010.0], "p99_latency_us": [100.0, 100.0]}, metrics=lat))
    write(tmp_path / "vm", rs("cpu", "vm", {"x": [88.0]}, variant="1G"))
    sets = results.load_dirs([tmp_path])
    rows, columns = report.build(sets)
    assert columns == ["native", "slice", "vm-1G"]
    by = {r.key: r for r in rows}
    assert set(by) == {"cpu", "storage.iops", "storage.p99_latency_us"}
    cpu = by["cpu"].cells
    assert cpu["native"].median == 100.0 and cpu["native"].relative_to_native == 1.0
    assert (cpu["slice"].median, cpu["slice"].min, cpu["slice"].max, cpu["slice"].n) == (100.0, 80.0, 101.0, 5)
    assert cpu["vm-1G"].relative_to_native == 0.88
    assert by["storage.iops"].cells["slice"].relative_to_native == 1.0
    # A latency twice native's is half as good.
    assert by["storage.p99_latency_us"].cells["slice"].relative_to_native == 0.5
    doc = report.to_json(rows, columns, sets)
    assert doc["report"]["cpu"]["vm-1G"] == {"median": 88.0, "min": 88.0, "max": 88.0, "n": 1, "spread": 0.0,
                                             "relative_to_native": 0.88}
    assert doc["reference_percent_of_native"]["graph"]["vm-2M"] == 90.3
    assert doc["emulated"] is False


def test_no_native_gives_no_ratio_and_reference_rows_show_the_prototype(tmp_path):
    write(tmp_path, rs("graph", "slice", {"x": [5.0]}))
    sets = results.load_dirs([tmp_path])
    rows, columns = report.build(sets)
    assert rows[0].cells["slice"].relative_to_native is None
    text = report.text(rows, columns, sets)
    assert "100.5%" in text and "88.8%" in text  # graph's reference figures, on its row
    assert "data-serving" in text and "103.0%" in text  # reference only, no built-in workload


def test_emulated_results_are_labelled(tmp_path):
    write(tmp_path, rs("cpu", "native", {"x": [1.0]}, emulated=True), rs("cpu", "slice", {"x": [1.0]}))
    sets = results.load_dirs([tmp_path])
    rows, columns = report.build(sets)
    assert "not performance claims" in report.text(rows, columns, sets)
    assert "not performance claims" in report.html_page(rows, columns, sets)
    assert report.to_json(rows, columns, sets)["emulated"] is True


def test_cli_writes_json_html_and_a_png(tmp_path, capsys):
    write(tmp_path / "ev", rs("cpu", "native", {"x": [100.0, 100.0]}), rs("cpu", "slice", {"x": [101.0, 99.0]}),
          rs("cpu", "vm", {"x": [90.0]}, variant="2M"),
          rs("graph", "native", {"x": [10.0]}), rs("graph", "slice", {"x": [10.05]}))
    png, page, out = tmp_path / "r.png", tmp_path / "r.html", tmp_path / "r.json"
    rc = cli.main(["eval", "report", str(tmp_path / "ev"), "--plot", str(png), "--html", str(page), "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "cpu" in text and "90.0%" in text and "100.5%" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert 'src="r.png"' in page.read_text() and "<td>cpu</td>" in page.read_text()
    doc = json.loads(out.read_text())
    assert doc["report"]["graph"]["slice"]["relative_to_native"] == 1.005
    assert doc["report"]["cpu"]["vm-2M"]["relative_to_native"] == 0.9


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(UsageError, match="no eval results"):
        results.load_dirs([tmp_path])
    (tmp_path / "x.json").write_text('{"hello": 1}')  # not ours: skipped
    with pytest.raises(UsageError, match="no eval results"):
        results.load_dirs([tmp_path])
    (tmp_path / "x.json").write_text('{"schema": "coreslice-eval-1", "workload": "cpu"}')
    with pytest.raises(UsageError, match="malformed eval result"):
        results.load_dirs([tmp_path])
    (tmp_path / "x.json").unlink()
    write(tmp_path / "a", rs("cpu", "slice", {"x": [1.0]}))
    write(tmp_path / "b", rs("cpu", "slice", {"x": [2.0]}))
    with pytest.raises(UsageError, match="cpu in slice is in both"):
        results.load_dirs([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(UsageError, match="not a directory"):
        results.load_dirs([tmp_path / "nope"])
    with pytest.raises(UsageError, match="letters, digits"):
        results.check_variant("1 G")


def test_a_mode_that_reached_nothing_shows_zero_and_outputs_are_checked_first(tmp_path, capsys):
    write(tmp_path / "ev", rs("kv", "native", {"x": [1000.0]}), rs("kv", "slice", {"x": [0.0]}))
    rows, _columns = report.build(results.load_dirs([tmp_path / "ev"]))
    assert rows[0].cells["slice"].relative_to_native == 0.0
    out = tmp_path / "r.json"
    rc = cli.main(["eval", "report", str(tmp_path / "ev"), "--out", str(out), "--html", str(tmp_path / "no" / "r.html")])
    assert rc == 2 and "--html" in capsys.readouterr().err
    assert not out.exists()  # nothing written before every output was checked
