//! What the gateway asks for: building `PaymentRequirements` / `PaymentRequired` from the configured network, and
//! matching a client's echoed `accepted` back to one of our offers by value (not raw JSON).

use alloy::primitives::Address;

use super::types::{
    AmountError, Extra, PaymentRequired, PaymentRequiredV1, PaymentRequirements,
    PaymentRequirementsV1, ResourceInfo, SCHEME_EXACT, u256_from_usdc,
};
use crate::config::Network;
use crate::usdc::Usdc;

/// The v1 (legacy) name of a chain, if it has one.
pub fn v1_network_name(chain_id: u64) -> Option<&'static str> {
    match chain_id {
        8453 => Some("base"),
        84532 => Some("base-sepolia"),
        137 => Some("polygon"),
        43114 => Some("avalanche"),
        _ => None,
    }
}

/// Whether a client's network string (CAIP-2, or a v1 name) means `network`.
pub fn network_matches(network: &Network, client: &str) -> bool {
    let client = client.trim();
    client.eq_ignore_ascii_case(&network.caip2())
        || v1_network_name(network.chain_id).is_some_and(|n| client.eq_ignore_ascii_case(n))
}

/// The exact-scheme requirements for `amount` of `network`'s USDC to `pay_to`. `extra` carries the token's
/// EIP-712 domain (name, version), without which official clients refuse to sign.
pub fn exact_requirements(
    network: &Network,
    pay_to: Address,
    amount: Usdc,
    max_timeout_seconds: u64,
) -> Result<PaymentRequirements, AmountError> {
    Ok(PaymentRequirements {
        scheme: SCHEME_EXACT.to_string(),
        network: network.caip2(),
        amount: u256_from_usdc(amount)?,
        asset: network.token,
        pay_to,
        max_timeout_seconds,
        extra: Some(Extra {
            name: Some(network.token_name.clone()),
            version: Some(network.token_version.clone()),
            other: Default::default(),
        }),
    })
}

/// The v2 402 envelope.
pub fn payment_required(
    resource: ResourceInfo,
    accepts: Vec<PaymentRequirements>,
    error: Option<String>,
) -> PaymentRequired {
    PaymentRequired {
        x402_version: 2,
        error,
        resource,
        accepts,
        extensions: None,
        svm_accepts: Vec::new(),
    }
}

/// The legacy v1 form of one requirement (for the 402 body of v1 clients).
pub fn to_v1(req: &PaymentRequirements, resource: &ResourceInfo) -> PaymentRequirementsV1 {
    let chain_id = req
        .network
        .trim()
        .strip_prefix("eip155:")
        .and_then(|id| id.parse::<u64>().ok());
    PaymentRequirementsV1 {
        scheme: req.scheme.clone(),
        network: chain_id
            .and_then(v1_network_name)
            .map(str::to_string)
            .unwrap_or_else(|| req.network.clone()),
        max_amount_required: req.amount,
        resource: resource.url.clone(),
        description: resource.description.clone().unwrap_or_default(),
        mime_type: resource
            .mime_type
            .clone()
            .unwrap_or_else(|| "application/json".to_string()),
        pay_to: req.pay_to,
        max_timeout_seconds: req.max_timeout_seconds,
        asset: req.asset,
        extra: req.extra.clone(),
    }
}

/// The legacy v1 402 body for a v2 envelope.
pub fn payment_required_v1(required: &PaymentRequired) -> PaymentRequiredV1 {
    PaymentRequiredV1 {
        x402_version: 1,
        error: required.error.clone(),
        accepts: required
            .accepts
            .iter()
            .map(|r| to_v1(r, &required.resource))
            .collect(),
    }
}

