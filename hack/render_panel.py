"""Render the dashboard's Loss panel (train, validation and baseline loss of one FineTuneJob) to a PNG
from any Prometheus, e.g. the local stack's after `make quickstart`:

    python hack/render_panel.py --prometheus "$PROMETHEUS_URL" --namespace default --job quickstart \
        --since 30m --output docs/images/loss-panel.png
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt
import requests

# The Loss panel's queries (hack/dashboard.py), with their legends.
SERIES = {
    "train": "max(finetune_train_loss{{{sel}}})",
    "validation": "max(finetune_eval_loss{{{sel}}})",
    "baseline": 'max(finetune_eval_metric_value{{{sel}, metric="eval_loss", split="baseline"}})',
}

Points = list[tuple[float, float]]


def fetch(
    prometheus: str, namespace: str, job: str, start: float, end: float, step: float
) -> dict[str, Points]:
    """Each series as (unix time, value) pairs; a series Prometheus has no data for is left out."""
    selector = f'namespace="{namespace}", job="{job}"'
    found: dict[str, Points] = {}
    for legend, template in SERIES.items():
        response = requests.get(
            f"{prometheus}/api/v1/query_range",
            params={
                "query": template.format(sel=selector),
                "start": str(start),
                "end": str(end),
                "step": str(step),
            },
            timeout=30,
        )
        response.raise_for_status()
        result = response.json()["data"]["result"]
        if result:
            found[legend] = [(float(t), float(v)) for t, v in result[0]["values"]]
    return found


def render(series: dict[str, Points], title: str, output: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=110)
    for legend, points in series.items():
        times: list[Any] = [datetime.fromtimestamp(t) for t, _ in points]
        style = "--" if legend == "baseline" else "-"
        ax.plot(times, [v for _, v in points], style, linewidth=1.2, label=legend)
    ax.set_title(title, loc="left", fontsize=10)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    fig.autofmt_xdate()
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python hack/render_panel.py", description=__doc__.split("\n")[0])
    parser.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--job", required=True, help="the FineTuneJob's name")
    parser.add_argument("--since", default="30m", help="how far back: 90s, 30m, 2h (default 30m)")
    parser.add_argument("--step", type=float, default=2.0, help="seconds between points (default 2)")
    parser.add_argument("--output", type=Path, default=Path("docs/images/loss-panel.png"))
    args = parser.parse_args(argv)
    unit = {"s": 1, "m": 60, "h": 3600}.get(args.since[-1:])
    if unit is None or not args.since[:-1].isdigit():
        parser.error(f"--since {args.since!r}: use a number and s, m or h, e.g. 30m")
    seconds = int(args.since[:-1]) * unit
    end = time.time()
    series = fetch(args.prometheus, args.namespace, args.job, end - seconds, end, args.step)
    if not series:
        parser.error(f"no loss series for {args.namespace}/{args.job} in the last {args.since}")
    render(series, f"Loss: {args.namespace}/{args.job}", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
