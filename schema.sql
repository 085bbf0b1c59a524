-- x402-gateway database schema: the one source of truth for every table.
--
-- The file is a sequence of migrations. Each starts with a line `-- migration: N <name>` and is applied once, in
-- order, inside one transaction; `PRAGMA user_version` records the last one applied. Never edit a migration that
-- has shipped: append a new one.
--
-- Money is always an INTEGER of USDC atomic units (6 decimals). Addresses and hashes are lower-case 0x-hex TEXT.
-- Times are INTEGER unix seconds (UTC).

-- migration: 1 indexer
-- What this database indexes. Written once; a config pointing the same file at another chain, token or payTo
-- is refused at start-up instead of silently mixing two ledgers.
CREATE TABLE chain_binding (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    chain_id      INTEGER NOT NULL,
    token_address TEXT    NOT NULL,
    pay_to        TEXT    NOT NULL,
    created_at    INTEGER NOT NULL
);

-- The last block whose logs are fully written. The indexer resumes at block_number + 1.
CREATE TABLE checkpoint (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    block_number INTEGER NOT NULL,
    block_hash   TEXT    NOT NULL,
    updated_at   INTEGER NOT NULL
);

-- Canonical headers of the recent window, used to detect reorgs from the parent-hash chain.
CREATE TABLE recent_blocks (
    number      INTEGER PRIMARY KEY,
    hash        TEXT    NOT NULL,
    parent_hash TEXT    NOT NULL,
    timestamp   INTEGER NOT NULL
);

-- One row per Transfer log to payTo, identified by the block it was mined in. A reorg never deletes a row: it
-- marks it `orphaned`; if the same transaction is mined again, in another block, that is a new row.
CREATE TABLE transfers (
    id            INTEGER PRIMARY KEY,
    tx_hash       TEXT    NOT NULL,
    log_index     INTEGER NOT NULL,
    block_number  INTEGER NOT NULL,
    block_hash    TEXT    NOT NULL,
    block_time    INTEGER,
    from_address  TEXT    NOT NULL,
    to_address    TEXT    NOT NULL,
    value_atomic  INTEGER NOT NULL CHECK (value_atomic >= 0),
    status        TEXT    NOT NULL CHECK (status IN ('seen', 'confirmed', 'orphaned')),
    first_seen_at INTEGER NOT NULL,
    confirmed_at  INTEGER,
    orphaned_at   INTEGER,
    UNIQUE (block_hash, log_index)
);
CREATE INDEX transfers_tx_hash ON transfers (tx_hash);
CREATE INDEX transfers_status_block ON transfers (status, block_number);
CREATE INDEX transfers_from ON transfers (from_address);

-- Every status change of a transfer after it was first recorded, for auditors. The transfers row is the first
-- entry: recorded at first_seen_at, as `confirmed` when confirmed_at = first_seen_at (found at depth), else `seen`.
CREATE TABLE transfer_status_history (
    id          INTEGER PRIMARY KEY,
    transfer_id INTEGER NOT NULL REFERENCES transfers (id),
    status      TEXT    NOT NULL,
    at          INTEGER NOT NULL,
    head_block  INTEGER NOT NULL,
    reason      TEXT    NOT NULL
);
CREATE INDEX transfer_status_history_transfer ON transfer_status_history (transfer_id);

-- Reorgs the indexer has handled.
CREATE TABLE reorgs (
    id               INTEGER PRIMARY KEY,
    detected_at      INTEGER NOT NULL,
    fork_block       INTEGER NOT NULL,
    old_head         INTEGER NOT NULL,
    depth            INTEGER NOT NULL,
    orphaned_transfers INTEGER NOT NULL
);

-- migration: 2 checkout
-- Agent checkout: accounts (payer addresses), their append-only credit ledger, claims of confirmed transfers,
-- pool subscriptions with their seats, API keys (hashes only) and used key-rotation messages.

-- An account is a payer address (lower-case 0x-hex).
CREATE TABLE accounts (
    address    TEXT    PRIMARY KEY,
    created_at INTEGER NOT NULL
);

