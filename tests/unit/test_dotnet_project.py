"""The .NET 8 side of the C# client (clients/dotnet) that no SDK here can build: the project file and the one
seam between Azure.Identity and the core that Mono compiles (tests/integration/test_dotnet_client.py)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "dotnet"
PROJECT = ET.parse(CLIENT / "GatewayClient.csproj").getroot()


def prop(name: str) -> str:
    return " ".join(e.text or "" for e in PROJECT.iter(name))


def test_project_is_a_net8_console_program_with_azure_identity() -> None:
    assert PROJECT.get("Sdk") == "Microsoft.NET.Sdk"
    assert (prop("OutputType"), prop("TargetFramework")) == ("Exe", "net8.0")
    references = {e.get("Include"): e.get("Version") for e in PROJECT.iter("PackageReference")}
    assert re.fullmatch(r"1\.\d+\.\d+", references.get("Azure.Identity") or ""), references
    assert "AZURE_IDENTITY" in prop("DefineConstants").split(";")


def test_only_the_azure_identity_token_source_references_azure_sdk_namespaces() -> None:
    users = sorted(p.name for p in CLIENT.rglob("*.cs") if re.search(r"^using Azure\.", p.read_text(), re.M))
    assert users == ["AzureIdentityTokenSource.cs"]


def test_the_azure_identity_token_source_is_used_only_where_the_dotnet_build_defines_it() -> None:
    program = (CLIENT / "src" / "Program.cs").read_text()
    guarded = re.findall(r"#if AZURE_IDENTITY\n(.*?)#else", program, re.S)
    assert len(guarded) == 1 and "new AzureIdentityTokenSource(" in guarded[0]
    assert program.count("AzureIdentityTokenSource") == 1
