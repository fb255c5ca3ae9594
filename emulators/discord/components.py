"""Message components and modals as a Discord client handles them: finding a component on a
message, and building a MODAL_SUBMIT's ``data.components`` from the modal the bot showed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def find_component(
    components: Sequence[Mapping[str, Any]], custom_id: str
) -> dict[str, Any] | None:
    for comp in components:
        if comp.get("custom_id") == custom_id:
            return dict(comp)
        for key in ("components",):
            found = find_component(comp.get(key) or [], custom_id)
            if found is not None:
                return found
        for key in ("accessory", "component"):
            child = comp.get(key)
            if isinstance(child, Mapping):
                found = find_component([child], custom_id)
                if found is not None:
                    return found
    return None


def modal_submission(
    definition: Mapping[str, Any] | None, values: Mapping[str, str | Sequence[str]]
) -> list[dict[str, Any]]:
    """Build MODAL_SUBMIT ``data.components`` mirroring the modal's layout."""
    used: set[str] = set()

    def value_for(comp: Mapping[str, Any], label: str | None) -> Any:
        for key in (comp.get("custom_id"), label, comp.get("label")):
            if key is not None and key in values:
                used.add(key)
                return values[key]
        return None

    def submit(comp: Mapping[str, Any], label: str | None) -> dict[str, Any] | None:
        ctype = comp.get("type")
        value = value_for(comp, label)
        out: dict[str, Any] = {"type": ctype, "custom_id": comp.get("custom_id")}
        if "id" in comp:
            out["id"] = comp["id"]
        if ctype == 4:
            text = (comp.get("value") or "") if value is None else str(value)
            if comp.get("required", True) and not text:
                raise ValueError(f"text input {label or comp.get('custom_id')!r} is required")
            if len(text) > comp.get("max_length", 4000) or (
                text and len(text) < comp.get("min_length", 0)
            ):
                raise ValueError(
                    f"text input {label or comp.get('custom_id')!r}: length out of range"
                )
            out["value"] = text
            return out
        if ctype in (3, 5, 6, 7, 8):
            picked = [] if value is None else ([value] if isinstance(value, str) else list(value))
            out["values"] = picked
            return out
        return None

    if definition is None:
        return [
            {"type": 1, "components": [{"type": 4, "custom_id": k, "value": str(v)}]}
            for k, v in values.items()
        ]
    result: list[dict[str, Any]] = []
    for comp in definition.get("components", []):
        if comp.get("type") == 1:
            children = [
                c for c in (submit(child, None) for child in comp.get("components", [])) if c
            ]
            row: dict[str, Any] = {"type": 1, "components": children}
            if "id" in comp:
                row["id"] = comp["id"]
            result.append(row)
        elif comp.get("type") == 18:
            child = submit(comp.get("component") or {}, comp.get("label"))
            if child is not None:
                label: dict[str, Any] = {"type": 18, "component": child}
                if "id" in comp:
                    label["id"] = comp["id"]
                result.append(label)
    unknown = [k for k in values if k not in used]
    if unknown:
        raise LookupError(f"the modal has no input(s) {unknown}")
    return result
