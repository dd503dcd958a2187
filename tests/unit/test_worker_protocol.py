"""How the worker's protocol is read from a wheel's generated modules and checked against what the worker uses."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from tools import worker_protocol, worker_protocol_check
from tools.worker_protocol import WIRE_ENUMS, WIRE_FIELDS
from tools.worker_setup import absolute_imports

F = descriptor_pb2.FieldDescriptorProto


def upstream_like() -> descriptor_pb2.FileDescriptorSet:
    """A protocol holding exactly the wire table's messages, fields and enums, plus the FunctionRpc service."""
    main = descriptor_pb2.FileDescriptorProto(name="FunctionRpc.proto", package="AzureFunctionsRpcMessages",
                                              dependency=["google/protobuf/duration.proto"])
    for message, fields in WIRE_FIELDS.items():
        main.message_type.add(name=message, field=[F(name=n, number=k, type=F.TYPE_STRING) for n, k in fields.items()])
    for enum, values in WIRE_ENUMS.items():
        outer, inner = enum.split(".")
        owner = next(m for m in main.message_type if m.name == outer)
        owner.enum_type.add(name=inner, value=[descriptor_pb2.EnumValueDescriptorProto(name=n, number=k)
                                               for n, k in values.items()])
    main.enum_type.add(name="RpcDataType", value=[descriptor_pb2.EnumValueDescriptorProto(name="string", number=1)])
    main.service.add(name="FunctionRpc")
    nullable = descriptor_pb2.FileDescriptorProto(name="shared/NullableTypes.proto")
    nullable.message_type.add(name="NullableString", field=[F(name="value", number=1, type=F.TYPE_STRING)])
    return descriptor_pb2.FileDescriptorSet(file=[nullable, main])


def message(fds: descriptor_pb2.FileDescriptorSet, name: str) -> descriptor_pb2.DescriptorProto:
    return next(m for f in fds.file for m in f.message_type if m.name == name)


def test_the_serialized_descriptor_is_read_without_running_the_module() -> None:
    file = descriptor_pb2.FileDescriptorProto(name="x.proto", package="p")
    blob = file.SerializeToString()
    source = f"raise SystemExit('executed')\nDESCRIPTOR = _pool.Default().AddSerializedFile({blob!r})\n"
    assert worker_protocol.serialized_descriptor(source) == blob
    with pytest.raises(ValueError, match="AddSerializedFile"):
        worker_protocol.serialized_descriptor("DESCRIPTOR = None\n")


def test_well_known_imports_come_from_protobufs_own_pool_before_the_files_that_import_them() -> None:
    ours = descriptor_pb2.FileDescriptorProto(name="shared/NullableTypes.proto",
                                              dependency=["google/protobuf/timestamp.proto"])
    fds = worker_protocol.with_dependencies([ours])
    assert [f.name for f in fds.file] == ["google/protobuf/timestamp.proto", "shared/NullableTypes.proto"]
    assert [m.name for m in fds.file[0].message_type] == ["Timestamp"]
    stray = descriptor_pb2.FileDescriptorProto(name="FunctionRpc.proto", dependency=["vendor/other.proto"])
    with pytest.raises(RuntimeError, match=re.escape("vendor/other.proto")):
        worker_protocol.with_dependencies([stray])


def test_a_protocol_with_upstreams_numbers_has_no_wire_problems() -> None:
    assert worker_protocol_check.wire_problems(upstream_like()) == []


def test_a_renumbered_or_missing_field_or_enum_value_is_named() -> None:
    fds = upstream_like()
    message(fds, "InvocationRequest").field[0].number = 99
    invocation = message(fds, "InvocationResponse")
    invocation.field.remove(next(f for f in invocation.field if f.name == "result"))
    message(fds, "StatusResult").enum_type[0].value[1].number = 7
    assert worker_protocol_check.wire_problems(fds) == [
        "InvocationRequest.invocation_id: field 99, upstream 1",
        "InvocationResponse.result: missing, upstream 3",
        "StatusResult.Status.Success: 7, upstream 1",
    ]


def test_names_the_workers_protos_package_imports_must_exist() -> None:
    init = ("from .FunctionRpc_pb2_grpc import (FunctionRpcStub, add_FunctionRpcServicer_to_server, Gone)\n"
            "from .FunctionRpc_pb2 import (StreamingMessage, RpcDataType, RpcRetryOptions)\n"
            "from .shared.NullableTypes_pb2 import (NullableString, NullableBool)\n")
    assert worker_protocol_check.export_problems(upstream_like(), init) == [
        "protos/__init__.py imports Gone from .FunctionRpc_pb2_grpc, which the protocol lacks",
        "protos/__init__.py imports RpcRetryOptions from .FunctionRpc_pb2, which the protocol lacks",
        "protos/__init__.py imports NullableBool from .shared.NullableTypes_pb2, which the protocol lacks",
    ]


def test_messages_fields_and_enum_values_the_workers_code_uses_must_exist(tmp_path: Path) -> None:
    package = tmp_path / "azure_functions_worker"
    package.mkdir()
    (package / "dispatcher.py").write_text(
        "from . import protos\n"
        "ok = protos.StreamingMessage(request_id='r', rpc_log=None)\n"
        "ok = (protos.StatusResult.Success, protos.RpcDataType.string, protos.FunctionRpcStub(None))\n"
        "bad = protos.StreamingMessage(request_id='r', worker_warmup_response=None)\n"
        "bad = protos.StatusResult.Maybe\n"
        "bad = protos.WorkerWarmupRequest()\n")
    assert worker_protocol_check.usage_problems(upstream_like(), package) == [
        "azure_functions_worker/dispatcher.py:4: StreamingMessage has no field worker_warmup_response",
        "azure_functions_worker/dispatcher.py:5: protos.StatusResult.Maybe is not in the protocol",
        "azure_functions_worker/dispatcher.py:6: protos.WorkerWarmupRequest is not in the protocol",
    ]


def test_a_cached_wheel_with_another_hash_is_removed_not_used(tmp_path: Path) -> None:
    wheel = tmp_path / worker_protocol.WHEEL
    wheel.write_bytes(b"not the pinned wheel")
    with pytest.raises(RuntimeError, match=hashlib.sha256(b"not the pinned wheel").hexdigest()):
        worker_protocol.fetch_wheel(tmp_path)
    assert not wheel.exists()


def test_generated_imports_become_the_workers_package() -> None:
    code = ("import FunctionRpc_pb2 as FunctionRpc__pb2\n"
            "from identity import ClaimsIdentityRpc_pb2 as identity_dot_ClaimsIdentityRpc__pb2\n"
            "from google.protobuf import duration_pb2 as google_dot_protobuf_dot_duration__pb2\n")
    assert absolute_imports(code) == (
        "from azure_functions_worker.protos import FunctionRpc_pb2 as FunctionRpc__pb2\n"
        "from azure_functions_worker.protos.identity import ClaimsIdentityRpc_pb2 as identity_dot_ClaimsIdentityRpc__pb2\n"
        "from google.protobuf import duration_pb2 as google_dot_protobuf_dot_duration__pb2\n")
