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