-- One row per claimed transaction: the PRIMARY KEY is the at-most-once guarantee. Inserted in the same
-- transaction that mints the key and writes the ledger rows.
CREATE TABLE claims (
    tx_hash         TEXT    PRIMARY KEY,
    account         TEXT    NOT NULL REFERENCES accounts (address),
    kind            TEXT    NOT NULL CHECK (kind IN ('subscription', 'topup')),
    paid_atomic     INTEGER NOT NULL CHECK (paid_atomic >= 0),
    price_atomic    INTEGER NOT NULL CHECK (price_atomic >= 0),
    surplus_atomic  INTEGER NOT NULL CHECK (surplus_atomic >= 0),
    subscription_id INTEGER REFERENCES subscriptions (id),
    key_id          INTEGER REFERENCES api_keys (id),
    signature       TEXT,
    claimed_at      INTEGER NOT NULL,
    CHECK (paid_atomic = price_atomic + surplus_atomic)
);
CREATE INDEX claims_account ON claims (account);

CREATE TABLE subscriptions (
    id           INTEGER PRIMARY KEY,
    account      TEXT    NOT NULL REFERENCES accounts (address),
    pool         TEXT    NOT NULL,
    blocks       TEXT    NOT NULL, -- JSON array of block names, in the order bought
    price_atomic INTEGER NOT NULL CHECK (price_atomic >= 0),
    tx_hash      TEXT    NOT NULL UNIQUE,
    starts_at    INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL
);
CREATE INDEX subscriptions_account ON subscriptions (account);

-- A subscription holds one seat in each bought block from its claim to its expiry.
CREATE TABLE seats (
    subscription_id INTEGER NOT NULL REFERENCES subscriptions (id),
    pool            TEXT    NOT NULL,
    block           TEXT    NOT NULL,
    expires_at      INTEGER NOT NULL,
    PRIMARY KEY (subscription_id, block)
);
CREATE INDEX seats_live ON seats (pool, block, expires_at);

-- Credits: append-only; the balance of an account is the sum of its rows (and equals the last balance_after).
CREATE TABLE ledger (
    id            INTEGER PRIMARY KEY,
    account       TEXT    NOT NULL REFERENCES accounts (address),
    kind          TEXT    NOT NULL CHECK (kind IN ('topup', 'surplus', 'grant', 'debit', 'refund')),
    amount_atomic INTEGER NOT NULL,
    balance_after INTEGER NOT NULL CHECK (balance_after >= 0),
    tx_hash       TEXT,
    key_id        INTEGER,
    note          TEXT,
    created_at    INTEGER NOT NULL,
    CHECK ((kind = 'debit') = (amount_atomic < 0) OR amount_atomic = 0)
);
CREATE INDEX ledger_account ON ledger (account, id);
CREATE TRIGGER ledger_append_only_update BEFORE UPDATE ON ledger
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER ledger_append_only_delete BEFORE DELETE ON ledger
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;

-- API keys `sk-<public_id>-<secret>`: only SHA-256(secret) is stored.
CREATE TABLE api_keys (
    id              INTEGER PRIMARY KEY,
    public_id       TEXT    NOT NULL UNIQUE,
    secret_hash     BLOB    NOT NULL,
    kind            TEXT    NOT NULL CHECK (kind IN ('subscription', 'credit')),
    account         TEXT    NOT NULL REFERENCES accounts (address),
    subscription_id INTEGER REFERENCES subscriptions (id),
    created_at      INTEGER NOT NULL,
    created_by      TEXT    NOT NULL, -- claim, rotation, operator
    revoked_at      INTEGER,
    revoked_reason  TEXT,
    replaced_by     INTEGER REFERENCES api_keys (id),
    CHECK ((kind = 'subscription') = (subscription_id IS NOT NULL))
);
CREATE INDEX api_keys_account ON api_keys (account);

-- Key-rotation messages already used: (address, signed_at) can rotate once, so a captured signature (or a
-- re-encoded copy of it) cannot be replayed.
CREATE TABLE rotation_nonces (
    account   TEXT    NOT NULL,
    signed_at INTEGER NOT NULL,
    used_at   INTEGER NOT NULL,
    PRIMARY KEY (account, signed_at)
);

