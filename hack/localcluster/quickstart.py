"""The quickstart: a real fine-tune through the operator on the local stack.

Starts (or reuses) the local cluster, installs the chart with Helm, uploads a real pretrained model
(SmolLM2-135M-Instruct, converted from its PyPI wheel) and a real task (the Unicode names of
accented Latin letters, from Python's `unicodedata`) to S3, applies examples/quickstart.yaml and
follows the job to the end: the base model's answers, the tuned model's, and the metrics of both.

    python -m localcluster.quickstart [--down] [--use-current-cluster] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import string
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import boto3
import yaml
from kubernetes import client, config

from finetune_trainer.testing import unicode_names
from finetune_trainer.testing.tiny import build_tiny_model, synthetic_records, write_jsonl
from localcluster import ClusterInfo, ClusterOptions, LocalCluster, models, scrape_interval, stop_run
from localcluster.processes import free_port
from localcluster.testing import apply_yaml, wait_for
from localcluster.tools import REPO_ROOT, tool

RUN_DIR = REPO_ROOT / ".run" / "quickstart"
CHART = REPO_ROOT / "charts" / "finetune-operator"
EXAMPLE = REPO_ROOT / "examples" / "quickstart.yaml"
OPERATOR_NAMESPACE = "finetune-system"
BUCKET = "quickstart"
REAL_MODEL_KEY = "models/smollm2-135m-instruct"
REAL_DATA_KEY = "data/unicode-names.jsonl"
TINY_MODEL_KEY = "models/tiny-llama"
TINY_DATA_KEY = "data/groups.jsonl"
TINY_EXAMPLES = 1500
GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# The stack


def current_cluster_reachable() -> bool:
    if not os.environ.get("KUBECONFIG") and not (Path.home() / ".kube" / "config").exists():
        return False
    try:
        config.load_kube_config()
        client.VersionApi().get_code(_request_timeout=3)
    except Exception:
        return False
    return True


def start_stack() -> ClusterInfo:
    try:
        info = ClusterInfo.load(RUN_DIR)
    except FileNotFoundError:
        info = None
    if info and all(Path(f"/proc/{pid}").exists() for pid in info.pids.values()):
        say(f"reusing the local cluster in {RUN_DIR}")
        return info
    if info:
        stop_run(RUN_DIR)
    say("starting the local cluster (etcd, kube-apiserver, controller-manager, scheduler, S3, Prometheus)")
    started = time.monotonic()
    info = LocalCluster(ClusterOptions(run_dir=RUN_DIR)).start()
    say(f"cluster ready in {time.monotonic() - started:.1f}s")
    return info


def helm(info: ClusterInfo, *args: str) -> str:
    argv = [str(tool("helm")), "--kubeconfig", info.kubeconfig, *args]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def install_chart(info: ClusterInfo) -> None:
    say("installing the operator with Helm (charts/finetune-operator)")
    helm(
        info,
        "upgrade", "--install", "finetune-operator", str(CHART),
        "--namespace", OPERATOR_NAMESPACE, "--create-namespace",
        "-f", str(REPO_ROOT / "examples" / "values-local.yaml"),
        "--set", f"operator.metricsPort={free_port()}", "--set", f"operator.healthPort={free_port()}",
        "--set", f"webhook.port={free_port()}",
        *scrape_values(info),
        "--wait", "--timeout", "3m",
    )  # fmt: skip


def scrape_values(info: ClusterInfo) -> list[str]:
    """The local Prometheus' scrape interval: finished trainers linger that long, not the chart's 15 s."""
    if not info.prometheus_url:
        return []  # the user's own cluster: the chart's default
    return ["--set", f"podMonitor.interval={scrape_interval(Path(info.run_dir))}"]


# ---------------------------------------------------------------------------------------------
# Model, data and secrets


def s3_client(info: ClusterInfo) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=info.s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=info.s3_access_key,
        aws_secret_access_key=info.s3_secret_key,
    )


def upload_model_and_data(info: ClusterInfo) -> None:
    """The quickstart's real model (SmolLM2-135M-Instruct) and task (Unicode letter names)."""
    say(
        f"uploading SmolLM2-135M-Instruct and {len(unicode_names.records())} Unicode-name examples to s3://{BUCKET}"
    )
    s3 = _bucket(info)
    upload_folder(s3, models.ensure(models.SMOLLM2), REAL_MODEL_KEY)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_jsonl(unicode_names.records(), Path(tmp) / "unicode-names.jsonl")
        s3.upload_file(str(data), BUCKET, REAL_DATA_KEY)


