//! The few Solana instructions payments use: builders (for tests and the demo) and a parser of compiled ones.
//!
//! Layouts (the programs' documented interfaces):
//! - SPL Token / Token-2022 `Transfer` = tag 3, amount u64 LE; accounts [source (w), destination (w), authority
//!   (s), …multisig signers]. `TransferChecked` = tag 12, amount u64 LE, decimals u8; accounts [source (w), mint,
//!   destination (w), authority (s), …multisig signers].
//! - Associated Token Account `CreateIdempotent` = data [1]; accounts [payer (s, w), account (w), wallet, mint,
//!   System program, token program].
//! - Compute Budget `SetComputeUnitLimit` = tag 2, u32 LE; `SetComputeUnitPrice` = tag 3, u64 LE micro-lamports.
//! - Memo: the data is the memo's UTF-8 bytes.

use super::address::{
    ASSOCIATED_TOKEN_PROGRAM, COMPUTE_BUDGET_PROGRAM, MEMO_PROGRAM, Pubkey, SYSTEM_PROGRAM,
    TOKEN_2022_PROGRAM, TOKEN_PROGRAM, associated_token_address,
};
use super::tx::{AccountMeta, CompiledInstruction, Instruction, Message, TxError};

fn meta(pubkey: &Pubkey, is_signer: bool, is_writable: bool) -> AccountMeta {
    AccountMeta {
        pubkey: *pubkey,
        is_signer,
        is_writable,
    }
}

/// `TransferChecked` of `amount` (`decimals` as the mint says) from `source` to `destination`, signed by
/// `authority`.
pub fn token_transfer_checked(
    token_program: &Pubkey,
    source: &Pubkey,
    mint: &Pubkey,
    destination: &Pubkey,
    authority: &Pubkey,
    amount: u64,
    decimals: u8,
) -> Instruction {
    let mut data = vec![12u8];
    data.extend_from_slice(&amount.to_le_bytes());
    data.push(decimals);
    Instruction {
        program_id: *token_program,
        accounts: vec![
            meta(source, false, true),
            meta(mint, false, false),
            meta(destination, false, true),
            meta(authority, true, false),
        ],
        data,
    }
}

/// The unchecked `Transfer` of `amount` from `source` to `destination`, signed by `authority`.
pub fn token_transfer(
    token_program: &Pubkey,
    source: &Pubkey,
    destination: &Pubkey,
    authority: &Pubkey,
    amount: u64,
) -> Instruction {
    let mut data = vec![3u8];
    data.extend_from_slice(&amount.to_le_bytes());
    Instruction {
        program_id: *token_program,
        accounts: vec![
            meta(source, false, true),
            meta(destination, false, true),
            meta(authority, true, false),
        ],
        data,
    }
}

/// Creates `owner`'s associated token account for `mint` if it does not exist (paid by `payer`).
pub fn create_associated_token_account_idempotent(
    payer: &Pubkey,
    owner: &Pubkey,
    mint: &Pubkey,
    token_program: &Pubkey,
) -> Instruction {
    Instruction {
        program_id: ASSOCIATED_TOKEN_PROGRAM,
        accounts: vec![
            meta(payer, true, true),
            meta(
                &associated_token_address(owner, mint, token_program),
                false,
                true,
            ),
            meta(owner, false, false),
            meta(mint, false, false),
            meta(&SYSTEM_PROGRAM, false, false),
            meta(token_program, false, false),
        ],
        data: vec![1],
    }
}

pub fn set_compute_unit_limit(units: u32) -> Instruction {
    let mut data = vec![2u8];
    data.extend_from_slice(&units.to_le_bytes());
    Instruction {
        program_id: COMPUTE_BUDGET_PROGRAM,
        accounts: Vec::new(),
        data,
    }
}

pub fn set_compute_unit_price(micro_lamports: u64) -> Instruction {
    let mut data = vec![3u8];
    data.extend_from_slice(&micro_lamports.to_le_bytes());
    Instruction {
        program_id: COMPUTE_BUDGET_PROGRAM,
        accounts: Vec::new(),
        data,
    }
}

pub fn memo(text: &[u8]) -> Instruction {
    Instruction {
        program_id: MEMO_PROGRAM,
        accounts: Vec::new(),
        data: text.to_vec(),
    }
}

