#!/usr/bin/env node
// Dev helper playing the agent's wallet (viem from the project's npm install):
//   pay:    node scripts/agent-pay.mjs pay  --rpc URL --token ADDR --to PAYTO --key 0xPRIVKEY --amount 39.00
//           → sends the USDC transfer, waits for the receipt, prints {txHash, from, signature} where `signature` is
//             the personal_sign of the catalog's claim text for that txHash.
//   rotate: node scripts/agent-pay.mjs rotate --gateway URL --key 0xPRIVKEY [--at UNIX_SECONDS]
//           → prints {address, signedAt, signature} for POST /api/agent/keys/rotate, signing the text the gateway's
//             catalog states (keyRotation.message: it names that gateway, so it is read, never rebuilt here).
// --chain-id defaults to 31337 (the dev chain). Never use a real key with this script.
import { createWalletClient, createPublicClient, http, parseUnits, erc20Abi } from "viem";
import { privateKeyToAccount } from "viem/accounts";

const [mode, ...rest] = process.argv.slice(2);
const args = {};
for (let i = 0; i < rest.length; i += 2) args[rest[i].replace(/^--/, "")] = rest[i + 1];
const chainId = Number(args["chain-id"] ?? 31337);
const account = privateKeyToAccount(args.key);

if (mode === "pay") {
  const chain = { id: chainId, name: "dev", nativeCurrency: { name: "ETH", symbol: "ETH", decimals: 18 }, rpcUrls: { default: { http: [args.rpc] } } };
  const wallet = createWalletClient({ account, chain, transport: http(args.rpc) });
  const pub = createPublicClient({ chain, transport: http(args.rpc) });
  const hash = await wallet.writeContract({ address: args.token, abi: erc20Abi, functionName: "transfer", args: [args.to, parseUnits(args.amount, 6)] });
  await pub.waitForTransactionReceipt({ hash });
  const txHash = hash.toLowerCase();
  const signature = await account.signMessage({ message: `x402-gateway: claim payment ${txHash} on chain ${chainId}` });
  console.log(JSON.stringify({ txHash, from: account.address.toLowerCase(), signature }));
} else if (mode === "rotate") {
  const address = account.address.toLowerCase();
  const signedAt = Number(args.at ?? Math.floor(Date.now() / 1000));
  const plans = await (await fetch(`${args.gateway}/api/agent/plans`)).json();
  const template = plans?.x402?.keyRotation?.message;
  if (typeof template !== "string") {
    console.error(`no keyRotation.message in ${args.gateway}/api/agent/plans`);
    process.exit(1);
  }
  const message = template.replace("{address}", address).replace("{signedAt}", String(signedAt));
  const signature = await account.signMessage({ message });
  console.log(JSON.stringify({ address, signedAt, signature }));
} else {
  console.error("usage: agent-pay.mjs pay|rotate --key 0x… [see the header]");
  process.exit(2);
}
