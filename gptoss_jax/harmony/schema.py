"""The `# Tools` section of system and developer messages: JSON schemas as openai-harmony's
TypeScript-like tool definitions.

* Tool namespaces are rendered sorted by their key (openai-harmony keeps them in a BTreeMap);
  properties of a JSON schema keep their order.
* `json_schema_to_typescript` reproduces openai-harmony's output including its oddities: a nested
  object's description is written both above the property and again after `key: `, nested
  closing braces carry the nested indent, and an array of enums is `"x" | "y"[]` (no parentheses).
* Text follows the Rust renderer: `// default: ...` values are serde_json's Display (floats in
  ryu's shortest round-trip layout) and descriptions are split into lines as `str::lines` does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any


def _rust_lines(text: str) -> list[str]:
    """Rust's `str::lines`: split at \\n (dropping a \\r before it); no empty last line."""
    pieces = text.split("\n")
    last = pieces.pop()  # the only piece not followed by a newline
    lines = [p[:-1] if p.endswith("\r") else p for p in pieces]
    return lines + [last] if last else lines


def _format_float(x: float) -> str:
    """A float as serde_json writes it (shortest round-trip digits, ryu's layout)."""
    if x != x or x in (float("inf"), float("-inf")):
        return "null"
    if x == 0:
        return "-0.0" if str(x).startswith("-") else "0.0"
    sign = "-" if x < 0 else ""
    tup = Decimal(repr(abs(x))).as_tuple()
    digits = "".join(map(str, tup.digits)).lstrip("0")
    exp = tup.exponent
    stripped = digits.rstrip("0")
    exp += len(digits) - len(stripped)
    digits = stripped
    length = len(digits)
    kk = length + exp  # the decimal point sits after kk digits
    if 0 <= exp and kk <= 16:
        body = digits + "0" * exp + ".0"
    elif 0 < kk <= 16:
        body = digits[:kk] + "." + digits[kk:]
    elif -5 < kk <= 0:
        body = "0." + "0" * (-kk) + digits
    elif length == 1:
        body = f"{digits}e{kk - 1}"
    else:
        body = f"{digits[0]}.{digits[1:]}e{kk - 1}"
    return sign + body