-- migration: 3 proxy
-- One small row per inference request. A credit request is written when its worst-case cost is reserved (a
-- `debit` ledger row in the same transaction, status `in_flight`) and updated when it is settled (a `refund` row
-- for the unused part). Rows still `in_flight` at start-up belong to a crashed process: they are refunded in full
-- and marked `interrupted`.
CREATE TABLE usage (
    id                INTEGER PRIMARY KEY,
    request_id        TEXT    NOT NULL,
    key_id            INTEGER NOT NULL REFERENCES api_keys (id),
    account           TEXT    NOT NULL,
    key_kind          TEXT    NOT NULL CHECK (key_kind IN ('subscription', 'credit')),
    model             TEXT    NOT NULL,
    stream            INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    reserved_atomic   INTEGER NOT NULL DEFAULT 0 CHECK (reserved_atomic >= 0),
    cost_atomic       INTEGER NOT NULL DEFAULT 0 CHECK (cost_atomic >= 0),
    -- in_flight, ok, upstream_error, upstream_cut, client_closed, interrupted
    status            TEXT    NOT NULL,
    -- upstream (the usage object), estimated (no usage arrived: see README), none (nothing billable)
    usage_source      TEXT    NOT NULL DEFAULT 'none',
    http_status       INTEGER,
    started_at        INTEGER NOT NULL,
    duration_ms       INTEGER,
    overhead_us       INTEGER
);
CREATE INDEX usage_key ON usage (key_id, id);
CREATE INDEX usage_in_flight ON usage (status) WHERE status = 'in_flight';

-- migration: 4 x402
-- Standard x402 payments settled by the gateway (self settlement or through a facilitator). The settlement's
-- transfer is also indexed like any other payment; its tx hash has a `claims` row (inserted in the same
-- transaction as the key and ledger rows), so it can never be claimed again by txHash.
CREATE TABLE x402_settlements (
    id             INTEGER PRIMARY KEY,
    tx_hash        TEXT    NOT NULL UNIQUE, -- the current settlement transaction (a re-submission replaces it)
    payer          TEXT    NOT NULL,        -- authorization.from
    nonce          TEXT    NOT NULL,        -- authorization.nonce
    x402_version   INTEGER NOT NULL,
    authorization  TEXT    NOT NULL,        -- JSON {from, to, value, validAfter, validBefore, nonce}
    signature      TEXT    NOT NULL,        -- 0x-hex, as signed by the payer
    requirements   TEXT    NOT NULL,        -- JSON: our offer the payment was verified against
    resource       TEXT    NOT NULL,        -- the resource URL paid for
    product        TEXT    NOT NULL CHECK (product IN ('credits', 'subscription', 'request')),
    amount_atomic  INTEGER NOT NULL CHECK (amount_atomic >= 0),
    key_id         INTEGER REFERENCES api_keys (id),
    status         TEXT    NOT NULL CHECK (status IN ('settled', 'failed')),
    settled_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    UNIQUE (payer, nonce)
);

-- What happened to settlements after the fact: `reorged` (its transfer was orphaned), `resubmitted` (the same
-- authorization settled again, in tx_hash), `suspended` (re-submission failed; the key was revoked).
CREATE TABLE x402_events (
    id            INTEGER PRIMARY KEY,
    settlement_id INTEGER NOT NULL REFERENCES x402_settlements (id),
    kind          TEXT    NOT NULL CHECK (kind IN ('reorged', 'resubmitted', 'suspended')),
    tx_hash       TEXT,
    detail        TEXT,
    at            INTEGER NOT NULL
);
CREATE INDEX x402_events_settlement ON x402_events (settlement_id);

-- The `payment-identifier` extension: one answer per id. The id itself is not stored (only its SHA-256), and the
-- stored answer (which may carry a new API key) is encrypted with a key derived from the id, so the database
-- alone does not reveal it.
CREATE TABLE x402_idempotency (
    id_hash      TEXT    PRIMARY KEY,
    payload_hash TEXT    NOT NULL,
    response     BLOB    NOT NULL,
    created_at   INTEGER NOT NULL
);