def upload_tiny_assets(info: ClusterInfo) -> None:
    """A tiny model and a synthetic task that it learns in seconds: for tests of lifecycle mechanics
    (kill, suspend, rotate, scale), where what the model learns does not matter."""
    s3 = _bucket(info)
    with tempfile.TemporaryDirectory() as tmp:
        upload_folder(s3, build_tiny_model(Path(tmp) / "model"), TINY_MODEL_KEY)
        data = write_jsonl(synthetic_records(TINY_EXAMPLES, seed=7), Path(tmp) / "groups.jsonl")
        s3.upload_file(str(data), BUCKET, TINY_DATA_KEY)


def _bucket(info: ClusterInfo) -> Any:
    s3 = s3_client(info)
    if BUCKET not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=BUCKET)
    return s3


def upload_folder(s3: Any, folder: Path, prefix: str) -> None:
    """Upload a model folder; files already there with the same size are kept (reruns are quick)."""
    stored = {
        o["Key"]: o["Size"]
        for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
    }
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        key = f"{prefix}/{path.name}"
        if stored.get(key) != path.stat().st_size:
            s3.upload_file(str(path), BUCKET, key)


def ensure_secrets(core: Any, namespace: str, info: ClusterInfo) -> None:
    alphabet = string.ascii_letters + string.digits
    wanted = {
        "s3-creds": {"accessKeyId": info.s3_access_key, "secretAccessKey": info.s3_secret_key},
        # Stands in for an app's persistence key: the trainer gets it by reference only.
        "persistence": {"serviceRoleKey": "".join(secrets.choice(alphabet) for _ in range(40))},
    }
    for name, data in wanted.items():
        body = {"metadata": {"name": name}, "stringData": data}
        try:
            core.create_namespaced_secret(namespace, body)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
            core.replace_namespaced_secret(name, namespace, body)


def apply_job(api: Any, info: ClusterInfo, namespace: str) -> str:
    text = EXAMPLE.read_text().replace("${S3_ENDPOINT}", info.s3_endpoint)
    name = str(yaml.safe_load(text)["metadata"]["name"])
    custom = client.CustomObjectsApi(api)
    try:
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        say(f"deleted the previous run of {name}")
        wait_for(lambda: not _exists(custom, namespace, name), 60, f"{name} to be deleted")
    except client.ApiException as exc:
        if exc.status != 404:
            raise
    # The admission webhook (it records who created the job) answers once the operator serves it.
    wait_for(lambda: apply_yaml(api, text, namespace) or True, 60, "the operator's admission webhook")
    say(f"applied examples/quickstart.yaml: FineTuneJob {namespace}/{name}")
    return name


def _exists(custom: Any, namespace: str, name: str) -> bool:
    try:
        custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except client.ApiException:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Following the job


def progress_line(status: dict[str, Any]) -> str:
    progress = status.get("progress") or {}
    step, total = int(progress.get("step") or 0), int(progress.get("totalSteps") or 0)
    width = 30
    filled = int(width * step / total) if total else 0
    bar = "#" * filled + "-" * (width - filled)
    loss = progress.get("loss")
    eta = progress.get("etaSeconds")
    parts = [f"{status.get('phase', 'Pending'):<10}", f"[{bar}] {step}/{total or '?'}"]
    if loss is not None:
        parts.append(f"loss {float(loss):.3f}")
    if eta is not None:
        parts.append(f"ETA {int(float(eta))}s")
    return "  ".join(parts)


def sample_lines(samples: list[dict[str, Any]], phase: str) -> list[str]:
    """Held-out prompts with the reference and the model's answer of one phase (baseline, final)."""
    lines = []
    for sample in samples:
        lines.append(f"    {sample['prompt']}")
        lines.append(f"      reference: {sample['reference']}")
        lines.append(f"      {phase + ':':<10} {sample.get(phase, '(not answered)')}")
    return lines


