"""Pays per token with the official Python x402 `upto` client (PyPI `x402`: UptoEvmScheme, sync `requests`).

    .venv/bin/python tests/interop/upto.py <url> <0x private key> <json body>

Prints one JSON line: {status, body, paymentResponse, paymentEvent} (see tests/interop/upto.mjs).
"""

import base64
import json
import sys

from eth_account import Account
from x402 import x402ClientSync
from x402.http.clients import x402_requests
from x402.mechanisms.evm.upto import UptoEvmScheme


def main() -> int:
    if len(sys.argv) < 4:
        print("usage: upto.py <url> <privkey> <json body>", file=sys.stderr)
        return 2
    url, key, body = sys.argv[1], sys.argv[2], sys.argv[3]
    client = x402ClientSync()
    # The dev chain's test USDC is not a default asset of the client: opt in explicitly.
    client.set_spend_controls({"allowed_assets": True, "max_amount_per_payment": False})
    client.register("eip155:*", UptoEvmScheme(Account.from_key(key)))
    try:
        session = x402_requests(client)
        res = session.post(url, data=body, headers={"content-type": "application/json"})
    except Exception as e:  # noqa: BLE001 - reported to the calling test
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 1
    header = res.headers.get("PAYMENT-RESPONSE")
    text = res.text
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    event = None
    for block in text.split("\n\n"):
        lines = block.split("\n")
        if "event: x402.payment-response" in lines:
            data = next((l for l in lines if l.startswith("data: ")), None)
            event = json.loads(data[6:]) if data else None
    print(
        json.dumps(
            {
                "status": res.status_code,
                "body": parsed,
                "paymentResponse": json.loads(base64.b64decode(header)) if header else None,
                "paymentEvent": event,
                "paymentStatus": res.headers.get("x-payment-status"),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