def _json_display(value) -> str:
    """Compact JSON as serde_json's Display (for `// default: ...` comments)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _format_float(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        return (
            "{"
            + ",".join(f"{json.dumps(str(k), ensure_ascii=False)}:{_json_display(v)}" for k, v in value.items())
            + "}"
        )
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_json_display(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _get(schema, key):
    return schema.get(key) if isinstance(schema, Mapping) else None


def _is_enum(schema) -> bool:
    values = _get(schema, "enum")
    return isinstance(values, list) and len(values) > 0


def _default_text(schema, default) -> str:
    """The text after "default: " - strings are quoted unless the schema is an enum."""
    if isinstance(default, str):
        return default if _is_enum(schema) else f'"{default}"'
    return _json_display(default)


def _nullable(schema, type_str: str) -> str:
    if _get(schema, "nullable") is True and "null" not in type_str:
        return f"{type_str} | null"
    return type_str


def _variant_comments(variant, skip_description: bool, property_description=None) -> str:
    comments = []
    description = _get(variant, "description")
    if not skip_description and isinstance(description, str) and description != property_description:
        comments.append(description)
    if isinstance(variant, Mapping) and "default" in variant:  # a JSON null default counts too
        comments.append("default: " + _default_text(variant, variant["default"]))
    return f" // {' '.join(comments)}" if comments else ""


def json_schema_to_typescript(schema: Any, indent: str = "") -> str:
    """A JSON schema as the TypeScript-like type openai-harmony puts in tool definitions.

    Supported as openai-harmony does: object properties (optional `?`, title / description /
    examples / default comments, nested objects indented by 4), string enums as `"a" | "b"`,
    `oneOf` unions, `nullable`, `type` lists, arrays (`T[]`, `Array<any>` without items),
    integer as number; anything else is `any`."""
    one_of = _get(schema, "oneOf")
    if isinstance(one_of, list):
        out = []
        for variant in one_of:
            type_str = _nullable(variant, json_schema_to_typescript(variant, indent + "   "))
            # At the top level every variant's description is a trailing comment.
            out.append(f"\n{indent} | {type_str}{_variant_comments(variant, False)}")
        return "".join(out)
    kind = _get(schema, "type")
    if isinstance(kind, list):
        names = ["number" if t == "integer" else t for t in kind if isinstance(t, str)]
        if names:
            return " | ".join(names)
        return "any"
    if not isinstance(kind, str):
        return "any"
    if kind == "object":
        return _object_to_typescript(schema, indent)
    if kind == "string":
        values = _get(schema, "enum")
        if isinstance(values, list):
            quoted = [f'"{v}"' for v in values if isinstance(v, str)]
            if quoted:
                return " | ".join(quoted)
        return "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        if isinstance(schema, Mapping) and "items" in schema:
            return json_schema_to_typescript(schema["items"], indent) + "[]"
        return "Array<any>"
    return "any"


def _object_to_typescript(schema: Mapping, indent: str) -> str:
    out = []
    description = _get(schema, "description")
    if isinstance(description, str):
        out.append(f"{indent}// {description}\n")
    out.append("{\n")
    properties = _get(schema, "properties")
    if isinstance(properties, Mapping):
        required = _get(schema, "required")
        required = {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
        for key, prop in properties.items():
            optional = "" if key in required else "?"
            title = _get(prop, "title")
            if isinstance(title, str):
                out.append(f"{indent}// {title}\n{indent}//\n")
            prop_description = _get(prop, "description")
            one_of = _get(prop, "oneOf")
            if one_of is None and isinstance(prop_description, str):
                out.append(f"{indent}// {prop_description}\n")
            examples = _get(prop, "examples")
            if isinstance(examples, list) and examples:
                out.append(f"{indent}// Examples:\n")
                out.extend(f'{indent}// - "{ex}"\n' for ex in examples if isinstance(ex, str))
            if isinstance(one_of, list):
                out.append(_one_of_property(key, prop, one_of, optional, indent))
                continue
            type_str = _nullable(prop, json_schema_to_typescript(prop, indent + "    "))
            line = f"{indent}{key}{optional}: {type_str},"
            # A property with a oneOf that is not a list has its default silently ignored.
            if one_of is None and isinstance(prop, Mapping) and "default" in prop:
                line += " // default: " + _default_text(prop, prop["default"])
            out.append(line + "\n")
    out.append(f"{indent}}}")
    return "".join(out)


def _one_of_property(key: str, prop: Mapping, variants: list, optional: str, indent: str) -> str:
    out = []
    prop_description = _get(prop, "description")
    if not isinstance(prop_description, str):
        prop_description = None
    # The property's description is written above it, unless the first variant repeats it.
    first_description = _get(variants[0], "description") if variants else None
    above = prop_description is not None and prop_description != first_description
    if above:
        out.append(f"{indent}// {prop_description}\n")
    if "default" in prop:
        out.append(f"{indent}// default: {_default_text(prop, prop['default'])}\n")
    out.append(f"{indent}{key}{optional}:\n")
    for i, variant in enumerate(variants):
        type_str = _nullable(variant, json_schema_to_typescript(variant, indent + "   "))
        comments = _variant_comments(
            variant, skip_description=(i == 0 and above), property_description=prop_description
        )
        out.append(f"{indent} | {type_str}{comments}\n")
    out.append(f"{indent},\n")
    return "".join(out)


def _tools_section(namespaces: Mapping) -> str:
    sections = ["# Tools"]
    for key in sorted(namespaces):  # openai-harmony holds namespaces in a BTreeMap
        ns = namespaces[key]
        lines = [f"## {ns['name']}\n"]
        has_tools = bool(ns["tools"])
        for line in _rust_lines(ns.get("description") or ""):
            lines.append(f"// {line}" if has_tools else line)
        if has_tools:
            lines.append(f"namespace {ns['name']} {{\n")
            for tool in ns["tools"]:
                lines.extend(f"// {line}" for line in _rust_lines(tool["description"]))
                if tool.get("parameters") is not None:
                    lines.append(
                        f"type {tool['name']} = (_: {json_schema_to_typescript(tool['parameters'], '')}) => any;\n"
                    )
                else:
                    lines.append(f"type {tool['name']} = () => any;\n")
            lines.append(f"}} // namespace {ns['name']}")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)
