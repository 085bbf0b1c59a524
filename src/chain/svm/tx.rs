//! The Solana transaction wire format: decode, encode (byte for byte), sign, and build legacy and v0 messages.
//!
//! Layout (Solana's documentation, "Transactions" and "Versioned transactions"): a compact-u16 count of 64-byte
//! signatures, then the message. A message starts with a version byte when its top bit is set (`0x80` = v0),
//! else it is legacy and that byte is the header's first; header = (required signatures, read-only signed,
//! read-only unsigned); a compact-u16 count of 32-byte account keys; the 32-byte recent blockhash; a compact-u16
//! count of instructions, each (program id index u8, compact-u16 count of account indexes u8, compact-u16 length
//! of data); v0 then adds a compact-u16 count of address table lookups, each (table key, writable indexes,
//! read-only indexes). A compact-u16 is 1–3 bytes of 7 bits each, little-endian, the top bit meaning "more"; only
//! its shortest form is canonical.
//!
//! The signed bytes are the message's bytes; a transaction's id is its first signature (the fee payer's).

use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use super::address::Pubkey;

/// A wire size that cannot be: the runtime refuses packets over 1232 bytes.
pub const MAX_TRANSACTION_SIZE: usize = 1232;

/// Why bytes are not a transaction, or a signing step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    #[error("the transaction ends early (at byte {0})")]
    Truncated(usize),
    #[error("{0} bytes after the transaction")]
    Trailing(usize),
    #[error("a length is not in its shortest form or exceeds 16 bits")]
    BadLength,
    #[error("unsupported message version {0}")]
    Version(u8),
    #[error("the header is inconsistent: {0}")]
    Header(&'static str),
    #[error("instruction {0} names an account index out of range")]
    IndexOutOfRange(usize),
    #[error("{found} signatures for {required} required signers")]
    SignatureCount { found: usize, required: usize },
    #[error("the transaction is {0} bytes, more than the 1232 a packet holds")]
    TooLarge(usize),
    #[error("not base64")]
    Base64,
    #[error("{0} is not a signer of this message")]
    NotASigner(Pubkey),
    #[error("the signature of {0} is missing")]
    MissingSignature(Pubkey),
    #[error("the signature of {0} does not verify")]
    BadSignature(Pubkey),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageVersion {
    Legacy,
    V0,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageHeader {
    pub num_required_signatures: u8,
    pub num_readonly_signed: u8,
    pub num_readonly_unsigned: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledInstruction {
    pub program_id_index: u8,
    pub accounts: Vec<u8>,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressTableLookup {
    pub account_key: Pubkey,
    pub writable_indexes: Vec<u8>,
    pub readonly_indexes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub version: MessageVersion,
    pub header: MessageHeader,
    pub account_keys: Vec<Pubkey>,
    pub recent_blockhash: [u8; 32],
    pub instructions: Vec<CompiledInstruction>,
    pub address_table_lookups: Vec<AddressTableLookup>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub signatures: Vec<[u8; 64]>,
    pub message: Message,
}

/// An account an instruction uses, before compilation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountMeta {
    pub pubkey: Pubkey,
    pub is_signer: bool,
    pub is_writable: bool,
}

/// An instruction before compilation into a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    pub program_id: Pubkey,
    pub accounts: Vec<AccountMeta>,
    pub data: Vec<u8>,
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TxError> {
        let end = self.at.checked_add(n).ok_or(TxError::Truncated(self.at))?;
        let out = self
            .bytes
            .get(self.at..end)
            .ok_or(TxError::Truncated(self.at))?;
        self.at = end;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, TxError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], TxError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A compact-u16, canonical only.
    fn length(&mut self) -> Result<usize, TxError> {
        let mut value: usize = 0;
        for i in 0..3 {
            let b = self.byte()?;
            value |= ((b & 0x7f) as usize) << (7 * i);
            if b & 0x80 == 0 {
                // The shortest form: no zero continuation byte, and a value fitting 16 bits.
                if (i > 0 && b == 0) || value > u16::MAX as usize {
                    return Err(TxError::BadLength);
                }
                return Ok(value);
            }
        }
        Err(TxError::BadLength)
    }

    fn bytes_vec(&mut self) -> Result<Vec<u8>, TxError> {
        let n = self.length()?;
        Ok(self.take(n)?.to_vec())
    }
}

fn put_length(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n & 0x7f) as u8;
        n >>= 7;
        if n != 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

impl Message {
    fn decode(r: &mut Reader<'_>) -> Result<Message, TxError> {
        let first = r.byte()?;
        let (version, first_header_byte) = if first & 0x80 != 0 {
            match first & 0x7f {
                0 => (MessageVersion::V0, r.byte()?),
                v => return Err(TxError::Version(v)),
            }
        } else {
            (MessageVersion::Legacy, first)
        };
        let header = MessageHeader {
            num_required_signatures: first_header_byte,
            num_readonly_signed: r.byte()?,
            num_readonly_unsigned: r.byte()?,
        };
        let n = r.length()?;
        let mut account_keys = Vec::with_capacity(n.min(256));
        for _ in 0..n {
            account_keys.push(Pubkey(r.array()?));
        }
        let recent_blockhash = r.array()?;
        let n = r.length()?;
        let mut instructions = Vec::with_capacity(n.min(256));
        for _ in 0..n {
            let program_id_index = r.byte()?;
            let accounts = r.bytes_vec()?;
            let data = r.bytes_vec()?;
            instructions.push(CompiledInstruction {
                program_id_index,
                accounts,
                data,
            });
        }
        let mut address_table_lookups = Vec::new();
        if version == MessageVersion::V0 {
            let n = r.length()?;
            for _ in 0..n {
                address_table_lookups.push(AddressTableLookup {
                    account_key: Pubkey(r.array()?),
                    writable_indexes: r.bytes_vec()?,
                    readonly_indexes: r.bytes_vec()?,
                });
            }
        }
        let m = Message {
            version,
            header,
            account_keys,
            recent_blockhash,
            instructions,
            address_table_lookups,
        };
        m.check()?;
        Ok(m)
    }

    /// The rules every message keeps: signers within the keys, read-only counts within their groups, every
    /// instruction's indexes within the accounts (static and looked up).
    fn check(&self) -> Result<(), TxError> {
        let h = self.header;
        let keys = self.account_keys.len();
        if h.num_required_signatures == 0 {
            return Err(TxError::Header("no signer"));
        }
        if h.num_required_signatures as usize > keys {
            return Err(TxError::Header("more signers than account keys"));
        }
        if h.num_readonly_signed >= h.num_required_signatures {
            return Err(TxError::Header("the fee payer must be writable"));
        }
        if h.num_readonly_unsigned as usize > keys - h.num_required_signatures as usize {
            return Err(TxError::Header(
                "more read-only unsigned accounts than unsigned accounts",
            ));
        }
        let total = keys
            + self
                .address_table_lookups
                .iter()
                .map(|l| l.writable_indexes.len() + l.readonly_indexes.len())
                .sum::<usize>();
        for (i, ix) in self.instructions.iter().enumerate() {
            // A program is a static key.
            if ix.program_id_index as usize >= keys
                || ix.accounts.iter().any(|&a| a as usize >= total)
            {
                return Err(TxError::IndexOutOfRange(i));
            }
        }
        Ok(())
    }

    /// The bytes that are signed.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        if self.version == MessageVersion::V0 {
            out.push(0x80);
        }
        out.push(self.header.num_required_signatures);
        out.push(self.header.num_readonly_signed);
        out.push(self.header.num_readonly_unsigned);
        put_length(&mut out, self.account_keys.len());
        for k in &self.account_keys {
            out.extend_from_slice(&k.0);
        }
        out.extend_from_slice(&self.recent_blockhash);
        put_length(&mut out, self.instructions.len());
        for ix in &self.instructions {
            out.push(ix.program_id_index);
            put_length(&mut out, ix.accounts.len());
            out.extend_from_slice(&ix.accounts);
            put_length(&mut out, ix.data.len());
            out.extend_from_slice(&ix.data);
        }
        if self.version == MessageVersion::V0 {
            put_length(&mut out, self.address_table_lookups.len());
            for l in &self.address_table_lookups {
                out.extend_from_slice(&l.account_key.0);
                put_length(&mut out, l.writable_indexes.len());
                out.extend_from_slice(&l.writable_indexes);
                put_length(&mut out, l.readonly_indexes.len());
                out.extend_from_slice(&l.readonly_indexes);
            }
        }
        out
    }

    /// The static account at `index` (`None` for an account from a lookup table, or out of range).
    pub fn account(&self, index: u8) -> Option<&Pubkey> {
        self.account_keys.get(index as usize)
    }

    /// Whether the static account at `index` must sign.
    pub fn is_signer(&self, index: u8) -> bool {
        (index as usize) < self.header.num_required_signatures as usize
    }

    /// Whether the static account at `index` is writable.
    pub fn is_writable(&self, index: u8) -> bool {
        let i = index as usize;
        let h = self.header;
        let signers = h.num_required_signatures as usize;
        if i < signers {
            return i < signers - h.num_readonly_signed as usize;
        }
        let keys = self.account_keys.len();
        i < keys.saturating_sub(h.num_readonly_unsigned as usize)
    }

    /// A legacy message with `fee_payer` first and the accounts in the runtime's order: writable signers,
    /// read-only signers, writable non-signers, read-only non-signers (programs are read-only non-signers); an
    /// account named twice takes the union of its flags.
    pub fn new_legacy(
        fee_payer: &Pubkey,
        instructions: &[Instruction],
        recent_blockhash: [u8; 32],
    ) -> Message {
        Message::compile(
            MessageVersion::Legacy,
            fee_payer,
            instructions,
            recent_blockhash,
        )
    }

    /// As [`Message::new_legacy`], as a v0 message without lookup tables.
    pub fn new_v0(
        fee_payer: &Pubkey,
        instructions: &[Instruction],
        recent_blockhash: [u8; 32],
    ) -> Message {
        Message::compile(
            MessageVersion::V0,
            fee_payer,
            instructions,
            recent_blockhash,
        )
    }

    fn compile(
        version: MessageVersion,
        fee_payer: &Pubkey,
        instructions: &[Instruction],
        recent_blockhash: [u8; 32],
    ) -> Message {
        // (key, signer, writable) in first-seen order, the fee payer first.
        let mut metas: Vec<(Pubkey, bool, bool)> = vec![(*fee_payer, true, true)];
        let mut add = |k: Pubkey, signer: bool, writable: bool| {
            if let Some(m) = metas.iter_mut().find(|m| m.0 == k) {
                m.1 |= signer;
                m.2 |= writable;
            } else {
                metas.push((k, signer, writable));
            }
        };
        for ix in instructions {
            for a in &ix.accounts {
                add(a.pubkey, a.is_signer, a.is_writable);
            }
            add(ix.program_id, false, false);
        }
        let group = |signer: bool, writable: bool| {
            metas
                .iter()
                .filter(move |m| m.1 == signer && m.2 == writable && m.0 != *fee_payer)
                .map(|m| m.0)
        };
        let mut keys = vec![*fee_payer];
        keys.extend(group(true, true));
        let readonly_signed: Vec<Pubkey> = group(true, false).collect();
        keys.extend(readonly_signed.iter().copied());
        keys.extend(group(false, true));
        let readonly_unsigned: Vec<Pubkey> = group(false, false).collect();
        keys.extend(readonly_unsigned.iter().copied());
        let signers = metas.iter().filter(|m| m.1).count();
        let index = |k: &Pubkey| keys.iter().position(|x| x == k).unwrap_or(0) as u8;
        let compiled = instructions
            .iter()
            .map(|ix| CompiledInstruction {
                program_id_index: index(&ix.program_id),
                accounts: ix.accounts.iter().map(|a| index(&a.pubkey)).collect(),
                data: ix.data.clone(),
            })
            .collect();
        Message {
            version,
            header: MessageHeader {
                num_required_signatures: signers as u8,
                num_readonly_signed: readonly_signed.len() as u8,
                num_readonly_unsigned: readonly_unsigned.len() as u8,
            },
            account_keys: keys,
            recent_blockhash,
            instructions: compiled,
            address_table_lookups: Vec::new(),
        }
    }
}

