"""Turns a pod's spec into what a process needs: environment variables and volume
directories, resolved the way the kubelet resolves them."""

from __future__ import annotations

import base64
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

Obj = dict[str, Any]


class MountError(RuntimeError):
    """A volume or env source is not available yet (the kubelet retries these)."""


class Lookup(Protocol):
    """Reads the objects a pod refers to; None when absent."""

    def secret(self, namespace: str, name: str) -> dict[str, str] | None: ...

    def config_map(self, namespace: str, name: str) -> dict[str, str] | None: ...

    def token(
        self, namespace: str, service_account: str, pod: Obj, audience: str | None, seconds: int
    ) -> str: ...

    def root_ca(self) -> str: ...


@dataclass(frozen=True)
class PodContext:
    pod: Obj
    pod_ip: str
    node_name: str

    @property
    def namespace(self) -> str:
        return str(self.pod["metadata"]["namespace"])


def _field_ref(ctx: PodContext, path: str) -> str:
    meta, spec = ctx.pod["metadata"], ctx.pod["spec"]
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": ctx.node_name,
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": ctx.pod_ip,
        "status.podIPs": ctx.pod_ip,
        "status.hostIP": "127.0.0.1",
    }
    if path in simple:
        return str(simple[path])
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise MountError(f"fieldRef {path!r} is not supported by the node agent")


_BINARY_SUFFIX = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DECIMAL_SUFFIX = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "m": 10**-3}


def parse_quantity(value: str) -> float:
    """A Kubernetes quantity ("500m", "2Gi", "1") as a number."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    if not match:
        raise ValueError(f"not a quantity: {value!r}")
    number, suffix = float(match.group(1)), match.group(2)
    if suffix in _BINARY_SUFFIX:
        return number * _BINARY_SUFFIX[suffix]
    if suffix in _DECIMAL_SUFFIX:
        return number * _DECIMAL_SUFFIX[suffix]
    raise ValueError(f"unknown quantity suffix in {value!r}")


def _resource_ref(container: Obj, ref: Obj) -> str:
    kind, _, name = ref["resource"].partition(".")
    resources = container.get("resources") or {}
    value = (resources.get(kind) or {}).get(name) or (resources.get("limits") or {}).get(name)
    if value is None:
        return "0"
    divisor = parse_quantity(ref.get("divisor", "1"))
    # The kubelet rounds up, so "500m" of cpu with divisor 1 becomes 1.
    result = -(-parse_quantity(value) // divisor)
    return str(int(result))


def _keyed(source: dict[str, str] | None, what: str, ref: Obj) -> str | None:
    if source is None:
        if ref.get("optional"):
            return None
        raise MountError(f'{what} "{ref["name"]}" not found')
    if ref["key"] not in source:
        if ref.get("optional"):
            return None
        raise MountError(f'key "{ref["key"]}" not found in {what} "{ref["name"]}"')
    return source[ref["key"]]


def _value_from(ctx: PodContext, container: Obj, source: Obj, lookup: Lookup) -> str | None:
    if "secretKeyRef" in source:
        ref = source["secretKeyRef"]
        return _keyed(lookup.secret(ctx.namespace, ref["name"]), "secret", ref)
    if "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        return _keyed(lookup.config_map(ctx.namespace, ref["name"]), "configmap", ref)
    if "fieldRef" in source:
        return _field_ref(ctx, source["fieldRef"]["fieldPath"])
    if "resourceFieldRef" in source:
        return _resource_ref(container, source["resourceFieldRef"])
    raise MountError(f"unsupported env source {sorted(source)}")


_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)|\$\$")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known variables expand, $$ escapes, others stay."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(replace, text)


def container_env(ctx: PodContext, container: Obj, lookup: Lookup) -> dict[str, str]:
    """The variables the spec declares, in the kubelet's order: envFrom, then env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            ref = source["configMapRef"]
            data = lookup.config_map(ctx.namespace, ref["name"])
            what = "configmap"
        else:
            ref = source["secretRef"]
            data = lookup.secret(ctx.namespace, ref["name"])
            what = "secret"
        if data is None and not ref.get("optional"):
            raise MountError(f'{what} "{ref["name"]}" not found')
        env.update({prefix + k: v for k, v in (data or {}).items()})
    for var in container.get("env") or []:
        if "valueFrom" in var:
            value = _value_from(ctx, container, var["valueFrom"], lookup)
            if value is not None:
                env[var["name"]] = value
        else:
            env[var["name"]] = expand(var.get("value", ""), env)
    return env


