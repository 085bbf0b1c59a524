"""Calls the gateway with the official OpenAI Python SDK (PyPI `openai`), as an agent holding a key would.

    .venv/bin/python tests/interop/openai_sdk.py <gateway base url> <api key> <model>

Prints one JSON line with what the SDK saw: the model list, a non-streaming completion, a streaming completion
(with `stream_options.include_usage`), a stream without it, and the SDK's view of two errors (unknown model, a
missing key). Installed by scripts/test into the project's .venv.
"""

import json
import sys

import openai
from openai import OpenAI


def error_view(call):
    try:
        call()
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        return {
            "class": type(e).__name__,
            "status": e.status_code,
            "code": body.get("code"),
            "type": body.get("type"),
            "message": body.get("message"),
        }
    return {"class": None}


def main() -> int:
    if len(sys.argv) != 4:
        print("usage: openai_sdk.py <base url> <api key> <model>", file=sys.stderr)
        return 2
    base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
    client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "say hello to the auditor"}]
    out = {"sdk": openai.__version__}
    try:
        out["models"] = [m.id for m in client.models.list()]

        raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=5)
        completion = raw.parse()
        out["json"] = {
            "content": completion.choices[0].message.content,
            "finish_reason": completion.choices[0].finish_reason,
            "usage": completion.usage.model_dump() if completion.usage else None,
            "cost": raw.headers.get("x-gateway-cost-usdc"),
            "balance": raw.headers.get("x-gateway-balance-usdc"),
        }

        chunks, text, usage, finish = 0, "", None, None
        for chunk in client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        ):
            chunks += 1
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage.model_dump()
        out["stream"] = {"chunks": chunks, "content": text, "finish_reason": finish, "usage": usage}

        saw_usage = False
        for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=3, stream=True):
            saw_usage = saw_usage or chunk.usage is not None
        out["stream_without_usage_option_saw_usage"] = saw_usage

        out["unknown_model"] = error_view(
            lambda: client.chat.completions.create(model="no-such-model", messages=messages)
        )
        keyless = OpenAI(base_url=f"{base}/v1", api_key="sk-not-a-real-key", max_retries=0, timeout=30)
        out["bad_key"] = error_view(lambda: keyless.chat.completions.create(model=model, messages=messages))
    except Exception as e:  # noqa: BLE001 - reported to the calling test
        out["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(out))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
