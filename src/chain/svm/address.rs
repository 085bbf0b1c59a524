//! Solana addresses: 32-byte ed25519 public keys (or program-derived addresses, which are off the curve) written in
//! base58, the well-known program ids, and the derivation of program-derived and associated token addresses.
//!
//! Sources: Solana's documentation of program-derived addresses (`create_program_address`: sha256 of the seeds,
//! the program id and the marker "ProgramDerivedAddress", refused when the result is a curve point;
//! `find_program_address`: the first bump seed from 255 down that gives an off-curve address) and the SPL
//! Associated Token Account program (seeds: wallet, token program, mint).

use sha2::{Digest, Sha256};

/// A Solana address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pubkey(pub [u8; 32]);

/// Why a text is not an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PubkeyError {
    #[error("not base58")]
    NotBase58,
    #[error("{0} bytes, not 32")]
    WrongLength(usize),
}

impl std::str::FromStr for Pubkey {
    type Err = PubkeyError;
    fn from_str(s: &str) -> Result<Pubkey, PubkeyError> {
        // 32 bytes are at most 44 base58 characters; a longer text is refused before decoding it.
        if s.is_empty() || s.len() > 44 {
            return Err(PubkeyError::WrongLength(s.len() * 3 / 4));
        }
        let bytes = bs58::decode(s)
            .into_vec()
            .map_err(|_| PubkeyError::NotBase58)?;
        let array: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| PubkeyError::WrongLength(bytes.len()))?;
        Ok(Pubkey(array))
    }
}

impl std::fmt::Display for Pubkey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&bs58::encode(self.0).into_string())
    }
}

impl std::fmt::Debug for Pubkey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pubkey({self})")
    }
}

impl serde::Serialize for Pubkey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Pubkey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Pubkey, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// An address from its base58 text, at compile time's leisure (constants below; checked by a unit test).
const fn key(bytes: [u8; 32]) -> Pubkey {
    Pubkey(bytes)
}

/// `11111111111111111111111111111111`: the System program.
pub const SYSTEM_PROGRAM: Pubkey = key([0; 32]);
/// `TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA`: the SPL Token program.
pub const TOKEN_PROGRAM: Pubkey = key([
    6, 221, 246, 225, 215, 101, 161, 147, 217, 203, 225, 70, 206, 235, 121, 172, 28, 180, 133, 237,
    95, 91, 55, 145, 58, 140, 245, 133, 126, 255, 0, 169,
]);
/// `TokenzQdBNbLqP5VEhdkAS6EPFLC1PHnBqCXEpPxuEb`: the SPL Token-2022 program.
pub const TOKEN_2022_PROGRAM: Pubkey = key([
    6, 221, 246, 225, 238, 117, 143, 222, 24, 66, 93, 188, 228, 108, 205, 218, 182, 26, 252, 77,
    131, 185, 13, 39, 254, 189, 249, 40, 216, 161, 139, 252,
]);
/// `ATokenGPvbdGVxr1b2hvZbsiqW5xWH25efTNsLJA8knL`: the SPL Associated Token Account program.
pub const ASSOCIATED_TOKEN_PROGRAM: Pubkey = key([
    140, 151, 37, 143, 78, 36, 137, 241, 187, 61, 16, 41, 20, 142, 13, 131, 11, 90, 19, 153, 218,
    255, 16, 132, 4, 142, 123, 216, 219, 233, 248, 89,
]);
/// `ComputeBudget111111111111111111111111111111`: the Compute Budget program.
pub const COMPUTE_BUDGET_PROGRAM: Pubkey = key([
    3, 6, 70, 111, 229, 33, 23, 50, 255, 236, 173, 186, 114, 195, 155, 231, 188, 140, 229, 187,
    197, 247, 18, 107, 44, 67, 155, 58, 64, 0, 0, 0,
]);
/// `MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr`: the SPL Memo program (v2).
pub const MEMO_PROGRAM: Pubkey = key([
    5, 74, 83, 90, 153, 41, 33, 6, 77, 36, 232, 113, 96, 218, 56, 124, 124, 53, 181, 221, 188, 146,
    187, 129, 228, 31, 168, 64, 65, 5, 68, 141,
]);
/// `EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v`: Circle's USDC on Solana mainnet (developers.circle.com,
/// "USDC Contract Addresses").
pub const USDC_MAINNET_MINT: Pubkey = key([
    198, 250, 122, 243, 190, 219, 173, 58, 61, 101, 243, 106, 171, 201, 116, 49, 177, 187, 228,
    194, 210, 246, 224, 228, 124, 166, 2, 3, 69, 47, 93, 97,
]);
/// `4zMMC9srt5Ri5X14GAgXhaHii3GnPAEERYPJgZJDncDU`: Circle's USDC on Solana devnet (the same page).
pub const USDC_DEVNET_MINT: Pubkey = key([
    59, 68, 44, 179, 145, 33, 87, 241, 58, 147, 61, 1, 52, 40, 45, 3, 43, 95, 254, 205, 1, 162,
    219, 241, 183, 121, 6, 8, 223, 0, 46, 167,
]);

