//! Keeping the secrets of RPC URLs out of every text the gateway produces.
//!
//! Provider URLs carry API keys in their path (`https://base-mainnet.g.alchemy.com/v2/KEY`), their query
//! (`?apikey=KEY`) or their userinfo (`https://user:pass@host/`). Errors from reqwest and alloy embed the URL they
//! failed on, and an error page a provider sends back may echo the request path; those texts reach `/healthz`,
//! `/readyz`, 503 bodies, `/admin` and the logs. So every error text made from an RPC failure goes through
//! [`UrlSecrets::scrub`] where it is made (in [`super::Rpc`] and the WebSocket wake-up), and an endpoint is named by
//! [`redact_url`]: scheme and host only, e.g. `https://base-mainnet.g.alchemy.com/…`.

use alloy::transports::http::reqwest::Url;

pub use crate::config::redact_url;

/// What replaces a secret fragment that is not a whole URL.
const HIDDEN: &str = "…";

/// The secret parts of some URLs, to be removed from texts.
#[derive(Debug, Clone, Default)]
pub struct UrlSecrets {
    /// (text to remove, what replaces it), longest first so a whole URL goes before its parts.
    needles: Vec<(String, String)>,
}

impl UrlSecrets {
    /// The secrets of `urls`: each URL as written and as a URL parser prints it (reqwest's errors use the latter:
    /// percent-encoded, with a `/` path added), and its userinfo, path and query on their own, since a provider's
    /// error page or a library may print just those.
    pub fn new<'a>(urls: impl IntoIterator<Item = &'a str>) -> UrlSecrets {
        let mut needles: Vec<(String, String)> = Vec::new();
        let mut add = |secret: &str, replacement: String| {
            if !secret.is_empty() && !needles.iter().any(|(s, _)| s == secret) {
                needles.push((secret.to_string(), replacement));
            }
        };
        for raw in urls {
            let label = redact_url(raw);
            add(raw, label.clone());
            let Ok(url) = Url::parse(raw) else {
                continue;
            };
            add(url.as_str(), label.clone());
            // The URL without its userinfo, as an error that strips credentials would print it.
            let mut bare = url.clone();
            if bare.set_username("").is_ok() && bare.set_password(None).is_ok() {
                add(bare.as_str(), label);
            }
            add(url.username(), HIDDEN.to_string());
            if let Some(password) = url.password() {
                add(password, HIDDEN.to_string());
            }
            // A bare `/` says nothing; any longer path may be the key.
            if url.path().len() > 1 {
                add(url.path(), format!("/{HIDDEN}"));
            }
            if let Some(query) = url.query() {
                add(query, HIDDEN.to_string());
            }
            // The raw text's own path and query, which the parser may have re-encoded.
            if let Some((_, rest)) = raw.split_once("://") {
                let after_authority = rest.find(['/', '?']).map(|i| &rest[i..]);
                if let Some(tail) = after_authority.filter(|t| t.len() > 1) {
                    add(tail, format!("/{HIDDEN}"));
                }
            }
        }
        needles.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        UrlSecrets { needles }
    }

    /// `text` with every secret of these URLs replaced.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (secret, replacement) in &self.needles {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), replacement);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_named_by_scheme_and_host() {
        assert_eq!(
            redact_url("https://base-mainnet.g.alchemy.com/v2/SECRETKEY"),
            "https://base-mainnet.g.alchemy.com/…"
        );
        assert_eq!(
            redact_url("https://user:pass@host.example/path?apikey=X"),
            "https://host.example/…"
        );
        assert_eq!(redact_url("wss://host.example"), "wss://host.example");
    }

    #[test]
    fn scrubs_whole_urls_and_their_parts() {
        let secrets = UrlSecrets::new([
            "https://base-mainnet.g.alchemy.com/v2/SECRETKEY",
            "https://user:PASSWORD1@rpc.example:8545/rpc?apikey=QUERYKEY",
            "wss://ws.example/ws/WSKEY",
        ]);
        for text in [
            "error sending request for url (https://base-mainnet.g.alchemy.com/v2/SECRETKEY)",
            "HTTP 404: <html>no route /v2/SECRETKEY</html>",
            "error sending request for url (https://rpc.example:8545/rpc?apikey=QUERYKEY)",
            "https://user:PASSWORD1@rpc.example:8545/rpc?apikey=QUERYKEY: refused",
            "bad auth for user with PASSWORD1; apikey=QUERYKEY",
            "WebSocket wss://ws.example/ws/WSKEY closed",
        ] {
            let clean = secrets.scrub(text);
            for secret in ["SECRETKEY", "PASSWORD1", "QUERYKEY", "WSKEY"] {
                assert!(!clean.contains(secret), "{secret} left in {clean:?}");
            }
        }
        assert_eq!(
            secrets.scrub(
                "error sending request for url (https://base-mainnet.g.alchemy.com/v2/SECRETKEY)"
            ),
            "error sending request for url (https://base-mainnet.g.alchemy.com/…)"
        );
        // Text without secrets is left alone, and a URL without a path has nothing to hide.
        assert_eq!(secrets.scrub("connection refused"), "connection refused");
        assert_eq!(
            UrlSecrets::new(["http://127.0.0.1:8545"]).scrub("http://127.0.0.1:8545/ refused"),
            "http://127.0.0.1:8545 refused"
        );
    }
}
