"""Hypothesis strategies for request bodies, built from the server's own OpenAPI schema.

Covers the JSON-schema subset pydantic emits for our models ($ref, anyOf, enum, type with bounds,
arrays, objects with properties and required). Values stay small (short strings and lists) but reach
every bound the schema states, so what the schema calls valid is what the test sends.
"""

from __future__ import annotations

import math

from hypothesis import strategies as st

# Any code point, lone surrogates included: JSON can carry them and a client may send them.
TEXT = st.text(st.characters(exclude_categories=()), max_size=24)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False), TEXT)


def _integers(schema: dict) -> st.SearchStrategy:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    lo = None if lo is None else int(lo) + (1 if "exclusiveMinimum" in schema else 0)
    hi = None if hi is None else int(hi)
    # Small values (token ids inside a baby vocabulary, short counts) and the schema's own edges.
    small = st.integers(max(lo, -2) if lo is not None else -2, min(hi, 400) if hi is not None else 400)
    edges = [v for v in (lo, hi) if v is not None]
    return st.one_of(small, st.integers(lo, hi), *(st.just(v) for v in edges))


def _numbers(schema: dict) -> st.SearchStrategy:
    lo = schema.get("minimum", schema.get("exclusiveMinimum"))
    hi = schema.get("maximum", schema.get("exclusiveMaximum"))
    floats = st.floats(lo, hi, exclude_min="exclusiveMinimum" in schema, exclude_max="exclusiveMaximum" in schema,
                       allow_nan=False, allow_infinity=False)
    # Boundaries are where arithmetic breaks (a temperature of 5e-324 overflows logits / temperature).
    edges = [v for v in (schema.get("minimum"), schema.get("maximum")) if v is not None]
    if lo is not None:
        edges.append(math.nextafter(lo, math.inf))
    return st.one_of(floats, st.sampled_from(edges)) if edges else floats


def from_schema(schema: dict, components: dict) -> st.SearchStrategy:
    if "$ref" in schema:
        return st.deferred(lambda: from_schema(components[schema["$ref"].rsplit("/", 1)[1]], components))
    if "anyOf" in schema:
        return st.one_of(*(from_schema(s, components) for s in schema["anyOf"]))
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "string":
        return TEXT
    if kind == "integer":
        return _integers(schema)
    if kind == "number":
        return _numbers(schema)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        items = from_schema(schema.get("items", {}), components)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 4), 4))
    if kind == "object":
        props = schema.get("properties", {})
        if not props:
            return st.dictionaries(st.sampled_from(["type", "text", "image_url", "x"]), SCALARS, max_size=3)
        required = set(schema.get("required", []))
        return st.fixed_dictionaries({k: from_schema(v, components) for k, v in props.items() if k in required},
                                     optional={k: from_schema(v, components) for k, v in props.items()
                                               if k not in required})
    return SCALARS


def request_bodies(openapi: dict, path: str) -> st.SearchStrategy:
    """Bodies for POST `path` as its OpenAPI request schema describes them."""
    schema = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return from_schema(schema, openapi["components"]["schemas"])
