// Buys from the gateway with the official x402 client: `@x402/fetch` + `@x402/evm` and a viem local account.
//   node tests/interop/buy-credits.mjs <url> <0x private key> [method] [json body] [network]
// Prints one JSON line: {status, body, paymentResponse}. The token's EIP-712 name/version come from the 402's
// `extra`; the chain id from its CAIP-2 network (the dev chain is eip155:31337).
import { wrapFetchWithPaymentFromConfig, decodePaymentResponseHeader } from "@x402/fetch";
import { ExactEvmScheme } from "@x402/evm";
import { privateKeyToAccount } from "viem/accounts";

// `network` (CAIP-2): pay on that network only (the client then picks the 402's `accepts` entry for it).
const [url, key, method = "POST", body, network = "eip155:*"] = process.argv.slice(2);
if (!url || !key) {
  console.error("usage: node tests/interop/buy-credits.mjs <url> <privkey> [method] [json body]");
  process.exit(2);
}
const account = privateKeyToAccount(key);
const fetchWithPayment = wrapFetchWithPaymentFromConfig(fetch, {
  schemes: [{ network, client: new ExactEvmScheme(account) }],
  // The dev chain's test USDC is not a "default asset" of the client, and the default per-payment cap ($1) is
  // below the gateway's minimum top-up: an agent buying credits must opt in explicitly.
  spendControls: { allowedAssets: true, maxAmountPerPayment: false },
});
try {
  const init = { method };
  if (body && method !== "GET") {
    init.body = body;
    init.headers = { "content-type": "application/json" };
  }
  const res = await fetchWithPayment(url, init);
  const header = res.headers.get("PAYMENT-RESPONSE");
  const text = await res.text();
  let parsed;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = text;
  }
  console.log(
    JSON.stringify({
      status: res.status,
      body: parsed,
      paymentResponse: header ? decodePaymentResponseHeader(header) : null,
    }),
  );
} catch (e) {
  console.log(JSON.stringify({ error: String(e && e.stack ? e.stack : e) }));
  process.exit(1);
}
