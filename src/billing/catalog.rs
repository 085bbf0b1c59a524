//! The 402 product catalog: what an agent can buy, how to pay, and how to claim.
//!
//! Same shape as seed 000's body (`{error, message, x402: {version, network, asset, payTo, facilitator, products,
//! docs}}`), plus what the claim-by-txHash flow needs: the exact text to sign, the chain id and the confirmations.

use std::collections::HashMap;

use alloy::primitives::Address;
use serde_json::{Value, json};

use crate::config::Settings;
use crate::usdc::Usdc;

/// `{txHash}` is replaced by the transaction hash, lower-case 0x-hex.
pub const CLAIM_TEXT_TEMPLATE: &str = "x402-gateway: claim payment {txHash} on chain {chainId}";
/// `{address}` lower-case 0x-hex, `{signedAt}` unix seconds; `{host}`, `{payTo}` and `{chainId}` name this gateway
/// (see [`rotate_text`]), so the catalog states them filled in.
pub const ROTATE_TEXT_TEMPLATE: &str = "x402-gateway: rotate key for {address} at gateway {host} (payTo {payTo}) on chain {chainId} at {signedAt}";
/// How far a rotation's `signedAt` may be from the gateway's clock.
pub const ROTATION_MAX_SKEW_SECS: i64 = 300;

/// The text a payer signs to claim `tx_hash` (lower-case 0x-hex).
pub fn claim_text(tx_hash: &str, chain_id: u64) -> String {
    format!("x402-gateway: claim payment {tx_hash} on chain {chain_id}")
}

/// The text the paying Solana wallet signs (`signMessage`, ed25519 over its UTF-8 bytes) to claim the payment
/// made in transaction `signature` on the Solana network `caip2`: naming the network keeps a proof for devnet from
/// working on mainnet.
pub const CLAIM_TEXT_TEMPLATE_SVM: &str = "x402-gateway: claim payment {txHash} on {caip2}";

/// [`CLAIM_TEXT_TEMPLATE_SVM`] filled in.
pub fn claim_text_svm(signature: &str, caip2: &str) -> String {
    format!("x402-gateway: claim payment {signature} on {caip2}")
}

/// The text an account signs to rotate its keys at the gateway `host` (see [`gateway_host`]) that is paid at `pay_to`
/// on `chain_id`. Naming the gateway is what keeps a signature made for one gateway from working on another that
/// knows the same payer (the same chain, the same wallet) during its 5-minute window; `signedAt` and the store's
/// rotation nonces keep it from working twice on this one.
pub fn rotate_text(
    address: &str,
    host: &str,
    pay_to: Address,
    chain_id: u64,
    signed_at: i64,
) -> String {
    format!(
        "x402-gateway: rotate key for {address} at gateway {host} (payTo {pay_to:#x}) on chain {chain_id} at \
         {signed_at}"
    )
}

/// The name of this gateway in the texts it has signed: the host (and port, if any) of `server.public_url`,
/// lower-case; without a public URL, the `server.listen` address. Never the request's `Host` header, which whoever
/// relays a signature chooses.
pub fn gateway_host(settings: &Settings) -> String {
    match settings.public_url.as_deref() {
        Some(url) => {
            let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
            let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
            authority
                .rsplit('@')
                .next()
                .unwrap_or(authority)
                .to_ascii_lowercase()
        }
        None => settings.listen.to_string(),
    }
}

/// [`rotate_text`] for `settings`' gateway.
pub fn rotate_text_for(settings: &Settings, address: &str, signed_at: i64) -> String {
    rotate_text(
        address,
        &gateway_host(settings),
        settings.chain.pay_to,
        settings.chain.network.chain_id,
        signed_at,
    )
}

fn endpoint(settings: &Settings, path: &str) -> String {
    format!("{}{path}", settings.public_url.as_deref().unwrap_or(""))
}

