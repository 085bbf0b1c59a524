// Pays per token with the official x402 `upto` client: `@x402/fetch` + `@x402/evm/upto/client` (UptoEvmScheme, a
// Permit2 witness signature for the 402's maximum) and a viem local account.
//   node tests/interop/upto.mjs <url> <0x private key> <json body>
// Prints one JSON line: {status, body, paymentResponse, paymentEvent}. For a stream, `body` is the raw SSE text and
// `paymentEvent` the data of its final `x402.payment-response` event (the receipt, sent after the metered cost is
// settled); `paymentResponse` is the decoded PAYMENT-RESPONSE header when there is one (JSON answers).
import { wrapFetchWithPaymentFromConfig, decodePaymentResponseHeader } from "@x402/fetch";
import { UptoEvmScheme } from "@x402/evm/upto/client";
import { privateKeyToAccount } from "viem/accounts";

const [url, key, body] = process.argv.slice(2);
if (!url || !key || !body) {
  console.error("usage: node tests/interop/upto.mjs <url> <privkey> <json body>");
  process.exit(2);
}
const account = privateKeyToAccount(key);
const fetchWithPayment = wrapFetchWithPaymentFromConfig(fetch, {
  schemes: [{ network: "eip155:*", client: new UptoEvmScheme(account) }],
  // The dev chain's test USDC is not one of the client's default assets: opt in explicitly.
  spendControls: { allowedAssets: true, maxAmountPerPayment: false },
});
try {
  const res = await fetchWithPayment(url, {
    method: "POST",
    body,
    headers: { "content-type": "application/json" },
  });
  const header = res.headers.get("PAYMENT-RESPONSE");
  const text = await res.text();
  let parsed;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = text;
  }
  let paymentEvent = null;
  for (const block of text.split("\n\n")) {
    const lines = block.split("\n");
    if (lines.some((l) => l === "event: x402.payment-response")) {
      const data = lines.find((l) => l.startsWith("data: "));
      paymentEvent = data ? JSON.parse(data.slice(6)) : null;
    }
  }
  console.log(
    JSON.stringify({
      status: res.status,
      body: parsed,
      paymentResponse: header ? decodePaymentResponseHeader(header) : null,
      paymentEvent,
      paymentStatus: res.headers.get("x-payment-status"),
    }),
  );
} catch (e) {
  console.log(JSON.stringify({ error: String(e && e.stack ? e.stack : e) }));
  process.exit(1);
}