/// Whether `bytes` is the compressed form of a point on the ed25519 curve (a key a signature can be made for).
pub fn is_on_curve(bytes: &[u8; 32]) -> bool {
    curve25519_dalek::edwards::CompressedEdwardsY(*bytes)
        .decompress()
        .is_some()
}

/// The program-derived address of `seeds` under `program`, or `None` when it falls on the curve (or a seed is
/// longer than 32 bytes, or there are more than 16).
pub fn create_program_address(seeds: &[&[u8]], program: &Pubkey) -> Option<Pubkey> {
    if seeds.len() > 16 || seeds.iter().any(|s| s.len() > 32) {
        return None;
    }
    let mut h = Sha256::new();
    for s in seeds {
        h.update(s);
    }
    h.update(program.0);
    h.update(b"ProgramDerivedAddress");
    let out: [u8; 32] = h.finalize().into();
    (!is_on_curve(&out)).then_some(Pubkey(out))
}

/// The canonical program-derived address of `seeds` under `program` and its bump seed.
pub fn find_program_address(seeds: &[&[u8]], program: &Pubkey) -> Option<(Pubkey, u8)> {
    for bump in (0..=255u8).rev() {
        let bump_seed = [bump];
        let mut all: Vec<&[u8]> = seeds.to_vec();
        all.push(&bump_seed);
        if let Some(address) = create_program_address(&all, program) {
            return Some((address, bump));
        }
    }
    None
}

