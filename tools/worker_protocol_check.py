"""Is a FileDescriptorSet the protocol the 4.34.0 worker speaks? Checked before any module is generated from it.

Three questions, each answered from descriptors and source text (nothing is imported): do the wire numbers
match upstream's (tools/worker_protocol.py WIRE_FIELDS), does every name the worker's ``protos/__init__.py``
re-exports exist, and does every ``protos.Message(field=...)`` / ``protos.Message.NAME`` in the worker's own
code name a real message, field, nested type or enum value.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import descriptor_pb2

from tools.worker_protocol import PROTOS, WIRE_ENUMS, WIRE_FIELDS


@dataclass
class Index:
    """Top-level messages and enums of the protocol's own files, by short name (as the worker imports them)."""

    messages: dict[str, descriptor_pb2.DescriptorProto] = field(default_factory=dict)
    enums: dict[str, descriptor_pb2.EnumDescriptorProto] = field(default_factory=dict)
    services: dict[str, list[str]] = field(default_factory=dict)  # proto file -> its services

    @classmethod
    def of(cls, fds: descriptor_pb2.FileDescriptorSet) -> Index:
        index = cls()
        for file in fds.file:
            if file.name in PROTOS:
                index.messages.update({m.name: m for m in file.message_type})
                index.enums.update({e.name: e for e in file.enum_type})
                index.services[file.name] = [s.name for s in file.service]
        return index

    def names_in(self, module: str) -> set[str]:
        """What ``from .<module> import NAME`` can find: ``FunctionRpc_pb2``, ``shared.NullableTypes_pb2``, ..."""
        stem = module.lstrip(".").removesuffix("_grpc").removesuffix("_pb2").replace(".", "/") + ".proto"
        if module.endswith("_pb2_grpc"):
            return {n for s in self.services.get(stem, []) for n in (f"{s}Stub", f"{s}Servicer", f"add_{s}Servicer_to_server")}
        return set(self.messages) | set(self.enums) if stem in self.services else set()


def wire_problems(fds: descriptor_pb2.FileDescriptorSet) -> list[str]:
    index, problems = Index.of(fds), []
    for name, expected in WIRE_FIELDS.items():
        found = index.messages.get(name)
        numbers = {f.name: f.number for f in found.field} if found else {}
        problems += [f"{name}.{f}: {'missing' if f not in numbers else f'field {numbers[f]}'}, upstream {n}"
                     for f, n in expected.items() if numbers.get(f) != n]
    for enum, expected in WIRE_ENUMS.items():
        outer, inner = enum.split(".")
        owner = index.messages.get(outer)
        values = {v.name: v.number for e in (owner.enum_type if owner else []) if e.name == inner for v in e.value}
        problems += [f"{enum}.{name}: {values.get(name, 'missing')}, upstream {n}"
                     for name, n in expected.items() if values.get(name) != n]
    return problems


def export_problems(fds: descriptor_pb2.FileDescriptorSet, init_source: str) -> list[str]:
    """Names the worker's ``protos/__init__.py`` imports from generated modules that would not be there."""
    index, problems = Index.of(fds), []
    for node in ast.walk(ast.parse(init_source)):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            available = index.names_in(node.module)
            problems += [f"protos/__init__.py imports {a.name} from .{node.module}, which the protocol lacks"
                         for a in node.names if a.name not in available]
    return problems


def usage_problems(fds: descriptor_pb2.FileDescriptorSet, package: Path) -> list[str]:
    """``protos.X(field=...)`` and ``protos.X.NAME`` in the worker's code that the protocol cannot satisfy."""
    index, problems = Index.of(fds), set()
    exported = index.names_in("FunctionRpc_pb2_grpc")
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            used = _protos_use(node)
            if used is None or not isinstance(node, ast.expr):
                continue
            name, member, keywords = used
            where = f"{path.relative_to(package.parent)}:{node.lineno}"
            if name in exported or (name in index.enums and (member is None or _in_enum(index.enums[name], member))):
                continue
            message = index.messages.get(name)
            if message is None:
                problems.add(f"{where}: protos.{name} is not in the protocol")
                continue
            fields = {f.name for f in message.field}
            problems |= {f"{where}: {name} has no field {k}" for k in keywords if k not in fields}
            nested = {t.name for t in message.nested_type} | {e.name for e in message.enum_type}
            if member is not None and member not in nested and not any(_in_enum(e, member) for e in message.enum_type):
                problems.add(f"{where}: protos.{name}.{member} is not in the protocol")
    return sorted(problems)


def _protos_use(node: ast.AST) -> tuple[str, str | None, list[str]] | None:
    """(message, member, keywords) for ``protos.M(...)`` or ``protos.M.member``; None for anything else."""
    if isinstance(node, ast.Call) and _is_protos_attr(node.func):
        assert isinstance(node.func, ast.Attribute)
        return node.func.attr, None, [k.arg for k in node.keywords if k.arg]
    if isinstance(node, ast.Attribute) and _is_protos_attr(node.value):
        assert isinstance(node.value, ast.Attribute)
        return node.value.attr, node.attr, []
    return None


def _is_protos_attr(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "protos"


def _in_enum(enum: descriptor_pb2.EnumDescriptorProto, name: str) -> bool:
    return any(v.name == name for v in enum.value)


def problems(fds: descriptor_pb2.FileDescriptorSet, worker_package: Path) -> list[str]:
    """Every reason ``fds`` is not the protocol the worker in ``worker_package`` (azure_functions_worker/) speaks."""
    init = (worker_package / "protos" / "__init__.py").read_text(encoding="utf-8")
    return [*wire_problems(fds), *export_problems(fds, init), *usage_problems(fds, worker_package)]
