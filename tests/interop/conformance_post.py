"""The x402-conformance resource checks (P1-P7, PyPI `x402-conformance`) on the 402 of a POST with a JSON body.

    .venv/bin/python tests/interop/conformance_post.py <paid url> <json body>

`x402conf resource` only sends GETs, but an inference route's 402 (its per-request `exact` price and its `upto`
maximum) depends on the request body. The checker's own `run_resource` takes the transport as its `opener`: this
one sends the same request as a POST with the body. Prints the checker's result (one JSON line).
"""

import json
import sys
import urllib.request

from x402conf.harness import run_resource


def main() -> int:
    url, body = sys.argv[1], sys.argv[2].encode()

    def post(req, timeout):
        headers = dict(req.header_items())
        headers["Content-Type"] = "application/json"
        return urllib.request.urlopen(
            urllib.request.Request(req.full_url, data=body, method="POST", headers=headers), timeout=timeout
        )

    print(json.dumps(run_resource(url, opener=post)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
