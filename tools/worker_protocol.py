"""The worker's gRPC protocol (FunctionRpc) as a FileDescriptorSet, ready for ``protoc --descriptor_set_in``.

Two sources, in this order: the worker source's own ``.proto`` files when its export carries them, else the
protocol serialized inside the generated modules that PyPI's ``azure-functions-runtime-v1`` wheel ships
(downloaded pinned by version and sha256, read as data: never installed, never imported). Either way the
result is checked against what the 4.34.0 worker and tools/worker_rpc.py use before anything is generated.
Where the protocol comes from and why: docs/functions-host.md.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool

PROTOS = ("FunctionRpc.proto", "identity/ClaimsIdentityRpc.proto", "shared/NullableTypes.proto")
WHEEL = "azure_functions_runtime_v1-1.2.0-py3-none-any.whl"
WHEEL_PIN = "azure-functions-runtime-v1==1.2.0"
WHEEL_SHA256 = "6ae0abb681e28c61a404b52e1c4481f203bb113e5027fbe908989ea9585a02a0"
IN_WHEEL = {proto: "tests/protos/" + proto.removesuffix(".proto") + "_pb2.py" for proto in PROTOS}

# Field numbers are the wire contract with the real host. These are the upstream FunctionRpc.proto's numbers
# for every field the worker's dispatcher and tools/worker_rpc.py exchange; a source that renumbered one
# would still pass our own tier (both ends share the generated code) while breaking against Azure.
WIRE_FIELDS: dict[str, dict[str, int]] = {
    "StreamingMessage": {"request_id": 1, "rpc_log": 2, "invocation_request": 4, "invocation_response": 5,
                         "function_load_request": 8, "function_load_response": 9, "worker_status_request": 12,
                         "worker_status_response": 13, "worker_terminate": 14, "worker_init_response": 16,
                         "worker_init_request": 17, "start_stream": 20, "invocation_cancel": 21,
                         "function_environment_reload_request": 25, "function_environment_reload_response": 26,
                         "close_shared_memory_resources_request": 27, "close_shared_memory_resources_response": 28,
                         "functions_metadata_request": 29, "function_metadata_response": 30},
    "StartStream": {"worker_id": 2},
    "WorkerInitRequest": {"host_version": 1, "capabilities": 2, "log_categories": 3, "worker_directory": 4,
                          "function_app_directory": 5},
    "WorkerInitResponse": {"worker_version": 1, "capabilities": 2, "result": 3, "worker_metadata": 4},
    "WorkerMetadata": {"runtime_name": 1, "runtime_version": 2, "worker_version": 3, "worker_bitness": 4,
                       "custom_properties": 5},
    "StatusResult": {"result": 1, "exception": 2, "logs": 3, "status": 4},
    "RpcException": {"stack_trace": 1, "message": 2, "source": 3},
    "FunctionsMetadataRequest": {"function_app_directory": 1},
    "FunctionMetadataResponse": {"function_metadata_results": 1, "result": 2, "use_default_metadata_indexing": 3},
    "RpcFunctionMetadata": {"directory": 1, "script_file": 2, "entry_point": 3, "name": 4, "bindings": 6,
                            "is_proxy": 7, "status": 8, "language": 9, "raw_bindings": 10, "function_id": 13,
                            "managed_dependency_enabled": 14, "properties": 16},
    "BindingInfo": {"type": 2, "direction": 3, "data_type": 4},
    "FunctionLoadRequest": {"function_id": 1, "metadata": 2, "managed_dependency_enabled": 3},
    "FunctionLoadResponse": {"function_id": 1, "result": 2},
    "InvocationRequest": {"invocation_id": 1, "function_id": 2, "input_data": 3, "trigger_metadata": 4,
                          "trace_context": 5, "retry_context": 6},
    "RpcTraceContext": {"trace_parent": 1, "trace_state": 2, "attributes": 3},
    "RetryContext": {"retry_count": 1, "max_retry_count": 2, "exception": 3},
    "InvocationResponse": {"invocation_id": 1, "output_data": 2, "result": 3, "return_value": 4},
    "ParameterBinding": {"name": 1, "data": 2, "rpc_shared_memory": 3},
    "TypedData": {"string": 1, "json": 2, "bytes": 3, "stream": 4, "http": 5, "int": 6, "double": 7},
    "RpcHttp": {"method": 1, "url": 2, "headers": 3, "body": 4, "params": 10, "status_code": 12, "query": 15,
                "enable_content_negotiation": 16, "rawBody": 17, "cookies": 19},
    "RpcLog": {"invocation_id": 1, "category": 2, "level": 3, "message": 4, "event_id": 5, "exception": 6,
               "properties": 7, "log_category": 8},
}
WIRE_ENUMS: dict[str, dict[str, int]] = {
    "StatusResult.Status": {"Failure": 0, "Success": 1, "Cancelled": 2},
    "RpcLog.Level": {"Trace": 0, "Debug": 1, "Information": 2, "Warning": 3, "Error": 4, "Critical": 5},
}


class ProtocolUnavailable(RuntimeError):
    """No source of the protocol could be reached (a reason to skip locally, not a broken protocol)."""


def serialized_descriptor(module_source: str) -> bytes:
    """The FileDescriptorProto a generated ``_pb2.py`` registers, read from its source without running it."""
    for node in ast.walk(ast.parse(module_source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "AddSerializedFile"
                and len(node.args) == 1):
            value = ast.literal_eval(node.args[0])
            if isinstance(value, bytes):
                return value
    raise ValueError("no AddSerializedFile(b'...') in the module")


def fetch_wheel(cache: Path) -> Path:
    """The pinned wheel in ``cache``, downloaded with pip when absent; its sha256 checked either way."""
    wheel = cache / WHEEL
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as scratch:
            # The wheel requires Python 3.13 to install; it is only read here, so its Requires-Python is ignored.
            out = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                                  "--no-deps", "--only-binary=:all:", "--ignore-requires-python", "-d", scratch,
                                  WHEEL_PIN], capture_output=True, text=True, timeout=300)
            if out.returncode != 0 or not (Path(scratch) / WHEEL).is_file():
                raise ProtocolUnavailable(f"pip download {WHEEL_PIN} failed: {out.stderr.strip()[-600:]}")
            shutil.move(str(Path(scratch) / WHEEL), wheel)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise RuntimeError(f"{WHEEL}: sha256 {digest}, expected {WHEEL_SHA256}; removed, not used")
    return wheel


def from_wheel(wheel: Path) -> descriptor_pb2.FileDescriptorSet:
    with zipfile.ZipFile(wheel) as archive:
        files = [descriptor_pb2.FileDescriptorProto.FromString(
            serialized_descriptor(archive.read(IN_WHEEL[proto]).decode())) for proto in PROTOS]
    for proto, file in zip(PROTOS, files, strict=True):
        if file.name != proto:
            raise RuntimeError(f"{IN_WHEEL[proto]} registers {file.name!r}, expected {proto!r}")
    return with_dependencies(files)


def with_dependencies(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> descriptor_pb2.FileDescriptorSet:
    """``files`` preceded by the well-known types they import (from protobuf's own pool), dependencies first."""
    ours = {f.name: f for f in files}
    ordered: list[descriptor_pb2.FileDescriptorProto] = []

    def add(name: str) -> None:
        if any(f.name == name for f in ordered):
            return
        file = ours.get(name) or _well_known(name)
        for dependency in file.dependency:
            add(dependency)
        ordered.append(file)

    for name in ours:
        add(name)
    return descriptor_pb2.FileDescriptorSet(file=ordered)


def _well_known(name: str) -> descriptor_pb2.FileDescriptorProto:
    if not name.startswith("google/protobuf/"):
        raise RuntimeError(f"the protocol imports {name}, which is neither its own nor a protobuf well-known type")
    importlib.import_module(name.removesuffix(".proto").replace("/", ".") + "_pb2")  # registers it in the pool
    file = descriptor_pb2.FileDescriptorProto()
    descriptor_pool.Default().FindFileByName(name).CopyToProto(file)
    return file


def from_protos(include: Path, protoc: list[str], env: dict[str, str], out: Path) -> descriptor_pb2.FileDescriptorSet:
    """The worker source's own .proto files, compiled to a descriptor set with their imports."""
    args = [*protoc, f"-I{include}", "--include_imports", f"--descriptor_set_out={out}", *PROTOS]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"protoc --descriptor_set_out failed:\n{result.stdout}\n{result.stderr}")
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
