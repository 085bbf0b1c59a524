"""Reads the gateway's agent cards with the official A2A Python SDK (PyPI `a2a-sdk`) and validates them.

    .venv/bin/python tests/interop/agent_card.py <gateway base URL>

1. `A2ACardResolver.get_agent_card()` fetches /.well-known/agent-card.json and parses it into the SDK's
   `AgentCard` (A2A v1.0, `lf.a2a.v1`), the way an A2A client discovers an agent.
2. The same JSON is parsed again strictly (`ignore_unknown_fields=False`): a misspelt or invented field fails, and
   every field the v1.0 proto marks REQUIRED must be present, recursively.
3. The legacy /.well-known/agent.json is validated against the SDK's v0.3 model (`a2a.compat.v0_3.types.AgentCard`,
   no unknown keys) and read by the resolver too (which converts a v0.3 card), and must describe the same agent.

Prints one JSON line: {"ok": true, ...facts} or {"ok": false, "error": "..."}; exits 0 only when ok.
"""

import asyncio
import json
import sys

import httpx
from a2a.client import A2ACardResolver
from a2a.compat.v0_3 import types as v03
from a2a.types import a2a_pb2
from google.api import field_behavior_pb2
from google.protobuf.json_format import ParseDict


def missing_required(message, path="card"):
    """Names of REQUIRED fields (google.api.field_behavior) that are unset, recursively."""
    missing = []
    for field in message.DESCRIPTOR.fields:
        behaviors = field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
        required = field_behavior_pb2.FieldBehavior.REQUIRED in behaviors
        name = f"{path}.{field.json_name}"
        if field.is_repeated:
            value = getattr(message, field.name)
            if required and len(value) == 0:
                missing.append(name)
            if field.message_type is not None and not field.message_type.GetOptions().map_entry:
                for i, item in enumerate(value):
                    missing += missing_required(item, f"{name}[{i}]")
            elif field.message_type is not None:
                value_field = field.message_type.fields_by_name["value"]
                if value_field.message_type is not None:
                    for key, item in value.items():
                        missing += missing_required(item, f"{name}[{key}]")
        elif field.message_type is not None:
            if message.HasField(field.name):
                missing += missing_required(getattr(message, field.name), name)
            elif required:
                missing.append(name)
        elif required and getattr(message, field.name) in ("", 0, False):
            missing.append(name)
    return missing


def _models_in(annotation):
    """(shape, model class) pairs inside a field annotation: shape is one, list or dict."""
    import typing

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (list, typing.List):
        return [("list", cls) for _, cls in _models_in(args[0])]
    if origin in (dict, typing.Dict):
        return [("dict", cls) for _, cls in _models_in(args[1])]
    if origin is not None:  # Union / Optional / Literal
        return [pair for arg in args for pair in _models_in(arg)]
    if isinstance(annotation, type) and issubclass(annotation, v03.A2ABaseModel):
        return [("one", annotation)]
    if isinstance(annotation, type) and hasattr(annotation, "model_fields") and "root" in annotation.model_fields:
        # A RootModel union (SecurityScheme): its members.
        return _models_in(annotation.model_fields["root"].annotation)
    return []


def unknown_keys(model_cls, data, path="card"):
    """Keys of `data` that the v0.3 pydantic model does not define, recursively through nested models."""
    if not isinstance(data, dict):
        return []
    fields = {}
    for name, info in model_cls.model_fields.items():
        fields[info.alias or name] = info
        fields[name] = info
    out = []
    for key, value in data.items():
        info = fields.get(key)
        if info is None:
            out.append(f"{path}.{key}")
            continue
        for shape, cls in _models_in(info.annotation):
            items = {"one": [(key, value)], "list": [], "dict": []}[shape]
            if shape == "list" and isinstance(value, list):
                items = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
            if shape == "dict" and isinstance(value, dict):
                items = [(f"{key}[{k}]", v) for k, v in value.items()]
            for sub, item in items:
                # A union member is checked only when it accepts the item (e.g. the scheme with that `type`).
                try:
                    cls.model_validate(item)
                except Exception:  # noqa: BLE001 - another member of the union
                    continue
                out += unknown_keys(cls, item, f"{path}.{sub}")
    return out


async def check(base: str) -> dict:
    async with httpx.AsyncClient(timeout=10) as client:
        # 1. The SDK's own discovery path.
        card = await A2ACardResolver(client, base).get_agent_card()

        # 2. Strict v1.0.
        raw = (await client.get(f"{base}/.well-known/agent-card.json")).json()
        strict = ParseDict(raw, a2a_pb2.AgentCard(), ignore_unknown_fields=False)
        missing = missing_required(strict)
        if missing:
            raise AssertionError(f"v1.0 card lacks REQUIRED fields: {missing}")
        if strict != card:
            raise AssertionError("the resolver's card differs from the strict parse")
        if not card.capabilities.streaming:
            raise AssertionError("capabilities.streaming is not true")
        skills = [s.id for s in card.skills]
        for wanted in ("chat-completion", "list-models", "buy-access"):
            if wanted not in skills:
                raise AssertionError(f"skill {wanted} missing: {skills}")
        bearer = card.security_schemes["bearer"]
        if bearer.WhichOneof("scheme") != "http_auth_security_scheme" or bearer.http_auth_security_scheme.scheme.lower() != "bearer":
            raise AssertionError(f"securitySchemes.bearer is not HTTP bearer: {bearer}")
        if not card.documentation_url.startswith("http"):
            raise AssertionError(f"documentationUrl is not absolute: {card.documentation_url!r}")
        interface = card.supported_interfaces[0]
        if not interface.url.startswith(base):
            raise AssertionError(f"supportedInterfaces[0].url {interface.url} is not under {base}")

        # 3. Legacy v0.3.
        legacy_raw = (await client.get(f"{base}/.well-known/agent.json")).json()
        legacy = v03.AgentCard.model_validate(legacy_raw)
        extra = unknown_keys(v03.AgentCard, legacy_raw)
        if extra:
            raise AssertionError(f"v0.3 card has keys the v0.3 model does not define: {extra}")
        converted = await A2ACardResolver(client, base, agent_card_path="/.well-known/agent.json").get_agent_card()
        for name, a, b in (
            ("name", legacy.name, card.name),
            ("version", legacy.version, card.version),
            ("url", legacy.url, interface.url),
            ("streaming", legacy.capabilities.streaming, True),
            ("skills", [s.id for s in legacy.skills], skills),
            ("converted skills", [s.id for s in converted.skills], skills),
            ("converted url", converted.supported_interfaces[0].url, interface.url),
        ):
            if a != b:
                raise AssertionError(f"legacy card {name}: {a!r} != {b!r}")
        return {
            "ok": True,
            "name": card.name,
            "version": card.version,
            "skills": skills,
            "securitySchemes": sorted(card.security_schemes.keys()),
            "interface": {"url": interface.url, "binding": interface.protocol_binding},
            "legacyProtocolVersion": legacy.protocol_version,
        }


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: agent_card.py <gateway base URL>", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(check(sys.argv[1].rstrip("/")))
    except Exception as e:  # noqa: BLE001 - reported to the calling test
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
