"""The generated CRD: checked in and current, structural (or the API server refuses it), every
field described (for `kubectl explain`), CEL rules present, compilable and cheap."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from finetune_operator import api
from finetune_operator.crd import DEFAULT_OUTPUT, build_crd, main, render_crd_yaml, stale_diff

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = REPO_ROOT / DEFAULT_OUTPUT


def nodes(schema: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from nodes(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), Mapping):
        yield from nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), Mapping):
        yield from nodes(schema["additionalProperties"], f"{path}{{}}")


def test_checked_in_crd_matches_the_models() -> None:
    diff = stale_diff(CHECKED_IN, render_crd_yaml())
    assert diff == "", f"{CHECKED_IN} is stale; run `python -m finetune_operator.crd`:\n{diff[:3000]}"


def test_check_mode_reports_a_stale_file_and_write_mode_fixes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "crd.yaml"
    target.write_text(render_crd_yaml().replace("shortNames:\n    - ftj", "shortNames:\n    - fj"))
    assert main(["--check", "--output", str(target)]) == 1
    out = capsys.readouterr()
    assert "-    - fj" in out.out and "+    - ftj" in out.out
    assert "stale" in out.err
    assert main(["--output", str(target)]) == 0
    assert main(["--check", "--output", str(target)]) == 0


def test_names_scope_status_and_printer_columns(schema: dict[str, Any]) -> None:
    crd = build_crd()
    assert crd["metadata"]["name"] == "finetunejobs.finetune.dev"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["singular"]) == (
        "FineTuneJob",
        "finetunejobs",
        "finetunejob",
    )
    assert names["shortNames"] == ["ftj"] and names["categories"] == ["finetune"]
    assert crd["spec"]["scope"] == "Namespaced"
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert list(columns)[:6] == ["Phase", "Method", "Progress", "Loss", "Checkpoint", "Age"]
    schema_paths = {path for path, _ in nodes(schema)}
    for name, json_path in columns.items():
        if json_path != ".metadata.creationTimestamp":
            assert json_path in schema_paths, f"printer column {name} points at a missing field {json_path}"


FORBIDDEN_KEYS = {"$ref", "anyOf", "oneOf", "allOf", "not", "patternProperties", "const", "$defs", "title"}


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    for path, node in nodes(schema):
        assert "type" in node, f"{path or '<root>'} has no type"
        assert not FORBIDDEN_KEYS & node.keys(), f"{path}: {FORBIDDEN_KEYS & node.keys()}"
        assert node.get("uniqueItems") is not True, f"{path}: uniqueItems is refused by the API server"
        if "additionalProperties" in node:
            assert isinstance(node["additionalProperties"], Mapping), (
                f"{path}: additionalProperties must be a schema"
            )
            assert "properties" not in node, f"{path}: properties and additionalProperties together"
        if node["type"] == "array":
            assert "items" in node, f"{path}: array without items"
        if node.get("x-kubernetes-list-type") == "map":
            keys = node["x-kubernetes-list-map-keys"]
            assert set(keys) <= set(node["items"].get("required", [])), f"{path}: map keys must be required"
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node


def test_every_property_has_a_description(schema: dict[str, Any]) -> None:
    missing = []
    for path, node in nodes(schema):
        for name, sub in node.get("properties", {}).items():
            if (path, name) == ("", "metadata"):
                continue  # the API server supplies metadata's schema and refuses any other
            if not sub.get("description", "").strip():
                missing.append(f"{path}.{name}")
    assert missing == []


def test_kubectl_explain_teaches_the_method_choice(schema: dict[str, Any]) -> None:
    method = schema["properties"]["spec"]["properties"]["method"]
    text = method["properties"]["type"]["description"]
    for phrase in ("on-prem", "qlora", "cloud", "DeepSpeed", "5,000"):
        assert phrase in text
    assert method["properties"]["type"]["enum"] == ["auto", "lora", "qlora", "full"]
    assert method["properties"]["type"]["default"] == "auto"


def rules_at(schema: Mapping[str, Any], path: str) -> list[dict[str, str]]:
    return dict(nodes(schema))[path].get("x-kubernetes-validations", [])  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("path", "phrase"),
    [
        (".spec.method", "qlora"),
        (".spec.method", "deepspeed"),
        (".spec", "resources.nodes"),
        (".spec.model", "self == oldSelf"),
        (".spec.dataset", "self == oldSelf"),
        (".spec.method", "self == oldSelf"),
        (".spec.env[]", "KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL"),
        (".spec.goal", "testFile"),
    ],
)
def test_cross_field_rules_are_in_the_crd(schema: dict[str, Any], path: str, phrase: str) -> None:
    assert any(phrase in rule["rule"] for rule in rules_at(schema, path)), rules_at(schema, path)


def all_rules(schema: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any], dict[str, str]]]:
    for path, node in nodes(schema):
        for rule in node.get("x-kubernetes-validations", []):
            yield path, node, rule


def test_every_rule_compiles_and_names_a_real_field(schema: dict[str, Any]) -> None:
    env = celpy.Environment()
    count = 0
    for path, node, rule in all_rules(schema):
        count += 1
        env.compile(rule["rule"])
        if "messageExpression" in rule:
            env.compile(rule["messageExpression"])
        assert rule["message"].startswith("spec."), (
            f"{path}: message should name the field: {rule['message']}"
        )
        if "fieldPath" in rule:
            target: Mapping[str, Any] = node
            for part in rule["fieldPath"].strip(".").split("."):
                assert part in target.get("properties", {}), (
                    f"{path}: fieldPath {rule['fieldPath']} does not exist"
                )
                target = target["properties"][part]
    assert count >= 15


def unbounded(node: Mapping[str, Any], path: str) -> Iterator[str]:
    for sub_path, sub in nodes(node, path):
        kind = sub["type"]
        if kind == "string" and "maxLength" not in sub and "enum" not in sub and "format" not in sub:
            yield sub_path
        if kind == "array" and "maxItems" not in sub:
            yield sub_path
        if kind == "object" and "additionalProperties" in sub and "maxProperties" not in sub:
            yield sub_path


def test_rules_only_touch_bounded_data_so_their_cost_is_accepted(schema: dict[str, Any]) -> None:
    offenders = [p for path, node, _ in all_rules(schema) for p in unbounded(node, path)]
    assert sorted(set(offenders)) == []


def test_crd_defaults_agree_with_the_models(
    spec_dict: Callable[..., dict[str, Any]], crd_defaults: Callable[[Any], Any]
) -> None:
    """The API server stores the CRD's defaults; the operator must read the same spec back."""
    raw = spec_dict()
    defaulted = crd_defaults({"spec": raw})["spec"]
    assert api.parse_spec(defaulted) == api.parse_spec(raw)
    assert defaulted["method"]["type"] == "auto"
    assert defaulted["resources"]["gpusPerNode"] == 1
    assert defaulted["dataset"]["split"]["test"] == 0.05


def test_yaml_has_a_do_not_edit_header_and_parses() -> None:
    text = render_crd_yaml()
    assert text.startswith("# Generated by `python -m finetune_operator.crd`")
    assert yaml.safe_load(text) == build_crd()
