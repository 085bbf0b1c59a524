//! Logging set-up: human-readable text by default or one JSON object per line, plus a small in-memory ring of
//! recent warnings and errors for the operator's status page (`/admin`).
//!
//! What is logged never includes API keys, private keys or tokens: keys are logged by public id, RPC URLs through
//! [`crate::config::redact_url`] (and RPC error texts scrubbed of their URLs' keys where they are made, see
//! [`crate::chain::redact`]), and request URIs (which may carry `?token=`) are not logged. Tests run the binary
//! through a claim, and through failing RPC endpoints at `debug`, and grep the whole log for the secrets.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// How many recent warnings and errors are kept.
const KEEP: usize = 50;

/// A warning or error as the status page shows it.
#[derive(Debug, Clone)]
pub struct RecentEvent {
    pub at: i64,
    pub level: &'static str,
    pub target: String,
    pub message: String,
}

static RECENT: Mutex<VecDeque<RecentEvent>> = Mutex::new(VecDeque::new());

/// The most recent warnings and errors, newest first.
pub fn recent_errors() -> Vec<RecentEvent> {
    match RECENT.lock() {
        Ok(q) => q.iter().rev().cloned().collect(),
        Err(p) => p.into_inner().iter().rev().cloned().collect(),
    }
}

/// Records one event by hand (tests, and code paths without tracing).
pub fn push_recent(level: &'static str, target: &str, message: String) {
    let mut q = match RECENT.lock() {
        Ok(q) => q,
        Err(p) => p.into_inner(),
    };
    if q.len() == KEEP {
        q.pop_front();
    }
    q.push_back(RecentEvent {
        at: crate::store::now_unix(),
        level,
        target: target.to_string(),
        message,
    });
}

/// A layer that keeps WARN and ERROR events in the ring.
pub struct RecentErrors;

struct MessageVisitor(String);

impl Visit for MessageVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
            // Put the message first, fields after.
            if let Some(rest) = self.0.strip_prefix(' ') {
                self.0 = rest.to_string();
            }
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.insert_str(0, value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for RecentErrors {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > Level::WARN {
            return;
        }
        crate::metrics::record_log_event(if level == Level::ERROR {
            "error"
        } else {
            "warn"
        });
        let mut v = MessageVisitor(String::new());
        event.record(&mut v);
        push_recent(
            if level == Level::ERROR {
                "ERROR"
            } else {
                "WARN"
            },
            event.metadata().target(),
            v.0.trim().to_string(),
        );
    }
}

/// Installs the global subscriber: `json` or text on stderr, filtered by `filter`, plus [`RecentErrors`].
pub fn init(json: bool, filter: &str) -> Result<(), String> {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| format!("invalid log filter: {e}"))?;
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(RecentErrors);
    let result = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    // Colour codes only for a person at a terminal, never in a file or a pipe.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr),
            )
            .try_init()
    };
    result.map_err(|e| e.to_string())
}
