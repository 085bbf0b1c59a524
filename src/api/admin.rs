//! The operator's status page `/admin`: server-rendered HTML (no scripts, no build step) behind the admin token,
//! sent as `Authorization: Bearer <token>` or, from a browser, `?token=<token>` (nothing is stored; the page sets
//! `Referrer-Policy: no-referrer` so the token does not travel on).

use std::collections::HashMap;
use std::fmt::Write as _;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use super::AppState;
use super::audit::{bearer, token_matches};
use crate::audit;
use crate::billing::rfc3339;
use crate::store::StoreError;
use crate::usdc::Usdc;

pub fn router() -> Router<AppState> {
    Router::new().route("/admin", get(admin))
}

/// HTML-escapes text for element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"referrer\" content=\"no-referrer\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{}</title><style>{CSS}</style>\
         </head><body>{body}</body></html>",
        escape(title)
    );
    (
        status,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'",
            ),
        ],
        Html(html),
    )
        .into_response()
}

const CSS: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.4em}\
h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ccc}table{border-collapse:collapse}\
td,th{padding:.2em .7em;text-align:left;border-bottom:1px solid #eee}td.num{text-align:right;font-variant-numeric:tabular-nums}\
code{font-size:.9em}.bad{color:#b00}.ok{color:#070}";

async fn admin(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(expected) = state.settings.auth.admin_token.as_deref() else {
        // A switched-off feature is not an outage: 404, as for a path that is not served.
        return page(
            StatusCode::NOT_FOUND,
            "x402-gateway: status page off",
            "<h1>Status page off</h1><p>No admin token is configured: set <code>auth.admin_token_env</code> to the \
             name of an environment variable holding one.</p>",
        );
    };
    let presented = bearer(&headers).or(q.get("token").map(String::as_str));
    match presented {
        Some(t) if token_matches(t, expected) => {}
        _ => {
            let mut r = page(
                StatusCode::UNAUTHORIZED,
                "x402-gateway: admin token required",
                "<h1>Admin token required</h1><p>Send <code>Authorization: Bearer &lt;admin token&gt;</code>, or open \
                 <code>/admin?token=&lt;admin token&gt;</code>.</p>",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"x402-gateway admin\""),
            );
            return r;
        }
    }
    match render(&state).await {
        Ok(body) => page(StatusCode::OK, "x402-gateway status", &body),
        Err(e) => {
            tracing::error!(error = %e, "status page failed");
            page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "x402-gateway: error",
                "<h1>Error</h1><p>The status page could not read the database; see the logs.</p>",
            )
        }
    }
}

struct Data {
    payments: Vec<serde_json::Value>,
    revenue: Vec<serde_json::Value>,
    total_claimed: i64,
    total_received: i64,
    seats: Vec<(String, String, u32)>,
    keys: Vec<serde_json::Value>,
    key_counts: Vec<(String, String, i64)>,
    reorgs: i64,
}

