//! A real local Solana for the tests: surfnet-tool (tools/surfnet-tool: surfpool-core's surfnet on LiteSVM,
//! offline) on a free loopback port, with Circle's devnet USDC mint created in it (offline, no mint exists until
//! one is written), funded wallets, and SPL transfers built, signed and sent with the gateway's own Solana codec.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey};
use serde_json::{Value, json};
use x402_gateway::chain::svm::address::{
    Pubkey, TOKEN_PROGRAM, USDC_DEVNET_MINT, associated_token_address,
};
use x402_gateway::chain::svm::instructions::{
    create_associated_token_account_idempotent, token_transfer, token_transfer_checked,
};
use x402_gateway::chain::svm::tx::{Instruction, Message, Transaction};

use crate::support::wait_for;

/// The CAIP-2 id of the devnet preset the tests configure (the official x402 SVM clients know only the public
/// clusters' ids; the RPC behind it is the local surfnet).
pub const SVM_DEVNET: &str = "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1";

/// The surfnet-tool binary: `X402_SURFNET_TOOL` (scripts/test sets it), else `scripts/surfnet-tool` finds it in the
/// machine's cache (building it once, ~25 minutes on 2 cores).
pub fn surfnet_tool() -> String {
    if let Ok(path) = std::env::var("X402_SURFNET_TOOL")
        && Path::new(&path).is_file()
    {
        return path;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("bash")
        .arg(format!("{root}/scripts/surfnet-tool"))
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/surfnet-tool runs");
    assert!(out.status.success(), "scripts/surfnet-tool failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A wallet from a fixed seed (tests are repeatable).
pub fn wallet(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

pub fn pubkey(k: &SigningKey) -> Pubkey {
    Pubkey(k.verifying_key().to_bytes())
}

/// An ed25519 signature of `text` by `k`, base58 (what a wallet's `signMessage` gives, as wallets show it).
pub fn sign_text(k: &SigningKey, text: &str) -> String {
    bs58::encode(k.sign(text.as_bytes()).to_bytes()).into_string()
}

/// A running surfnet; killed when dropped.
pub struct TestSolana {
    pub url: String,
    child: tokio::process::Child,
    http: reqwest::Client,
    pub mint: Pubkey,
}

impl Drop for TestSolana {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Two free consecutive loopback ports (surfnet takes `port` for HTTP and `port + 1` for its WebSocket).
fn free_port_pair() -> u16 {
    for _ in 0..50 {
        let Ok(a) = std::net::TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(addr) = a.local_addr() else { continue };
        let port = addr.port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no two consecutive free loopback ports");
}

impl TestSolana {
    /// Starts surfnet and creates the devnet USDC mint (6 decimals, Token program).
    pub async fn start() -> TestSolana {
        let tool = surfnet_tool();
        let port = free_port_pair();
        let child = tokio::process::Command::new(&tool)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("surfnet-tool starts");
        let s = TestSolana {
            url: format!("http://127.0.0.1:{port}"),
            child,
            http: reqwest::Client::new(),
            mint: USDC_DEVNET_MINT,
        };
        wait_for("surfnet answers getHealth", || async {
            let r = s.try_rpc("getHealth", json!([])).await.ok()?;
            (r == json!("ok")).then_some(())
        })
        .await;
        s.create_mint(&s.mint, 6).await;
        s
    }

    async fn try_rpc(&self, method: &str, params: Value) -> Result<Value, String> {
        let r = self
            .http
            .post(&self.url)
            .timeout(Duration::from_secs(10))
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let v: Value = r.json().await.map_err(|e| e.to_string())?;
        match v.get("result") {
            Some(result) => Ok(result.clone()),
            None => Err(v.to_string()),
        }
    }

    /// Calls `method`; panics on a JSON-RPC error.
    pub async fn rpc(&self, method: &str, params: Value) -> Value {
        match self.try_rpc(method, params.clone()).await {
            Ok(v) => v,
            Err(e) => panic!("{method} {params}: {e}"),
        }
    }

    /// Writes an initialized SPL mint account (Token program) at `mint` (cheatcode `surfnet_setAccount`).
    pub async fn create_mint(&self, mint: &Pubkey, decimals: u8) {
        // SPL Mint: mint_authority COption<Pubkey> (4 + 32), supply u64, decimals u8, is_initialized bool,
        // freeze_authority COption<Pubkey> (4 + 32): 82 bytes.
        let mut data = [0u8; 82];
        data[36..44].copy_from_slice(&1_000_000_000_000u64.to_le_bytes());
        data[44] = decimals;
        data[45] = 1;
        let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
        self.rpc(
            "surfnet_setAccount",
            json!([mint.to_string(), {"lamports": 1_461_600, "data": hex, "owner": TOKEN_PROGRAM.to_string()}]),
        )
        .await;
    }

    /// Gives `owner` lamports for fees.
    pub async fn airdrop(&self, owner: &Pubkey, lamports: u64) {
        self.rpc(
            "surfnet_setAccount",
            json!([owner.to_string(), {"lamports": lamports}]),
        )
        .await;
    }

    /// Sets `owner`'s USDC token account (created if needed) to `amount` atomic units.
    pub async fn set_usdc(&self, owner: &Pubkey, amount: u64) {
        self.rpc(
            "surfnet_setTokenAccount",
            json!([owner.to_string(), self.mint.to_string(), {"amount": amount, "state": "initialized"}, TOKEN_PROGRAM.to_string()]),
        )
        .await;
    }

    /// `owner`'s USDC balance (0 when it has no token account).
    pub async fn usdc_of(&self, owner: &Pubkey) -> u64 {
        let ata = associated_token_address(owner, &self.mint, &TOKEN_PROGRAM);
        match self
            .try_rpc("getTokenAccountBalance", json!([ata.to_string()]))
            .await
        {
            Ok(v) => v["value"]["amount"]
                .as_str()
                .and_then(|a| a.parse().ok())
                .unwrap_or(0),
            Err(_) => 0,
        }
    }

    pub async fn blockhash(&self) -> [u8; 32] {
        let v = self
            .rpc("getLatestBlockhash", json!([{"commitment": "confirmed"}]))
            .await;
        let text = v["value"]["blockhash"].as_str().expect("a blockhash");
        let bytes = bs58::decode(text).into_vec().expect("base58");
        bytes.try_into().expect("32 bytes")
    }

    /// Builds, signs (fee payer first, then `signers`) and sends `instructions`; waits until it is confirmed and
    /// returns its signature.
    pub async fn send(
        &self,
        instructions: &[Instruction],
        fee_payer: &SigningKey,
        signers: &[&SigningKey],
    ) -> String {
        let message = Message::new_legacy(&pubkey(fee_payer), instructions, self.blockhash().await);
        let mut tx = Transaction::new_unsigned(message);
        tx.sign(fee_payer).expect("fee payer signs");
        for s in signers {
            tx.sign(s).expect("signer signs");
        }
        let sig = self.send_raw(&tx.to_base64()).await;
        self.wait_confirmed(&sig).await;
        sig
    }

    /// Sends a signed transaction (base64) as is; its signature.
    pub async fn send_raw(&self, base64: &str) -> String {
        self.rpc(
            "sendTransaction",
            json!([base64, {"encoding": "base64", "preflightCommitment": "confirmed"}]),
        )
        .await
        .as_str()
        .expect("a signature")
        .to_string()
    }

    /// Waits until `sig` is confirmed (or finalized).
    pub async fn wait_confirmed(&self, sig: &str) {
        wait_for("the transaction is confirmed", || async {
            let v = self
                .try_rpc(
                    "getSignatureStatuses",
                    json!([[sig], {"searchTransactionHistory": true}]),
                )
                .await
                .ok()?;
            let status = v["value"][0]["confirmationStatus"].as_str()?.to_string();
            (status == "confirmed" || status == "finalized").then_some(())
        })
        .await;
    }

    /// Waits until `sig` is finalized.
    pub async fn wait_finalized(&self, sig: &str) {
        wait_for("the transaction is finalized", || async {
            let v = self
                .try_rpc(
                    "getSignatureStatuses",
                    json!([[sig], {"searchTransactionHistory": true}]),
                )
                .await
                .ok()?;
            (v["value"][0]["confirmationStatus"].as_str()? == "finalized").then_some(())
        })
        .await;
    }

    /// A wallet with SOL for fees and `usdc` atomic units of USDC.
    pub async fn funded_wallet(&self, seed: u8, usdc: u64) -> SigningKey {
        let k = wallet(seed);
        self.airdrop(&pubkey(&k), 10_000_000_000).await;
        self.set_usdc(&pubkey(&k), usdc).await;
        k
    }

    /// `payer` sends `amount` USDC atomic units to `to`'s token account with `transferChecked` (creating it if
    /// needed); returns the signature once confirmed.
    pub async fn pay(&self, payer: &SigningKey, to: &Pubkey, amount: u64) -> String {
        let from = pubkey(payer);
        let ixs = [
            create_associated_token_account_idempotent(&from, to, &self.mint, &TOKEN_PROGRAM),
            token_transfer_checked(
                &TOKEN_PROGRAM,
                &associated_token_address(&from, &self.mint, &TOKEN_PROGRAM),
                &self.mint,
                &associated_token_address(to, &self.mint, &TOKEN_PROGRAM),
                &from,
                amount,
                6,
            ),
        ];
        self.send(&ixs, payer, &[]).await
    }

    /// As [`TestSolana::pay`] with the unchecked `transfer` instruction (no mint, no decimals).
    pub async fn pay_unchecked(&self, payer: &SigningKey, to: &Pubkey, amount: u64) -> String {
        let from = pubkey(payer);
        let ixs = [
            create_associated_token_account_idempotent(&from, to, &self.mint, &TOKEN_PROGRAM),
            token_transfer(
                &TOKEN_PROGRAM,
                &associated_token_address(&from, &self.mint, &TOKEN_PROGRAM),
                &associated_token_address(to, &self.mint, &TOKEN_PROGRAM),
                &from,
                amount,
            ),
        ];
        self.send(&ixs, payer, &[]).await
    }
}
