//! Verification of an x402 v2 `exact` payment on SVM, as `specs/schemes/exact/scheme_exact_svm.md` lists it and
//! the reference facilitator (`@x402/svm` 2.27.0) applies it, with its `invalidReason` codes:
//!
//! 1. the transaction decodes (strictly: canonical lengths, indexes in range, one signature slot per signer);
//! 2. its fee payer (account 0) is ours (`extra.feePayer`), and every other required signature is present and
//!    valid (ours is added at settlement);
//! 3. 3 to 7 instructions: `SetComputeUnitLimit`, `SetComputeUnitPrice` (at most the cap, 5 lamports per compute
//!    unit by default), `TransferChecked` of the Token or Token-2022 program, then only Memo or Lighthouse
//!    instructions, with exactly one memo of 1 to 256 bytes (the official client's random nonce: it makes every
//!    payment a distinct transaction; stricter than the reference facilitator, which needs a memo only when the
//!    offer names one);
//! 4. the transfer: the mint is the asset, the destination is payTo's associated token account for it under that
//!    token program, the amount is exactly the required amount, and its authority is not the fee payer;
//! 5. the fee payer appears in no instruction's accounts at all (it signs only to pay the fee: it must not be made
//!    to move funds, close or create accounts);
//! 6. no address lookup tables (every account must be checked, and a table could change between check and use).
//!
//! Simulation (balances, blockhash age) is the settler's step (`settle.rs`): it needs the cluster.

use ed25519_dalek::SigningKey;
use serde_json::{Value, json};

use crate::chain::svm::address::{
    MEMO_PROGRAM, Pubkey, TOKEN_2022_PROGRAM, TOKEN_PROGRAM, associated_token_address,
};
use crate::chain::svm::instructions::{ParsedInstruction, parse};
use crate::chain::svm::tx::Transaction;

/// Phantom's wallet-protection program (`L2TExMFKdjpN9kozasaurPirfHy9P8sbXoAN1qA3S95`): its assertions may follow
/// the transfer (the reference facilitator allows them).
pub const LIGHTHOUSE_PROGRAM: Pubkey = Pubkey([
    4, 223, 173, 121, 98, 255, 177, 221, 146, 93, 10, 159, 181, 230, 208, 12, 230, 25, 91, 168,
    187, 58, 145, 253, 7, 239, 152, 96, 197, 233, 123, 184,
]);

/// The reference facilitator's default cap on the compute-unit price (micro-lamports).
pub const MAX_COMPUTE_UNIT_PRICE: u64 = 5_000_000;

/// The longest memo the reference client writes.
pub const MAX_MEMO_BYTES: usize = 256;

/// What a payment must satisfy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvmRequirements {
    /// CAIP-2 (`solana:…`).
    pub network: String,
    pub amount: u64,
    pub asset: Pubkey,
    /// The wallet paid (its associated token account receives).
    pub pay_to: Pubkey,
    pub fee_payer: Pubkey,
    pub decimals: u8,
    pub max_compute_unit_price: u64,
}

/// A payment that passed every check.
#[derive(Debug, Clone)]
pub struct VerifiedSvmPayment {
    /// The transfer's authority: the wallet that pays.
    pub payer: Pubkey,
    pub source: Pubkey,
    pub destination: Pubkey,
    pub amount: u64,
    pub token_program: Pubkey,
    /// The client's transaction (the fee payer's slot empty until [`cosign`] fills it).
    pub transaction: Transaction,
    /// The transaction's id once co-signed by the fee payer (ed25519 is deterministic: the fee payer's signature
    /// of this message, base58); set by the settler once it has co-signed.
    pub signature_id: String,
}

