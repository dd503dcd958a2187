"""The benchmark summary's arithmetic: what it calls added latency, which RPS it compares, what a ratio
meets, and that a cell the harness skipped is reported as not measured (bench/report.py)."""

from __future__ import annotations

from typing import Any

import pytest

from bench import report


def row(target: str, mode: str, conc: int, p50: float, p99: float, rps: float, **extra: Any) -> dict[str, Any]:
    return {"target": target, "mode": mode, "conc": conc, "p50_ms": p50, "p99_ms": p99, "rps": rps,
            "requests": int(rps * 10), "ok_requests": int(rps * 10), "seconds": 10.0, "errors": 0,
            "gw_cpu_ms_per_req": 1.0, "rss_max_kb": 100 * 1024, "foreign": {"foreign_max_pct": 1.0}} | extra


def target(name: str, idle_mib: float, peak_mib: float, cold_s: float) -> dict[str, Any]:
    return {"name": name, "cold_start_s": cold_s, "rss_idle_kb": idle_mib * 1024, "rss_max_load_kb": peak_mib * 1024}


@pytest.fixture
def summary() -> dict[str, Any]:
    peer = {
        "rows": [
            row("direct", "nonstream", 1, 0.1, 0.2, 20000),
            row("direct", "nonstream", 8, 0.3, 0.5, 25000),
            row("litellm", "nonstream", 1, 10.1, 20.2, 100),
            row("litellm", "nonstream", 8, 50.3, 60.5, 150),
            row("ours-memory", "nonstream", 1, 1.1, 3.2, 600),
            # 1,400 answers in 10 s, of which 200 were errors: capacity counts the 1,200 2xx only
            row("ours-memory", "nonstream", 8, 8.3, 12.5, 1400, ok_requests=12000, errors=200, contended=True),
        ],
        "targets": [target("direct", 0, 0, 0), target("litellm", 400, 500, 4.0),
                    target("ours-memory", 150, 300, 1.2)],
        "skipped": [["ours-memory", "stream", 64, "time budget"]],
        "args": {}, "facts": {},
    }
    cold = {"ours-memory": {"median_s": 0.9, "samples_s": [0.88, 0.9, 1.6]}}
    return report.build(peer, {}, ["python", "-m", "bench.run"], cold)


def check(s: dict[str, Any], metric: str) -> dict[str, Any]:
    return next(c for c in s["vs_litellm"]["ours-memory"] if c["metric"] == metric)


def test_added_latency_is_measured_against_the_upstream_alone_at_the_same_concurrency(summary: dict) -> None:
    cell = report._find(summary["cells"], "ours-memory", "nonstream", 8)
    assert cell is not None
    assert cell["added_p50_ms"] == pytest.approx(8.0) and cell["added_p99_ms"] == pytest.approx(12.0)
    assert cell["flags"] == "*"  # contended: foreign CPU on the load generator's core
    p50 = check(summary, "added p50 ms, nonstream c=1")
    assert p50["ours"] == pytest.approx(1.0) and p50["litellm"] == pytest.approx(10.0)
    assert p50["ratio"] == pytest.approx(0.1) and p50["met"] is True  # the limit itself meets "<= 0.1"
    assert check(summary, "added p99 ms, nonstream c=1")["met"] is False  # 3.0 / 20.0 = 0.15


def test_throughput_compares_the_best_2xx_rate_of_each_over_all_concurrencies(summary: dict) -> None:
    rps = check(summary, "max 2xx RPS, nonstream")
    assert rps["ours"] == pytest.approx(1200) and rps["litellm"] == pytest.approx(150)
    assert rps["ratio"] == pytest.approx(8.0) and rps["met"] is False


def test_memory_and_the_median_cold_start_are_compared_to_the_peer(summary: dict) -> None:
    assert check(summary, "idle RSS MiB")["ratio"] == pytest.approx(150 / 400)
    assert check(summary, "peak RSS MiB")["met"] is False  # 300 / 500 = 0.6
    cold = check(summary, "cold start s")
    assert cold["ours"] == pytest.approx(0.9) and cold["ratio"] == pytest.approx(0.225) and cold["met"] is True
    assert summary["gateways"]["ours-memory"]["cold_start_harness_s"] == pytest.approx(1.2)


def test_the_summary_names_every_cell_it_did_not_measure(summary: dict) -> None:
    text = report.markdown(summary)
    assert "Not measured: ours-memory stream c=64 (time budget)." in text
    assert "| ours-memory | nonstream | 8 | 1200.0* |" in text
    assert "0.90 (median of 3: 0.88 to 1.60; harness 1.20)" in text


def test_cell_by_cell_runs_split_the_matrix_and_merge_into_one_result(tmp_path: Any) -> None:
    from bench.run import harness_runs, merged, parse

    a = parse(["--cell-by-cell", "--concurrency", "1,64"])
    runs = harness_runs(a)
    assert [(r.modes, r.concurrency) for r in runs] == [("nonstream", "1"), ("nonstream", "64"), ("stream", "1"),
                                                         ("stream", "64")]
    assert len({r.outdir for r in runs}) == 4 and all(r.max_total_s >= 180 for r in runs)
    assert [(r.modes, r.concurrency) for r in harness_runs(parse([]))] == [("nonstream,stream", "1,8,64")]

    first = {"rows": [row("litellm", "nonstream", 1, 10, 20, 100)], "skipped": [], "runtime_s": 50, "args": {},
             "facts": {}, "targets": [target("litellm", 400, 450, 4.0)]}
    second = {"rows": [row("litellm", "nonstream", 64, 50, 90, 150)], "skipped": [["litellm", "stream", 1, "x"]],
              "runtime_s": 60, "args": {}, "facts": {}, "targets": [target("litellm", 390, 520, 4.1)]}
    whole = merged([first, second])
    assert [r["conc"] for r in whole["rows"]] == [1, 64] and whole["skipped"] == [["litellm", "stream", 1, "x"]]
    assert whole["runtime_s"] == 110 and whole["harness_runs"] == 2
    (litellm,) = whole["targets"]
    assert litellm["rss_idle_kb"] == 400 * 1024 and litellm["rss_max_load_kb"] == 520 * 1024  # first; highest
    assert "Cell by cell: 2 harness runs" in report.markdown(report.build(whole, {}, ["bench"], None))
