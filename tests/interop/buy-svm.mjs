// Buys from the gateway with the official x402 Solana client: `@x402/fetch` + `@x402/svm` (ExactSvmScheme) and a
// `@solana/kit` key pair signer.
//   node tests/interop/buy-svm.mjs <url> <base58 64-byte keypair> <solana rpc url> [method] [json body]
// Prints one JSON line: {status, body, paymentResponse}. The client builds the transfer itself (it reads the mint
// from the RPC and derives both token accounts), signs it as the payer and leaves the fee payer's signature to the
// gateway (`extra.feePayer`).
import { wrapFetchWithPaymentFromConfig, decodePaymentResponseHeader } from "@x402/fetch";
import { ExactSvmScheme } from "@x402/svm";
import { createKeyPairSignerFromBytes, getBase58Encoder } from "@solana/kit";

const [url, keypair, rpcUrl, method = "POST", body] = process.argv.slice(2);
if (!url || !keypair || !rpcUrl) {
  console.error("usage: node tests/interop/buy-svm.mjs <url> <base58 keypair> <rpc url> [method] [json body]");
  process.exit(2);
}
try {
  const signer = await createKeyPairSignerFromBytes(getBase58Encoder().encode(keypair));
  const fetchWithPayment = wrapFetchWithPaymentFromConfig(fetch, {
    schemes: [{ network: "solana:*", client: new ExactSvmScheme(signer, { rpcUrl }) }],
    // The default per-payment cap ($1) is below the gateway's minimum top-up: an agent buying credits opts in.
    spendControls: { allowedAssets: true, maxAmountPerPayment: false },
  });
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
