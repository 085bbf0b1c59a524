//! Payer proof: a signature by an address over a fixed text.
//!
//! An externally owned account signs with EIP-191 `personal_sign`; the signature must recover to the address. When
//! it does not (or is not a 65-byte ECDSA signature) and the address holds code, the contract is asked with
//! ERC-1271 `isValidSignature(eip191Hash(text), signature)` over `eth_call`, which must answer `0x1626ba7e`.
//! Recovery is tried first so the common case needs no RPC round trip.

use alloy::primitives::{Address, Bytes, FixedBytes, Signature, eip191_hash_message};
use alloy::sol_types::SolCall;

use crate::chain::{Rpc, RpcError};

alloy::sol! {
    /// ERC-1271.
    interface IERC1271 {
        function isValidSignature(bytes32 hash, bytes signature) external view returns (bytes4 magicValue);
    }
}

/// ERC-1271's "valid" answer.
pub const ERC1271_MAGIC: [u8; 4] = [0x16, 0x26, 0xba, 0x7e];

/// Why a signature does not prove the address.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error("the signature is not by {0}")]
    WrongSigner(String),
    #[error("cannot check the contract wallet's signature (ERC-1271) right now: {0}")]
    Rpc(#[from] RpcError),
}

/// The EIP-191 signer of `text`, if `sig` is a well-formed 65-byte ECDSA signature.
pub fn recover(text: &str, sig: &[u8]) -> Option<Address> {
    Signature::from_raw(sig)
        .ok()?
        .recover_address_from_msg(text.as_bytes())
        .ok()
}

/// Checks that `signer` signed `text` (EOA or ERC-1271 contract wallet).
pub async fn verify(rpc: &Rpc, signer: Address, text: &str, sig: &[u8]) -> Result<(), ProofError> {
    if recover(text, sig) == Some(signer) {
        return Ok(());
    }
    let code = rpc.code(signer).await?;
    if code.is_empty() {
        return Err(ProofError::WrongSigner(format!("{signer:#x}")));
    }
    let call = IERC1271::isValidSignatureCall {
        hash: eip191_hash_message(text),
        signature: Bytes::copy_from_slice(sig),
    };
    let answer = match rpc.call(signer, Bytes::from(call.abi_encode())).await {
        Ok(a) => a,
        // A revert is a "no" (many wallets revert on a malformed signature).
        Err(RpcError::Node { .. }) => return Err(ProofError::WrongSigner(format!("{signer:#x}"))),
        Err(e) => return Err(e.into()),
    };
    match IERC1271::isValidSignatureCall::abi_decode_returns(&answer) {
        Ok(magic) if magic == FixedBytes(ERC1271_MAGIC) => Ok(()),
        _ => Err(ProofError::WrongSigner(format!("{signer:#x}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::signers::SignerSync;
    use alloy::signers::local::PrivateKeySigner;

    #[test]
    fn recovers_personal_sign() {
        let signer = PrivateKeySigner::random();
        let sig = signer.sign_message_sync(b"hello").unwrap();
        assert_eq!(recover("hello", &sig.as_bytes()), Some(signer.address()));
        assert_ne!(recover("hellO", &sig.as_bytes()), Some(signer.address()));
        assert_eq!(recover("hello", &[0u8; 10]), None);
    }
}
