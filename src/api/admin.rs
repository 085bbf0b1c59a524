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
    Router::new()
        .route("/admin", get(admin))
        .route("/api/admin/summary", get(summary))
}

/// A bar chart of one value per day, as inline SVG (no script, no external asset; prints as drawn). Each bar has
/// its figure as a tooltip, and the chart its total in the title.
fn bar_chart(id: &str, title: &str, bars: &[(String, i64, String)], total: &str) -> String {
    let (w, h, pad) = (600.0_f64, 120.0_f64, 18.0_f64);
    let max = bars.iter().map(|b| b.1).max().unwrap_or(0).max(1) as f64;
    let n = bars.len().max(1) as f64;
    let slot = (w - 2.0 * pad) / n;
    let mut svg = format!(
        "<figure class=\"chart\" id=\"{id}\"><figcaption>{} <b class=\"num\">{}</b></figcaption>\
         <svg viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"{}\" preserveAspectRatio=\"none\">\
         <line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#999\"/>",
        escape(title),
        escape(total),
        escape(title),
        h - pad,
        w - pad,
        h - pad
    );
    for (i, (label, value, text)) in bars.iter().enumerate() {
        let bh = ((*value).max(0) as f64 / max) * (h - 2.0 * pad);
        let x = pad + i as f64 * slot + slot * 0.1;
        let _ = write!(
            svg,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"#3b6ea5\" data-value=\"{}\">\
             <title>{}: {}</title></rect>",
            h - pad - bh,
            slot * 0.8,
            escape(text),
            escape(label),
            escape(text)
        );
    }
    if let (Some(first), Some(last)) = (bars.first(), bars.last()) {
        let _ = write!(
            svg,
            "<text x=\"{pad}\" y=\"{}\" font-size=\"11\">{}</text><text x=\"{}\" y=\"{}\" font-size=\"11\" \
             text-anchor=\"end\">{}</text>",
            h - 4.0,
            escape(&first.0),
            w - pad,
            h - 4.0,
            escape(&last.0)
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

/// The console's overview, inference, payments and health sections (the figures of `/api/admin/summary`).
async fn console(
    state: &AppState,
    range: Range,
    refresh: bool,
    token_in_url: bool,
) -> Result<String, StoreError> {
    let v = summary_json(state, range).await?;
    let mut h = String::new();
    // Links keep the other choice. They never carry the admin token (the page holds no secret): a browser that
    // opened `?token=` adds it again, a client sending `Authorization` follows them as they are.
    let link = |r: Range, refresh: bool| {
        format!(
            "?range={}{}",
            r.as_str(),
            if refresh { "" } else { "&amp;refresh=0" },
        )
    };
    if token_in_url {
        h.push_str(
            "<p class=\"hint\">Opened with <code>?token=</code>: add it again to a link below, or send \
             <code>Authorization: Bearer</code> instead.</p>",
        );
    }
    h.push_str("<nav id=\"range\">Range: ");
    for r in [Range::Today, Range::Days7, Range::Days30] {
        if r == range {
            let _ = write!(h, "<b>{}</b> ", r.as_str());
        } else {
            let _ = write!(h, "<a href=\"{}\">{}</a> ", link(r, refresh), r.as_str());
        }
    }
    let _ = write!(
        h,
        "· auto-refresh {} (<a href=\"{}\">{}</a>) · {} to {}</nav>",
        if refresh { "every 30 s" } else { "off" },
        link(range, !refresh),
        if refresh { "turn off" } else { "turn on" },
        escape(v["from"].as_str().unwrap_or_default()),
        escape(v["to"].as_str().unwrap_or_default()),
    );
    let t = &v["totals"];
    let text = |x: &serde_json::Value| match x {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    h.push_str("<h2 id=\"overview\">Overview</h2><table id=\"totals\">");
    for (key, label) in [
        ("receivedUsdc", "Received (USDC, confirmed payments)"),
        ("earnedUsdc", "Earned (USDC sold)"),
        ("creditsSpentUsdc", "of which credits spent"),
        ("poolSoldUsdc", "of which pool blocks sold"),
        ("perRequestUsdc", "of which x402 per request"),
        ("uptoUsdc", "of which x402 upto"),
        ("requests", "Requests"),
        ("promptTokens", "Tokens in"),
        ("completionTokens", "Tokens out"),
        ("errors", "Errors"),
        ("activeKeys", "Active keys"),
        ("reversedUsdc", "Reversed by reorgs (USDC)"),
    ] {
        let _ = write!(
            h,
            "<tr><th>{label}</th><td class=\"num\" data-key=\"{key}\">{}</td></tr>",
            escape(&text(&t[key]))
        );
    }
    h.push_str("</table><div class=\"charts\">");
    let days = v["days"].as_array().cloned().unwrap_or_default();
    let atomic = |s: &str| s.parse::<Usdc>().map(|u| u.atomic()).unwrap_or(0);
    for (id, title, key, money) in [
        ("chart-received", "Received per day", "receivedUsdc", true),
        ("chart-earned", "Earned per day", "earnedUsdc", true),
        ("chart-requests", "Requests per day", "requests", false),
        (
            "chart-tokens",
            "Tokens out per day",
            "completionTokens",
            false,
        ),
    ] {
        let bars: Vec<(String, i64, String)> = days
            .iter()
            .map(|d| {
                let label = d["day"].as_str().unwrap_or_default().to_string();
                let (value, shown) = if money {
                    let s = d[key].as_str().unwrap_or("0").to_string();
                    (atomic(&s), s)
                } else {
                    let n = d[key].as_i64().unwrap_or(0);
                    (n, n.to_string())
                };
                (label, value, shown)
            })
            .collect();
        h.push_str(&bar_chart(id, title, &bars, &text(&t[key])));
    }
    h.push_str("</div>");

    h.push_str(
        "<h2 id=\"inference\">Inference</h2><div class=\"scroll\"><table id=\"models-table\"><tr><th>Model</th><th>Requests</th>\
         <th>Tokens in</th><th>Tokens out</th><th>Spend (USDC)</th><th>Errors</th><th>Error rate</th><th>p50 ms</th>\
         <th>p95 ms</th><th>First byte p50 ms</th><th>First byte p95 ms</th><th>Overrun tokens</th></tr>",
    );
    for m in v["models"].as_array().cloned().unwrap_or_default() {
        let _ = write!(
            h,
            "<tr data-model=\"{}\"><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{:.1}%</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            escape(&text(&m["model"])),
            escape(&text(&m["model"])),
            text(&m["requests"]),
            text(&m["promptTokens"]),
            text(&m["completionTokens"]),
            escape(&text(&m["spendUsdc"])),
            text(&m["errors"]),
            m["errorRate"].as_f64().unwrap_or(0.0) * 100.0,
            m["p50Ms"].as_i64().map_or("—".into(), |n| n.to_string()),
            m["p95Ms"].as_i64().map_or("—".into(), |n| n.to_string()),
            m["ttfbP50Ms"]
                .as_i64()
                .map_or("—".into(), |n| n.to_string()),
            m["ttfbP95Ms"]
                .as_i64()
                .map_or("—".into(), |n| n.to_string()),
            text(&m["overrunTokens"]),
        );
    }
    h.push_str(
        "</table></div><h3>Per deployment</h3><div class=\"scroll\"><table id=\"deployment-requests-table\"><tr><th>Model</th><th>Deployment</th>\
         <th>Requests</th><th>Errors</th><th>Error rate</th><th>p50 ms</th><th>p95 ms</th><th>First byte p50 ms</th>\
         <th>First byte p95 ms</th></tr>",
    );
    let ms = |x: &serde_json::Value| x.as_i64().map_or("—".into(), |n| n.to_string());
    for d in v["deploymentRequests"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{:.1}%</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            escape(&text(&d["model"])),
            escape(&text(&d["deployment"])),
            text(&d["requests"]),
            text(&d["errors"]),
            d["errorRate"].as_f64().unwrap_or(0.0) * 100.0,
            ms(&d["p50Ms"]),
            ms(&d["p95Ms"]),
            ms(&d["ttfbP50Ms"]),
            ms(&d["ttfbP95Ms"]),
        );
    }
    h.push_str("</table></div><h3>Top accounts by spend</h3><table id=\"accounts-table\"><tr><th>Account</th><th>Spend (USDC)</th><th>Requests</th></tr>");
    for a in v["topAccounts"].as_array().cloned().unwrap_or_default() {
        let _ = write!(
            h,
            "<tr><td><code>{}</code></td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            escape(&text(&a["account"])),
            escape(&text(&a["spendUsdc"])),
            text(&a["requests"])
        );
    }
    h.push_str(
        "</table><h2 id=\"payments-by-network\">Payments by network</h2><div class=\"scroll\"><table id=\"payments-table\"><tr><th>Network</th>\
         <th>Confirmed</th><th>Received (USDC)</th><th>Pending</th><th>Orphaned</th><th>Claims</th><th>x402 settled</th>\
         <th>x402 failed</th><th>upto settled</th><th>upto unsettled</th><th>upto owed (USDC)</th><th>Reorgs</th>\
         <th>Reversed (USDC)</th><th>Restored (USDC)</th><th>Still reversed (USDC)</th></tr>",
    );
    for p in v["networks"].as_array().cloned().unwrap_or_default() {
        let _ = write!(
            h,
            "<tr data-network=\"{}\"><td>{}</td>",
            escape(&text(&p["network"])),
            escape(&text(&p["network"]))
        );
        for key in [
            "confirmedTransfers",
            "receivedUsdc",
            "pendingTransfers",
            "orphanedTransfers",
            "claims",
            "x402Settled",
            "x402Failed",
            "uptoSettled",
            "uptoUnsettled",
            "uptoOwedUsdc",
            "reorgs",
            "reversedUsdc",
            "restoredUsdc",
            "stillReversedUsdc",
        ] {
            let _ = write!(h, "<td class=\"num\">{}</td>", escape(&text(&p[key])));
        }
        h.push_str("</tr>");
    }
    h.push_str("</table></div>");
    for p in v["networks"].as_array().cloned().unwrap_or_default() {
        network_detail(&mut h, state, &p);
    }
    health(&mut h, &v);
    Ok(h)
}

/// `0x1234…abcd`: a hash or address short enough for a table cell (the whole one is its tooltip).
fn short(s: &str) -> String {
    if s.len() > 14 && s.is_ascii() {
        format!("{}…{}", &s[..6], &s[s.len() - 4..])
    } else {
        s.to_string()
    }
}

/// A `<code>` cell with a shortened hash and the whole one as its tooltip.
fn hash_cell(v: &serde_json::Value) -> String {
    match v.as_str() {
        Some(s) => format!(
            "<td><code title=\"{}\">{}</code></td>",
            escape(s),
            escape(&short(s))
        ),
        None => "<td>—</td>".into(),
    }
}

/// The text of a JSON value: a string as it is, anything else as JSON (`null` as a dash).
fn plain(x: &serde_json::Value) -> String {
    match x {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "—".into(),
        other => other.to_string(),
    }
}

/// One network's recent transfers, claims, x402 settlements and reorgs (from the summary's `networks[]` entry).
fn network_detail(h: &mut String, state: &AppState, p: &serde_json::Value) {
    let network = plain(&p["network"]);
    let required = state
        .settings
        .networks()
        .find(|n| n.network.caip2() == network)
        .map(|n| n.confirmations.to_string())
        .unwrap_or_else(|| "—".into());
    let name = state
        .settings
        .networks()
        .find(|n| n.network.caip2() == network)
        .map(|n| n.network.name.clone())
        .or_else(|| state.settings.svm_network(&network).map(|n| n.name.clone()))
        .unwrap_or_default();
    let list = |key: &str| p[key].as_array().cloned().unwrap_or_default();
    let _ = write!(
        h,
        "<section class=\"network-detail\" data-network=\"{}\"><h3>{} <code>{}</code></h3>",
        escape(&network),
        escape(&name),
        escape(&network)
    );
    h.push_str("<h4>Recent transfers</h4>");
    let transfers = list("recentTransfers");
    if transfers.is_empty() {
        h.push_str("<p>None yet.</p>");
    } else {
        h.push_str(
            "<div class=\"scroll\"><table class=\"recent-transfers\"><tr><th>Transaction</th><th>Block</th>\
             <th>From</th><th>USDC</th><th>Status</th><th>Confirmations</th><th>Claimed</th><th>Time (UTC)</th></tr>",
        );
        for t in transfers {
            let _ = write!(
                h,
                "<tr class=\"transfer {}\">{}<td class=\"num\">{}</td>{}<td class=\"num\">{}</td><td>{}</td>\
                 <td class=\"num\">{} / {}</td><td>{}</td><td>{}</td></tr>",
                escape(&plain(&t["status"])),
                hash_cell(&t["txHash"]),
                plain(&t["blockNumber"]),
                hash_cell(&t["from"]),
                escape(&plain(&t["valueUsdc"])),
                escape(&plain(&t["status"])),
                plain(&t["confirmations"]),
                escape(&required),
                if t["claimed"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "no"
                },
                escape(&plain(&t["at"])),
            );
        }
        h.push_str("</table></div>");
    }
    h.push_str("<h4>Recent claims</h4>");
    let claims = list("recentClaims");
    if claims.is_empty() {
        h.push_str("<p>None yet.</p>");
    } else {
        h.push_str(
            "<div class=\"scroll\"><table class=\"recent-claims\"><tr><th>Transaction</th><th>Account</th>\
             <th>Kind</th><th>Paid (USDC)</th><th>State</th><th>Claimed (UTC)</th></tr>",
        );
        for c in claims {
            let reversed = c["reversed"].as_bool() == Some(true);
            let _ = write!(
                h,
                "<tr class=\"claim\">{}{}<td>{}</td><td class=\"num\">{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
                hash_cell(&c["txHash"]),
                hash_cell(&c["account"]),
                escape(&plain(&c["kind"])),
                escape(&plain(&c["paidUsdc"])),
                if reversed { "bad" } else { "ok" },
                if reversed { "reversed" } else { "standing" },
                escape(&plain(&c["claimedAt"])),
            );
        }
        h.push_str("</table></div>");
    }
    h.push_str("<h4>Recent x402 settlements</h4>");
    let settlements = list("recentSettlements");
    if settlements.is_empty() {
        h.push_str("<p>None yet.</p>");
    } else {
        h.push_str(
            "<div class=\"scroll\"><table class=\"recent-settlements\"><tr><th>Scheme</th><th>Transaction</th>\
             <th>Payer</th><th>For</th><th>USDC</th><th>State</th><th>Updated (UTC)</th></tr>",
        );
        for x in settlements {
            let status = plain(&x["status"]);
            let class = match status.as_str() {
                "settled" | "zero" => "ok",
                "failed" | "unsettled" => "bad",
                _ => "",
            };
            let _ = write!(
                h,
                "<tr class=\"settlement\"><td>{}</td>{}{}<td>{}</td><td class=\"num\">{}</td><td class=\"{class}\">{}</td>\
                 <td>{}</td></tr>",
                escape(&plain(&x["scheme"])),
                hash_cell(&x["txHash"]),
                hash_cell(&x["payer"]),
                escape(&plain(&x["what"])),
                escape(&plain(&x["amountUsdc"])),
                escape(&status),
                escape(&plain(&x["at"])),
            );
        }
        h.push_str("</table></div>");
    }
    h.push_str("<h4>Reorgs handled</h4>");
    let reorgs = list("recentReorgs");
    if reorgs.is_empty() {
        h.push_str("<p>None.</p>");
    } else {
        h.push_str(
            "<div class=\"scroll\"><table class=\"recent-reorgs\"><tr><th>Detected (UTC)</th><th>Fork block</th>\
             <th>Old head</th><th>Depth</th><th>Orphaned transfers</th></tr>",
        );
        for r in reorgs {
            let _ = write!(
                h,
                "<tr class=\"reorg\"><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                escape(&plain(&r["detectedAt"])),
                plain(&r["forkBlock"]),
                plain(&r["oldHead"]),
                plain(&r["depth"]),
                plain(&r["orphanedTransfers"]),
            );
        }
        h.push_str("</table></div>");
    }
    h.push_str("</section>");
}

/// The health section: indexer lag, RPC errors and failovers per network, upstreams, the database, warnings.
fn health(h: &mut String, v: &serde_json::Value) {
    let health = &v["health"];
    h.push_str(
        "<h2 id=\"health\">Health</h2><div class=\"scroll\"><table id=\"health-networks\"><tr><th>Network</th>\
         <th>Indexer</th><th>Indexed head</th><th>Chain head</th><th>Lag (blocks)</th><th>RPC endpoints</th>\
         <th>RPC errors</th><th>RPC failovers</th><th>WebSocket</th></tr>",
    );
    for n in health["networks"].as_array().cloned().unwrap_or_default() {
        let st = plain(&n["state"]);
        let class = if st == "running" || st == "follower" {
            "ok"
        } else {
            "bad"
        };
        let _ = write!(
            h,
            "<tr data-network=\"{}\"><td><code>{}</code></td><td class=\"{class}\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td>{}</td></tr>",
            escape(&plain(&n["network"])),
            escape(&plain(&n["network"])),
            escape(&st),
            plain(&n["indexedHead"]),
            plain(&n["chainHead"]),
            plain(&n["lag"]),
            plain(&n["rpcEndpoints"]),
            plain(&n["rpcErrors"]),
            plain(&n["rpcFailovers"]),
            if n["wsConnected"].as_bool() == Some(true) {
                "connected"
            } else {
                "not connected"
            },
        );
    }
    let up = &health["upstreams"];
    let cooling = up["coolingDown"].as_array().cloned().unwrap_or_default();
    let _ = write!(
        h,
        "</table></div><p id=\"upstream-health\">Upstreams: <b class=\"{}\">{} of {}</b> deployments in rotation",
        if cooling.is_empty() { "ok" } else { "bad" },
        plain(&up["healthy"]),
        plain(&up["deployments"]),
    );
    if !cooling.is_empty() {
        h.push_str("; cooling down: ");
        let parts: Vec<String> = cooling
            .iter()
            .map(|c| {
                format!(
                    "{} on {} ({} s left)",
                    escape(&plain(&c["model"])),
                    escape(&plain(&c["upstream"])),
                    plain(&c["secondsLeft"])
                )
            })
            .collect();
        h.push_str(&parts.join(", "));
    }
    h.push_str(".</p>");
    let db = &v["database"];
    let _ = write!(
        h,
        "<p id=\"database\">Database: {}{}",
        escape(&plain(&db["engine"])),
        db["sizeBytes"]
            .as_u64()
            .map(|b| format!(", {:.1} MiB", b as f64 / 1_048_576.0))
            .unwrap_or_default()
    );
    if let Some(replicas) = db["replicas"].as_array() {
        let _ = write!(
            h,
            "; this replica <code>{}</code>; {} live replica{}: ",
            escape(&plain(&db["replica"])),
            replicas.len(),
            if replicas.len() == 1 { "" } else { "s" }
        );
        let parts: Vec<String> = replicas
            .iter()
            .map(|r| {
                format!(
                    "<code>{}</code>{}",
                    escape(&plain(&r["replicaId"])),
                    if r["leader"].as_bool() == Some(true) {
                        " (indexer leader)"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        h.push_str(&parts.join(", "));
        if db["leader"].is_null() {
            h.push_str("; <span class=\"bad\">no indexer leader</span>");
        }
    }
    h.push_str("</p><h3 id=\"warnings\">Recent warnings</h3>");
    let warnings = health["warnings"].as_array().cloned().unwrap_or_default();
    if warnings.is_empty() {
        h.push_str("<p>No warnings or errors since start.</p>");
    } else {
        h.push_str(
            "<div class=\"scroll\"><table id=\"warnings-table\"><tr><th>Time (UTC)</th><th>Level</th><th>Where</th>\
             <th>Message</th></tr>",
        );
        for w in warnings {
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"bad\">{}</td><td>{}</td><td class=\"msg\">{}</td></tr>",
                escape(&plain(&w["at"])),
                escape(&plain(&w["level"])),
                escape(&plain(&w["target"])),
                escape(&plain(&w["message"])),
            );
        }
        h.push_str("</table></div>");
    }
}

/// How many of the latest warnings and errors the console shows.
const WARNINGS_SHOWN: usize = 20;

/// The secrets of every configured RPC URL (HTTP and WebSocket), to scrub from texts the console shows.
fn rpc_secrets(state: &AppState) -> crate::chain::redact::UrlSecrets {
    let urls: Vec<&str> = state
        .settings
        .networks()
        .flat_map(|n| {
            n.rpc_http
                .iter()
                .map(String::as_str)
                .chain(n.rpc_ws.as_deref())
        })
        .chain(
            state
                .settings
                .svm_networks
                .iter()
                .flat_map(|n| n.rpc_http.iter().map(String::as_str)),
        )
        .collect();
    crate::chain::redact::UrlSecrets::new(urls)
}

/// An indexer's state in a word: `running`, `lagging`, `stopped`, `follower` or `starting`.
fn indexer_state(s: &crate::chain::IndexerStatus, max_lag: u64) -> &'static str {
    match (&s.fatal, s.lag()) {
        (Some(_), _) => "stopped",
        (None, Some(lag)) if lag > max_lag => "lagging",
        (None, Some(_)) => "running",
        (None, None) if s.follower => "follower",
        (None, None) => "starting",
    }
}

/// The console's time ranges: today (UTC), the last 7 or 30 UTC days (today included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    Today,
    Days7,
    Days30,
}

impl Range {
    pub fn parse(s: Option<&str>) -> Option<Range> {
        match s.unwrap_or("today") {
            "today" | "1d" => Some(Range::Today),
            "7d" => Some(Range::Days7),
            "30d" => Some(Range::Days30),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Range::Today => "today",
            Range::Days7 => "7d",
            Range::Days30 => "30d",
        }
    }

    /// `[from, to)` in unix seconds at `now`: whole UTC days, the last one today's.
    pub fn bounds(self, now: i64) -> (i64, i64) {
        let days = match self {
            Range::Today => 1,
            Range::Days7 => 7,
            Range::Days30 => 30,
        };
        let today = now.div_euclid(86_400) * 86_400;
        (today - (days - 1) * 86_400, today + 86_400)
    }
}

/// `Ok` when the request carries the admin token; else the answer to send (404 when no admin token is set, as for
/// a path that is not served; 401 otherwise).
fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
) -> Result<(), Box<Response>> {
    let Some(expected) = state.settings.auth.admin_token.as_deref() else {
        return Err(Box::new(page(
            StatusCode::NOT_FOUND,
            "x402-gateway: status page off",
            "<h1>Status page off</h1><p>No admin token is configured: set <code>auth.admin_token_env</code> to the \
             name of an environment variable holding one.</p>",
        )));
    };
    let presented = bearer(headers).or(q.get("token").map(String::as_str));
    match presented {
        Some(t) if token_matches(t, expected) => Ok(()),
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
            Err(Box::new(r))
        }
    }
}

/// The console's figures of `range` as JSON (see `store::summary`), with every network's indexer, the deployments
/// and the database: what `/admin` shows, for scripts.
pub async fn summary_json(state: &AppState, range: Range) -> Result<serde_json::Value, StoreError> {
    use serde_json::json;
    let now = state.billing.now();
    let (from, to) = range.bounds(now);
    let networks: Vec<String> = state
        .settings
        .networks()
        .map(|n| n.network.caip2())
        .chain(state.settings.svm_networks.iter().map(|n| n.caip2.clone()))
        .collect();
    let s = state.store.admin_summary(from, to, networks).await?;
    // Every configured RPC URL's path, query and credentials, scrubbed from any error text shown.
    let secrets = rpc_secrets(state);
    let money = |atomic: i64| Usdc(atomic).to_string();
    let days: Vec<serde_json::Value> = s
        .days
        .iter()
        .map(|d| {
            json!({
                "day": d.day,
                "receivedUsdc": money(d.received_atomic),
                "receivedByNetwork": d.received_by_network.iter().map(|(n, v)| (n.clone(), json!(money(*v)))).collect::<serde_json::Map<_, _>>(),
                "earnedUsdc": money(d.earned_atomic()),
                "creditsSpentUsdc": money(d.credits_spent_atomic),
                "poolSoldUsdc": money(d.pool_sold_atomic),
                "perRequestUsdc": money(d.per_request_atomic),
                "uptoUsdc": money(d.upto_atomic),
                "requests": d.requests,
                "promptTokens": d.prompt_tokens,
                "completionTokens": d.completion_tokens,
                "errors": d.errors,
            })
        })
        .collect();
    let sum = |f: fn(&crate::store::summary::SummaryDay) -> i64| s.days.iter().map(f).sum::<i64>();
    let totals = json!({
        "receivedUsdc": money(sum(|d| d.received_atomic)),
        "earnedUsdc": money(sum(|d| d.earned_atomic())),
        "creditsSpentUsdc": money(sum(|d| d.credits_spent_atomic)),
        "poolSoldUsdc": money(sum(|d| d.pool_sold_atomic)),
        "perRequestUsdc": money(sum(|d| d.per_request_atomic)),
        "uptoUsdc": money(sum(|d| d.upto_atomic)),
        "requests": sum(|d| d.requests),
        "promptTokens": sum(|d| d.prompt_tokens),
        "completionTokens": sum(|d| d.completion_tokens),
        "errors": sum(|d| d.errors),
        "activeKeys": s.active_keys,
        "reversedUsdc": money(s.reversed_atomic),
        "restoredUsdc": money(s.restored_atomic),
    });
    let models: Vec<serde_json::Value> = s
        .models
        .iter()
        .map(|m| {
            json!({
                "model": m.model,
                "requests": m.requests,
                "promptTokens": m.prompt_tokens,
                "completionTokens": m.completion_tokens,
                "spendUsdc": money(m.spend_atomic),
                "errors": m.errors,
                "errorRate": if m.requests > 0 { m.errors as f64 / m.requests as f64 } else { 0.0 },
                "p50Ms": m.p50_ms,
                "p95Ms": m.p95_ms,
                "ttfbP50Ms": m.ttfb_p50_ms,
                "ttfbP95Ms": m.ttfb_p95_ms,
                "overrunTokens": m.overrun_tokens,
                "unchargedUsdc": money(m.uncharged_atomic),
            })
        })
        .collect();
    let deployment_stats: Vec<serde_json::Value> = s
        .deployments
        .iter()
        .map(|d| {
            json!({
                "model": d.model,
                "deployment": d.deployment,
                "requests": d.requests,
                "errors": d.errors,
                "errorRate": if d.requests > 0 { d.errors as f64 / d.requests as f64 } else { 0.0 },
                "promptTokens": d.prompt_tokens,
                "completionTokens": d.completion_tokens,
                "p50Ms": d.p50_ms,
                "p95Ms": d.p95_ms,
                "ttfbP50Ms": d.ttfb_p50_ms,
                "ttfbP95Ms": d.ttfb_p95_ms,
            })
        })
        .collect();
    let accounts: Vec<serde_json::Value> = s
        .top_accounts
        .iter()
        .map(|a| json!({"account": a.account, "spendUsdc": money(a.spend_atomic), "requests": a.requests}))
        .collect();
    let payments: Vec<serde_json::Value> = s
        .networks
        .iter()
        .map(|p| {
            let status = state.indexers.get(&p.network).map(|h| h.snapshot());
            json!({
                "network": p.network,
                "confirmedTransfers": p.confirmed_transfers,
                "receivedUsdc": money(p.received_atomic),
                "pendingTransfers": p.pending_transfers,
                "orphanedTransfers": p.orphaned_transfers,
                "claims": p.claims,
                "claimedUsdc": money(p.claimed_atomic),
                "x402Settled": p.x402_settled,
                "x402Failed": p.x402_failed,
                "uptoSettled": p.upto_settled,
                "uptoUnsettled": p.upto_unsettled,
                "uptoOwedUsdc": money(p.upto_owed_atomic),
                "reorgs": p.reorgs,
                "reversedUsdc": money(p.reversed_atomic),
                "restoredUsdc": money(p.restored_atomic),
                "stillReversedUsdc": money(p.still_reversed_atomic),
                "indexer": status.map(|s| json!({
                    "indexedHead": s.indexed_head,
                    "chainHead": s.chain_head,
                    "lag": s.lag(),
                    "rpcErrors": s.rpc_errors,
                    "rpcFailovers": crate::metrics::rpc_failovers(&p.network),
                    "reorgs": s.reorgs,
                    "role": if s.follower { "follower" } else { "leader" },
                    "wsConnected": s.ws_connected,
                    "lastError": s.last_error.as_deref().map(|e| secrets.scrub(e)),
                    "fatal": s.fatal.as_deref().map(|e| secrets.scrub(e)),
                })),
                "recentTransfers": p.recent_transfers.iter().map(|t| json!({
                    "txHash": t.tx_hash,
                    "logIndex": t.log_index,
                    "blockNumber": t.block_number,
                    "from": t.from,
                    "valueUsdc": money(t.value_atomic),
                    "status": t.status,
                    "confirmations": t.confirmations,
                    "claimed": t.claimed,
                    "at": rfc3339(t.at),
                })).collect::<Vec<_>>(),
                "recentClaims": p.recent_claims.iter().map(|c| json!({
                    "txHash": c.tx_hash,
                    "account": c.account,
                    "kind": c.kind,
                    "paidUsdc": money(c.paid_atomic),
                    "claimedAt": rfc3339(c.claimed_at),
                    "reversed": c.reversed,
                })).collect::<Vec<_>>(),
                "recentSettlements": p.recent_settlements.iter().map(|x| json!({
                    "scheme": x.scheme,
                    "txHash": x.tx_hash,
                    "payer": x.payer,
                    "what": x.what,
                    "amountUsdc": x.amount_atomic.map(money),
                    "status": x.status,
                    "at": rfc3339(x.at),
                })).collect::<Vec<_>>(),
                "recentReorgs": p.recent_reorgs.iter().map(|r| json!({
                    "detectedAt": rfc3339(r.detected_at),
                    "forkBlock": r.fork_block,
                    "oldHead": r.old_head,
                    "depth": r.depth,
                    "orphanedTransfers": r.orphaned_transfers,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let size = state.store.database_size().await?;
    let database = match state.store.engine() {
        crate::store::sql::Engine::Sqlite => json!({
            "engine": "sqlite",
            "sizeBytes": size,
        }),
        crate::store::sql::Engine::Postgres => {
            let replicas = state.store.replicas(now).await?;
            json!({
                "engine": "postgres",
                "sizeBytes": size,
                "replica": state.store.replica_id(),
                "replicas": replicas,
                "leader": replicas.iter().find(|r| r.leader).map(|r| r.replica_id.clone()),
            })
        }
    };
    // Health: each network's indexer and RPC, the upstreams, the latest warnings (RPC URLs scrubbed).
    let deployments = state.proxy.router().status(std::time::Instant::now());
    let cooling: Vec<serde_json::Value> = deployments
        .iter()
        .filter(|d| !d.healthy)
        .map(|d| json!({"model": d.model, "upstream": d.upstream, "secondsLeft": d.cooldown_remaining_secs}))
        .collect();
    let health_networks: Vec<serde_json::Value> = state
        .settings
        .networks()
        .map(|chain| {
            let id = chain.network.caip2();
            let s = state
                .indexers
                .get(&id)
                .map(|h| h.snapshot())
                .unwrap_or_default();
            json!({
                "network": id,
                "state": indexer_state(&s, chain.ready_max_lag_blocks),
                "indexedHead": s.indexed_head,
                "chainHead": s.chain_head,
                "lag": s.lag(),
                "maxLag": chain.ready_max_lag_blocks,
                "rpcEndpoints": chain.rpc_http.len(),
                "rpcErrors": s.rpc_errors,
                "rpcFailovers": crate::metrics::rpc_failovers(&id),
                "wsConnected": s.ws_connected,
            })
        })
        .chain(state.settings.svm_networks.iter().map(|svm| {
            let s = state
                .indexers
                .get(&svm.caip2)
                .map(|h| h.snapshot())
                .unwrap_or_default();
            json!({
                "network": svm.caip2,
                "kind": "svm",
                "state": indexer_state(&s, svm.ready_max_lag_slots),
                "indexedHead": s.indexed_head,
                "chainHead": s.chain_head,
                "lag": s.lag(),
                "maxLag": svm.ready_max_lag_slots,
                "rpcEndpoints": svm.rpc_http.len(),
                "rpcErrors": s.rpc_errors,
                "rpcFailovers": crate::metrics::rpc_failovers(&svm.caip2),
                "wsConnected": false,
            })
        }))
        .collect();
    let warnings: Vec<serde_json::Value> = crate::logs::recent_errors()
        .into_iter()
        .take(WARNINGS_SHOWN)
        .map(|e| {
            json!({
                "at": rfc3339(e.at),
                "level": e.level,
                "target": e.target,
                "message": secrets.scrub(&e.message),
            })
        })
        .collect();
    let health = json!({
        "networks": health_networks,
        "upstreams": {
            "deployments": deployments.len(),
            "healthy": deployments.iter().filter(|d| d.healthy).count(),
            "coolingDown": cooling,
        },
        "warnings": warnings,
    });
    Ok(json!({
        "range": range.as_str(),
        "from": rfc3339(from),
        "to": rfc3339(to),
        "generatedAt": rfc3339(now),
        "totals": totals,
        "days": days,
        "models": models,
        "deploymentRequests": deployment_stats,
        "topAccounts": accounts,
        "networks": payments,
        "deployments": deployments,
        "database": database,
        "health": health,
    }))
}

async fn summary(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    // The same token as the page; the answers are JSON here.
    if let Err(r) = authorize(&state, &headers, &q) {
        let status = r.status();
        let (code, message) = if status == StatusCode::NOT_FOUND {
            (
                "admin_off",
                "no admin token is configured (auth.admin_token_env)",
            )
        } else {
            ("unauthorized", "send Authorization: Bearer <admin token>")
        };
        let mut out = (
            status,
            axum::Json(serde_json::json!({"error": {"code": code, "message": message}})),
        )
            .into_response();
        if let Some(v) = r.headers().get(header::WWW_AUTHENTICATE) {
            out.headers_mut()
                .insert(header::WWW_AUTHENTICATE, v.clone());
        }
        return out;
    }
    let Some(range) = Range::parse(q.get("range").map(String::as_str)) else {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(serde_json::json!({"error": {"code": "invalid_range", "message": "range must be today, 7d or 30d"}})),
        )
            .into_response();
    };
    match summary_json(&state, range).await {
        Ok(v) => (
            StatusCode::OK,
            [(header::CACHE_CONTROL, "no-store")],
            axum::Json(v),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "admin summary failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(serde_json::json!({"error": {"code": "internal", "message": "the summary could not be read; see the logs"}})),
            )
                .into_response()
        }
    }
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
td,th{padding:.2em .5em;text-align:left;border-bottom:1px solid #eee}td.num{text-align:right;font-variant-numeric:tabular-nums}\
code{font-size:.9em}.bad{color:#b00}.ok{color:#070}nav{margin:.5em 0}\
.charts{display:flex;flex-wrap:wrap;gap:1em}figure.chart{margin:0;flex:1 1 280px;max-width:600px}\
figure.chart svg{width:100%;height:120px;background:#fafafa}figcaption{font-size:.9em}\
.scroll{overflow-x:auto;max-width:100%}td:first-child{white-space:nowrap}h4{margin:.8em 0 .2em;font-size:.95em}td.msg{max-width:60em;word-break:break-word}\
@media print{nav{display:none}}";

async fn admin(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    // A switched-off feature is not an outage: 404, as for a path that is not served.
    if let Err(r) = authorize(&state, &headers, &q) {
        return *r;
    }
    let range = Range::parse(q.get("range").map(String::as_str)).unwrap_or(Range::Today);
    // Auto-refresh every 30 s unless the operator turns it off (`refresh=0`); no script needed.
    let refresh = q.get("refresh").is_none_or(|v| v != "0");
    match render(&state, range, refresh, q.contains_key("token")).await {
        Ok(body) => {
            let mut r = page(StatusCode::OK, "x402-gateway status", &body);
            if refresh {
                r.headers_mut()
                    .insert(header::REFRESH, header::HeaderValue::from_static("30"));
            }
            r
        }
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

async fn render(
    state: &AppState,
    range: Range,
    refresh: bool,
    token_in_url: bool,
) -> Result<String, StoreError> {
    let now = state.billing.now();
    let console = console(state, range, refresh, token_in_url).await?;
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
    h.push_str(&console);

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
    // Solana networks: heads are slots; the commitment stands where EVM networks show their confirmations.
    for svm in &settings.svm_networks {
        let n = state
            .indexers
            .get(&svm.caip2)
            .map(|h| h.snapshot())
            .unwrap_or_default();
        let (class, text) = match (&n.fatal, n.lag()) {
            (Some(_), _) => ("bad", "stopped".to_string()),
            (None, Some(lag)) if lag > svm.ready_max_lag_slots => {
                ("bad", format!("lagging ({lag} slots)"))
            }
            (None, Some(_)) => ("ok", "running".to_string()),
            (None, None) if n.follower => ("ok", "follower".to_string()),
            (None, None) => ("bad", "starting".to_string()),
        };
        let _ = write!(
            h,
            "<tr data-network=\"{}\"><td>{} <code>{}</code></td><td class=\"num\">—</td><td><code>{}</code></td>\
             <td><code>{}</code></td><td class=\"{class}\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            escape(&svm.caip2),
            escape(&svm.name),
            escape(&svm.caip2),
            svm.pay_to,
            svm.mint,
            escape(&text),
            opt(n.indexed_head),
            opt(n.chain_head),
            opt(n.lag()),
            svm.commitment.as_str(),
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