/// The catalog body. `taken` holds the seats in use per (pool, block) right now.
pub fn catalog(settings: &Settings, taken: &HashMap<(String, String), u32>) -> Value {
    let chain_id = settings.chain.network.chain_id;
    let mut products: Vec<Value> = settings
        .pools
        .iter()
        .map(|pool| {
            let blocks: Vec<Value> = pool
                .blocks
                .iter()
                .map(|b| {
                    let used = taken
                        .get(&(pool.slug.clone(), b.name.clone()))
                        .copied()
                        .unwrap_or(0);
                    json!({
                        "block": b.name,
                        "hoursUtc": format!("{} UTC", b.hours()),
                        "priceUsdc": b.price,
                        "seats": b.seats,
                        "availableSeats": b.seats.saturating_sub(used),
                    })
                })
                .collect();
            let first = pool
                .blocks
                .first()
                .map(|b| b.name.clone())
                .unwrap_or_default();
            json!({
                "type": "subscription",
                "pool": pool.slug,
                "name": pool.name,
                "models": pool.models,
                "currency": "USDC",
                "duration": format!("{} days", pool.duration_days),
                "durationDays": pool.duration_days,
                "blocks": blocks,
                "agentCheckout": {
                    "endpoint": endpoint(settings, "/api/agent/subscribe-pool"),
                    "method": "POST",
                    "body": {
                        "txHash": "<USDC_TX_HASH>",
                        "poolSlug": pool.slug,
                        "blocks": [first],
                        "signature": "<PAYER_SIGNATURE_OF_CLAIM_MESSAGE>",
                    },
                    "optionalFields": {"network": "CAIP-2 id of the network paid on (default: the first network)"},
                },
            })
        })
        .collect();
    products.push(json!({
        "type": "credits",
        "minAmount": settings.credits.min_topup,
        "currency": "USDC",
        "description": "Pay-as-you-go credits, never expire",
        "agentTopup": {
            "endpoint": endpoint(settings, "/api/agent/topup"),
            "method": "POST",
            "body": {
                "txHash": "<USDC_TX_HASH>",
                "amount": "<AMOUNT_USDC>",
                "signature": "<PAYER_SIGNATURE_OF_CLAIM_MESSAGE>",
            },
            "optionalFields": {"network": "CAIP-2 id of the network paid on (default: the first network)"},
        },
    }));
    let require = settings.auth.claims_require_signature;
    // What a key buys: the models and the inference APIs that serve them (every one metered the same way).
    let models: Vec<Value> = settings
        .models
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "inputUsdcPerMtok": m.input_per_mtok,
                "outputUsdcPerMtok": m.output_per_mtok,
                "maxOutputTokens": m.max_output_tokens,
                "perRequestUsdc": m.per_request,
                "upto": m.upto,
            })
        })
        .collect();
    let endpoints: Vec<Value> = crate::proxy::Api::ALL
        .iter()
        .map(|api| json!({"api": api.name(), "method": "POST", "endpoint": endpoint(settings, api.path())}))
        .collect();
    json!({
        "error": "Payment Required",
        "message": "Subscribe or purchase credits to access AI inference. Pay USDC to payTo, wait for the \
                    confirmations, then claim with the endpoints below (signed by the paying address) to get an API key.",
        "x402": {
            "version": 2,
            "network": settings.chain.network.name,
            "chainId": chain_id,
            "caip2": settings.chain.network.caip2(),
            "asset": "USDC",
            "assetAddress": format!("{:#x}", settings.chain.network.token),
            "payTo": format!("{:#x}", settings.chain.pay_to),
            "facilitator": settings.facilitator,
            // Every network an agent may pay on (the top-level fields are the first one's). A claim names its
            // network in `network` (default: the first), and the claim message names its chain id.
            "networks": settings.networks().map(|n| json!({
                "network": n.network.name,
                "caip2": n.network.caip2(),
                "chainId": n.network.chain_id,
                "asset": "USDC",
                "assetAddress": format!("{:#x}", n.network.token),
                "assetDecimals": 6,
                "eip712": {"name": n.network.token_name, "version": n.network.token_version},
                "payTo": format!("{:#x}", n.pay_to),
                "confirmations": n.confirmations,
                "claimMessage": CLAIM_TEXT_TEMPLATE.replace("{chainId}", &n.network.chain_id.to_string()),
                // Every token accepted there, USDC first; a payment is credited at the token's USD price.
                "tokens": n.tokens().iter().map(|t| json!({
                    "symbol": t.symbol,
                    "address": format!("{:#x}", t.address),
                    "decimals": t.decimals,
                    "eip712": {"name": t.name, "version": t.version},
                    "usdPerToken": Usdc(t.usd_micro_per_token as i64).to_string(),
                })).collect::<Vec<_>>(),
            })).chain(settings.svm_networks.iter().map(|n| json!({
                // A Solana network: pay USDC (SPL) to payTo's associated token account for the mint, then claim
                // with the transaction's signature as `txHash` and `network` = this caip2, signed (ed25519,
                // a wallet's signMessage) by the wallet that signed the transfer.
                "network": n.name,
                "caip2": n.caip2,
                "kind": "svm",
                "asset": "USDC",
                "assetAddress": n.mint.to_string(),
                "assetDecimals": 6,
                "payTo": n.pay_to.to_string(),
                "commitment": n.commitment.as_str(),
                "claimMessage": CLAIM_TEXT_TEMPLATE_SVM.replace("{caip2}", &n.caip2),
                "claimSigning": "ed25519 signature (base58, or 0x-hex) of the UTF-8 bytes of claimMessage with \
                                 {txHash} replaced by the transaction signature, by the wallet that signed the \
                                 transfer (a Solana wallet's signMessage)",
                "tokens": [{
                    "symbol": "USDC",
                    "address": n.mint.to_string(),
                    "decimals": 6,
                    "usdPerToken": "1",
                }],
            }))).collect::<Vec<_>>(),
            "products": products,
            "models": models,
            "endpoints": endpoints,
            "claim": {
                "signatureRequired": require,
                "message": CLAIM_TEXT_TEMPLATE.replace("{chainId}", &chain_id.to_string()),
                "signing": "EIP-191 personal_sign of `message` with {txHash} replaced by the transaction hash in \
                            lower-case 0x-hex, by the address that sent the USDC; a contract wallet answers \
                            ERC-1271 isValidSignature(eip191Hash(message), signature)",
                "signatureField": "signature",
                "chainId": chain_id,
                "confirmations": settings.chain.confirmations,
                "payment": "the claim is worth the sum of the USDC transfers to payTo in the transaction; any \
                            value beyond the product's price becomes credits of the paying address",
            },
            "keyRotation": {
                "endpoint": endpoint(settings, "/api/agent/keys/rotate"),
                "method": "POST",
                "message": ROTATE_TEXT_TEMPLATE
                    .replace("{chainId}", &chain_id.to_string())
                    .replace("{payTo}", &format!("{:#x}", settings.chain.pay_to))
                    .replace("{host}", &gateway_host(settings)),
                "signing": "EIP-191 personal_sign of `message` with {address} replaced by the account (the paying \
                            address, lower-case 0x-hex) and {signedAt} by the unix seconds now; the text names this \
                            gateway, so a signature made for another gateway is refused here",
                "maxClockSkewSeconds": ROTATION_MAX_SKEW_SECS,
                "body": {
                    "address": "<PAYER_ADDRESS>",
                    "signedAt": "<UNIX_SECONDS>",
                    "signature": "<SIGNATURE_OF_ROTATION_MESSAGE>",
                },
            },
            "docs": settings.docs_url.clone().unwrap_or_else(|| endpoint(settings, "/api/agent/plans")),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn settings(server: &str) -> Settings {
        let text = format!(
            "{server}\n[chain]\nnetwork = \"base\"\nrpc_http = [\"https://mainnet.base.org\"]\n\
             pay_to = \"0x1111111111111111111111111111111111111111\"\n"
        );
        Config::parse(&text, std::path::Path::new("test.toml"))
            .unwrap()
            .resolve(std::path::Path::new("/srv"), &|_| None)
            .unwrap()
    }

    #[test]
    fn the_rotation_text_names_this_gateway() {
        let public = settings("[server]\npublic_url = \"https://API.Example.com:8443/base/\"");
        assert_eq!(gateway_host(&public), "api.example.com:8443");
        assert_eq!(
            rotate_text_for(&public, "0xabc", 1_700_000_000),
            "x402-gateway: rotate key for 0xabc at gateway api.example.com:8443 (payTo \
             0x1111111111111111111111111111111111111111) on chain 8453 at 1700000000"
        );
        // The catalog states the same text, with only the account and the time left to fill in.
        let stated = catalog(&public, &HashMap::new())["x402"]["keyRotation"]["message"]
            .as_str()
            .unwrap()
            .replace("{address}", "0xabc")
            .replace("{signedAt}", "1700000000");
        assert_eq!(stated, rotate_text_for(&public, "0xabc", 1_700_000_000));
        // Without a public URL, the listen address.
        let local = settings("[server]\nlisten = \"127.0.0.1:18402\"");
        assert_eq!(gateway_host(&local), "127.0.0.1:18402");
    }
}