/// Why a payment is refused; [`SvmPaymentError::reason`] is the reference facilitator's code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvmPaymentError {
    #[error("the transaction could not be decoded: {0}")]
    Decode(String),
    #[error("the transaction's fee payer is not this gateway's ({0})")]
    FeePayerMismatch(Pubkey),
    #[error("a required signature is missing or invalid: {0}")]
    SignatureInvalid(String),
    #[error("the transaction has {0} instructions; 3 to 7 are allowed")]
    InstructionsLength(usize),
    #[error("the first instruction must set the compute unit limit")]
    ComputeLimit,
    #[error("the second instruction must set the compute unit price")]
    ComputePrice,
    #[error("the compute unit price {0} micro-lamports is above the cap {1}")]
    ComputePriceTooHigh(u64, u64),
    #[error("the third instruction must be a TransferChecked of the Token or Token-2022 program")]
    NoTransfer,
    #[error("the fee payer must not move funds (it is the transfer's authority or source)")]
    FeePayerTransferring,
    #[error("the fee payer appears in the accounts of instruction {0}")]
    FeePayerNotIsolated(usize),
    #[error("the mint {0} is not the asset")]
    MintMismatch(Pubkey),
    #[error("the destination {0} is not payTo's token account")]
    RecipientMismatch(Pubkey),
    #[error("the amount {found} is not the required {required}")]
    AmountMismatch { found: u64, required: u64 },
    #[error("instruction {0} is neither a memo nor a Lighthouse assertion")]
    UnknownInstruction(usize),
    #[error("address lookup tables are not accepted")]
    LookupTables,
    #[error("the transaction must carry exactly one memo (the payment's nonce, 1 to 256 bytes)")]
    MemoCount,
}

impl SvmPaymentError {
    /// The reference facilitator's `invalidReason` for this refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            SvmPaymentError::Decode(_) => {
                "invalid_exact_svm_payload_transaction_could_not_be_decoded"
            }
            SvmPaymentError::FeePayerMismatch(_) => "invalid_exact_svm_fee_payer_mismatch",
            SvmPaymentError::SignatureInvalid(_) => "invalid_exact_svm_payload_signature_invalid",
            SvmPaymentError::InstructionsLength(_) => {
                "invalid_exact_svm_payload_transaction_instructions_length"
            }
            SvmPaymentError::ComputeLimit => {
                "invalid_exact_svm_payload_transaction_instructions_compute_limit_instruction"
            }
            SvmPaymentError::ComputePrice => {
                "invalid_exact_svm_payload_transaction_instructions_compute_price_instruction"
            }
            SvmPaymentError::ComputePriceTooHigh(..) => {
                "invalid_exact_svm_payload_transaction_instructions_compute_price_instruction_too_high"
            }
            SvmPaymentError::NoTransfer => "invalid_exact_svm_payload_no_transfer_instruction",
            SvmPaymentError::FeePayerTransferring | SvmPaymentError::FeePayerNotIsolated(_) => {
                "invalid_exact_svm_payload_transaction_fee_payer_transferring_funds"
            }
            SvmPaymentError::MintMismatch(_) => "invalid_exact_svm_payload_mint_mismatch",
            SvmPaymentError::RecipientMismatch(_) => "invalid_exact_svm_payload_recipient_mismatch",
            SvmPaymentError::AmountMismatch { .. } => "invalid_exact_svm_payload_amount_mismatch",
            SvmPaymentError::UnknownInstruction(3) => {
                "invalid_exact_svm_payload_unknown_fourth_instruction"
            }
            SvmPaymentError::UnknownInstruction(4) => {
                "invalid_exact_svm_payload_unknown_fifth_instruction"
            }
            SvmPaymentError::UnknownInstruction(5) => {
                "invalid_exact_svm_payload_unknown_sixth_instruction"
            }
            SvmPaymentError::UnknownInstruction(6) => {
                "invalid_exact_svm_payload_unknown_seventh_instruction"
            }
            SvmPaymentError::UnknownInstruction(_) => {
                "invalid_exact_svm_payload_unknown_optional_instruction"
            }
            SvmPaymentError::LookupTables => "invalid_exact_svm_payload_transaction",
            SvmPaymentError::MemoCount => "invalid_exact_svm_payload_memo_count",
        }
    }
}

/// The `extra` of an SVM `accepts` entry.
pub fn offer_extra(fee_payer: &Pubkey) -> Value {
    json!({"feePayer": fee_payer.to_string()})
}

