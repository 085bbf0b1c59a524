//! Proof of a Solana wallet: an ed25519 signature over a text, as a wallet's `signMessage` makes it (Phantom,
//! Solflare, Backpack, `@solana/kit`'s `signBytes`: the signature of the message's raw UTF-8 bytes, no prefix).

use super::address::Pubkey;

/// Why a signature proves nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("a signature is 64 bytes; this one is {0}")]
    Length(usize),
    #[error("the signature is not by this wallet over this message")]
    Invalid,
}

/// Checks that `signature` is `signer`'s ed25519 signature of `message` (strict verification: no malleable
/// signatures, no small-order keys).
pub fn verify_message_signature(
    signer: &Pubkey,
    message: &[u8],
    signature: &[u8],
) -> Result<(), SignatureError> {
    let sig: [u8; 64] = signature
        .try_into()
        .map_err(|_| SignatureError::Length(signature.len()))?;
    super::tx::verify(signer, message, &sig).map_err(|()| SignatureError::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    #[test]
    fn only_the_wallet_over_the_text() {
        let k = SigningKey::from_bytes(&[5; 32]);
        let me = Pubkey(k.verifying_key().to_bytes());
        let other = Pubkey(SigningKey::from_bytes(&[6; 32]).verifying_key().to_bytes());
        let sig = k.sign(b"claim").to_bytes();
        assert_eq!(verify_message_signature(&me, b"claim", &sig), Ok(()));
        assert_eq!(
            verify_message_signature(&me, b"claim!", &sig),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            verify_message_signature(&other, b"claim", &sig),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            verify_message_signature(&me, b"claim", &sig[..63]),
            Err(SignatureError::Length(63))
        );
        // s + L (a malleated signature) is refused by strict verification.
        let mut malleated = sig;
        let l: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let mut carry = 0u16;
        for i in 0..32 {
            let v = malleated[32 + i] as u16 + l[i] as u16 + carry;
            malleated[32 + i] = v as u8;
            carry = v >> 8;
        }
        assert_eq!(
            verify_message_signature(&me, b"claim", &malleated),
            Err(SignatureError::Invalid)
        );
    }
}
