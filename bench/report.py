"""Turn the harness's results.json and the in-process numbers into the summary: cells, process facts, ratios.

Targets from the issue, checked per store (and for the relay floor, to show what the stack alone reaches)
against LiteLLM measured in the same run:
added latency <= 1/10 of LiteLLM's, RPS >= 10x, memory <= 1/2, cold start <= 1/4.
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import subprocess
import time
from typing import Any

from bench.services import ROOT

Row = dict[str, Any]


def build(peer: dict[str, Any], inprocess: dict[str, Any], command: list[str],
          cold: dict[str, Any] | None = None) -> dict[str, Any]:
    """``cold``: bench.coldstart's medians; where present they replace the harness's single sample."""
    rows: list[Row] = peer["rows"]
    targets = {t["name"]: t for t in peer["targets"]}
    direct = {(r["mode"], r["conc"]): r for r in rows if r["target"] == "direct"}
    cells = [_cell(r, direct.get((r["mode"], r["conc"]))) for r in rows]
    gateways = {name: _process(t) for name, t in targets.items() if name != "direct"}
    for name, c in (cold or {}).items():
        if name in gateways:
            gateways[name] |= {"cold_start_harness_s": gateways[name]["cold_start_s"], "cold_start_s": c["median_s"],
                               "cold_starts_s": c["samples_s"]}
    ours = [n for n in gateways if n.startswith("ours-")]
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(command),
        "harness_outdir_stamp": peer.get("stamp"), "pinning": peer.get("pinning"),
        "facts": peer["facts"] | _our_versions(), "harness_args": peer["args"],
        "cells": cells, "gateways": gateways,
        "vs_litellm": {n: _targets_check(n, cells, gateways) for n in [*ours, "relay-floor"]
                       if "litellm" in gateways and n in gateways},
        "vs_floor": {n: _floor(n, cells, "passthru") for n in ours if "passthru" in gateways},
        "vs_relay_floor": {n: _floor(n, cells, "relay-floor") for n in ours if "relay-floor" in gateways},
        "inprocess": inprocess, "skipped": peer.get("skipped"), "runtime_s": peer.get("runtime_s"),
        "harness_runs": peer.get("harness_runs", 1),
    }


def _cell(r: Row, d: Row | None) -> Row:
    ok_rps = r.get("ok_requests", r["requests"]) / r["seconds"] if r["seconds"] else 0.0
    return {
        "target": r["target"], "mode": r["mode"], "conc": r["conc"], "rps": r["rps"], "ok_rps": ok_rps,
        "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "errors": r["errors"],
        "added_p50_ms": r["p50_ms"] - d["p50_ms"] if d and r is not d else None,
        "added_p99_ms": r["p99_ms"] - d["p99_ms"] if d and r is not d else None,
        "cpu_ms_per_req": r.get("gw_cpu_ms_per_req"), "peak_rss_mib": (r.get("rss_max_kb") or 0) / 1024 or None,
        "core_busy_pct": r.get("core_busy_pct"), "foreign_max_pct": r["foreign"]["foreign_max_pct"],
        "flags": ("*" if r.get("contended") else "") + ("!" if r.get("stalled") else ""),
        "attempts": r.get("attempts", 1),
    }


def _process(t: dict[str, Any]) -> Row:
    mib = 1 / 1024
    return {"cold_start_s": t.get("cold_start_s"), "idle_rss_mib": (t.get("rss_idle_kb") or 0) * mib or None,
            "peak_rss_mib": (t.get("rss_max_load_kb") or 0) * mib or None,
            "rss_after_mib": (t.get("rss_after_kb") or 0) * mib or None,
            "self_reported_overhead_ms": t.get("self_reported_overhead_ms"), "validation": t.get("validation")}


def _find(cells: list[Row], target: str, mode: str, conc: int) -> Row | None:
    return next((c for c in cells if (c["target"], c["mode"], c["conc"]) == (target, mode, conc)), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def _check(name: str, ours: float | None, peer: float | None, goal: str, limit: float) -> Row:
    ratio = _ratio(ours, peer)
    met = None if ratio is None else (ratio <= limit if goal == "<=" else ratio >= limit)
    return {"metric": name, "ours": ours, "litellm": peer, "ratio": ratio, "target": f"{goal} {limit:g}", "met": met}


def _targets_check(name: str, cells: list[Row], gw: dict[str, Row]) -> list[Row]:
    """Latency at c=1 (overhead, not queueing); RPS as the best of all c (capacity) counting 2xx only."""
    out = []
    modes = sorted({c["mode"] for c in cells}, reverse=True)
    for mode in modes:
        ours, peer = _find(cells, name, mode, 1), _find(cells, "litellm", mode, 1)
        if ours and peer:
            out.append(_check(f"added p50 ms, {mode} c=1", ours["added_p50_ms"], peer["added_p50_ms"], "<=", 0.1))
            out.append(_check(f"added p99 ms, {mode} c=1", ours["added_p99_ms"], peer["added_p99_ms"], "<=", 0.1))
        best = {t: max((c["ok_rps"] for c in cells if c["target"] == t and c["mode"] == mode), default=None)
                for t in (name, "litellm")}
        out.append(_check(f"max 2xx RPS, {mode}", best[name], best["litellm"], ">=", 10))
    ours_p, peer_p = gw[name], gw["litellm"]
    out.append(_check("idle RSS MiB", ours_p["idle_rss_mib"], peer_p["idle_rss_mib"], "<=", 0.5))
    out.append(_check("peak RSS MiB", ours_p["peak_rss_mib"], peer_p["peak_rss_mib"], "<=", 0.5))
    out.append(_check("cold start s", ours_p["cold_start_s"], peer_p["cold_start_s"], "<=", 0.25))
    return out


def _floor(name: str, cells: list[Row], floor: str) -> list[Row]:
    out = []
    for c in cells:
        if c["target"] != name:
            continue
        f = _find(cells, floor, c["mode"], c["conc"])
        if f:
            out.append({"mode": c["mode"], "conc": c["conc"],
                        "added_p50_ms": (c["added_p50_ms"], f["added_p50_ms"]),
                        "extra_p50_ms": (c["p50_ms"] - f["p50_ms"]),
                        "rps_ratio": _ratio(c["ok_rps"], f["ok_rps"]),
                        "cpu_ratio": _ratio(c["cpu_ms_per_req"], f["cpu_ms_per_req"])})
    return out


def _our_versions() -> dict[str, str]:
    versions = {"python_gateway": platform.python_version()}
    for dist in ("uvicorn", "starlette", "aiohttp", "azure-identity", "azure-data-tables", "pydantic", "PyJWT", "tiktoken"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "not installed"
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    versions["commit"] = git.stdout.strip() + (" (+ uncommitted changes in the tree)" if dirty else "")
    return versions


def _f(x: Any, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def markdown(s: dict[str, Any]) -> str:
    runs = s.get("harness_runs", 1)
    lines = [f"Run {s['date_utc']} — `{s['command']}` — {s['pinning']}", "",
             *([f"Cell by cell: {runs} harness runs, one per mode and concurrency level, every gateway started "
                "afresh on fresh tables; idle RSS from the first run, peak RSS the highest of all.", ""]
               if runs > 1 else []),
             "| target | mode | c | RPS (2xx) | p50 ms | p99 ms | err | added p50 | added p99 | CPU ms/req | peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in sorted(s["cells"], key=lambda c: (c["mode"] != "nonstream", c["conc"])):
        lines.append(f"| {c['target']} | {c['mode']} | {c['conc']} | {_f(c['ok_rps'], 1)}{c['flags']} | "
                     f"{_f(c['p50_ms'], 3)} | {_f(c['p99_ms'], 3)} | {c['errors']} | {_f(c['added_p50_ms'], 3)} | "
                     f"{_f(c['added_p99_ms'], 3)} | {_f(c['cpu_ms_per_req'])} | {_f(c['peak_rss_mib'], 0)} |")
    if s.get("skipped"):  # a cell that was not measured must not read as one that was left out of the table
        lines += ["", "Not measured: " + "; ".join(f"{t} {m} c={c} ({why})" for t, m, c, why in s["skipped"]) + "."]
    lines += ["", "| gateway | cold start s | idle RSS MiB | peak RSS MiB |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {_cold(g)} | {_f(g['idle_rss_mib'], 1)} | {_f(g['peak_rss_mib'], 1)} |"
              for n, g in s["gateways"].items()]
    for name, checks in s["vs_litellm"].items():
        lines += ["", f"**{name} vs LiteLLM**", "", "| metric | ours | LiteLLM | ratio | target | met |",
                  "|---|---:|---:|---:|---|---|"]
        lines += [f"| {c['metric']} | {_f(c['ours'], 3)} | {_f(c['litellm'], 3)} | {_f(c['ratio'], 3)} | "
                  f"{c['target']} | {'yes' if c['met'] else 'no' if c['met'] is not None else '-'} |" for c in checks]
    floors = [(name, rows, "pass-through floor") for name, rows in s["vs_floor"].items()]
    floors += [(name, rows, "relay floor") for name, rows in s.get("vs_relay_floor", {}).items()]
    for name, rows, floor in floors:
        lines += ["", f"**{name} vs {floor}**", "",
                  "| mode | c | added p50 ours / floor ms | p50 above floor ms | RPS ratio | CPU ratio |",
                  "|---|---:|---|---:|---:|---:|"]
        lines += [f"| {r['mode']} | {r['conc']} | {_f(r['added_p50_ms'][0], 3)} / {_f(r['added_p50_ms'][1], 3)} | "
                  f"{_f(r['extra_p50_ms'], 3)} | {_f(r['rps_ratio'], 3)} | {_f(r['cpu_ratio'], 1)} |" for r in rows]
    for store, res in s["inprocess"].items():
        lines += ["", f"**in-process, {store}**: CPU ms/request {_ms(res['cpu_ms_per_request_inprocess'])}; "
                  f"relay floor {_ms(res.get('relay_floor_cpu_ms_per_request_inprocess'))}; "
                  f"above the floor {_ms(res.get('above_relay_floor_cpu_ms'))}; "
                  f"first request {res['round_trips']['first_request']}"]
        lines += [f"- {case}: {v['round_trips_per_request']:.2f} round trips/request, statuses {v['statuses']}"
                  for case, v in res["round_trips"].items() if case != "first_request"]
        if "profile" in res:
            lines += _profile_lines(res["profile"])
    return "\n".join(lines) + "\n"


def _ms(by_mode: dict[str, float] | None) -> str:
    return ", ".join(f"{mode} {ms:.2f}" for mode, ms in by_mode.items()) if by_mode else "-"


def _cold(g: Row) -> str:
    """The median of bench.coldstart's starts with their range and the harness's own sample, or that sample."""
    samples = g.get("cold_starts_s")
    if not samples:
        return _f(g["cold_start_s"])
    return (f"{_f(g['cold_start_s'])} (median of {len(samples)}: {min(samples):.2f} to {max(samples):.2f}; "
            f"harness {_f(g['cold_start_harness_s'])})")


def _profile_lines(p: dict[str, Any]) -> list[str]:
    """Shares, not microseconds: cProfile's own cost inflates the absolute numbers several times over."""
    total = p["profiled_us_per_request"]
    owners = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in list(p["self_time_by_owner_us"].items())[:12])
    lines = [f"- profile ({p['requests']} requests, CPU timer): self time by owner: {owners}",
             "- gateway functions by cumulative CPU share: " + ", ".join(
                 f"{r['function']} {100 * r['cum_us'] / total:.0f}%" for r in p["top_cumulative_gateway"][:25])]
    return lines
