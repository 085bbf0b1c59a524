// An x402 facilitator made of the official open-source parts: `@x402/core`'s x402Facilitator with `@x402/evm`'s
// upto facilitator scheme (UptoEvmScheme, Permit2 + the upto proxy), signing with a viem local account on the given
// chain. GET /supported, POST /verify, POST /settle, on loopback; the gateway's facilitator mode is tested against it.
//   node tests/interop/facilitator.mjs <rpc url> <0x private key> <chain id>
// Prints one JSON line when listening: {url, address}.
import http from "node:http";
import { x402Facilitator } from "@x402/core/facilitator";
import { toFacilitatorEvmSigner } from "@x402/evm";
import { UptoEvmScheme } from "@x402/evm/upto/facilitator";
import { createWalletClient, defineChain, http as viemHttp, publicActions } from "viem";
import { privateKeyToAccount } from "viem/accounts";

const [rpc, key, chainId] = process.argv.slice(2);
if (!rpc || !key || !chainId) {
  console.error("usage: node tests/interop/facilitator.mjs <rpc> <privkey> <chain id>");
  process.exit(2);
}
const chain = defineChain({
  id: Number(chainId),
  name: "local",
  nativeCurrency: { name: "Ether", symbol: "ETH", decimals: 18 },
  rpcUrls: { default: { http: [rpc] } },
});
const account = privateKeyToAccount(key);
const client = createWalletClient({ account, chain, transport: viemHttp(rpc) }).extend(publicActions);
const signer = toFacilitatorEvmSigner({ ...client, address: account.address });
const facilitator = new x402Facilitator();
facilitator.register(`eip155:${chainId}`, new UptoEvmScheme(signer));

const server = http.createServer(async (rq, rs) => {
  const send = (code, body) => {
    rs.writeHead(code, { "content-type": "application/json" });
    rs.end(JSON.stringify(body, (_, v) => (typeof v === "bigint" ? v.toString() : v)));
  };
  try {
    if (rq.method === "GET" && rq.url === "/supported") return send(200, facilitator.getSupported());
    if (rq.method !== "POST" || !["/verify", "/settle"].includes(rq.url)) return send(404, { error: "not found" });
    let data = "";
    for await (const chunk of rq) data += chunk;
    const { paymentPayload, paymentRequirements } = JSON.parse(data);
    if (rq.url === "/verify") return send(200, await facilitator.verify(paymentPayload, paymentRequirements));
    return send(200, await facilitator.settle(paymentPayload, paymentRequirements));
  } catch (e) {
    send(500, { error: String(e?.message || e).slice(0, 500) });
  }
});
server.listen(0, "127.0.0.1", () => {
  const { port } = server.address();
  console.log(JSON.stringify({ url: `http://127.0.0.1:${port}`, address: account.address }));
});
