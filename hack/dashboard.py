"""Generate the Grafana dashboard shipped in the chart (charts/finetune-operator/dashboards/finetune.json).

    python hack/dashboard.py            # write the JSON
    python hack/dashboard.py --check    # exit 1 when the checked-in JSON differs from this script's output

Built with grafana-foundation-sdk. Every query filters by the `namespace` variable (and the per-job
rows by `job`); the data source is the `datasource` variable, so the dashboard works in any Grafana.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import prometheus as prometheus_model

OUTPUT = Path(__file__).resolve().parent.parent / "charts/finetune-operator/dashboards/finetune.json"
UID = "finetune-operator"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
NS = 'namespace=~"$namespace"'
JOB = f'{NS}, job="$job"'

# Counters appear on their first increment: until then these stand in for "0 so far".
KNOWN_JOBS_ZERO = f"sum by (namespace, job) (0 * finetune_job_phase{{{NS}}})"
HANDLERS_ZERO = "sum by (handler) (0 * rate(finetune_operator_reconciles_total[$__rate_interval]))"

LAST_VALUE = common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False)

Target = prometheus.Dataquery
Panel = Any  # the SDK's panel builders share no usable base type


def query(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> Target:
    q = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    if legend:
        q = q.legend_format(legend)
    return q.instant().format(prometheus_model.PromQueryFormat.TABLE) if instant else q.range()


def series(title: str, description: str, unit: str, *targets: Target, w: int = 12, h: int = 8) -> Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(w)
        .height(h)
        .line_width(1)
        .fill_opacity(10)
    )
    for target in targets:
        panel = panel.with_target(target)
    return panel


def single(title: str, description: str, unit: str, target: Target, w: int = 4, h: int = 4) -> Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(w)
        .height(h)
        .graph_mode(common.BigValueGraphMode.NONE)
        .reduce_options(LAST_VALUE)
        .with_target(target)
    )


def dashed(panel: Panel, series_name: str) -> Panel:
    """Draw one series (a baseline) as a dashed line."""
    style = model.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]})
    return panel.override_by_name(series_name, [style])


def fleet_row() -> list[Panel]:
    # The counts sum finetune_job_phase: it has a 0 series for every other phase of each job (so
    # "failed" reads 0, not "No data") and changes with the status, not on the 15 s fleet refresh.
    return [
        single(
            "Jobs training",
            "FineTuneJobs in phase Training.",
            "none",
            query(f'sum(finetune_job_phase{{{NS}, phase="Training"}})'),
        ),
        single(
            "Jobs failed",
            "FineTuneJobs in phase Failed.",
            "none",
            query(f'sum(finetune_job_phase{{{NS}, phase="Failed"}})'),
        ),
        single(
            "Jobs succeeded",
            "FineTuneJobs in phase Succeeded.",
            "none",
            query(f'sum(finetune_job_phase{{{NS}, phase="Succeeded"}})'),
        ),
        single(
            "GPU memory in use",
            "Peak GPU memory allocated by all trainer processes.",
            "bytes",
            query(f"sum(finetune_gpu_memory_allocated_bytes{{{NS}}})"),
        ),
        single(
            "Tokens/s, all jobs",
            "Training throughput summed over jobs.",
            "short",
            query(f"sum(finetune_tokens_per_second{{{NS}}})"),
        ),
        single(
            "Restarts (24h)",
            "Trainer restarts (preemption, pod loss, retries) in the last day.",
            "none",
            query(f"sum(increase(finetune_job_restarts_total{{{NS}}}[24h])) or sum({KNOWN_JOBS_ZERO})"),
        ),
        series(
            "Jobs by phase",
            "FineTuneJobs per phase, as the operator counts them.",
            "none",
            query(f"sum by (phase) (finetune_jobs{{{NS}}})", "{{phase}}"),
        ),
        series(
            "Failures and restarts",
            "Jobs that failed and trainer restarts per hour.",
            "none",
            query(f'sum by (namespace) (finetune_job_phase{{{NS}, phase="Failed"}})', "failed {{namespace}}"),
            query(
                f"sum by (namespace, job) (increase(finetune_job_restarts_total{{{NS}}}[1h])) "
                f"or {KNOWN_JOBS_ZERO}",
                "restarts/h {{namespace}}/{{job}}",
                ref="B",
            ),
        ),
        series(
            "GPU memory by job",
            "Peak GPU memory allocated per job (all ranks).",
            "bytes",
            query(
                f"sum by (namespace, job) (finetune_gpu_memory_allocated_bytes{{{NS}}})",
                "{{namespace}}/{{job}}",
            ),
        ),
        series(
            "Checkpoint age by job",
            "Seconds since each job's last verified checkpoint.",
            "s",
            query(
                f"max by (namespace, job) (finetune_checkpoint_age_seconds{{{NS}}})", "{{namespace}}/{{job}}"
            ),
        ),
        series(
            "Time to first step",
            "From job creation to the first optimizer step (image pull, data, baseline).",
            "s",
            query(
                f"max by (namespace, job) (finetune_job_time_to_first_step_seconds{{{NS}}})",
                "{{namespace}}/{{job}}",
            ),
            w=8,
        ),
        series(
            "Operator reconciles",
            "Reconciles and reconcile errors per second, by handler.",
            "reqps",
            query(
                "sum by (handler) (rate(finetune_operator_reconciles_total[$__rate_interval]))", "{{handler}}"
            ),
            query(
                "sum by (handler) (rate(finetune_operator_reconcile_errors_total[$__rate_interval])) "
                f"or {HANDLERS_ZERO}",
                "errors {{handler}}",
                ref="B",
            ),
            w=8,
        ),
        series(
            "Operator reconcile latency and watch staleness",
            "95th percentile reconcile duration by handler, and seconds since the last watch event.",
            "s",
            query(
                "histogram_quantile(0.95, sum by (le, handler) "
                "(rate(finetune_operator_reconcile_duration_seconds_bucket[$__rate_interval])))",
                "p95 {{handler}}",
            ),
            query("max(finetune_operator_watch_staleness_seconds)", "watch staleness", ref="B"),
            w=8,
        ),
    ]


def job_row() -> list[Panel]:
    phase = (
        single(
            "Phase",
            "The job's current phase.",
            "none",
            query(f"max by (phase) (finetune_job_phase{{{JOB}}}) == 1", "{{phase}}"),
        )
        .text_mode(common.BigValueTextMode.NAME)
        .color_mode(common.BigValueColorMode.NONE)
    )
    loss = series(
        "Loss",
        "Training and validation loss; the dashed line is the validation loss before training.",
        "none",
        query(f"max(finetune_train_loss{{{JOB}}})", "train"),
        query(f"max(finetune_eval_loss{{{JOB}}})", "validation", ref="B"),
        query(
            f'max(finetune_eval_metric_value{{{JOB}, metric="eval_loss", split="baseline"}})',
            "baseline",
            ref="C",
        ),
    )
    evals = series(
        "Evaluation metrics",
        "Each evaluation metric on the validation split, with the baseline (dashed) and final values.",
        "none",
        query(f'max by (metric) (finetune_eval_metric_value{{{JOB}, split="validation"}})', "{{metric}}"),
        query(
            f'max by (metric) (finetune_eval_metric_value{{{JOB}, split="baseline"}})',
            "{{metric}} baseline",
            ref="B",
        ),
        query(
            f'max by (metric) (finetune_eval_metric_value{{{JOB}, split="final"}})',
            "{{metric}} final",
            ref="C",
        ),
    ).override_by_regexp(
        ".* baseline",
        [model.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]})],
    )
    predictions = (
        stat.Panel()
        .title("Predictions diagnostic")
        .description("Checks on sample generations after each evaluation: 1 passed, 0 failed.")
        .datasource(DATASOURCE)
        .span(12)
        .height(6)
        .graph_mode(common.BigValueGraphMode.NONE)
        .reduce_options(LAST_VALUE)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .mappings(
            [
                model.ValueMap(
                    {
                        "0": model.ValueMappingResult(text="failed", color="red"),
                        "1": model.ValueMappingResult(text="passed", color="green"),
                    }
                )
            ]
        )
        .with_target(query(f"min by (check) (finetune_predictions_check_passed{{{JOB}}})", "{{check}}"))
    )
    data = (
        bargauge.Panel()
        .title("Data report")
        .description("Examples read, duplicates and boilerplate removed, tokens, chunks and split sizes.")
        .datasource(DATASOURCE)
        .span(12)
        .height(6)
        .orientation(common.VizOrientation.HORIZONTAL)
        .reduce_options(LAST_VALUE)
        .with_target(query(f"max by (count) (finetune_data_examples{{{JOB}}})", "{{count}}"))
    )
    flags = (
        table.Panel()
        .title("Runtime flags")
        .description("Environment, method, world size and library versions the trainer runs with.")
        .datasource(DATASOURCE)
        .span(24)
        .height(5)
        # The trainer's series end with its pod: show the flags of the run in the time range.
        .with_target(query(f"last_over_time(finetune_trainer_runtime_info{{{JOB}}}[$__range])", instant=True))
    )
    return [
        phase,
        single(
            "Progress",
            "Optimizer step over planned steps.",
            "percentunit",
            query(f"max(finetune_step{{{JOB}}}) / max(finetune_total_steps{{{JOB}}})"),
        ),
        single("Epoch", "Fractional epoch.", "none", query(f"max(finetune_epoch{{{JOB}}})")),
        single(
            "Restarts",
            "Trainer restarts of this job.",
            "none",
            query(f"max(finetune_job_restarts_total{{{JOB}}}) or max(0 * finetune_job_phase{{{JOB}}})"),
        ),
        single(
            "Time to first step",
            "From creation to the first optimizer step.",
            "s",
            query(f"max(finetune_job_time_to_first_step_seconds{{{JOB}}})"),
        ),
        single(
            "Checkpoint age",
            "Since the last verified checkpoint.",
            "s",
            query(f"max(finetune_checkpoint_age_seconds{{{JOB}}})"),
        ),
        dashed(loss, "baseline"),
        evals,
        series(
            "Throughput",
            "Tokens and samples per second.",
            "short",
            query(f"sum(finetune_tokens_per_second{{{JOB}}})", "tokens/s"),
            query(f"sum(finetune_samples_per_second{{{JOB}}})", "samples/s", ref="B"),
            w=6,
        ),
        series(
            "GPU memory",
            "Per device of each trainer pod: peak memory allocated by tensors, and memory reserved by "
            "PyTorch's caching allocator (what the GPU sees in use).",
            "bytes",
            query(
                f"max by (instance, device) (finetune_gpu_memory_allocated_bytes{{{JOB}}})",
                "{{instance}} gpu{{device}} peak allocated",
            ),
            query(
                f"max by (instance, device) (finetune_gpu_memory_reserved_bytes{{{JOB}}})",
                "{{instance}} gpu{{device}} reserved",
                ref="B",
            ),
            w=6,
        ),
        series(
            "GPU utilization",
            "Share of time a kernel ran on each device (NVML); low values mean the GPU waits on data, "
            "the CPU or the network.",
            "percentunit",
            query(
                f"max by (instance, device) (finetune_gpu_utilization_ratio{{{JOB}}})",
                "{{instance}} gpu{{device}}",
            ),
            w=6,
        ),
        series(
            "Learning rate",
            "Scheduled learning rate.",
            "none",
            query(f"max(finetune_learning_rate{{{JOB}}})", "learning rate"),
            w=6,
        ),
        *checkpoint_panels(),
        predictions,
        data,
        flags,
    ]


def checkpoint_panels() -> list[Panel]:
    # The trainer sets the committed and verified series as it happens; the operator also serves
    # the verified step and the checkpoint age from the job's status, which outlive the pod.
    since_verified = (
        f"time() - max(finetune_checkpoint_last_verified_timestamp_seconds{{{JOB}}}) "
        f"or max(finetune_checkpoint_age_seconds{{{JOB}}})"
    )

    def uploads(series: str) -> str:
        return f"increase(finetune_checkpoint_upload_duration_seconds_{series}{{{JOB}}}[1h])"

    return [
        series(
            "Checkpoint timeline",
            "Step of the last committed and of the last verified checkpoint (each rise is a new one) "
            "against the training step; a verified line lagging the committed one means verification "
            "is slow or failing.",
            "none",
            query(f"max(finetune_checkpoint_last_committed_step{{{JOB}}})", "committed checkpoint step"),
            query(
                f"max(finetune_checkpoint_last_verified_step{{{JOB}}})", "verified checkpoint step", ref="B"
            ),
            query(f"max(finetune_step{{{JOB}}})", "training step", ref="C"),
        ),
        series(
            "Checkpoint age",
            "Seconds since the last committed and the last verified checkpoint; a saw-tooth means "
            "checkpoints keep landing.",
            "s",
            query(
                f"time() - max(finetune_checkpoint_last_committed_timestamp_seconds{{{JOB}}})", "since commit"
            ),
            query(since_verified, "since verification", ref="B"),
        ),
        series(
            "Checkpoint upload time",
            "Time to store a checkpoint's files and manifest, over the last hour.",
            "s",
            query(
                f"sum({uploads('sum')}) / sum({uploads('count')})",
                "mean (1h)",
            ),
            query(
                f"histogram_quantile(0.95, sum by (le) ({uploads('bucket')}))",
                "p95 (1h)",
                ref="B",
            ),
        ),
        series(
            "Checkpoint bytes uploaded",
            "Size of the checkpoints committed to the store in the last hour.",
            "bytes",
            query(f"sum(increase(finetune_checkpoint_uploaded_bytes_total{{{JOB}}}[1h]))", "uploaded (1h)"),
        ),
    ]


def variables() -> list[Any]:
    datasource = dash.DatasourceVariable("datasource").label("Data source").type("prometheus")
    namespace = (
        dash.QueryVariable("namespace")
        .label("Namespace")
        .datasource(DATASOURCE)
        .query("label_values(finetune_job_phase, namespace)")
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )
    job = (
        dash.QueryVariable("job")
        .label("FineTuneJob")
        .datasource(DATASOURCE)
        .query('label_values(finetune_job_phase{namespace=~"$namespace"}, job)')
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
    )
    return [datasource, namespace, job]


def build() -> dict[str, Any]:
    board = (
        dash.Dashboard("Fine-tuning")
        .uid(UID)
        .description("FineTuneJobs: fleet overview and per-job drill-down (finetune-operator).")
        .tags(["finetune", "training"])
        .time("now-6h", "now")
        .refresh("30s")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .variables(variables())
    )
    row = dash.Row("Fleet")
    for panel in fleet_row():
        row = row.with_panel(panel)
    board = board.with_row(row)
    row = dash.Row("Job $namespace/$job")
    for panel in job_row():
        row = row.with_panel(panel)
    board = board.with_row(row)
    document: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    # Expanded rows keep their panels at the top level, after the row; ids in reading order.
    flat: list[dict[str, Any]] = []
    for panel in document["panels"]:
        children = panel.pop("panels", []) if panel.get("type") == "row" else []
        flat += [{**panel, "panels": []}, *children] if panel.get("type") == "row" else [panel]
    for number, panel in enumerate(flat, start=1):
        panel["id"] = number
    document["panels"] = flat
    for variable in document["templating"]["list"]:
        variable.pop("id", None)  # the SDK's placeholder; Grafana keys variables by name
    return document


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python hack/dashboard.py", description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"file to write (default {OUTPUT})")
    parser.add_argument("--check", action="store_true", help="exit 1 when the file differs from the output")
    args = parser.parse_args(argv)
    expected = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != expected:
            sys.stderr.write(f"{args.output} is stale: run `python hack/dashboard.py`\n")
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(expected, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