/// Whether a client's `accepted` is `offered`, compared field by field by value: scheme and network
/// case-insensitively, addresses as addresses, amounts as numbers, and `extra` only where both sides have a key
/// (the Python SDK drops unknown keys and defaults `extra` to `{}`).
pub fn accepted_matches(accepted: &PaymentRequirements, offered: &PaymentRequirements) -> bool {
    let extra_ok = match (&accepted.extra, &offered.extra) {
        (Some(a), Some(o)) => {
            let same = |x: &Option<String>, y: &Option<String>| match (x, y) {
                (Some(x), Some(y)) => x == y,
                _ => true,
            };
            same(&a.name, &o.name) && same(&a.version, &o.version)
        }
        _ => true,
    };
    accepted.scheme.eq_ignore_ascii_case(&offered.scheme)
        && accepted
            .network
            .trim()
            .eq_ignore_ascii_case(offered.network.trim())
        && accepted.amount == offered.amount
        && accepted.asset == offered.asset
        && accepted.pay_to == offered.pay_to
        && accepted.max_timeout_seconds == offered.max_timeout_seconds
        && extra_ok
}

/// Our offer matching `accepted`, if any.
pub fn find_accepted<'a>(
    accepted: &PaymentRequirements,
    offered: &'a [PaymentRequirements],
) -> Option<&'a PaymentRequirements> {
    offered.iter().find(|o| accepted_matches(accepted, o))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::U256;
    use serde_json::json;

    fn base() -> Network {
        Network {
            name: "base".into(),
            chain_id: 8453,
            token: crate::config::BASE_USDC.parse().unwrap(),
            token_name: "USD Coin".into(),
            token_version: "2".into(),
        }
    }

    #[test]
    fn builds_reference_shape() {
        let pay_to = Address::repeat_byte(0x11);
        let r = exact_requirements(&base(), pay_to, Usdc(10_000), 300).unwrap();
        let req = payment_required(
            ResourceInfo {
                url: "https://api.example.com/x402/credits".into(),
                description: Some("credits".into()),
                mime_type: None,
            },
            vec![r],
            None,
        );
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(
            v,
            json!({
                "x402Version": 2,
                "resource": {"url": "https://api.example.com/x402/credits", "description": "credits"},
                "accepts": [{
                    "scheme": "exact",
                    "network": "eip155:8453",
                    "amount": "10000",
                    "asset": "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
                    "payTo": "0x1111111111111111111111111111111111111111",
                    "maxTimeoutSeconds": 300,
                    "extra": {"name": "USD Coin", "version": "2"}
                }]
            })
        );
        let v1 = serde_json::to_value(payment_required_v1(&req)).unwrap();
        assert_eq!(v1["accepts"][0]["network"], "base");
        assert_eq!(v1["accepts"][0]["maxAmountRequired"], "10000");
        assert_eq!(
            v1["accepts"][0]["resource"],
            "https://api.example.com/x402/credits"
        );
        assert_eq!(v1["accepts"][0]["mimeType"], "application/json");
        assert!(v1["accepts"][0].get("outputSchema").is_none());
        assert!(exact_requirements(&base(), pay_to, Usdc(-1), 300).is_err());
    }

    #[test]
    fn matches_by_value() {
        let offered =
            exact_requirements(&base(), Address::repeat_byte(0xab), Usdc(10_000), 300).unwrap();
        // Lower-case addresses, zero-padded amount, no extra (Python SDK): still ours.
        let echoed: PaymentRequirements = serde_json::from_value(json!({
            "scheme": "exact", "network": "eip155:8453", "amount": "0010000",
            "asset": "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913",
            "payTo": "0xabababababababababababababababababababab",
            "maxTimeoutSeconds": 300, "extra": {}
        }))
        .unwrap();
        assert!(find_accepted(&echoed, std::slice::from_ref(&offered)).is_some());
        let mut other = echoed.clone();
        other.amount = U256::from(9_999);
        assert!(!accepted_matches(&other, &offered));
        let mut other = echoed.clone();
        other.extra = Some(Extra {
            name: Some("USDC".into()),
            ..Default::default()
        });
        assert!(!accepted_matches(&other, &offered));
        let mut other = echoed;
        other.network = "eip155:84532".into();
        assert!(!accepted_matches(&other, &offered));
        assert!(network_matches(&base(), "base"));
        assert!(network_matches(&base(), "eip155:8453"));
        assert!(!network_matches(&base(), "base-sepolia"));
    }
}
