"""Buys from the gateway with the official Python x402 client (PyPI `x402`, sync `requests` adapter).

    .venv/bin/python tests/interop/buy_credits.py <url> <0x private key> [method] [network]

`network` (CAIP-2): pay on that network only (the client then picks the 402's `accepts` entry for it).

Prints one JSON line: {status, body, paymentResponse}. Installed by scripts/test into the project's .venv.
"""

import base64
import json
import sys

from eth_account import Account
from x402 import x402ClientSync
from x402.http.clients import x402_requests
from x402.mechanisms.evm.exact.register import register_exact_evm_client


def main() -> int:
    if len(sys.argv) < 3:
        print("usage: buy_credits.py <url> <privkey> [method]", file=sys.stderr)
        return 2
    url, key = sys.argv[1], sys.argv[2]
    method = sys.argv[3] if len(sys.argv) > 3 else "POST"
    network = sys.argv[4] if len(sys.argv) > 4 else None
    client = x402ClientSync()
    # The dev chain's test USDC is not a default asset of the client, and the default per-payment cap is below the
    # gateway's minimum top-up: opt in explicitly.
    client.set_spend_controls({"allowed_assets": True, "max_amount_per_payment": False})
    register_exact_evm_client(client, Account.from_key(key), networks=network)
    try:
        session = x402_requests(client)
        res = session.request(method, url)
    except Exception as e:  # noqa: BLE001 - reported to the calling test
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 1
    header = res.headers.get("PAYMENT-RESPONSE")
    try:
        body = res.json()
    except ValueError:
        body = res.text
    print(
        json.dumps(
            {
                "status": res.status_code,
                "body": body,
                "paymentResponse": json.loads(base64.b64decode(header)) if header else None,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