/// Checks a payment (`payload.transaction`, base64) against `req`; see the module documentation.
pub fn verify_exact(
    transaction_base64: &str,
    req: &SvmRequirements,
) -> Result<VerifiedSvmPayment, SvmPaymentError> {
    let tx = Transaction::from_base64(transaction_base64)
        .map_err(|e| SvmPaymentError::Decode(e.to_string()))?;
    let m = &tx.message;
    if !m.address_table_lookups.is_empty() {
        return Err(SvmPaymentError::LookupTables);
    }
    let fee_payer = m.account_keys[0];
    if fee_payer != req.fee_payer {
        return Err(SvmPaymentError::FeePayerMismatch(fee_payer));
    }
    // Every signer but the fee payer has signed, validly.
    for (i, sig) in tx.signatures.iter().enumerate().skip(1) {
        if sig.iter().all(|&b| b == 0) {
            return Err(SvmPaymentError::SignatureInvalid(format!(
                "{} has not signed",
                m.account_keys[i]
            )));
        }
    }
    tx.verify_present_signatures()
        .map_err(|e| SvmPaymentError::SignatureInvalid(e.to_string()))?;

    let n = m.instructions.len();
    if !(3..=7).contains(&n) {
        return Err(SvmPaymentError::InstructionsLength(n));
    }
    for (i, ix) in m.instructions.iter().enumerate() {
        if ix
            .accounts
            .iter()
            .any(|&a| m.account(a) == Some(&fee_payer))
        {
            // The transfer's authority or source is the reference's "transferring funds"; any other place is no
            // better.
            return Err(if i == 2 {
                SvmPaymentError::FeePayerTransferring
            } else {
                SvmPaymentError::FeePayerNotIsolated(i)
            });
        }
        if m.account(ix.program_id_index) == Some(&fee_payer) {
            return Err(SvmPaymentError::FeePayerNotIsolated(i));
        }
    }
    let parsed =
        |i: usize| parse(m, &m.instructions[i]).map_err(|e| SvmPaymentError::Decode(e.to_string()));
    if !matches!(parsed(0)?, ParsedInstruction::SetComputeUnitLimit(_)) {
        return Err(SvmPaymentError::ComputeLimit);
    }
    match parsed(1)? {
        ParsedInstruction::SetComputeUnitPrice(p) if p > req.max_compute_unit_price => {
            return Err(SvmPaymentError::ComputePriceTooHigh(
                p,
                req.max_compute_unit_price,
            ));
        }
        ParsedInstruction::SetComputeUnitPrice(_) => {}
        _ => return Err(SvmPaymentError::ComputePrice),
    }
    let ParsedInstruction::TransferChecked {
        token_program,
        source,
        mint,
        destination,
        authority,
        amount,
        decimals: _,
    } = parsed(2)?
    else {
        return Err(SvmPaymentError::NoTransfer);
    };
    if token_program != TOKEN_PROGRAM && token_program != TOKEN_2022_PROGRAM {
        return Err(SvmPaymentError::NoTransfer);
    }
    if authority == fee_payer || source == fee_payer {
        return Err(SvmPaymentError::FeePayerTransferring);
    }
    if mint != req.asset {
        return Err(SvmPaymentError::MintMismatch(mint));
    }
    if destination != associated_token_address(&req.pay_to, &req.asset, &token_program) {
        return Err(SvmPaymentError::RecipientMismatch(destination));
    }
    if amount != req.amount {
        return Err(SvmPaymentError::AmountMismatch {
            found: amount,
            required: req.amount,
        });
    }
    let mut memos = 0;
    for i in 3..n {
        let program = m.account(m.instructions[i].program_id_index).copied();
        if program == Some(MEMO_PROGRAM) {
            let len = m.instructions[i].data.len();
            if len == 0 || len > MAX_MEMO_BYTES {
                return Err(SvmPaymentError::MemoCount);
            }
            memos += 1;
        } else if program != Some(LIGHTHOUSE_PROGRAM) {
            return Err(SvmPaymentError::UnknownInstruction(i));
        }
    }
    // Exactly one memo (the client's nonce): two payments of one amount within one blockhash's life are then two
    // transactions, not one that the cluster (and this gateway) would take once.
    if memos != 1 {
        return Err(SvmPaymentError::MemoCount);
    }
    Ok(VerifiedSvmPayment {
        payer: authority,
        source,
        destination,
        amount,
        token_program,
        transaction: tx,
        signature_id: String::new(),
    })
}

