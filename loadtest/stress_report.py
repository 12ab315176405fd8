"""The stress report's chart: throughput, backlog and latency over time (one PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt


def chart(report: dict[str, Any], path: Path) -> None:
    series = report.get("series") or []
    timeline = report.get("timeline") or []
    load_end = (report.get("drain") or {}).get("load_end_s")
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 9.5), sharex=True)
    config = report.get("config", {})
    grpc = config.get("transport") == "grpc"
    fig.suptitle(
        f"otelworker stress: {config.get('duration_s', 0):.0f} s at concurrency "
        f"{config.get('concurrency')}, {config.get('records_per_request')} records/request, "
        f"{config.get('signals')}, {config.get('encoding')}"
        f"{', OTLP/gRPC' if grpc else ''}  -  {report.get('result', '')[:60]}",
        fontsize=10,
    )
    ok = "OK" if grpc else "200"

    # 1. throughput, from the client's per-second buckets
    t = [row["t"] + 0.5 for row in series]
    acked = [row["acked"] for row in series]
    refused = [row["requests"] - row["acked"] for row in series]
    ax1.plot(t, acked, color="tab:green", label=f"requests/s answered {ok}")
    ax1.plot(t, refused, color="tab:red", label="requests/s answered otherwise")
    ax1.set_ylabel("requests / s")
    ax1.grid(alpha=0.3)
    twin = ax1.twinx()
    twin.plot(t, [row["records_acked"] for row in series], color="tab:blue", ls=":",
              label="records/s acknowledged")  # fmt: skip
    twin.set_ylabel("records / s")
    lines = ax1.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax1.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right", fontsize=8)
    ax1.set_title("throughput", fontsize=9, loc="left")

    # 2. backlog and buffer, from /metrics and the queue table once a second
    ts = [tick["t"] for tick in timeline]
    ax2.plot(ts, [tick["backlog"] for tick in timeline], color="tab:purple",
             label="staging backlog (admission gauge)")  # fmt: skip
    ax2.plot(ts, [tick["queue_rows"] for tick in timeline], color="tab:gray", ls="--",
             label="ingestion_queue rows (not dead)")  # fmt: skip
    ax2.set_ylabel("items")
    ax2.grid(alpha=0.3)
    twin2 = ax2.twinx()
    twin2.plot(ts, [tick["buffer"] for tick in timeline], color="tab:orange",
               label="worker buffer depth")  # fmt: skip
    twin2.set_ylabel("buffer items")
    lines = ax2.get_legend_handles_labels()
    more = twin2.get_legend_handles_labels()
    ax2.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right", fontsize=8)
    ax2.set_title("backlog and buffer (sampled each second)", fontsize=9, loc="left")

    # 3. latency percentiles per second (every answered request)
    for key, color in (("p50_ms", "tab:green"), ("p95_ms", "tab:orange"), ("p99_ms", "tab:red")):
        ax3.plot(t, [row[key] for row in series], color=color, label=key.replace("_ms", ""))
    ax3.set_ylabel("latency (ms)")
    ax3.set_xlabel("seconds since the load started")
    ax3.grid(alpha=0.3)
    ax3.legend(loc="upper right", fontsize=8)
    ax3.set_title("request latency per second", fontsize=9, loc="left")
    if any(row["p99_ms"] for row in series):
        ax3.set_yscale("log")

    for ax in (ax1, twin, ax2, twin2):
        ax.set_ylim(bottom=0)
    for ax in (ax1, ax2, ax3):
        if load_end:
            ax.axvline(load_end, color="black", lw=0.8, ls="--")
    if load_end:
        ax2.annotate("load ends, drain", (load_end, 0), xytext=(4, 4),
                     textcoords="offset points", fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
