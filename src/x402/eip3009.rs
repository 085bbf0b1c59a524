//! EIP-3009 `transferWithAuthorization` on USDC: the EIP-712 digest a payer signs, signature forms (65-byte ECDSA,
//! ERC-1271 contract signatures, ERC-6492 wrappers) and the calldata of the token calls used to verify and settle.

use alloy::primitives::{Address, B256, Bytes, U256, b256};
use alloy::sol_types::{Eip712Domain, SolCall, SolStruct, SolValue};

use super::types::Authorization;
use crate::config::Network;
use crate::dev::contracts::TestUSDC;

alloy::sol! {
    /// EIP-3009's signed struct (FiatToken v2 `TRANSFER_WITH_AUTHORIZATION_TYPEHASH`).
    struct TransferWithAuthorization {
        address from;
        address to;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
    }

    /// ERC-1271.
    interface IERC1271 {
        function isValidSignature(bytes32 hash, bytes signature) external view returns (bytes4 magicValue);
    }
}

/// What ERC-1271 `isValidSignature` returns for a valid signature.
pub const ERC1271_MAGIC: [u8; 4] = [0x16, 0x26, 0xba, 0x7e];

/// The 32-byte suffix of an ERC-6492 (counterfactual wallet) signature.
pub const ERC6492_MAGIC: B256 =
    b256!("6492649264926492649264926492649264926492649264926492649264926492");

/// secp256k1n / 2: FiatToken rejects signatures with a larger `s` (malleable).
const SECP256K1_HALF_N: U256 = U256::from_limbs([
    0xdfe92f46681b20a0,
    0x5d576e7357a4501d,
    0xffffffffffffffff,
    0x7fffffffffffffff,
]);

/// The token's EIP-712 domain: `{name, version, chainId, verifyingContract}`.
pub fn domain(name: &str, version: &str, chain_id: u64, token: Address) -> Eip712Domain {
    Eip712Domain::new(
        Some(name.to_string().into()),
        Some(version.to_string().into()),
        Some(U256::from(chain_id)),
        Some(token),
        None,
    )
}

/// The domain of `network`'s token as configured.
pub fn network_domain(network: &Network) -> Eip712Domain {
    domain(
        &network.token_name,
        &network.token_version,
        network.chain_id,
        network.token,
    )
}

/// The EIP-712 digest the payer signs for `auth` under `domain`.
pub fn digest(auth: &Authorization, domain: &Eip712Domain) -> B256 {
    TransferWithAuthorization {
        from: auth.from,
        to: auth.to,
        value: auth.value,
        validAfter: auth.valid_after,
        validBefore: auth.valid_before,
        nonce: auth.nonce,
    }
    .eip712_signing_hash(domain)
}

/// A 65-byte `r ‖ s ‖ v` signature as FiatToken accepts it: low `s`, `v` ∈ {27, 28} (0/1 normalised).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rsv {
    pub r: B256,
    pub s: B256,
    pub v: u8,
}

impl Rsv {
    /// Parses a 65-byte signature; `None` for any other length, a `v` outside {0, 1, 27, 28} or a high `s`.
    pub fn parse(sig: &[u8]) -> Option<Rsv> {
        if sig.len() != 65 {
            return None;
        }
        let v = match sig[64] {
            0 | 27 => 27,
            1 | 28 => 28,
            _ => return None,
        };
        let r = B256::from_slice(&sig[..32]);
        let s = B256::from_slice(&sig[32..64]);
        if U256::from_be_bytes(s.0) > SECP256K1_HALF_N {
            return None;
        }
        Some(Rsv { r, s, v })
    }

    /// The address that signed `digest`, if the signature is well formed.
    pub fn recover(&self, digest: &B256) -> Option<Address> {
        let sig =
            alloy::primitives::Signature::from_scalars_and_parity(self.r, self.s, self.v == 28);
        sig.recover_address_from_prehash(digest).ok()
    }

    /// `r ‖ s ‖ v` with the normalised `v`.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = Vec::with_capacity(65);
        out.extend_from_slice(self.r.as_slice());
        out.extend_from_slice(self.s.as_slice());
        out.push(self.v);
        out.into()
    }
}

/// An ERC-6492 signature: `abi.encode(factory, factoryCalldata, innerSignature) ‖ magic`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erc6492 {
    pub factory: Address,
    pub factory_calldata: Bytes,
    pub inner: Bytes,
}

/// Unwraps an ERC-6492 signature. `None` if `sig` does not end with the magic suffix; `Some(Err)` if it does but
/// the rest is not the expected ABI encoding.
pub fn unwrap_erc6492(sig: &[u8]) -> Option<Result<Erc6492, String>> {
    let body = sig.strip_suffix(ERC6492_MAGIC.as_slice())?;
    Some(
        <(Address, Bytes, Bytes)>::abi_decode_params(body)
            .map(|(factory, factory_calldata, inner)| Erc6492 {
                factory,
                factory_calldata,
                inner,
            })
            .map_err(|e| e.to_string()),
    )
}

