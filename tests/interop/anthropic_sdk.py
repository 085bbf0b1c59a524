"""Calls the gateway's `/v1/messages` with the official Anthropic Python SDK (PyPI `anthropic`), as an agent would.

    .venv/bin/python tests/interop/anthropic_sdk.py <gateway base url> <api key> <model>

Prints one JSON line with what the SDK saw, each call with the gateway's `x-request-id` so the calling test can find
its usage row: `messages.create` with the key as `api_key`, as `auth_token` and as a bare `x-api-key` header;
`messages.stream` (the SDK's accumulated final message) and `messages.create(stream=True)` (the raw event
sequence); and the SDK's error classes for an unknown model, a bad request and a key the gateway does not know
(402 with the catalog). Installed by scripts/test into the project's .venv.
"""

import json
import os
import sys

import anthropic
from anthropic import Anthropic

SYSTEM = "be brief"
PROMPT = "say hello to the auditor"


def usage_of(message):
    return {"input_tokens": message.usage.input_tokens, "output_tokens": message.usage.output_tokens}


def text_of(message):
    return "".join(block.text for block in message.content if block.type == "text")


def sent_auth(request):
    """Which header carried the key on the wire."""
    return {
        "authorization": "authorization" in request.headers,
        "x_api_key": "x-api-key" in request.headers,
    }


def create(client, model, max_tokens):
    raw = client.messages.with_raw_response.create(
        model=model,
        max_tokens=max_tokens,
        system=SYSTEM,
        messages=[{"role": "user", "content": PROMPT}],
    )
    message = raw.parse()
    return {
        "request_id": raw.headers.get("x-request-id"),
        "cost": raw.headers.get("x-gateway-cost-usdc"),
        "balance": raw.headers.get("x-gateway-balance-usdc"),
        "type": message.type,
        "role": message.role,
        "model": message.model,
        "stop_reason": message.stop_reason,
        "text": text_of(message),
        "usage": usage_of(message),
        "sent": sent_auth(raw.http_request),
    }


def error_view(call):
    try:
        call()
    except anthropic.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        x402 = body.get("x402") if isinstance(body.get("x402"), dict) else {}
        return {
            "class": type(e).__name__,
            "status": e.status_code,
            "body_type": body.get("type"),
            "error_type": error.get("type"),
            "message": error.get("message"),
            "catalog_models": [m.get("id") for m in x402.get("models", [])],
            "request_id": e.response.headers.get("x-request-id"),
        }
    return {"class": None}



def main() -> int:
    if len(sys.argv) != 4:
        print("usage: anthropic_sdk.py <base url> <api key> <model>", file=sys.stderr)
        return 2
    base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
    # Only what this script passes may authenticate it.
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        os.environ.pop(name, None)
    common = {"base_url": base, "max_retries": 0, "timeout": 30}
    out = {"sdk": anthropic.__version__}
    try:
        client = Anthropic(api_key=key, **common)
        out["json"] = create(client, model, 5)
        out["auth_token"] = create(Anthropic(auth_token=key, **common), model, 3)
        out["x_api_key"] = create(Anthropic(default_headers={"x-api-key": key}, **common), model, 2)

        with client.messages.stream(
            model=model,
            max_tokens=6,
            system=SYSTEM,
            messages=[{"role": "user", "content": PROMPT}],
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
            out["stream"] = {
                "request_id": stream.response.headers.get("x-request-id"),
                "reserved": stream.response.headers.get("x-gateway-reserved-usdc"),
                "text": text,
                "final_text": text_of(final),
                "stop_reason": final.stop_reason,
                "usage": usage_of(final),
            }

        events = client.messages.create(
            model=model,
            max_tokens=4,
            system=SYSTEM,
            messages=[{"role": "user", "content": PROMPT}],
            stream=True,
        )
        kinds, text, start_input_tokens, input_tokens, output_tokens = [], "", None, None, None
        for event in events:
            kinds.append(event.type)
            if event.type == "message_start":
                start_input_tokens = input_tokens = event.message.usage.input_tokens
            elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                text += event.delta.text
            elif event.type == "message_delta":
                output_tokens = event.usage.output_tokens
                if event.usage.input_tokens is not None:
                    input_tokens = event.usage.input_tokens
        out["raw_stream"] = {
            "request_id": events.response.headers.get("x-request-id"),
            "events": kinds,
            "text": text,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
            "message_start_input_tokens": start_input_tokens,
        }

        messages = [{"role": "user", "content": PROMPT}]
        out["unknown_model"] = error_view(
            lambda: client.messages.create(model="no-such-model", max_tokens=5, messages=messages)
        )
        out["bad_request"] = error_view(lambda: client.messages.create(model=model, max_tokens=0, messages=messages))
        stranger = Anthropic(api_key="sk-not-a-real-key", **common)
        out["bad_key"] = error_view(lambda: stranger.messages.create(model=model, max_tokens=5, messages=messages))
    except Exception as e:  # noqa: BLE001 - reported to the calling test
        out["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(out))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