-- migration: 5 metering
-- The gateway's bound on each request (the output part is written into the forwarded request) and the prices it
-- was reserved at, so an auditor can recompute every charge: `cost_atomic` = the tokens at these prices, never more
-- than `reserved_atomic`. An upstream that generated past the bound (one that ignores caps) is an overrun:
-- `overrun_tokens` > 0, the reservation is charged, and what the reported tokens cost beyond the charge is
-- `uncharged_atomic` (the operator's loss, made visible). Rows from before this migration have NULL prices.
ALTER TABLE usage ADD COLUMN bound_prompt_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN bound_output_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN input_price_atomic INTEGER;
ALTER TABLE usage ADD COLUMN output_price_atomic INTEGER;
ALTER TABLE usage ADD COLUMN overrun_tokens INTEGER NOT NULL DEFAULT 0 CHECK (overrun_tokens >= 0);
ALTER TABLE usage ADD COLUMN uncharged_atomic INTEGER NOT NULL DEFAULT 0 CHECK (uncharged_atomic >= 0);

-- migration: 6 reversals
-- Claimed payments that a reorg removed (issue 13, hole 8). When every transaction of a purchase has left the
-- canonical chain, the purchase is reversed at once, in the indexer's own write: its credits are taken back with a
-- `reversal` ledger row (the balance may go negative), its subscription keys are suspended, and a
-- `claim_reversals` row records it. When one of its transactions is confirmed again, the same amount comes back
-- as a `reinstatement` row, the keys the reversal suspended are unsuspended, and a `restored` row records it.

-- The purchase a claim row belongs to: NULL for the original claim, else the tx hash of the original claim (an
-- x402 settlement re-submitted, or adopted from the payer's own transaction, gets a copy of its claim row keyed by
-- the new transaction). All transactions of one purchase back it together.
ALTER TABLE claims ADD COLUMN origin_tx TEXT;
CREATE INDEX claims_origin ON claims (origin_tx) WHERE origin_tx IS NOT NULL;
-- Copies made before this migration: the original is the tx of the settlement's first `reorged` event.
UPDATE claims SET origin_tx = (
    SELECT first.tx_hash FROM x402_events e JOIN x402_events first ON first.settlement_id = e.settlement_id
    WHERE e.kind = 'resubmitted' AND e.tx_hash = claims.tx_hash AND first.kind = 'reorged'
    ORDER BY first.id LIMIT 1)
WHERE tx_hash IN (SELECT tx_hash FROM x402_events WHERE kind = 'resubmitted' AND tx_hash IS NOT NULL);

-- A key suspended by a reversal (`suspended_by` = the purchase's original tx hash). Independent of revocation: a
-- restore clears only the suspension, so a key revoked for another reason stays revoked.
ALTER TABLE api_keys ADD COLUMN suspended_at INTEGER;
ALTER TABLE api_keys ADD COLUMN suspended_by TEXT;

-- Every reversal and restore, for auditors. `seq` counts the purchase's events from 1: odd rows are `reversed`,
-- even rows `restored`, and (claim_tx, seq) is unique, so a purchase can never be reversed twice in a row (a
-- retried or restarted task finds the row already there).
CREATE TABLE claim_reversals (
    id            INTEGER PRIMARY KEY,
    claim_tx      TEXT    NOT NULL REFERENCES claims (tx_hash), -- the purchase's original claim
    seq           INTEGER NOT NULL CHECK (seq >= 1),
    kind          TEXT    NOT NULL CHECK (kind IN ('reversed', 'restored')),
    account       TEXT    NOT NULL,
    amount_atomic INTEGER NOT NULL CHECK (amount_atomic >= 0), -- credits taken back / given back
    cause         TEXT    NOT NULL, -- reorg, settlement_failed, confirmed_again
    tx_hash       TEXT,             -- the transaction whose confirmation restored it
    at            INTEGER NOT NULL,
    UNIQUE (claim_tx, seq),
    CHECK ((kind = 'reversed') = (seq % 2 = 1))
);

-- The ledger again, with two more kinds and the new balance rule: a `reversal` may take a balance below zero (and
-- rows that add credits may leave it there), but a `debit` never ends below zero, so a negative account cannot
-- spend until it is topped up. SQLite cannot change a CHECK in place: the table is copied.
CREATE TABLE ledger_v6 (
    id            INTEGER PRIMARY KEY,
    account       TEXT    NOT NULL REFERENCES accounts (address),
    kind          TEXT    NOT NULL CHECK (kind IN ('topup', 'surplus', 'grant', 'debit', 'refund', 'reversal',
                                                   'reinstatement')),
    amount_atomic INTEGER NOT NULL,
    balance_after INTEGER NOT NULL,
    tx_hash       TEXT,
    key_id        INTEGER,
    note          TEXT,
    created_at    INTEGER NOT NULL,
    CHECK (kind <> 'debit' OR balance_after >= 0),
    CHECK ((kind IN ('debit', 'reversal')) = (amount_atomic < 0) OR amount_atomic = 0)
);
INSERT INTO ledger_v6 (id, account, kind, amount_atomic, balance_after, tx_hash, key_id, note, created_at)
    SELECT id, account, kind, amount_atomic, balance_after, tx_hash, key_id, note, created_at FROM ledger;
DROP TABLE ledger;
ALTER TABLE ledger_v6 RENAME TO ledger;
CREATE INDEX ledger_account ON ledger (account, id);
CREATE INDEX ledger_tx_hash ON ledger (tx_hash) WHERE tx_hash IS NOT NULL;
CREATE TRIGGER ledger_append_only_update BEFORE UPDATE ON ledger
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER ledger_append_only_delete BEFORE DELETE ON ledger
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;

-- migration: 7 guarded money
-- Money rules held by the database itself, one guarded statement each, so that they hold under any number of
-- writers (one writer thread on SQLite; several gateway replicas on PostgreSQL), not by "read, then write":
-- * each account's balance is a column that changes only through `UPDATE accounts SET balance_atomic =
--   balance_atomic + delta WHERE address = ? AND balance_atomic + delta >= 0 RETURNING balance_atomic` (the guard is
--   left out only for the kinds that may take a balance below zero: a reorg's `reversal`); the ledger row written
--   with it carries that returned balance, and `audit verify` checks the column against the ledger;
-- * one live credit key per account is a unique index, not a check before the insert.
ALTER TABLE accounts ADD COLUMN balance_atomic INTEGER NOT NULL DEFAULT 0;
UPDATE accounts SET balance_atomic = coalesce(
    (SELECT l.balance_after FROM ledger l WHERE l.account = accounts.address ORDER BY l.id DESC LIMIT 1), 0);
CREATE UNIQUE INDEX api_keys_one_live_credit_key ON api_keys (account) WHERE kind = 'credit' AND revoked_at IS NULL;
-- * a block's seats are numbered slots (pool, block, seat_no) under a primary key: a claim takes a slot with one
--   guarded upsert that succeeds only if the slot is free or its holder has expired, so two concurrent claims can
--   never both take the last seat. `seats` stays the record of what each subscription holds.
CREATE TABLE seat_slots (
    pool            TEXT    NOT NULL,
    block           TEXT    NOT NULL,
    seat_no         INTEGER NOT NULL CHECK (seat_no >= 1),
    subscription_id INTEGER NOT NULL REFERENCES subscriptions (id),
    expires_at      INTEGER NOT NULL,
    PRIMARY KEY (pool, block, seat_no)
);
INSERT INTO seat_slots (pool, block, seat_no, subscription_id, expires_at)
    SELECT s.pool, s.block,
           (SELECT count(*) FROM seats e WHERE e.pool = s.pool AND e.block = s.block
              AND (e.subscription_id < s.subscription_id)) + 1,
           s.subscription_id, s.expires_at
    FROM seats s;

-- migration: 8 replica leases
-- Several gateway replicas on one database (PostgreSQL): each holds a lease it renews while it runs, and each of
-- its in-flight credit reservations names it. A replica that stops renewing (it crashed) loses its reservations to
-- the others' recovery, exactly once (each row is claimed by a guarded update that re-checks the lease); a live
-- replica's are never touched. A single SQLite process leaves `replica_id` NULL and recovers at start-up as before.
CREATE TABLE replica_leases (
    replica_id TEXT    PRIMARY KEY,
    expires_at INTEGER NOT NULL
);
ALTER TABLE usage ADD COLUMN replica_id TEXT;

-- migration: 9 request slots
-- Requests in flight per owner across replicas: a pool subscription serves one request at a time, a credit account
-- at most `[limits] credit_key_max_in_flight`, whichever replica receives them. A slot is a numbered row taken by
-- one guarded upsert (free, or held by a replica whose lease has expired) and released by its request. A single
-- SQLite process keeps its slots in memory and leaves this table empty.
CREATE TABLE request_slots (
    owner      TEXT    NOT NULL, -- subscription:<id> or account:<address>
    slot_no    INTEGER NOT NULL CHECK (slot_no >= 1),
    replica_id TEXT    NOT NULL,
    request_id TEXT    NOT NULL,
    PRIMARY KEY (owner, slot_no)
);

-- migration: 10 upto
-- Keyless pay-per-token payments (x402 `upto`, Permit2): one row per authorization, inserted after verification
-- and before the request is served. UNIQUE (payer, nonce) makes it single-use whatever happens on chain: a replay,
-- concurrent or later, on this replica or another, even of an authorization settled for zero, is refused.
-- status: serving → settling (the metered cost is known: prices and tokens recorded, cost ≤ max) → settled
-- (tx_hash; the `claims` row and the ledger's top-up + debit are written in the same transaction) | zero (nothing
-- billable: no transaction) | unsettled (settlement failed: the payer moved funds or revoked the allowance; its
-- `cost_atomic` is the operator's loss and the payer is refused until it is settled). `payment` is the payer's
-- PAYMENT-SIGNATURE (JSON) and `requirements` our offer, so a settlement can be retried and audited.
CREATE TABLE upto_payments (
    id                  INTEGER PRIMARY KEY,
    payer               TEXT    NOT NULL,
    nonce               TEXT    NOT NULL, -- the Permit2 nonce, 0x-hex (32 bytes)
    network             TEXT    NOT NULL, -- CAIP-2
    request_id          TEXT    NOT NULL,
    model               TEXT    NOT NULL,
    resource            TEXT    NOT NULL,
    max_atomic          INTEGER NOT NULL CHECK (max_atomic > 0),
    deadline            INTEGER NOT NULL,
    input_price_atomic  INTEGER NOT NULL,
    output_price_atomic INTEGER NOT NULL,
    prompt_tokens       INTEGER,
    completion_tokens   INTEGER,
    cost_atomic         INTEGER CHECK (cost_atomic >= 0 AND cost_atomic <= max_atomic),
    tx_hash             TEXT    UNIQUE,
    -- A settlement sent without a receipt (outcome unknown): the retrier reads its receipt before sending another.
    pending_tx          TEXT,
    status              TEXT    NOT NULL CHECK (status IN ('serving', 'settling', 'settled', 'zero', 'unsettled')),
    attempts            INTEGER NOT NULL DEFAULT 0,
    last_error          TEXT,
    payment             TEXT    NOT NULL,
    requirements        TEXT    NOT NULL,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    UNIQUE (payer, nonce)
);
CREATE INDEX upto_payments_open ON upto_payments (payer) WHERE status IN ('settling', 'unsettled');

-- migration: 11 networks
-- One gateway, several networks (`[[networks]]`): everything the indexer writes, and every claim and settlement, is
-- keyed by its network's CAIP-2 id (`eip155:8453`). A database made for one network is upgraded in place: its rows
-- take the network of its `chain_binding`, which then gives way to one binding per network.
-- A claim stays keyed by its transaction hash alone: an EVM transaction hash commits to its chain id (EIP-155), so
-- the same hash on two networks would be one replayable pre-EIP-155 transaction, which is credited once.
CREATE TABLE network_bindings (
    network       TEXT    PRIMARY KEY, -- CAIP-2
    chain_id      INTEGER NOT NULL,
    token_address TEXT    NOT NULL,
    pay_to        TEXT    NOT NULL,
    created_at    INTEGER NOT NULL
);
INSERT INTO network_bindings (network, chain_id, token_address, pay_to, created_at)
    SELECT 'eip155:' || chain_id, chain_id, token_address, pay_to, created_at FROM chain_binding;

-- The last block whose logs are fully written, per network.
CREATE TABLE network_checkpoints (
    network      TEXT    PRIMARY KEY,
    block_number INTEGER NOT NULL,
    block_hash   TEXT    NOT NULL,
    updated_at   INTEGER NOT NULL
);
INSERT INTO network_checkpoints (network, block_number, block_hash, updated_at)
    SELECT 'eip155:' || b.chain_id, c.block_number, c.block_hash, c.updated_at FROM checkpoint c, chain_binding b;

-- The recent window of canonical headers, per network (the block number alone no longer names a block).
CREATE TABLE recent_blocks_v11 (
    network     TEXT    NOT NULL,
    number      INTEGER NOT NULL,
    hash        TEXT    NOT NULL,
    parent_hash TEXT    NOT NULL,
    timestamp   INTEGER NOT NULL,
    PRIMARY KEY (network, number)
);
INSERT INTO recent_blocks_v11 (network, number, hash, parent_hash, timestamp)
    SELECT 'eip155:' || b.chain_id, r.number, r.hash, r.parent_hash, r.timestamp FROM recent_blocks r, chain_binding b;
DROP TABLE recent_blocks;
ALTER TABLE recent_blocks_v11 RENAME TO recent_blocks;
DROP TABLE checkpoint;

-- Every indexed transfer, handled reorg, claim and x402 settlement names its network.
ALTER TABLE transfers ADD COLUMN network TEXT NOT NULL DEFAULT '';
UPDATE transfers SET network = coalesce((SELECT 'eip155:' || chain_id FROM chain_binding), '');
CREATE INDEX transfers_network_tx ON transfers (network, tx_hash);
-- The token paid in (its address; a network may accept several, e.g. USDC and EURC) and the amount in that token's
-- own atomic units, as a decimal string (an 18-decimal token overflows 64 bits). `value_atomic` is what the payment
-- is credited at: its USD value in micro-units at the token's configured price (USDC: the same number).
ALTER TABLE transfers ADD COLUMN token TEXT NOT NULL DEFAULT '';
ALTER TABLE transfers ADD COLUMN token_value TEXT;
UPDATE transfers SET token = coalesce((SELECT token_address FROM chain_binding), ''),
    token_value = CAST(value_atomic AS TEXT);
CREATE INDEX transfers_network_status_block ON transfers (network, status, block_number);
ALTER TABLE reorgs ADD COLUMN network TEXT NOT NULL DEFAULT '';
UPDATE reorgs SET network = coalesce((SELECT 'eip155:' || chain_id FROM chain_binding), '');
ALTER TABLE claims ADD COLUMN network TEXT NOT NULL DEFAULT '';
UPDATE claims SET network = coalesce((SELECT 'eip155:' || chain_id FROM chain_binding), '');
ALTER TABLE x402_settlements ADD COLUMN network TEXT NOT NULL DEFAULT '';
UPDATE x402_settlements SET network = coalesce((SELECT 'eip155:' || chain_id FROM chain_binding), '');
DROP TABLE chain_binding;

-- migration: 12 console
-- What the operator's console reads per request: the API it came in on (`chat.completions`, `completions`,
-- `embeddings`, `responses`, `messages`), the deployment (upstream name) that answered, and the time to its response
-- headers.
-- NULL on rows from before this migration and on requests no deployment answered.
ALTER TABLE usage ADD COLUMN api TEXT;
ALTER TABLE usage ADD COLUMN deployment TEXT;
ALTER TABLE usage ADD COLUMN first_byte_ms INTEGER;
CREATE INDEX usage_started ON usage (started_at);
