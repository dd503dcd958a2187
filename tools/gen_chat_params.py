"""Write the chat parameter names the installed ``openai`` SDK types, for the gateway's request schema.

Importing ``openai.types`` is too slow for a cold start (docs/api.md), so the names are generated here
into ``gateway_lib/operations/chat_params.json`` (checked in) and a unit test holds the file equal
to the installed SDK: upgrading the SDK fails that test until this is re-run (``make chat-params``).

    python -m tools.gen_chat_params
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "gateway_lib" / "operations" / "chat_params.json"


def from_sdk() -> dict[str, Any]:
    import openai
    from openai.types.chat import ChatCompletionStreamOptionsParam, completion_create_params

    chat = set(completion_create_params.CompletionCreateParamsBase.__annotations__) | {"stream"}
    return {"sdk_version": openai.__version__, "chat": sorted(chat),
            "stream_options": sorted(ChatCompletionStreamOptionsParam.__annotations__)}


def main() -> None:
    OUT.write_text(json.dumps(from_sdk(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