def follow(api: Any, namespace: str, name: str, timeout: float) -> dict[str, Any]:
    custom = client.CustomObjectsApi(api)
    deadline = time.monotonic() + timeout
    last = ""
    shown_baseline = False
    while time.monotonic() < deadline:
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        status = obj.get("status") or {}
        samples = status.get("samples") or []
        if not shown_baseline and samples and all("baseline" in s for s in samples):
            print("\n    the base model, before training, on held-out test prompts:")
            print("\n".join(sample_lines(samples, "baseline")), flush=True)
            shown_baseline, last = True, ""
        line = progress_line(status)
        if line != last:
            end = "\n" if not sys.stdout.isatty() else ""
            print(f"\r    {line:<90}", end=end, flush=True)
            last = line
        if status.get("phase") in ("Succeeded", "Failed"):
            print()
            return dict(obj)
        time.sleep(2)
    print()
    raise SystemExit(f"the job did not finish within {timeout:.0f}s; see `kubectl describe ftj {name}`")


# ---------------------------------------------------------------------------------------------
# Summary


def prometheus_range(info: ClusterInfo, query: str, start: float, end: float) -> list[tuple[float, float]]:
    params = urllib.parse.urlencode({"query": query, "start": start, "end": end, "step": "2s"})
    url = f"{info.prometheus_url}/api/v1/query_range?{params}"
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (the stack's own URL)
        result = json.load(response)["data"]["result"]
    return [(float(t), float(v)) for t, v in result[0]["values"]] if result else []


def by_step(values: list[tuple[float, float]], steps: list[tuple[float, float]]) -> list[tuple[int, float]]:
    """(optimizer step, value) from two series sampled at the same times; a value held over several
    samples of one step counts once, as its last sample."""
    step_at = dict(steps)
    points: dict[int, float] = {}
    for t, value in values:
        if t in step_at:
            points[int(step_at[t])] = value
    return sorted(points.items())


def loss_series(info: ClusterInfo, namespace: str, name: str, started: float) -> dict[str, Any]:
    selector = f'{{namespace="{namespace}",job="{name}"}}'
    end = time.time()  # one time grid for every series, so they join on timestamps
    steps = prometheus_range(info, f"finetune_step{selector}", started, end)
    baseline = prometheus_range(
        info, f'finetune_eval_metric_value{{namespace="{namespace}",job="{name}",'
        f'metric="eval_loss",split="baseline"}}', started, end,
    )  # fmt: skip
    return {
        "train loss": by_step(prometheus_range(info, f"finetune_train_loss{selector}", started, end), steps),
        "eval loss": by_step(prometheus_range(info, f"finetune_eval_loss{selector}", started, end), steps),
        "baseline": baseline[-1][1] if baseline else None,
    }


def plot(info: ClusterInfo, namespace: str, name: str, started: float, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = loss_series(info, namespace, name, started)
    if not series["train loss"]:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for label in ("train loss", "eval loss"):
        if series[label]:
            ax.plot(
                *zip(*series[label], strict=True), marker="." if label == "eval loss" else "", label=label
            )
    if series["baseline"] is not None:
        ax.axhline(series["baseline"], linestyle="--", color="grey", label="baseline eval loss")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.set_title(f"{namespace}/{name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _data_line(data: dict[str, Any]) -> str:
    split = data.get("split") or {}
    return (
        f"{data.get('raw')} raw, {data.get('duplicatesRemoved', 0)} duplicates and "
        f"{data.get('nearDuplicatesRemoved', 0)} near duplicates removed, {data.get('examples')} examples, "
        f"{data.get('tokens')} tokens; "
        f"split {split.get('train')}/{split.get('validation')}/{split.get('test')}"
    )


def _metric_lines(baseline: dict[str, float], final: dict[str, float]) -> list[str]:
    nan = float("nan")
    return [
        f"  {metric:<12} baseline {baseline.get(metric, nan):.4f} -> final {final.get(metric, nan):.4f}"
        for metric in sorted(set(baseline) | set(final))
    ]


def _verified_in_s3(info: ClusterInfo, namespace: str, name: str) -> list[str]:
    prefix = f"checkpoints/{namespace}/{name}/"
    listing = s3_client(info).list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return sorted({o["Key"].rsplit("/", 2)[-2] for o in listing if o["Key"].endswith("/VERIFIED")})


def summary(info: ClusterInfo, obj: dict[str, Any], started: float) -> bool:
    status = obj.get("status") or {}
    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    print(f"\nFineTuneJob {namespace}/{name}: {status.get('phase')} - {status.get('message', '')}")
    if status.get("data"):
        print(f"  data:        {_data_line(status['data'])}")
    if status.get("samples"):
        print("  the tuned model on the same held-out prompts:")
        print("\n".join(line[2:] for line in sample_lines(status["samples"], "final")))
    print("\n".join(_metric_lines(status.get("baseline") or {}, status.get("final") or {})))
    checkpoint = status.get("checkpoint") or {}
    step, verified_flag = checkpoint.get("step"), checkpoint.get("verified")
    print(f"  checkpoint:  {checkpoint.get('uri')} (step {step}, verified {verified_flag})")
    verified = _verified_in_s3(info, namespace, name)
    print(f"  in S3:       {len(verified)} verified: {', '.join(verified)}")
    predictions = status.get("predictions") or {}
    if predictions:
        print(f"  predictions: {predictions.get('passed')} checks passed, {predictions.get('failed')} failed")
    png = (
        plot(info, namespace, name, started, REPO_ROOT / ".run" / "quickstart-loss.png")
        if info.prometheus_url
        else None
    )
    if png:
        print(f"  loss plot:   {png}")
    if info.prometheus_url:
        print(f'  Prometheus:  {info.prometheus_url}  (try finetune_train_loss{{job="{name}"}})')
    print(f"  kubectl:     export KUBECONFIG={info.kubeconfig}; kubectl describe ftj {name}")
    return bool(status.get("phase") == "Succeeded")


def current_cluster_target() -> ClusterInfo:
    """The user's own cluster: S3 must be reachable from its pods, so the user names it."""
    missing = [
        v for v in ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(v)
    ]
    if missing:
        raise SystemExit(
            f"--use-current-cluster needs an S3 store its pods can reach: set {', '.join(missing)} "
            "(the bucket 'quickstart' is created if missing)"
        )
    kubeconfig = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    return ClusterInfo(
        run_id="current", run_dir=str(RUN_DIR), kubeconfig=kubeconfig, apiserver_url="", ca_cert="",
        etcd_url="", node_name="", s3_endpoint=os.environ["S3_ENDPOINT_URL"],
        s3_access_key=os.environ["AWS_ACCESS_KEY_ID"], s3_secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
    )  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--down", action="store_true", help="stop the local stack at the end")
    parser.add_argument(
        "--use-current-cluster",
        action="store_true",
        help="use the cluster in KUBECONFIG (needs S3_ENDPOINT_URL and AWS_* credentials)",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the job")
    args = parser.parse_args()
    if not args.use_current_cluster and current_cluster_reachable() and sys.stdin.isatty():
        answer = input("Your kubeconfig reaches a cluster. Use it instead of the local stack? [y/N] ")
        args.use_current_cluster = answer.strip().lower() in ("y", "yes")
    return args


def main() -> int:
    args = parse_args()
    info = current_cluster_target() if args.use_current_cluster else start_stack()
    try:
        api = config.new_client_from_config(info.kubeconfig)
        install_chart(info)
        upload_model_and_data(info)
        ensure_secrets(client.CoreV1Api(api), "default", info)
        started = time.time()
        name = apply_job(api, info, "default")
        ok = summary(info, follow(api, "default", name, args.timeout), started)
    finally:
        if args.use_current_cluster:
            pass
        elif args.down:
            stop_run(RUN_DIR)
            say("stopped the local stack")
        else:
            say(
                f"the stack keeps running; stop it: .venv/bin/python -m localcluster --run-dir {RUN_DIR} down"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
