#!/usr/bin/env python3
"""Summarise a bench/pair.sh run: medians and min-max over the interleaved rounds, ratios,
added latency over direct, CPU per 10,000 requests, peak RSS; a Markdown table and a gnuplot
PNG of the latency percentiles. Standard library only.

    python3 bench/report.py bench/results/latest.json [--markdown OUT.md] [--plot OUT.png]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HTTP_PEERS = ["nginx", "haproxy", "haproxy-h2"]
LABELS = {
    "direct": "direct (no proxy)",
    "outrider": "Outrider pair",
    "nginx": "nginx pair",
    "haproxy": "HAProxy pair (h1)",
    "haproxy-h2": "HAProxy pair (h2)",
    "grpc-direct": "gRPC direct",
    "grpc-outrider": "gRPC Outrider pair",
}


def runs(doc, variant, test):
    return [r for r in doc["runs"] if r["variant"] == variant and r["test"] == test]


def stat(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def cpu_per_10k(run, requests, has_procs=True):
    if not has_procs or not requests or "cpu_ticks" not in run:
        return None
    return run["cpu_ticks"] / run["clk_tck"] / requests * 10_000


def paired_delta(doc, variant, base, test, key):
    """Per-round difference variant - base of latency `key`, then the median over rounds."""
    by_round = {r["round"]: r["loadgen"]["latency_ms"][key] for r in runs(doc, base, test)}
    return stat(
        r["loadgen"]["latency_ms"][key] - by_round[r["round"]]
        for r in runs(doc, variant, test)
        if r["round"] in by_round
    )


def summarise(doc):
    out = {}
    mem = doc.get("memory", {})
    for v in doc["variants"]:
        s = {}
        grpc = v.startswith("grpc-")
        base = "grpc-direct" if grpc else "direct"
        has_procs = bool(doc["processes"].get(v))
        if not grpc:
            small = runs(doc, v, "small")
            s["rps_small"] = stat(r["rps"] for r in small)
            s["rps_16k"] = stat(r["rps"] for r in runs(doc, v, "16k"))
            s["errors"] = sum(r.get("errors", 0) for r in small + runs(doc, v, "16k"))
            s["cpu_per_10k_max"] = stat(cpu_per_10k(r, r["requests"], has_procs) for r in small)
            lat_test = "latency"
        else:
            gm = runs(doc, v, "grpc-max")
            s["rps_small"] = stat(r["loadgen"]["achieved_rps"] for r in gm)
            s["errors"] = sum(r["loadgen"]["errors"] for r in gm)
            s["cpu_per_10k_max"] = stat(cpu_per_10k(r, r["loadgen"].get("requests_total"), has_procs) for r in gm)
            lat_test = "grpc-latency"
        lat = runs(doc, v, lat_test)
        for key in ("p50", "p90", "p99", "p99_9", "max"):
            s[key] = stat(r["loadgen"]["latency_ms"][key] for r in lat)
        s["lat_achieved_rps"] = stat(r["loadgen"]["achieved_rps"] for r in lat)
        s["lat_errors"] = sum(r["loadgen"]["errors"] + r["loadgen"].get("missed", 0) for r in lat)
        s["cpu_per_10k_fixed"] = stat(cpu_per_10k(r, r["loadgen"].get("requests_total"), has_procs) for r in lat)
        if v != base:
            for key in ("p50", "p99", "p99_9"):
                s["added_" + key] = paired_delta(doc, v, base, lat_test, key)
        procs = doc["processes"].get(v, [])
        s["rss_mib"] = {p: mem.get(p, {}).get("hwm_kib", 0) / 1024 for p in procs}
        s["rss_pair_mib"] = sum(s["rss_mib"].values()) if procs else None
        # Median percentile curve over rounds, for the plot.
        curves = [r["loadgen"]["percentiles"] for r in lat]
        if curves:
            s["curve"] = [
                [curves[0][i][0], statistics.median(c[i][1] for c in curves)]
                for i in range(len(curves[0]))
            ]
        out[v] = s
    # Throughput ratios, paired by round (each path against the run next to it in time): vs
    # direct, and vs the best peer pair (the peer with the highest median throughput).
    for v, s in out.items():
        base = "grpc-direct" if v.startswith("grpc-") else "direct"
        if base in out and v != base:
            s["ratio_vs_direct"] = paired_ratio(doc, v, base)
    peers = [p for p in HTTP_PEERS if p in out and out[p]["rps_small"]]
    if peers and "outrider" in out and out["outrider"]["rps_small"]:
        best = max(peers, key=lambda p: out[p]["rps_small"]["median"])
        for v in ["outrider"] + peers:
            out[v]["ratio_vs_best_peer"] = paired_ratio(doc, v, best)
        out["outrider"]["best_peer"] = best
    sweep = {}
    for r in doc["runs"]:
        if r["test"].startswith("sweep-"):
            sweep.setdefault(r["variant"], {}).setdefault(r["connections"], []).append(r["rps"])
    if sweep:
        out["_sweep"] = {v: {c: stat(x) for c, x in per.items()} for v, per in sweep.items()}
    idle = {}
    for r in doc["runs"]:
        if r["test"] == "idle":
            procs = doc["processes"][r["variant"]]
            delta = [(r["rss_during_kib"][p] - r["rss_before_kib"][p]) / 1024 for p in procs]
            idle[r["variant"]] = {
                "caller_mib": delta[0],
                "callee_mib": sum(delta[1:]),
                "before_mib": sum(r["rss_before_kib"].values()) / 1024,
                "during_mib": sum(r["rss_during_kib"].values()) / 1024,
                "still_open": r["hold"]["still_open"],
                "errors": r["hold"]["errors"],
            }
    if idle:
        out["_idle"] = idle
    return out


def throughput_by_round(doc, variant):
    if variant.startswith("grpc-"):
        return {r["round"]: r["loadgen"]["achieved_rps"] for r in runs(doc, variant, "grpc-max")}
    return {r["round"]: r["rps"] for r in runs(doc, variant, "small")}


def paired_ratio(doc, variant, base):
    """Median over rounds of variant/base throughput within the same round."""
    a, b = throughput_by_round(doc, variant), throughput_by_round(doc, base)
    return stat(a[k] / b[k] for k in a if b.get(k))


def fmt(st, digits=0, unit=""):
    if not st:
        return "–"
    f = f"{{:,.{digits}f}}"
    if st["n"] == 1 or st["min"] == st["max"]:
        return f.format(st["median"]) + unit
    return f"{f.format(st['median'])}{unit} ({f.format(st['min'])}–{f.format(st['max'])})"


def fmt_ms(st):
    return fmt(st, 3)


def markdown(doc, summary):
    lines = []
    lines.append(
        f"Run {doc['started']} on {doc['host']}: {doc['ncpu']} × {doc['cpu']}; servers on CPU "
        f"{doc['server_cpus']}, load generators on CPU {doc['load_cpus']}"
        + (f" (nice {doc['nice']})" if doc.get("nice") else "")
        + f"; {doc['rounds']} interleaved "
        f"rounds of {doc['seconds']} s; load average {doc['loadavg_before']} before, "
        f"{doc['loadavg_after']} after; Outrider {doc['outrider_commit']}, nginx "
        f"{doc['versions']['nginx']}, HAProxy {doc['versions']['haproxy']}, wrk {doc['versions']['wrk']}."
    )
    lines.append("")
    lines.append(
        "Median over rounds (min–max in brackets). Ratios and added latency are paired: each "
        "round's figure against the other path's figure from the same round."
    )
    lines.append("")
    http = [v for v in doc["variants"] if not v.startswith("grpc-")]
    grpc = [v for v in doc["variants"] if v.startswith("grpc-")]
    lines.append(
        "| path | req/s, 2 B, 64 conns | × direct | × best peer | req/s, 16 KiB | "
        f"p50 ms @ {doc['rate']:g}/s | p99 ms | p99.9 ms | added p50 / p99 ms | "
        "proxy CPU s / 10k req (max load · fixed rate) | peak RSS MiB (pair) | errors |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for v in http:
        s = summary[v]
        added = (
            f"{s['added_p50']['median']:+.3f} / {s['added_p99']['median']:+.3f}"
            if s.get("added_p50") and s.get("added_p99")
            else "–"
        )
        cpu = (
            f"{fmt(s['cpu_per_10k_max'], 3)} · {fmt(s['cpu_per_10k_fixed'], 3)}"
            if s.get("cpu_per_10k_max")
            else "–"
        )
        rss = (
            f"{s['rss_pair_mib']:.1f} (" + " + ".join(f"{m:.1f}" for m in s["rss_mib"].values()) + ")"
            if s["rss_pair_mib"]
            else "–"
        )
        ratio = fmt(s.get("ratio_vs_direct"), 2)
        best = fmt(s.get("ratio_vs_best_peer"), 2)
        lines.append(
            f"| {LABELS.get(v, v)} | {fmt(s['rps_small'])} | {ratio} | {best} | {fmt(s['rps_16k'])} | "
            f"{fmt_ms(s['p50'])} | {fmt_ms(s['p99'])} | {fmt_ms(s['p99_9'])} | {added} | {cpu} | {rss} | "
            f"{s['errors'] + s['lat_errors']} |"
        )
    if grpc:
        lines.append("")
        lines.append(
            "| gRPC unary (h2c) | calls/s, 4 conns × 16 streams | × direct | "
            f"p50 ms @ {doc['rate']:g}/s | p99 ms | p99.9 ms | added p50 / p99 ms | "
            "proxy CPU s / 10k calls (max · fixed) | peak RSS MiB (pair) | errors |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for v in grpc:
            s = summary[v]
            added = (
                f"{s['added_p50']['median']:+.3f} / {s['added_p99']['median']:+.3f}"
                if s.get("added_p50") and s.get("added_p99")
                else "–"
            )
            cpu = (
                f"{fmt(s['cpu_per_10k_max'], 3)} · {fmt(s['cpu_per_10k_fixed'], 3)}"
                if s.get("cpu_per_10k_max")
                else "–"
            )
            rss = f"{s['rss_pair_mib']:.1f}" if s["rss_pair_mib"] else "–"
            ratio = fmt(s.get("ratio_vs_direct"), 2)
            lines.append(
                f"| {LABELS.get(v, v)} | {fmt(s['rps_small'])} | {ratio} | {fmt_ms(s['p50'])} | "
                f"{fmt_ms(s['p99'])} | {fmt_ms(s['p99_9'])} | {added} | {cpu} | {rss} | "
                f"{s['errors'] + s['lat_errors']} |"
            )
    sweep = summary.get("_sweep")
    if sweep:
        conns = sorted({c for per in sweep.values() for c in per})
        lines.append("")
        lines.append(
            "| throughput by connection count (wrk, 2 B) | "
            + " | ".join(f"{c} conns" for c in conns)
            + " | spread (max/min − 1) |"
        )
        lines.append("|---|" + "---|" * (len(conns) + 1))
        for v, per in sweep.items():
            medians = [per[c]["median"] for c in conns if per.get(c)]
            spread = f"{max(medians) / min(medians) - 1:.0%}" if medians and min(medians) > 0 else "–"
            lines.append(
                f"| {LABELS.get(v, v)} | " + " | ".join(fmt(per.get(c)) for c in conns) + f" | {spread} |"
            )
        after = doc.get("memory_after_sweep") or {}
        procs = doc["processes"].get("outrider", [])
        if after and procs:
            lines.append("")
            lines.append(
                "Outrider peak RSS after the sweep (1,024 connections): "
                + " + ".join(f"{after.get(p, {}).get('hwm_kib', 0) / 1024:.1f}" for p in procs)
                + " MiB."
            )
    idle = summary.get("_idle")
    if idle:
        lines.append("")
        lines.append(
            "| 1,000 idle keep-alive connections to the caller (one request each) | "
            "RSS added, caller MiB | RSS added, callee MiB | pair RSS before → during, MiB |"
        )
        lines.append("|---|---|---|---|")
        for v, d in idle.items():
            lines.append(
                f"| {LABELS.get(v, v)} | {d['caller_mib']:+.1f} | {d['callee_mib']:+.1f} | "
                f"{d['before_mib']:.1f} → {d['during_mib']:.1f} |"
            )
    odd = [
        f"{name} {series} = {value:g}"
        for name, series_map in (doc.get("outrider_metrics") or {}).items()
        for series, value in series_map.items()
        if value and 'code="2' not in series
    ]
    if odd:
        lines.append("")
        lines.append("Outrider's own counters, other than 2xx (whole run): " + "; ".join(odd) + ".")
    o = summary.get("outrider")
    if o and o.get("ratio_vs_direct"):
        lines.append("")
        lines.append(
            f"Throughput ratio Outrider pair / direct: **{fmt(o['ratio_vs_direct'], 2)}**"
            + (
                f"; Outrider pair / best peer ({LABELS[o['best_peer']]}): **{fmt(o['ratio_vs_best_peer'], 2)}**"
                if o.get("best_peer")
                else ""
            )
            + "."
        )
    return "\n".join(lines) + "\n"


def plot(doc, summary, png):
    if not shutil.which("gnuplot"):
        print("report.py: gnuplot not installed, no plot", file=sys.stderr)
        return False
    panels = []
    for title, variants in (
        (f"HTTP/1.1 GET, {doc['rate']:g} req/s, 16 connections", [v for v in doc["variants"] if not v.startswith("grpc-")]),
        (f"gRPC unary (h2c), {doc['rate']:g} calls/s, 16 connections", [v for v in doc["variants"] if v.startswith("grpc-")]),
    ):
        variants = [v for v in variants if summary[v].get("curve")]
        if variants:
            panels.append((title, variants))
    if not panels:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        script = [
            f"set terminal pngcairo size {900 * len(panels)},560 font 'sans,10'",
            f"set output '{png}'",
            f"set multiplot layout 1,{len(panels)} title 'Latency by percentile (median of {doc['rounds']} rounds; "
            f"corrected for coordinated omission){' — measured under CPU contention' if contended(doc) else ''}'",
            "set logscale x",
            "set xrange [1:100000]",
            "set logscale y",
            "set grid xtics ytics mytics",
            "set xlabel 'percentile'",
            "set ylabel 'latency (ms)'",
            "set xtics ('50%%' 2, '90%%' 10, '99%%' 100, '99.9%%' 1000, '99.99%%' 10000, '99.999%%' 100000)",
            "set key top left",
        ]
        for title, variants in panels:
            plots = []
            for v in variants:
                path = os.path.join(tmp, f"{v}.dat")
                with open(path, "w") as f:
                    for q, ms in summary[v]["curve"]:
                        if q < 1.0:
                            f.write(f"{1.0 / (1.0 - q)} {max(ms, 1e-3)}\n")
                plots.append(f"'{path}' using 1:2 with linespoints pointsize 0.5 lw 2 title '{LABELS.get(v, v)}'")
            script.append(f"set title '{title}'")
            script.append("plot " + ", ".join(plots))
        script.append("unset multiplot")
        subprocess.run(["gnuplot"], input="\n".join(script), text=True, check=True)
    return True


def contended(doc):
    try:
        return max(float(doc["loadavg_before"].split()[0]), float(doc["loadavg_after"].split()[0])) > 1.5
    except (KeyError, ValueError, IndexError):
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--markdown")
    ap.add_argument("--plot")
    a = ap.parse_args()
    with open(a.results) as f:
        doc = json.load(f)
    summary = summarise(doc)
    md = markdown(doc, summary)
    if contended(doc):
        md += (
            "\n**Measured under contention**: the load average was above 1.5 (other jobs were using "
            "the same cores), so absolute figures are noisy and pessimistic; the interleaved ratios "
            "are the more robust numbers.\n"
        )
    print(md)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(md)
    doc["summary"] = {
        v: ({k: x for k, x in s.items() if k != "curve"} if not v.startswith("_") else s)
        for v, s in summary.items()
    }
    with open(a.results, "w") as f:
        json.dump(doc, f, indent=1)
    if a.plot and plot(doc, summary, a.plot):
        print(f"plot: {a.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
