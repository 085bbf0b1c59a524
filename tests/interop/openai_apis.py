"""Calls the gateway's Responses, legacy completions and embeddings APIs with the official OpenAI Python SDK (PyPI
`openai`), as an agent holding a key would.

    .venv/bin/python tests/interop/openai_apis.py <gateway base url> <api key> <model>

Prints one JSON line with what the SDK saw, each call with the gateway's `x-request-id` so the calling test can find
its usage row: `responses.create` (JSON, and streamed to its final `response.completed` / `response.incomplete`
event), `completions.create` (JSON, streamed with `stream_options.include_usage`, and a prompt list with `n`),
`embeddings.create` (the SDK's default encoding, which asks for base64, and `float`), and the SDK's error class for
a Responses request the gateway refuses. Installed by scripts/test into the project's .venv.
"""

import json
import math
import os
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
            "param": body.get("param"),
            "request_id": e.response.headers.get("x-request-id"),
        }
    return {"class": None}


def raw_view(raw):
    return {
        "request_id": raw.headers.get("x-request-id"),
        "cost": raw.headers.get("x-gateway-cost-usdc"),
    }


def main() -> int:
    if len(sys.argv) != 4:
        print("usage: openai_apis.py <base url> <api key> <model>", file=sys.stderr)
        return 2
    base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
        os.environ.pop(name, None)
    client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30)
    out = {"sdk": openai.__version__}
    try:
        # Responses, JSON.
        raw = client.responses.with_raw_response.create(
            model=model, instructions="be brief", input="say hello to the auditor", max_output_tokens=5
        )
        response = raw.parse()
        out["responses_json"] = {
            **raw_view(raw),
            "status": response.status,
            "output_text": response.output_text,
            "usage": {"input_tokens": response.usage.input_tokens, "output_tokens": response.usage.output_tokens},
        }

        # Responses, streamed: the final event carries the whole response and its usage.
        events = client.responses.create(model=model, input="count to four please", max_output_tokens=4, stream=True)
        kinds, text, final = [], "", None
        for event in events:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
            if event.type in ("response.completed", "response.incomplete"):
                final = event.response
        out["responses_stream"] = {
            "request_id": events.response.headers.get("x-request-id"),
            "events": kinds,
            "text": text,
            "status": final.status if final else None,
            "usage": (
                {"input_tokens": final.usage.input_tokens, "output_tokens": final.usage.output_tokens}
                if final and final.usage
                else None
            ),
        }

        # Legacy completions, JSON.
        raw = client.completions.with_raw_response.create(model=model, prompt="once upon a time", max_tokens=5)
        completion = raw.parse()
        out["completions_json"] = {
            **raw_view(raw),
            "choices": len(completion.choices),
            "text": completion.choices[0].text,
            "usage": {
                "prompt_tokens": completion.usage.prompt_tokens,
                "completion_tokens": completion.usage.completion_tokens,
            },
        }

        # Legacy completions, streamed with the usage chunk.
        events = client.completions.create(
            model=model,
            prompt="the quick brown fox",
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage, chunks = "", None, 0
        for chunk in events:
            chunks += 1
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                usage = {"prompt_tokens": chunk.usage.prompt_tokens, "completion_tokens": chunk.usage.completion_tokens}
        out["completions_stream"] = {
            "request_id": events.response.headers.get("x-request-id"),
            "chunks": chunks,
            "text": text,
            "usage": usage,
        }

        # Legacy completions, three prompts × n = 2: six choices.
        raw = client.completions.with_raw_response.create(
            model=model, prompt=["alpha beta", "gamma delta epsilon", "zeta"], n=2, max_tokens=3
        )
        completion = raw.parse()
        out["completions_list"] = {
            **raw_view(raw),
            "choices": sorted(c.index for c in completion.choices),
            "usage": {
                "prompt_tokens": completion.usage.prompt_tokens,
                "completion_tokens": completion.usage.completion_tokens,
            },
        }

        # Embeddings: the SDK's default (it asks for base64 and decodes it), then floats.
        for name, extra in (("embeddings_default", {}), ("embeddings_float", {"encoding_format": "float"})):
            raw = client.embeddings.with_raw_response.create(
                model=model, input=["first input text", "second one"], **extra
            )
            embeddings = raw.parse()
            sent = json.loads(raw.http_request.content or b"{}")
            vectors = [d.embedding for d in embeddings.data]
            out[name] = {
                **raw_view(raw),
                "sent_encoding_format": sent.get("encoding_format"),
                "dimensions": [len(v) for v in vectors],
                "all_floats": all(isinstance(x, float) for v in vectors for x in v),
                "norms": [round(math.sqrt(sum(x * x for x in v)), 4) for v in vectors],
                "usage": {
                    "prompt_tokens": embeddings.usage.prompt_tokens,
                    "total_tokens": embeddings.usage.total_tokens,
                },
            }

        out["previous_response_id"] = error_view(
            lambda: client.responses.create(model=model, input="go on", previous_response_id="resp_123")
        )
    except Exception as e:  # noqa: BLE001 - reported to the calling test
        out["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(out))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
