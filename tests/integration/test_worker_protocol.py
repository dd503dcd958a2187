"""The worker's protocol at setup: the pinned wheel's descriptors in the generated modules, and the .proto route
kept for a worker source that carries its .proto files. Needs grpcio-tools from `make worker`."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from tools import worker_protocol, worker_setup
from tools.worker_protocol import WIRE_ENUMS, WIRE_FIELDS

pytestmark = pytest.mark.integration
BUILD = worker_setup.HOME / "build"


@pytest.fixture(scope="module")
def worker_dir() -> Path:
    worker, reason = worker_setup.ensure()
    if worker is None:
        if os.environ.get("CI"):
            pytest.fail(f"the worker's protocol must be generated under CI: {reason}")
        pytest.skip(f"real Functions worker not available: {reason}")
    return worker.directory


def generated(path: Path) -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(worker_protocol.serialized_descriptor(path.read_text()))


def test_the_workers_modules_carry_the_pinned_wheels_protocol(worker_dir: Path) -> None:
    source, _ = worker_setup.find_source()
    assert source is not None
    if worker_setup.has_protos(source):
        pytest.skip("this worker source has its own .proto files; the wheel is not used")
    wheel = worker_protocol.from_wheel(worker_protocol.fetch_wheel(worker_setup.DOWNLOADS))
    protos = worker_dir / "azure_functions_worker" / "protos"
    for proto in worker_protocol.PROTOS:
        module = protos / (proto.removesuffix(".proto") + "_pb2.py")
        assert generated(module) == next(f for f in wheel.file if f.name == proto), proto
    assert "from azure_functions_worker.protos import FunctionRpc_pb2" in (protos / "FunctionRpc_pb2_grpc.py").read_text()


def proto_text(tamper: str | None) -> str:
    """A FunctionRpc.proto of our own with exactly the wire table (``tamper``: a field given another number)."""
    lines = ['syntax = "proto3";', "package AzureFunctionsRpcMessages;", 'import "google/protobuf/duration.proto";',
             'import "identity/ClaimsIdentityRpc.proto";',
             "service FunctionRpc { rpc EventStream (stream StreamingMessage) returns (stream StreamingMessage) {} }"]
    for message, fields in WIRE_FIELDS.items():
        body = [f"string {n} = {900 if f'{message}.{n}' == tamper else k};" for n, k in fields.items()]
        for enum, values in WIRE_ENUMS.items():
            if enum.startswith(message + "."):
                body.append(f"enum {enum.split('.')[1]} {{ " + " ".join(f"{v} = {k};" for v, k in values.items()) + " }")
        lines.append(f"message {message} {{ {' '.join(body)} google.protobuf.Duration took = 800; }}")
    return "\n".join(lines) + "\n"


def source_with_protos(root: Path, tamper: str | None = None) -> Path:
    package = root / "azure_functions_worker"
    (package / "protos").mkdir(parents=True)
    (package / "protos" / "__init__.py").write_text("from .FunctionRpc_pb2_grpc import FunctionRpcStub\n"
                                                    "from .FunctionRpc_pb2 import StreamingMessage, InvocationRequest\n"
                                                    "from .shared.NullableTypes_pb2 import NullableString\n")
    protos = root / worker_setup.PROTO_SUBDIR
    (protos / "identity").mkdir(parents=True)
    (protos / "shared").mkdir()
    (protos / "FunctionRpc.proto").write_text(proto_text(tamper))
    (protos / "identity" / "ClaimsIdentityRpc.proto").write_text(
        'syntax = "proto3";\nimport "shared/NullableTypes.proto";\nmessage RpcClaimsIdentity { NullableString label = 1; }\n')
    (protos / "shared" / "NullableTypes.proto").write_text(
        'syntax = "proto3";\nimport "google/protobuf/timestamp.proto";\n'
        "message NullableString { oneof string { string value = 1; } }\n"
        "message NullableTimestamp { oneof timestamp { google.protobuf.Timestamp value = 1; } }\n")
    return root


def test_a_source_with_proto_files_is_generated_from_them(worker_dir: Path, tmp_path: Path) -> None:
    source, out, downloads = source_with_protos(tmp_path / "src"), tmp_path / "out", tmp_path / "downloads"
    for package in ("", "identity", "shared"):
        (out / package).mkdir(parents=True, exist_ok=True)
    origin = worker_setup.generate_protos(source, BUILD, out, downloads)
    assert origin.startswith("the .proto files in") and not downloads.exists()
    main = generated(out / "FunctionRpc_pb2.py")
    assert list(main.dependency) == ["google/protobuf/duration.proto", "identity/ClaimsIdentityRpc.proto"]
    invocation = next(m for m in main.message_type if m.name == "InvocationRequest")
    assert {f.name: f.number for f in invocation.field if f.name != "took"} == WIRE_FIELDS["InvocationRequest"]
    text = (out / "FunctionRpc_pb2.py").read_text()
    assert "from azure_functions_worker.protos.identity import ClaimsIdentityRpc_pb2" in text


def test_proto_files_with_another_wire_number_are_refused(worker_dir: Path, tmp_path: Path) -> None:
    source, out = source_with_protos(tmp_path / "src", tamper="InvocationRequest.function_id"), tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError, match=re.escape("InvocationRequest.function_id: field 900, upstream 2")):
        worker_setup.generate_protos(source, BUILD, out, tmp_path / "downloads")
    assert not list(out.rglob("*_pb2.py")), "nothing is generated from a protocol that failed the check"