impl Transaction {
    /// Decodes wire bytes strictly: canonical lengths, one signature per required signer, every index in range,
    /// nothing after the message, at most a packet's size.
    pub fn decode(bytes: &[u8]) -> Result<Transaction, TxError> {
        if bytes.len() > MAX_TRANSACTION_SIZE {
            return Err(TxError::TooLarge(bytes.len()));
        }
        let mut r = Reader { bytes, at: 0 };
        let n = r.length()?;
        let mut signatures = Vec::with_capacity(n.min(32));
        for _ in 0..n {
            signatures.push(r.array::<64>()?);
        }
        let message = Message::decode(&mut r)?;
        if r.at != bytes.len() {
            return Err(TxError::Trailing(bytes.len() - r.at));
        }
        let required = message.header.num_required_signatures as usize;
        if signatures.len() != required {
            return Err(TxError::SignatureCount {
                found: signatures.len(),
                required,
            });
        }
        Ok(Transaction {
            signatures,
            message,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        put_length(&mut out, self.signatures.len());
        for s in &self.signatures {
            out.extend_from_slice(s);
        }
        out.extend_from_slice(&self.message.encode());
        out
    }

    pub fn from_base64(text: &str) -> Result<Transaction, TxError> {
        // Base64 of a packet is at most 1644 characters; longer text is refused before decoding.
        if text.len() > 4 * MAX_TRANSACTION_SIZE.div_ceil(3) + 4 {
            return Err(TxError::TooLarge(text.len() * 3 / 4));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| TxError::Base64)?;
        Transaction::decode(&bytes)
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.encode())
    }

    /// A transaction of `message` with every signature slot zero (unsigned).
    pub fn new_unsigned(message: Message) -> Transaction {
        let n = message.header.num_required_signatures as usize;
        Transaction {
            signatures: vec![[0u8; 64]; n],
            message,
        }
    }

    /// The transaction's id: the base58 of its first signature (the fee payer's).
    pub fn signature_id(&self) -> String {
        self.signatures
            .first()
            .map(|s| bs58::encode(s).into_string())
            .unwrap_or_default()
    }

    /// The signer at slot `i` (slot i signs for account key i).
    pub fn signer(&self, i: usize) -> Option<&Pubkey> {
        self.message.account_keys.get(i)
    }

    /// Checks every signature that is present (non-zero) against its key; a zero slot is "not signed yet".
    pub fn verify_present_signatures(&self) -> Result<(), TxError> {
        let bytes = self.message.encode();
        for (i, sig) in self.signatures.iter().enumerate() {
            if sig.iter().all(|&b| b == 0) {
                continue;
            }
            let key = *self
                .signer(i)
                .ok_or(TxError::Header("a signature without a key"))?;
            verify(&key, &bytes, sig).map_err(|_| TxError::BadSignature(key))?;
        }
        Ok(())
    }

    /// Checks that every required signature is present and valid.
    pub fn verify_all_signatures(&self) -> Result<(), TxError> {
        for (i, sig) in self.signatures.iter().enumerate() {
            if sig.iter().all(|&b| b == 0) {
                let key = self.signer(i).copied().unwrap_or(Pubkey([0; 32]));
                return Err(TxError::MissingSignature(key));
            }
        }
        self.verify_present_signatures()
    }

    /// Signs as `key`, in the slot of its position among the required signers.
    pub fn sign(&mut self, key: &SigningKey) -> Result<(), TxError> {
        let me = Pubkey(key.verifying_key().to_bytes());
        let required = self.message.header.num_required_signatures as usize;
        let slot = self.message.account_keys[..required.min(self.message.account_keys.len())]
            .iter()
            .position(|k| *k == me)
            .ok_or(TxError::NotASigner(me))?;
        if self.signatures.len() != required {
            self.signatures.resize(required, [0u8; 64]);
        }
        self.signatures[slot] = key.sign(&self.message.encode()).to_bytes();
        Ok(())
    }
}

/// An ed25519 signature check (strict: no malleable or small-order forms).
pub(super) fn verify(key: &Pubkey, message: &[u8], signature: &[u8; 64]) -> Result<(), ()> {
    let vk = VerifyingKey::from_bytes(&key.0).map_err(|_| ())?;
    let sig = Signature::from_bytes(signature);
    vk.verify_strict(message, &sig).map_err(|_| ())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::svm::address::{TOKEN_PROGRAM, USDC_DEVNET_MINT};
    use crate::chain::svm::instructions::{memo, set_compute_unit_limit, token_transfer_checked};
    use proptest::prelude::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn pk(k: &SigningKey) -> Pubkey {
        Pubkey(k.verifying_key().to_bytes())
    }

    fn sample(version: MessageVersion) -> Transaction {
        let payer = key(1);
        let fee = key(2);
        let ixs = [
            set_compute_unit_limit(20_000),
            token_transfer_checked(
                &TOKEN_PROGRAM,
                &Pubkey([7; 32]),
                &USDC_DEVNET_MINT,
                &Pubkey([8; 32]),
                &pk(&payer),
                1_000_000,
                6,
            ),
            memo(b"nonce"),
        ];
        let m = match version {
            MessageVersion::Legacy => Message::new_legacy(&pk(&fee), &ixs, [9; 32]),
            MessageVersion::V0 => Message::new_v0(&pk(&fee), &ixs, [9; 32]),
        };
        let mut tx = Transaction::new_unsigned(m);
        tx.sign(&payer).unwrap();
        tx
    }

    #[test]
    fn round_trips_byte_for_byte_and_signs_in_place() {
        for v in [MessageVersion::Legacy, MessageVersion::V0] {
            let mut tx = sample(v);
            let bytes = tx.encode();
            let back = Transaction::decode(&bytes).unwrap();
            assert_eq!(back, tx);
            assert_eq!(back.encode(), bytes);
            assert_eq!(Transaction::from_base64(&tx.to_base64()).unwrap(), tx);
            // Fee payer first, payer second: two signers, the payer's slot signed, the fee payer's empty.
            assert_eq!(tx.message.header.num_required_signatures, 2);
            assert_eq!(tx.message.account_keys[0], pk(&key(2)));
            assert!(tx.signatures[0].iter().all(|&b| b == 0));
            tx.verify_present_signatures().unwrap();
            assert_eq!(
                tx.verify_all_signatures(),
                Err(TxError::MissingSignature(pk(&key(2))))
            );
            tx.sign(&key(2)).unwrap();
            tx.verify_all_signatures().unwrap();
            assert_eq!(tx.sign(&key(3)), Err(TxError::NotASigner(pk(&key(3)))));
            // A signature over other bytes fails.
            let mut bad = tx.clone();
            bad.message.recent_blockhash = [1; 32];
            assert!(bad.verify_present_signatures().is_err());
        }
    }

    /// A real mainnet transaction (a USDT `transferChecked` behind a durable-nonce advance), as quoted with its
    /// parse in paulmillr/micro-sol-signer's examples; its id is the explorer's 5Nnhjv….
    #[test]
    fn a_real_mainnet_transaction_decodes_verifies_and_parses() {
        use crate::chain::svm::instructions::{ParsedInstruction, parse};
        const TX: &str = "Atrba9P4rJ4tA3fMXioF+LBR5Y397TCaCC7o/JsViIFxDQ+FOpW2/I+DGMtapWPmrRJ3KDEaYa21YbpUcXaygQPKXDfudpRNZKsMsjhhH018U2YKTAJoqu6Jr1jASfnV98/65boYyPzPujo4YMKnIaCjrt1EsvnPNCuoBMXUEzYAAgEECc20MANIMI92j1eVfOiH5WQ691HznE9ZeQfjeXpDNm0eH5z5eohWokD+6H+jjnZ/KFqkCmlEdPrk6HCx+mOgjTAJUM/3r5vR1DjJnZhT6PQK3Z32pIe8MzDmPxe8Ttzy2CTxiTfFaNQeAkRJCefcB5JJGeb/Qxrj4dpxv8Kv9gClJ544V5wdVgmhBbCFO1kSIv6OaEUizyYdqhTUiO8w8XsGp9UXGSxWjuCKhF9z0peIzwNcMUWyGrNE2AYuqUAAAM4BDmCv7bInF71jGS9UFFo/llozu4LSxwKess4eIIJkAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAG3fbh12Whk9nL4UbO63msHLSF7V9bN5E6jPWFfv8AqYUpqsC9KfFD7lsris1C7YZkNRdSH5qix9nMo2igoP0yAgcDAgUBBAQAAAAIBAMGBAAKDJSDxgMPAAAABg==";
        let pk = |s: &str| s.parse::<Pubkey>().unwrap();
        let tx = Transaction::from_base64(TX).unwrap();
        assert_eq!(tx.to_base64(), TX);
        assert_eq!(
            tx.signature_id(),
            "5Nnhjv1GVB8T1k8MguUGHQw5zQQQsWET1f1zzj8azRhnVoYQPoZPtkscPCKy6FisP2eVWehjU1EYV8zywqKm5if4"
        );
        tx.verify_all_signatures().unwrap();
        let m = &tx.message;
        assert_eq!(m.version, MessageVersion::Legacy);
        assert_eq!(
            m.account_keys[0],
            pk("EqywLUZcm73PSWri93X3M5TN62iFMsUPMjvWYUq89dKB")
        );
        assert_eq!(
            Pubkey(m.recent_blockhash),
            pk("9xp5Jz2v7ZsE3Xn5SVGkRisjo7h16vzF1ducwhWnc5n9")
        );
        assert_eq!(
            parse(m, &m.instructions[1]).unwrap(),
            ParsedInstruction::TransferChecked {
                token_program: crate::chain::svm::address::TOKEN_PROGRAM,
                source: pk("3VDHywae15vgbG2euNPpwoHTEr2eyGLuS6EoF74kDkp4"),
                mint: pk("Es9vMFrzaCERmJfrF4H2FYD4KCoNkY11McCe8BenwNYB"),
                destination: pk("3feqC1fmo5YHMh2iw7X9kGE9F8P147hiiDQqC5xtSbpN"),
                authority: pk("EqywLUZcm73PSWri93X3M5TN62iFMsUPMjvWYUq89dKB"),
                amount: 64_487_850_900,
                decimals: 6,
            }
        );
        let i = m.instructions[1].accounts[2];
        assert!(m.is_writable(i) && !m.is_signer(i));
    }

    #[test]
    fn account_flags_follow_the_header() {
        let tx = sample(MessageVersion::Legacy);
        let m = &tx.message;
        assert!(m.is_signer(0) && m.is_writable(0));
        assert!(
            m.is_signer(1) && !m.is_writable(1),
            "the payer only signs the transfer"
        );
        let programs: Vec<u8> = m.instructions.iter().map(|i| i.program_id_index).collect();
        for p in programs {
            assert!(!m.is_signer(p) && !m.is_writable(p));
        }
    }

    #[test]
    fn malformed_bytes_are_refused() {
        let bytes = sample(MessageVersion::V0).encode();
        assert!(matches!(
            Transaction::decode(&bytes[..bytes.len() - 1]),
            Err(TxError::Truncated(_))
        ));
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(Transaction::decode(&extra), Err(TxError::Trailing(1)));
        // A non-canonical length: 2 written as 0x82 0x00.
        let mut long = vec![0x82, 0x00];
        long.extend_from_slice(&bytes[1..]);
        assert_eq!(Transaction::decode(&long), Err(TxError::BadLength));
        // Version 1 does not exist.
        let mut v1 = bytes.clone();
        v1[1 + 128] = 0x81;
        assert_eq!(Transaction::decode(&v1), Err(TxError::Version(1)));
        assert_eq!(Transaction::from_base64("%%%"), Err(TxError::Base64));
    }

    proptest! {
        #[test]
        fn random_and_mutated_bytes_never_panic(
            random in proptest::collection::vec(any::<u8>(), 0..1300),
            at in 0usize..400,
            value in any::<u8>(),
        ) {
            let _ = Transaction::decode(&random);
            let mut bytes = sample(MessageVersion::V0).encode();
            let i = at % bytes.len();
            bytes[i] = value;
            if let Ok(tx) = Transaction::decode(&bytes) {
                prop_assert_eq!(tx.encode(), bytes);
            }
        }
    }
}