/// `isValidSignature(digest, signature)` calldata.
pub fn is_valid_signature_call(digest: B256, signature: &Bytes) -> Bytes {
    IERC1271::isValidSignatureCall {
        hash: digest,
        signature: signature.clone(),
    }
    .abi_encode()
    .into()
}

/// Whether an `isValidSignature` answer is the ERC-1271 magic value.
pub fn is_erc1271_magic(answer: &[u8]) -> bool {
    // bytes4 is ABI-encoded left-aligned in one 32-byte word.
    answer.len() >= 32 && answer[..4] == ERC1271_MAGIC && answer[4..32].iter().all(|b| *b == 0)
}

/// `transferWithAuthorization(..., v, r, s)` calldata.
pub fn transfer_vrs_call(auth: &Authorization, rsv: &Rsv) -> Bytes {
    TestUSDC::transferWithAuthorization_1Call {
        from: auth.from,
        to: auth.to,
        value: auth.value,
        validAfter: auth.valid_after,
        validBefore: auth.valid_before,
        nonce: auth.nonce,
        v: rsv.v,
        r: rsv.r,
        s: rsv.s,
    }
    .abi_encode()
    .into()
}

/// `transferWithAuthorization(..., bytes signature)` calldata.
pub fn transfer_bytes_call(auth: &Authorization, signature: &Bytes) -> Bytes {
    TestUSDC::transferWithAuthorization_0Call {
        from: auth.from,
        to: auth.to,
        value: auth.value,
        validAfter: auth.valid_after,
        validBefore: auth.valid_before,
        nonce: auth.nonce,
        signature: signature.clone(),
    }
    .abi_encode()
    .into()
}

/// `authorizationState(from, nonce)` calldata.
pub fn authorization_state_call(from: Address, nonce: B256) -> Bytes {
    TestUSDC::authorizationStateCall {
        authorizer: from,
        nonce,
    }
    .abi_encode()
    .into()
}

/// `balanceOf(owner)` calldata.
pub fn balance_of_call(owner: Address) -> Bytes {
    TestUSDC::balanceOfCall(owner).abi_encode().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::signers::SignerSync;
    use alloy::signers::local::PrivateKeySigner;

    fn auth(from: Address) -> Authorization {
        Authorization {
            from,
            to: Address::repeat_byte(0x22),
            value: U256::from(10_000),
            valid_after: U256::from(0),
            valid_before: U256::from(2_000_000_000u64),
            nonce: B256::repeat_byte(0x33),
        }
    }

    #[test]
    fn half_n_constant_is_right() {
        let n = U256::from_str_radix(
            "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141",
            16,
        )
        .unwrap();
        assert_eq!(SECP256K1_HALF_N, n >> 1);
    }

    #[test]
    fn signature_recovers_and_normalises_v() {
        let key = PrivateKeySigner::random();
        let a = auth(key.address());
        let d = digest(&a, &domain("USD Coin", "2", 8453, Address::repeat_byte(1)));
        let sig = key.sign_hash_sync(&d).unwrap();
        let mut raw = sig.as_bytes().to_vec();
        let rsv = Rsv::parse(&raw).unwrap();
        assert_eq!(rsv.recover(&d), Some(key.address()));
        raw[64] -= 27; // 0/1 form
        let rsv01 = Rsv::parse(&raw).unwrap();
        assert_eq!(rsv01, rsv);
        raw[64] = 29;
        assert!(Rsv::parse(&raw).is_none());
        assert!(Rsv::parse(&raw[..64]).is_none());
        // high-s twin of a valid signature is rejected
        let high = alloy::primitives::Signature::new(
            sig.r(),
            U256::from_str_radix(
                "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141",
                16,
            )
            .unwrap()
                - sig.s(),
            !sig.v(),
        );
        assert!(Rsv::parse(&high.as_bytes()).is_none());
    }

    #[test]
    fn erc6492_unwraps() {
        let inner = Bytes::from(vec![7u8; 65]);
        let mut sig = (
            Address::repeat_byte(9),
            Bytes::from(vec![1, 2, 3]),
            inner.clone(),
        )
            .abi_encode_params();
        sig.extend_from_slice(ERC6492_MAGIC.as_slice());
        let w = unwrap_erc6492(&sig).unwrap().unwrap();
        assert_eq!(w.factory, Address::repeat_byte(9));
        assert_eq!(w.inner, inner);
        assert!(unwrap_erc6492(&[0u8; 65]).is_none());
        assert!(unwrap_erc6492(ERC6492_MAGIC.as_slice()).unwrap().is_err());
    }
}