/// Adds the fee payer's signature (the fee payer must be account 0 and a required signer); afterwards every
/// required signature is present and valid.
pub fn cosign(tx: &mut Transaction, fee_payer: &SigningKey) -> Result<(), SvmPaymentError> {
    let me = Pubkey(fee_payer.verifying_key().to_bytes());
    if tx.message.account_keys.first() != Some(&me) {
        return Err(SvmPaymentError::FeePayerMismatch(
            tx.message
                .account_keys
                .first()
                .copied()
                .unwrap_or(Pubkey([0; 32])),
        ));
    }
    tx.sign(fee_payer)
        .map_err(|e| SvmPaymentError::SignatureInvalid(e.to_string()))?;
    tx.verify_all_signatures()
        .map_err(|e| SvmPaymentError::SignatureInvalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::svm::address::{SYSTEM_PROGRAM, USDC_DEVNET_MINT};
    use crate::chain::svm::instructions::{
        memo, set_compute_unit_limit, set_compute_unit_price, token_transfer,
        token_transfer_checked,
    };
    use crate::chain::svm::tx::{Instruction, Message};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }
    fn pk(k: &SigningKey) -> Pubkey {
        Pubkey(k.verifying_key().to_bytes())
    }

    fn req() -> SvmRequirements {
        SvmRequirements {
            network: "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1".into(),
            amount: 10_000,
            asset: USDC_DEVNET_MINT,
            pay_to: pk(&key(3)),
            fee_payer: pk(&key(2)),
            decimals: 6,
            max_compute_unit_price: MAX_COMPUTE_UNIT_PRICE,
        }
    }

    fn transfer(amount: u64, to: &Pubkey, authority: &Pubkey) -> Instruction {
        token_transfer_checked(
            &TOKEN_PROGRAM,
            &associated_token_address(authority, &USDC_DEVNET_MINT, &TOKEN_PROGRAM),
            &USDC_DEVNET_MINT,
            &associated_token_address(to, &USDC_DEVNET_MINT, &TOKEN_PROGRAM),
            authority,
            amount,
            6,
        )
    }

    /// The official client's layout, signed by the payer (key 1) only.
    fn payment(ixs: Vec<Instruction>, fee_payer: &Pubkey, signers: &[&SigningKey]) -> String {
        let mut tx = Transaction::new_unsigned(Message::new_v0(fee_payer, &ixs, [4; 32]));
        for s in signers {
            // A layout without the payer's transfer has nothing for it to sign.
            let _ = tx.sign(s);
        }
        tx.to_base64()
    }

    fn good() -> Vec<Instruction> {
        vec![
            set_compute_unit_limit(20_000),
            set_compute_unit_price(1),
            transfer(10_000, &pk(&key(3)), &pk(&key(1))),
            memo(b"0123456789abcdef"),
        ]
    }

    fn reason(ixs: Vec<Instruction>) -> &'static str {
        match verify_exact(&payment(ixs, &pk(&key(2)), &[&key(1)]), &req()) {
            Ok(_) => "ok",
            Err(e) => e.reason(),
        }
    }

    #[test]
    fn lighthouse_is_the_program_it_names() {
        assert_eq!(
            LIGHTHOUSE_PROGRAM.to_string(),
            "L2TExMFKdjpN9kozasaurPirfHy9P8sbXoAN1qA3S95"
        );
    }

    #[test]
    fn the_official_layout_verifies_and_cosigns() {
        let v = verify_exact(&payment(good(), &pk(&key(2)), &[&key(1)]), &req()).unwrap();
        assert_eq!(v.payer, pk(&key(1)));
        assert_eq!(v.amount, 10_000);
        let mut tx = v.transaction.clone();
        assert!(
            tx.verify_all_signatures().is_err(),
            "the fee payer has not signed yet"
        );
        cosign(&mut tx, &key(2)).unwrap();
        tx.verify_all_signatures().unwrap();
        assert_eq!(
            cosign(&mut tx.clone(), &key(9)),
            Err(SvmPaymentError::FeePayerMismatch(pk(&key(2))))
        );
        // Without its memo nonce, or with two, or an empty one: refused (this gateway asks for exactly one).
        let mut three = good();
        three.pop();
        assert_eq!(reason(three), "invalid_exact_svm_payload_memo_count");
        let mut two = good();
        two.push(memo(b"again"));
        assert_eq!(reason(two), "invalid_exact_svm_payload_memo_count");
        let mut empty = good();
        empty[3] = memo(b"");
        assert_eq!(reason(empty), "invalid_exact_svm_payload_memo_count");
    }

    #[test]
    fn every_rule_refuses_with_the_reference_code() {
        let mut ixs = good();
        ixs[2] = transfer(9_999, &pk(&key(3)), &pk(&key(1)));
        assert_eq!(reason(ixs), "invalid_exact_svm_payload_amount_mismatch");
        let mut ixs = good();
        ixs[2] = transfer(10_000, &pk(&key(7)), &pk(&key(1)));
        assert_eq!(reason(ixs), "invalid_exact_svm_payload_recipient_mismatch");
        let mut ixs = good();
        ixs[2] = token_transfer_checked(
            &TOKEN_PROGRAM,
            &Pubkey([5; 32]),
            &Pubkey([6; 32]),
            &associated_token_address(&pk(&key(3)), &Pubkey([6; 32]), &TOKEN_PROGRAM),
            &pk(&key(1)),
            10_000,
            6,
        );
        assert_eq!(reason(ixs), "invalid_exact_svm_payload_mint_mismatch");
        let mut ixs = good();
        ixs[2] = token_transfer(
            &TOKEN_PROGRAM,
            &Pubkey([5; 32]),
            &associated_token_address(&pk(&key(3)), &USDC_DEVNET_MINT, &TOKEN_PROGRAM),
            &pk(&key(1)),
            10_000,
        );
        assert_eq!(
            reason(ixs),
            "invalid_exact_svm_payload_no_transfer_instruction"
        );
        let mut ixs = good();
        ixs[1] = set_compute_unit_price(MAX_COMPUTE_UNIT_PRICE + 1);
        assert_eq!(
            reason(ixs),
            "invalid_exact_svm_payload_transaction_instructions_compute_price_instruction_too_high"
        );
        let mut ixs = good();
        ixs.swap(0, 1);
        assert_eq!(
            reason(ixs),
            "invalid_exact_svm_payload_transaction_instructions_compute_limit_instruction"
        );
        let mut ixs = good();
        ixs.push(Instruction {
            program_id: SYSTEM_PROGRAM,
            accounts: Vec::new(),
            data: vec![2, 0, 0, 0],
        });
        assert_eq!(
            reason(ixs),
            "invalid_exact_svm_payload_unknown_fifth_instruction"
        );
        assert_eq!(
            reason(good()[..2].to_vec()),
            "invalid_exact_svm_payload_transaction_instructions_length"
        );
        // The fee payer as the transfer's authority: it would pay the payment itself.
        let mut ixs = good();
        ixs[2] = transfer(10_000, &pk(&key(3)), &pk(&key(2)));
        assert_eq!(
            verify_exact(&payment(ixs, &pk(&key(2)), &[]), &req())
                .map_err(|e| e.reason())
                .err(),
            Some("invalid_exact_svm_payload_transaction_fee_payer_transferring_funds")
        );
        // The fee payer named by a memo's accounts (a memo signer): still not isolated.
        let mut ixs = good();
        ixs[3].accounts.push(crate::chain::svm::tx::AccountMeta {
            pubkey: pk(&key(2)),
            is_signer: true,
            is_writable: false,
        });
        assert_eq!(
            reason(ixs),
            "invalid_exact_svm_payload_transaction_fee_payer_transferring_funds"
        );
    }

    #[test]
    fn signatures_and_fee_payer_are_checked() {
        // Not signed by the payer.
        assert_eq!(
            verify_exact(&payment(good(), &pk(&key(2)), &[]), &req())
                .map_err(|e| e.reason())
                .err(),
            Some("invalid_exact_svm_payload_signature_invalid")
        );
        // Signed, then tampered with (the amount changed after signing).
        let mut tx = Transaction::new_unsigned(Message::new_v0(&pk(&key(2)), &good(), [4; 32]));
        tx.sign(&key(1)).unwrap();
        let at = tx.message.instructions[2].data.len();
        tx.message.instructions[2].data[1] ^= 1;
        let _ = at;
        assert_eq!(
            verify_exact(&tx.to_base64(), &req())
                .map_err(|e| e.reason())
                .err(),
            Some("invalid_exact_svm_payload_signature_invalid")
        );
        // Another fee payer.
        assert_eq!(
            verify_exact(&payment(good(), &pk(&key(8)), &[&key(1)]), &req())
                .map_err(|e| e.reason())
                .err(),
            Some("invalid_exact_svm_fee_payer_mismatch")
        );
        assert_eq!(
            verify_exact("not base64!", &req())
                .map_err(|e| e.reason())
                .err(),
            Some("invalid_exact_svm_payload_transaction_could_not_be_decoded")
        );
    }
}
