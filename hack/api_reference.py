"""Writes docs/api-reference.md, the FineTuneJob field reference, from the generated CRD schema
(itself generated from the pydantic models), so the docs never drift from the API.

    python hack/api_reference.py [--check]
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune_operator.crd import build_crd

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "api-reference.md"


def _type(node: dict[str, Any]) -> str:
    kind = str(node.get("type", "object"))
    if kind == "array":
        return f"[]{_type(node.get('items', {}))}"
    if kind == "object" and "additionalProperties" in node:
        return f"map[string]{_type(node['additionalProperties'])}"
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    return kind


def _default(node: dict[str, Any]) -> str:
    if "default" not in node:
        return ""
    value = node["default"]
    if isinstance(value, dict | list) and len(json.dumps(value)) > 40:
        return "(see fields)"
    return f"`{json.dumps(value)}`"


def _rows(node: dict[str, Any], path: str, required: bool) -> Iterator[str]:
    description = " ".join(str(node.get("description", "")).split()).replace("|", "\\|")
    mark = " (required)" if required else ""
    yield f"| `{path}`{mark} | {_type(node)} | {_default(node)} | {description} |"
    children = node.get("properties") or (node.get("items") or {}).get("properties") or {}
    needed = set(node.get("required") or (node.get("items") or {}).get("required") or [])
    suffix = "[]" if node.get("type") == "array" else ""
    for name, child in children.items():
        yield from _rows(child, f"{path}{suffix}.{name}", name in needed)


def render() -> str:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    lines = [
        "# FineTuneJob reference",
        "",
        "Generated from the API models by `python hack/api_reference.py`; do not edit by hand.",
        "`kubectl explain ftj.spec.<field>` shows the same descriptions.",
        "",
    ]
    for top in ("spec", "status"):
        lines += [f"## {top}", "", "| Field | Type | Default | Meaning |", "| --- | --- | --- | --- |"]
        node = schema["properties"][top]
        for name, child in node.get("properties", {}).items():
            lines += list(_rows(child, f"{top}.{name}", name in set(node.get("required") or [])))
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when the checked-in file is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            diff = difflib.unified_diff(current.splitlines(), text.splitlines(), "checked-in", "generated")
            print("\n".join(list(diff)[:40]), file=sys.stderr)
            print(f"{OUTPUT} is stale: run `python hack/api_reference.py`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
