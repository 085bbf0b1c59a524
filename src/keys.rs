//! API keys: `sk-<public id>-<secret>`.
//!
//! The public id (16 hex digits, 64 random bits) finds the key's row and is safe to show in logs, CLIs and audits;
//! the secret (64 hex digits, 256 random bits from the OS generator) is shown once, when the key is made, and only
//! its SHA-256 is stored. A presented key is checked by comparing hashes in constant time.

use rand::TryRngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Prefix of every key.
pub const PREFIX: &str = "sk-";
const PUBLIC_ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;

/// A freshly generated key: `full` goes to the client once; the rest is stored.
#[derive(Clone)]
pub struct NewKey {
    pub public_id: String,
    pub secret_hash: [u8; 32],
    /// The whole key, `sk-<public_id>-<secret>`.
    pub full: String,
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey")
            .field("public_id", &self.public_id)
            .finish_non_exhaustive()
    }
}

/// Why a key could not be made.
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random generator failed: {0}")]
pub struct KeyGenError(String);

fn random<const N: usize>() -> Result<[u8; N], KeyGenError> {
    let mut buf = [0u8; N];
    rand::rngs::OsRng
        .try_fill_bytes(&mut buf)
        .map_err(|e| KeyGenError(e.to_string()))?;
    Ok(buf)
}

/// Makes a new key from the OS random generator.
pub fn generate() -> Result<NewKey, KeyGenError> {
    let public_id = alloy::hex::encode(random::<PUBLIC_ID_BYTES>()?);
    let secret = alloy::hex::encode(random::<SECRET_BYTES>()?);
    let secret_hash = hash_secret(&secret);
    Ok(NewKey {
        full: format!("{PREFIX}{public_id}-{secret}"),
        public_id,
        secret_hash,
    })
}

/// SHA-256 of the secret part.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// A presented key split into its parts; `None` when it does not have the key's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    pub public_id: &'a str,
    pub secret: &'a str,
}

pub fn parse(key: &str) -> Option<ParsedKey<'_>> {
    let rest = key.strip_prefix(PREFIX)?;
    let (public_id, secret) = rest.split_once('-')?;
    let hex = |s: &str, n: usize| {
        s.len() == n * 2
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (hex(public_id, PUBLIC_ID_BYTES) && hex(secret, SECRET_BYTES))
        .then_some(ParsedKey { public_id, secret })
}

/// Whether `secret` hashes to `stored`, compared in constant time.
pub fn secret_matches(secret: &str, stored: &[u8]) -> bool {
    let got = hash_secret(secret);
    stored.len() == got.len() && bool::from(got.as_slice().ct_eq(stored))
}

/// `Authorization: Bearer sk-…` → the key text.
pub fn from_bearer(header: &str) -> Option<&str> {
    let (scheme, value) = header.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| value.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_parses_and_checks() {
        let k = generate().unwrap();
        assert!(k.full.starts_with("sk-"));
        assert_eq!(k.full.len(), 3 + 16 + 1 + 64);
        let parsed = parse(&k.full).unwrap();
        assert_eq!(parsed.public_id, k.public_id);
        assert!(secret_matches(parsed.secret, &k.secret_hash));
        let other = generate().unwrap();
        assert_ne!(other.public_id, k.public_id);
        assert!(!secret_matches(
            parse(&other.full).unwrap().secret,
            &k.secret_hash
        ));
        assert!(!secret_matches(parsed.secret, &k.secret_hash[..31]));
    }

    #[test]
    fn rejects_what_is_not_a_key() {
        for bad in [
            "",
            "sk-",
            "sk-abc-def",
            "pk-0123456789abcdef-00",
            "sk-0123456789ABCDEF-".repeat(2).as_str(),
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
        assert_eq!(from_bearer("Bearer sk-x"), Some("sk-x"));
        assert_eq!(from_bearer("bearer  sk-x "), Some("sk-x"));
        assert_eq!(from_bearer("Basic abc"), None);
    }
}