def _write_files(directory: Path, files: dict[str, str | bytes], mode: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for relative, content in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
        path.chmod(mode)


def _select(data: dict[str, str], items: list[Obj] | None) -> dict[str, str]:
    if not items:
        return dict(data)
    return {item["path"]: data[item["key"]] for item in items if item["key"] in data}


def _downward_files(ctx: PodContext, items: list[Obj], container: Obj) -> dict[str, str]:
    files = {}
    for item in items:
        if "fieldRef" in item:
            files[item["path"]] = _field_ref(ctx, item["fieldRef"]["fieldPath"])
        else:
            files[item["path"]] = _resource_ref(container, item["resourceFieldRef"])
    return files


def _projected(ctx: PodContext, sources: list[Obj], lookup: Lookup) -> dict[str, str]:
    files: dict[str, str] = {}
    for source in sources:
        if "serviceAccountToken" in source:
            sat = source["serviceAccountToken"]
            account = ctx.pod["spec"].get("serviceAccountName", "default")
            token = lookup.token(
                ctx.namespace, account, ctx.pod, sat.get("audience"), sat.get("expirationSeconds", 3607)
            )
            files[sat["path"]] = token
        elif "configMap" in source:
            files.update(_config_map_files(ctx, source["configMap"], lookup))
        elif "secret" in source:
            files.update(_secret_files(ctx, source["secret"], lookup))
        elif "downwardAPI" in source:
            files.update(_downward_files(ctx, source["downwardAPI"].get("items", []), {}))
    return files


def _config_map_files(ctx: PodContext, ref: Obj, lookup: Lookup) -> dict[str, str]:
    name = ref["name"]
    if name == "kube-root-ca.crt":
        data: dict[str, str] | None = {"ca.crt": lookup.root_ca()}
    else:
        data = lookup.config_map(ctx.namespace, name)
    if data is None:
        if ref.get("optional"):
            return {}
        raise MountError(f'configmap "{name}" not found')
    return _select(data, ref.get("items"))


def _secret_files(ctx: PodContext, ref: Obj, lookup: Lookup) -> dict[str, str]:
    name = ref.get("secretName") or ref["name"]
    data = lookup.secret(ctx.namespace, name)
    if data is None:
        if ref.get("optional"):
            return {}
        raise MountError(f'secret "{name}" not found')
    return _select(data, ref.get("items"))


def materialize_volume(ctx: PodContext, volume: Obj, directory: Path, lookup: Lookup) -> None:
    """Writes one volume's files into `directory` (emptyDir stays empty)."""
    if directory.exists() and "emptyDir" not in volume:
        shutil.rmtree(directory)
    mode = 0o644
    if "emptyDir" in volume:
        directory.mkdir(parents=True, exist_ok=True)
        return
    if "configMap" in volume:
        files: dict[str, str] = _config_map_files(ctx, volume["configMap"], lookup)
        mode = volume["configMap"].get("defaultMode", mode)
    elif "secret" in volume:
        files = _secret_files(ctx, volume["secret"], lookup)
        mode = volume["secret"].get("defaultMode", mode)
    elif "downwardAPI" in volume:
        files = _downward_files(ctx, volume["downwardAPI"].get("items", []), {})
    elif "projected" in volume:
        files = _projected(ctx, volume["projected"].get("sources", []), lookup)
        mode = volume["projected"].get("defaultMode", mode)
    elif "hostPath" in volume:
        return
    else:
        raise MountError(f"volume {volume['name']!r}: type {sorted(set(volume) - {'name'})} is not supported")
    _write_files(directory, dict(files), mode)


def decode_secret_data(data: dict[str, str] | None) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (data or {}).items()}


# --- entrypoints ------------------------------------------------------------------------------------------

# Images are not pulled here, but this project's own images are known by their Dockerfiles: a
# container that gives only `args` runs its image's ENTRYPOINT, as it would on a real node.
IMAGE_DOCKERFILES = {
    "finetune-trainer": "trainer_image/Dockerfile",
    "finetune-operator": "operator/Dockerfile",
}
_ENTRYPOINT = re.compile(r"^ENTRYPOINT\s+(\[.*\])\s*$", re.MULTILINE)


def dockerfile_entrypoint(text: str) -> list[str]:
    """The last exec-form ENTRYPOINT of a Dockerfile (the one the image keeps)."""
    found = _ENTRYPOINT.findall(text)
    if not found:
        raise ValueError("the Dockerfile has no exec-form ENTRYPOINT")
    entrypoint = json.loads(found[-1])
    if not isinstance(entrypoint, list) or not all(isinstance(a, str) for a in entrypoint):
        raise ValueError(f"ENTRYPOINT {found[-1]} is not a list of strings")
    return entrypoint


def image_name(image: str) -> str:
    """ghcr.io/org/finetune-trainer:0.1.0@sha256:... -> finetune-trainer"""
    return image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]


def container_argv(container: Obj, repo_root: Path, binaries: dict[str, str]) -> list[str]:
    """What the container runs: its command, else its image's ENTRYPOINT; then its args. Absolute
    paths of the image's own binaries (its init) map to `binaries`, built for this machine."""
    command = container.get("command") or []
    if not command:
        dockerfile = IMAGE_DOCKERFILES.get(image_name(str(container.get("image", ""))))
        if dockerfile is None:
            raise MountError(
                f"container {container['name']}: no command, and image {container.get('image')!r} is not one "
                f"of this project's ({', '.join(IMAGE_DOCKERFILES)}), whose ENTRYPOINT the node agent knows"
            )
        command = dockerfile_entrypoint((repo_root / dockerfile).read_text())
        command = [binaries.get(command[0], command[0]), *command[1:]]
    return [*command, *(container.get("args") or [])]
