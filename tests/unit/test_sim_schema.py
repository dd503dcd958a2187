"""The simulator's schema-driven values are valid for the schemas the openai SDK sends (pydantic models, strict mode)."""

from __future__ import annotations

from datetime import date, datetime
from enum import Enum
from typing import Any, Literal
from uuid import UUID

from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel, Field

from tools.sim_schema import generate


class Colour(Enum):
    RED = "red"
    BLUE = "blue"


class Node(BaseModel):
    label: str
    children: list[Node]


class Item(BaseModel):
    sku: str = Field(min_length=3, max_length=6)
    quantity: int = Field(ge=2, le=9)
    price: float = Field(gt=10.0, multiple_of=0.25)


class Order(BaseModel):
    id: UUID
    placed: datetime
    ship_on: date
    colour: Colour
    kind: Literal["retail", "wholesale"]
    note: str | None
    items: list[Item] = Field(min_length=2)
    tree: Node
    urgent: bool
    extra: dict[str, int] | None


def test_strict_schema_of_a_nested_pydantic_model_yields_a_valid_instance() -> None:
    value = generate(to_strict_json_schema(Order), "hello world")
    order = Order.model_validate(value)
    assert len(order.items) == 2 and order.items[0].quantity == 2 and order.items[0].price > 10
    assert order.note == "hello world" and order.kind == "retail" and order.colour is Colour.RED
    assert order.tree.children and order.tree.children[0].label == "hello world"


def test_recursive_schema_ends() -> None:
    value = generate(Node.model_json_schema())
    depth, node = 0, value
    while node["children"]:
        node, depth = node["children"][0], depth + 1
    assert 0 < depth <= 10


def test_type_lists_const_allof_and_bounds() -> None:
    schema: dict[str, Any] = {"type": "object", "properties": {
        "maybe": {"type": ["null", "integer"], "exclusiveMinimum": 4},
        "fixed": {"const": 42},
        "merged": {"allOf": [{"type": "object", "properties": {"a": {"type": "boolean"}}},
                             {"properties": {"b": {"type": "number", "exclusiveMaximum": 1}}}]},
        "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "maxItems": 2},
        "empty": {"type": "array", "maxItems": 0},
        "nothing": {"type": "null"},
    }}
    assert generate(schema, "hint") == {"maybe": 5, "fixed": 42, "merged": {"a": True, "b": 0.5},
                                        "pair": ["hint", 1], "empty": [], "nothing": None}


def test_anything_goes_schema_is_a_string() -> None:
    assert generate({}, "x") == "x" and generate(True, "y") == "y"