/// A compiled instruction, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedInstruction {
    SetComputeUnitLimit(u32),
    SetComputeUnitPrice(u64),
    TransferChecked {
        token_program: Pubkey,
        source: Pubkey,
        mint: Pubkey,
        destination: Pubkey,
        /// The owner or delegate who signs (with a multisig owner: the multisig account; its signers follow).
        authority: Pubkey,
        amount: u64,
        decimals: u8,
    },
    Transfer {
        token_program: Pubkey,
        source: Pubkey,
        destination: Pubkey,
        authority: Pubkey,
        amount: u64,
    },
    Memo(Vec<u8>),
    /// Any other instruction (including other instructions of the programs above).
    Other {
        program_id: Pubkey,
    },
}

fn le_u64(data: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(data.get(..8)?.try_into().ok()?))
}

/// Parses `ix` of `message`. Accounts must be static keys (an instruction of interest naming an account from a
/// lookup table is refused: it cannot be checked without the table).
pub fn parse(message: &Message, ix: &CompiledInstruction) -> Result<ParsedInstruction, TxError> {
    let program = *message
        .account(ix.program_id_index)
        .ok_or(TxError::IndexOutOfRange(0))?;
    let account = |i: usize| -> Result<Pubkey, TxError> {
        ix.accounts
            .get(i)
            .and_then(|&a| message.account(a))
            .copied()
            .ok_or(TxError::Header(
                "an instruction's account is missing or not a static key",
            ))
    };
    let data = ix.data.as_slice();
    if program == COMPUTE_BUDGET_PROGRAM {
        return Ok(match data {
            [2, rest @ ..] if rest.len() == 4 => {
                ParsedInstruction::SetComputeUnitLimit(u32::from_le_bytes([
                    rest[0], rest[1], rest[2], rest[3],
                ]))
            }
            [3, rest @ ..] if rest.len() == 8 => {
                ParsedInstruction::SetComputeUnitPrice(le_u64(rest).unwrap_or(0))
            }
            _ => ParsedInstruction::Other {
                program_id: program,
            },
        });
    }
    if program == MEMO_PROGRAM {
        return Ok(ParsedInstruction::Memo(data.to_vec()));
    }
    if program == TOKEN_PROGRAM || program == TOKEN_2022_PROGRAM {
        return Ok(match data {
            [12, rest @ ..] if rest.len() == 9 => ParsedInstruction::TransferChecked {
                token_program: program,
                source: account(0)?,
                mint: account(1)?,
                destination: account(2)?,
                authority: account(3)?,
                amount: le_u64(rest).unwrap_or(0),
                decimals: rest[8],
            },
            [3, rest @ ..] if rest.len() == 8 => ParsedInstruction::Transfer {
                token_program: program,
                source: account(0)?,
                destination: account(1)?,
                authority: account(2)?,
                amount: le_u64(rest).unwrap_or(0),
            },
            _ => ParsedInstruction::Other {
                program_id: program,
            },
        });
    }
    Ok(ParsedInstruction::Other {
        program_id: program,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_parse_back() {
        let (src, mint, dst, auth) = (
            Pubkey([1; 32]),
            Pubkey([2; 32]),
            Pubkey([3; 32]),
            Pubkey([4; 32]),
        );
        let ixs = [
            set_compute_unit_limit(20_000),
            set_compute_unit_price(7),
            token_transfer_checked(&TOKEN_PROGRAM, &src, &mint, &dst, &auth, 1_234_567, 6),
            token_transfer(&TOKEN_2022_PROGRAM, &src, &dst, &auth, 99),
            memo(b"abc"),
        ];
        let m = Message::new_v0(&Pubkey([9; 32]), &ixs, [0; 32]);
        let parsed: Vec<ParsedInstruction> = m
            .instructions
            .iter()
            .map(|ix| parse(&m, ix).unwrap())
            .collect();
        assert_eq!(parsed[0], ParsedInstruction::SetComputeUnitLimit(20_000));
        assert_eq!(parsed[1], ParsedInstruction::SetComputeUnitPrice(7));
        assert_eq!(
            parsed[2],
            ParsedInstruction::TransferChecked {
                token_program: TOKEN_PROGRAM,
                source: src,
                mint,
                destination: dst,
                authority: auth,
                amount: 1_234_567,
                decimals: 6
            }
        );
        assert_eq!(
            parsed[3],
            ParsedInstruction::Transfer {
                token_program: TOKEN_2022_PROGRAM,
                source: src,
                destination: dst,
                authority: auth,
                amount: 99
            }
        );
        assert_eq!(parsed[4], ParsedInstruction::Memo(b"abc".to_vec()));
        // Data of the wrong length is not what it seems.
        let mut odd = m.clone();
        odd.instructions[2].data.pop();
        assert!(matches!(
            parse(&odd, &odd.instructions[2]).unwrap(),
            ParsedInstruction::Other { .. }
        ));
    }
}