/// The associated token account of `owner` for `mint` under `token_program` (Token or Token-2022).
pub fn associated_token_address(owner: &Pubkey, mint: &Pubkey, token_program: &Pubkey) -> Pubkey {
    // One of 256 bumps is off the curve with overwhelming probability (each is, with probability about 1/2).
    find_program_address(
        &[&owner.0, &token_program.0, &mint.0],
        &ASSOCIATED_TOKEN_PROGRAM,
    )
    .map_or(Pubkey([0; 32]), |(a, _)| a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_are_the_programs_they_name() {
        for (k, text) in [
            (SYSTEM_PROGRAM, "11111111111111111111111111111111"),
            (TOKEN_PROGRAM, "TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA"),
            (
                TOKEN_2022_PROGRAM,
                "TokenzQdBNbLqP5VEhdkAS6EPFLC1PHnBqCXEpPxuEb",
            ),
            (
                ASSOCIATED_TOKEN_PROGRAM,
                "ATokenGPvbdGVxr1b2hvZbsiqW5xWH25efTNsLJA8knL",
            ),
            (
                COMPUTE_BUDGET_PROGRAM,
                "ComputeBudget111111111111111111111111111111",
            ),
            (MEMO_PROGRAM, "MemoSq4gqABAXKb96qnH8TysNcWxMyWCqXgDLGmfcHr"),
            (
                USDC_MAINNET_MINT,
                "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v",
            ),
            (
                USDC_DEVNET_MINT,
                "4zMMC9srt5Ri5X14GAgXhaHii3GnPAEERYPJgZJDncDU",
            ),
        ] {
            assert_eq!(k.to_string(), text);
            assert_eq!(text.parse::<Pubkey>(), Ok(k));
        }
    }

    #[test]
    fn bad_text_is_refused() {
        assert_eq!("0OIl".parse::<Pubkey>(), Err(PubkeyError::NotBase58));
        assert!(matches!(
            "3xQ".parse::<Pubkey>(),
            Err(PubkeyError::WrongLength(_))
        ));
        assert!("".parse::<Pubkey>().is_err());
        assert!("1".repeat(100).parse::<Pubkey>().is_err());
    }

    fn pk(s: &str) -> Pubkey {
        s.parse().unwrap()
    }

    /// solana.com/docs/core/pda: seed "helloWorld" under the System program gives
    /// 46GZzzetjCURsdFPb7rcnspbEMnCBXe9kpjrsZAkKb6X with bump 254 (255 falls on the curve); 253 gives GBNWBG….
    #[test]
    fn pda_matches_the_solana_docs_example() {
        let (pda, bump) = find_program_address(&[b"helloWorld"], &SYSTEM_PROGRAM).unwrap();
        assert_eq!(pda, pk("46GZzzetjCURsdFPb7rcnspbEMnCBXe9kpjrsZAkKb6X"));
        assert_eq!(bump, 254);
        assert_eq!(
            create_program_address(&[b"helloWorld", &[255]], &SYSTEM_PROGRAM),
            None
        );
        assert_eq!(
            create_program_address(&[b"helloWorld", &[253]], &SYSTEM_PROGRAM),
            Some(pk("GBNWBGxKmdcd7JrMnBdZke9Fumj9sir4rpbruwEGmR4y"))
        );
        assert_eq!(create_program_address(&[&[0u8; 33]], &SYSTEM_PROGRAM), None);
    }

    /// External vectors: metaplex-foundation/Solana.Swift's associated token test (the USDC account of wallet
    /// 3h1zGm…), and trustwallet/wallet-core's Solana address tests (an SPL Token and a Token-2022 account).
    #[test]
    fn associated_token_addresses_match_external_vectors() {
        assert_eq!(
            associated_token_address(
                &pk("3h1zGmCwsRJnVk5BuRNMLsPaQu1y2aqXqXDWYCgrp5UG"),
                &USDC_MAINNET_MINT,
                &TOKEN_PROGRAM
            ),
            pk("3uetDDizgTtadDHZzyy9BqxrjQcozMEkxzbKhfZF4tG3")
        );
        assert_eq!(
            associated_token_address(
                &pk("B1iGmDJdvmxyUiYM8UEo2Uw2D58EmUrw4KyLYMmrhf8V"),
                &pk("SRMuApVNdxXokk5GT7XD5cUUgXMBCoAz2LHeuAoKWRt"),
                &TOKEN_PROGRAM
            ),
            pk("EDNd1ycsydWYwVmrYZvqYazFqwk1QjBgAUKFjBoz1jKP")
        );
        assert_eq!(
            associated_token_address(
                &pk("68dzdXkni9BrAwU1asAwurMEdQhXUJq6MNY8niDAny8t"),
                &pk("7atgF8KQo4wJrD5ATGX7t1V2zVvykPJbFfNeVf1icFv1"),
                &TOKEN_2022_PROGRAM
            ),
            pk("3PaFQnebQMHBgthRScup2B932cMxA1GBP7m9roCkomHq")
        );
    }

    /// Every derivation is off the curve and depends on the token program. (That it is the address the real
    /// programs use is checked against a real cluster in the integration tests: surfnet's `surfnet_setTokenAccount`
    /// creates the account at its own derivation, and its balance is read at ours.)
    #[test]
    fn associated_token_addresses_are_off_curve_and_deterministic() {
        let owner: Pubkey = "9WzDXwBbmkg8ZTbNMqUxvQRAyrZzDsGYdLVL9zYtAWWM"
            .parse()
            .unwrap();
        let a = associated_token_address(&owner, &USDC_MAINNET_MINT, &TOKEN_PROGRAM);
        assert_eq!(
            a,
            associated_token_address(&owner, &USDC_MAINNET_MINT, &TOKEN_PROGRAM)
        );
        assert!(!is_on_curve(&a.0));
        assert_ne!(
            a,
            associated_token_address(&owner, &USDC_MAINNET_MINT, &TOKEN_2022_PROGRAM)
        );
        assert!(is_on_curve(&owner.0), "a wallet is a curve point");
    }
}