async fn render(state: &AppState) -> Result<String, StoreError> {
    let now = state.billing.now();
    let overview = state.store.admin_overview(now).await?;
    let data = Data {
        // Newest first on the page; the store reads oldest first.
        payments: audit::payments_json(&overview.latest_payments)
            .into_iter()
            .rev()
            .map(|(_, v)| v)
            .collect(),
        revenue: overview
            .revenue
            .iter()
            .rev()
            .map(audit::revenue_json)
            .collect(),
        total_claimed: overview.total_claimed_atomic,
        total_received: overview.total_received_atomic,
        seats: overview
            .seats
            .into_iter()
            .map(|s| (s.pool, s.block, s.taken))
            .collect(),
        keys: overview
            .latest_keys
            .iter()
            .rev()
            .map(|k| audit::key_json(k, now))
            .collect(),
        key_counts: overview
            .key_counts
            .into_iter()
            .map(|k| (k.kind, k.state, k.count))
            .collect(),
        reorgs: overview.reorgs,
    };

    let s = state.indexer.snapshot();
    let settings = &state.settings;
    let mut h = String::new();
    let opt = |v: Option<u64>| v.map(|n| n.to_string()).unwrap_or_else(|| "—".into());
    let _ = write!(
        h,
        "<h1>x402-gateway status</h1><p>chain {} · payTo <code>{:#x}</code> · generated {}</p>",
        settings.chain.network.chain_id,
        settings.chain.pay_to,
        escape(&rfc3339(now))
    );

    // Indexer.
    let (state_class, state_text) = match (&s.fatal, s.lag()) {
        (Some(_), _) => ("bad", "stopped".to_string()),
        (None, Some(lag)) if lag > settings.ready_max_lag_blocks => {
            ("bad", format!("lagging ({lag} blocks)"))
        }
        (None, Some(_)) => ("ok", "running".to_string()),
        (None, None) => ("bad", "starting".to_string()),
    };
    let _ = write!(
        h,
        "<h2 id=\"indexer\">Indexer</h2><table>\
         <tr><th>State</th><td id=\"indexer-state\" class=\"{state_class}\">{}</td></tr>\
         <tr><th>Indexed head</th><td id=\"indexed-head\" class=\"num\">{}</td></tr>\
         <tr><th>Chain head</th><td id=\"chain-head\" class=\"num\">{}</td></tr>\
         <tr><th>Lag (blocks)</th><td id=\"lag\" class=\"num\">{}</td></tr>\
         <tr><th>Confirmations required</th><td class=\"num\">{}</td></tr>\
         <tr><th>Reorgs handled</th><td class=\"num\">{}</td></tr>\
         <tr><th>RPC errors since start</th><td class=\"num\">{}</td></tr>\
         <tr><th>WebSocket</th><td>{}</td></tr>",
        escape(&state_text),
        opt(s.indexed_head),
        opt(s.chain_head),
        opt(s.lag()),
        settings.chain.confirmations,
        data.reorgs,
        s.rpc_errors,
        if s.ws_connected {
            "connected"
        } else {
            "not connected"
        },
    );
    if let Some(e) = &s.last_error {
        let _ = write!(
            h,
            "<tr><th>Last error</th><td class=\"bad\">{}</td></tr>",
            escape(e)
        );
    }
    if let Some(e) = &s.fatal {
        let _ = write!(
            h,
            "<tr><th>Stopped by</th><td class=\"bad\">{}</td></tr>",
            escape(e)
        );
    }
    h.push_str("</table>");

    // Every network agents may pay on, each with its own indexer (the table above is the first network's).
    h.push_str(
        "<h2 id=\"networks\">Networks</h2><table id=\"networks-table\"><tr><th>Network</th><th>Chain id</th>\
         <th>payTo</th><th>Token</th><th>State</th><th>Indexed head</th><th>Chain head</th><th>Lag</th>\
         <th>Confirmations</th><th>Reorgs</th><th>RPC errors</th></tr>",
    );
    for chain in settings.networks() {
        let id = chain.network.caip2();
        let n = state
            .indexers
            .get(&id)
            .map(|h| h.snapshot())
            .unwrap_or_default();
        let (class, text) = match (&n.fatal, n.lag()) {
            (Some(_), _) => ("bad", "stopped".to_string()),
            (None, Some(lag)) if lag > chain.ready_max_lag_blocks => {
                ("bad", format!("lagging ({lag} blocks)"))
            }
            (None, Some(_)) => ("ok", "running".to_string()),
            (None, None) if n.follower => ("ok", "follower".to_string()),
            (None, None) => ("bad", "starting".to_string()),
        };
        let _ = write!(
            h,
            "<tr data-network=\"{}\"><td>{} <code>{}</code></td><td class=\"num\">{}</td><td><code>{:#x}</code></td>\
             <td><code>{:#x}</code></td><td class=\"{class}\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            escape(&id),
            escape(&chain.network.name),
            escape(&id),
            chain.network.chain_id,
            chain.pay_to,
            chain.network.token,
            escape(&text),
            opt(n.indexed_head),
            opt(n.chain_head),
            opt(n.lag()),
            chain.confirmations,
            n.reorgs,
            n.rpc_errors,
        );
    }
    h.push_str("</table>");

    // Deployments: where each model is served, and whether it is in rotation.
    h.push_str("<h2 id=\"deployments\">Deployments</h2><table id=\"deployments-table\"><tr><th>Model</th><th>Upstream</th>\
        <th>Weight</th><th>State</th><th>In flight</th><th>Answered</th><th>Failures</th><th>Cooldowns</th>\
        <th>First byte (ms, smoothed)</th></tr>");
    for d in state.proxy.router().status(std::time::Instant::now()) {
        let (class, health) = if d.healthy {
            ("ok", "healthy".to_string())
        } else {
            (
                "bad",
                format!("cooling down ({} s left)", d.cooldown_remaining_secs),
            )
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"{class}\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            escape(&d.model),
            escape(&d.upstream),
            d.weight,
            escape(&health),
            d.in_flight,
            d.answered,
            d.failures,
            d.cooldowns,
            d.latency_ms
                .map_or("–".to_string(), |ms| format!("{ms:.1}")),
        );
    }
    h.push_str("</table>");

    // Payments.
    let _ = write!(h, "<h2 id=\"payments\">Recent payments</h2>");
    if data.payments.is_empty() {
        h.push_str("<p>No payments indexed yet.</p>");
    } else {
        h.push_str(
            "<table><tr><th>Transaction</th><th>Block</th><th>From</th><th>USDC</th><th>Status</th>\
             <th>Confirmations</th><th>Claimed</th></tr>",
        );
        for p in &data.payments {
            let s = |k: &str| escape(p[k].as_str().unwrap_or(""));
            let n = |k: &str| p[k].as_i64().unwrap_or(0);
            let _ = write!(
                h,
                "<tr class=\"payment\"><td><code>{}</code></td><td class=\"num\">{}</td><td><code>{}</code></td>\
                 <td class=\"num\">{}</td><td>{}</td><td class=\"num confirmations\">{} / {}</td><td>{}</td></tr>",
                s("txHash"),
                n("blockNumber"),
                s("from"),
                s("valueUsdc"),
                s("status"),
                n("confirmations"),
                settings.chain.confirmations,
                if p["claimed"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "no"
                },
            );
        }
        h.push_str("</table>");
    }

    // Revenue.
    let _ = write!(
        h,
        "<h2 id=\"revenue\">Revenue</h2><p>Confirmed payments received: <b id=\"received-total\">{} USDC</b>; \
         claimed as products: <b id=\"claimed-total\">{} USDC</b>.</p>",
        Usdc(data.total_received),
        Usdc(data.total_claimed)
    );
    if !data.revenue.is_empty() {
        h.push_str(
            "<table><tr><th>Day (UTC)</th><th>Received</th><th>Payments</th><th>Claims</th>\
             <th>Subscriptions</th><th>Top-ups</th><th>Surplus</th></tr>",
        );
        for r in &data.revenue {
            let s = |k: &str| escape(r[k].as_str().unwrap_or(""));
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                s("day"),
                s("receivedUsdc"),
                r["payments"],
                r["claims"],
                s("subscriptionsUsdc"),
                s("topupsUsdc"),
                s("surplusUsdc"),
            );
        }
        h.push_str("</table>");
    }

    // Seats.
    h.push_str("<h2 id=\"seats\">Seats</h2>");
    if settings.pools.is_empty() {
        h.push_str("<p>No pools configured.</p>");
    } else {
        h.push_str("<table><tr><th>Pool</th><th>Block</th><th>Hours (UTC)</th><th>Taken</th><th>Seats</th><th>Available</th></tr>");
        for pool in &settings.pools {
            for b in &pool.blocks {
                let taken = data
                    .seats
                    .iter()
                    .find(|(p, bl, _)| *p == pool.slug && *bl == b.name)
                    .map(|(_, _, n)| *n)
                    .unwrap_or(0);
                let _ = write!(
                    h,
                    "<tr class=\"seat\"><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{taken}</td>\
                     <td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                    escape(&pool.slug),
                    escape(&b.name),
                    escape(&b.hours()),
                    b.seats,
                    b.seats.saturating_sub(taken)
                );
            }
        }
        h.push_str("</table>");
    }

    // Keys.
    h.push_str("<h2 id=\"keys\">Keys</h2>");
    if data.key_counts.is_empty() {
        h.push_str("<p>No keys issued yet.</p>");
    } else {
        h.push_str("<p>");
        let parts: Vec<String> = data
            .key_counts
            .iter()
            .map(|(k, s, n)| format!("{n} {} {}", escape(s), escape(k)))
            .collect();
        h.push_str(&parts.join(" · "));
        h.push_str("</p><table><tr><th>Public id</th><th>Kind</th><th>State</th><th>Account</th><th>Pool / blocks</th><th>Expires</th><th>Created</th></tr>");
        for k in &data.keys {
            let s = |key: &str| escape(k[key].as_str().unwrap_or(""));
            let blocks = k["blocks"]
                .as_array()
                .map(|b| {
                    b.iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let _ = write!(
                h,
                "<tr><td><code>sk-{}-…</code></td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{} {}</td>\
                 <td>{}</td><td>{}</td></tr>",
                s("publicId"),
                s("kind"),
                s("state"),
                s("account"),
                s("pool"),
                escape(&blocks),
                s("expiresAt"),
                s("createdAt"),
            );
        }
        h.push_str("</table>");
    }

    // Recent errors.
    h.push_str("<h2 id=\"errors\">Recent errors</h2>");
    let errors = crate::logs::recent_errors();
    if errors.is_empty() {
        h.push_str("<p>No warnings or errors since start.</p>");
    } else {
        h.push_str("<table><tr><th>Time</th><th>Level</th><th>Where</th><th>Message</th></tr>");
        for e in errors.iter().take(20) {
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"bad\">{}</td><td>{}</td><td>{}</td></tr>",
                escape(&rfc3339(e.at)),
                e.level,
                escape(&e.target),
                escape(&e.message)
            );
        }
        h.push_str("</table>");
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_html() {
        assert_eq!(
            super::escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
