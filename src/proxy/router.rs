//! Routing a model's requests over its deployments (the upstreams that serve it): which one to try, what a
//! failure does to it, and when a failed one comes back.
//!
//! - **Choice**: two deployments are drawn by weight among the healthy ones not yet tried, and the less busy of the
//!   two (in flight ÷ weight) is taken. Idle, that is exactly the weighted split; under load, the least busy wins.
//! - **Failover**: a failure *before any byte reached the client* (connect error, no response headers within
//!   `first_byte_timeout`, HTTP 429 or 5xx) is retried once on another deployment. Once the response is handed to
//!   the client nothing is retried: a stream is never restarted, so nothing is billed or generated twice.
//! - **Cooldown**: `failures_before_cooldown` consecutive failures take a deployment out of rotation for
//!   `cooldown`; then a probe (`GET <base_url>/models`) brings it back when it answers, or starts another cooldown.
//!   When every deployment of a model is cooling down, requests still go to the one whose cooldown ends first
//!   (fail open: a single-deployment model keeps working the moment its server is back), and `/readyz` says so.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{Routing, Settings};

/// Health of one deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// In rotation; `failures` consecutive failures so far.
    Healthy { failures: u32 },
    /// Out of rotation until `until`, then probed.
    CoolingDown { until: Instant },
}

/// One (model, upstream) pair and what the router knows about it.
#[derive(Debug)]
pub struct Deployment {
    pub model: String,
    /// Index into `Settings::upstreams`.
    pub upstream: usize,
    pub upstream_name: String,
    pub upstream_model: String,
    pub weight: u32,
    in_flight: AtomicU64,
    health: Mutex<Health>,
    /// Requests answered (headers received), failures, and cooldowns entered since start.
    answered: AtomicU64,
    failures: AtomicU64,
    cooldowns: AtomicU64,
    /// Smoothed time to the response headers, microseconds (0 until the first answer).
    latency_us: AtomicU64,
}

impl Deployment {
    pub fn health(&self) -> Health {
        *self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_healthy(&self) -> bool {
        matches!(self.health(), Health::Healthy { .. })
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// A deployment's state as `/metrics`, `/readyz` and `/admin` show it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentStatus {
    pub model: String,
    pub upstream: String,
    pub weight: u32,
    pub healthy: bool,
    /// Seconds left in the cooldown (0 when healthy or being probed).
    pub cooldown_remaining_secs: u64,
    pub in_flight: u64,
    pub answered: u64,
    pub failures: u64,
    pub cooldowns: u64,
    /// Smoothed time to the response headers, milliseconds (null before the first answer).
    pub latency_ms: Option<f64>,
}

/// Every model's deployments.
#[derive(Debug)]
pub struct Router {
    deployments: Vec<Arc<Deployment>>,
    by_model: HashMap<String, Vec<usize>>,
    routing: Routing,
}

/// Holds a deployment's in-flight count until dropped.
#[derive(Debug)]
pub struct Attempt {
    pub deployment: Arc<Deployment>,
    started: Instant,
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.deployment.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Router {
    pub fn new(settings: &Settings) -> Router {
        let mut deployments = Vec::new();
        let mut by_model: HashMap<String, Vec<usize>> = HashMap::new();
        for model in &settings.models {
            for d in &model.deployments {
                let upstream_name = settings
                    .upstreams
                    .get(d.upstream)
                    .map(|u| u.name.clone())
                    .unwrap_or_default();
                by_model
                    .entry(model.id.clone())
                    .or_default()
                    .push(deployments.len());
                deployments.push(Arc::new(Deployment {
                    model: model.id.clone(),
                    upstream: d.upstream,
                    upstream_name,
                    upstream_model: d.upstream_model.clone(),
                    weight: d.weight.max(1),
                    in_flight: AtomicU64::new(0),
                    health: Mutex::new(Health::Healthy { failures: 0 }),
                    answered: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    cooldowns: AtomicU64::new(0),
                    latency_us: AtomicU64::new(0),
                }));
            }
        }
        Router {
            deployments,
            by_model,
            routing: settings.routing.clone(),
        }
    }

    pub fn routing(&self) -> &Routing {
        &self.routing
    }

    /// Picks a deployment of `model` not in `tried` (`None` when there is none left), counting it in flight.
    /// `random` draws a number in `0..n` (injected so tests can fix the draw).
    pub fn pick(
        &self,
        model: &str,
        tried: &[usize],
        now: Instant,
        random: &mut dyn FnMut(u64) -> u64,
    ) -> Option<(usize, Attempt)> {
        let candidates: Vec<usize> = self
            .by_model
            .get(model)?
            .iter()
            .copied()
            .filter(|i| !tried.contains(i))
            .collect();
        let healthy: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|i| self.deployments[*i].is_healthy())
            .collect();
        let chosen = if healthy.is_empty() {
            // Every one left is cooling down: fail open on the one whose cooldown ends first.
            candidates
                .into_iter()
                .min_by_key(|i| match self.deployments[*i].health() {
                    Health::CoolingDown { until } => until.saturating_duration_since(now),
                    Health::Healthy { .. } => Duration::ZERO,
                })?
        } else {
            self.least_busy_of_two(&healthy, random)
        };
        let deployment = self.deployments[chosen].clone();
        deployment.in_flight.fetch_add(1, Ordering::Relaxed);
        Some((
            chosen,
            Attempt {
                deployment,
                started: now,
            },
        ))
    }

    /// Two draws by weight (distinct when possible); the one with less in flight per weight wins, the first on a tie.
    fn least_busy_of_two(&self, healthy: &[usize], random: &mut dyn FnMut(u64) -> u64) -> usize {
        let weight = |i: usize| u64::from(self.deployments[i].weight);
        // One weighted draw among `healthy` without `exclude`.
        let draw = |exclude: Option<usize>, random: &mut dyn FnMut(u64) -> u64| {
            let pool = healthy.iter().copied().filter(|i| Some(*i) != exclude);
            let total: u64 = pool.clone().map(weight).sum();
            let mut r = random(total.max(1));
            let mut last = None;
            for i in pool {
                if r < weight(i) {
                    return Some(i);
                }
                r -= weight(i);
                last = Some(i);
            }
            last
        };
        let Some(first) = draw(None, random) else {
            return healthy[0];
        };
        let Some(second) = draw(Some(first), random) else {
            return first;
        };
        // in_flight/weight compared without division: a.in_flight × b.weight vs b.in_flight × a.weight.
        let load = |i: usize, other: usize| self.deployments[i].in_flight() * weight(other);
        if load(second, first) < load(first, second) {
            second
        } else {
            first
        }
    }

    /// The response headers arrived with a status that is not a deployment failure.
    pub fn succeeded(&self, attempt: &Attempt, now: Instant) {
        let d = &attempt.deployment;
        d.answered.fetch_add(1, Ordering::Relaxed);
        let micros = now.saturating_duration_since(attempt.started).as_micros() as u64;
        // Exponential smoothing (1/8 weight for the new sample); the first sample is taken as is.
        let old = d.latency_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            micros.max(1)
        } else {
            (old * 7 + micros) / 8
        };
        d.latency_us.store(new.max(1), Ordering::Relaxed);
        crate::metrics::record_deployment_latency(
            &d.model,
            &d.upstream_name,
            now.saturating_duration_since(attempt.started),
        );
        let mut health = d.health.lock().unwrap_or_else(|p| p.into_inner());
        *health = Health::Healthy { failures: 0 };
    }

    /// The deployment failed before answering (connect error, timeout before the headers, 429 or 5xx). Returns
    /// whether this failure started a cooldown.
    pub fn failed(&self, attempt: &Attempt, now: Instant) -> bool {
        let d = &attempt.deployment;
        d.failures.fetch_add(1, Ordering::Relaxed);
        let mut health = d.health.lock().unwrap_or_else(|p| p.into_inner());
        match *health {
            Health::Healthy { failures } => {
                let failures = failures + 1;
                if failures >= self.routing.failures_before_cooldown {
                    *health = Health::CoolingDown {
                        until: now + self.routing.cooldown,
                    };
                    d.cooldowns.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        model = %d.model,
                        upstream = %d.upstream_name,
                        failures,
                        cooldown_secs = self.routing.cooldown.as_secs(),
                        "deployment failed repeatedly: cooling down"
                    );
                    true
                } else {
                    *health = Health::Healthy { failures };
                    false
                }
            }
            // A fail-open request to a cooling deployment failed again: the cooldown restarts.
            Health::CoolingDown { .. } => {
                *health = Health::CoolingDown {
                    until: now + self.routing.cooldown,
                };
                false
            }
        }
    }

    /// Deployments whose cooldown is over and should be probed now (the same upstream is probed once).
    pub fn due_for_probe(&self, now: Instant) -> Vec<Arc<Deployment>> {
        self.deployments
            .iter()
            .filter(|d| matches!(d.health(), Health::CoolingDown { until } if until <= now))
            .cloned()
            .collect()
    }

    /// The probe of `deployment` answered (`ok`) or not.
    pub fn probed(&self, deployment: &Deployment, ok: bool, now: Instant) {
        let mut health = deployment.health.lock().unwrap_or_else(|p| p.into_inner());
        *health = if ok {
            tracing::info!(
                model = %deployment.model,
                upstream = %deployment.upstream_name,
                "deployment answers its probe again: back in rotation"
            );
            Health::Healthy { failures: 0 }
        } else {
            Health::CoolingDown {
                until: now + self.routing.cooldown,
            }
        };
    }

    /// Every deployment's state, in configuration order.
    pub fn status(&self, now: Instant) -> Vec<DeploymentStatus> {
        self.deployments
            .iter()
            .map(|d| {
                let health = d.health();
                let latency = d.latency_us.load(Ordering::Relaxed);
                DeploymentStatus {
                    model: d.model.clone(),
                    upstream: d.upstream_name.clone(),
                    weight: d.weight,
                    healthy: matches!(health, Health::Healthy { .. }),
                    cooldown_remaining_secs: match health {
                        Health::CoolingDown { until } => {
                            until.saturating_duration_since(now).as_secs_f64().ceil() as u64
                        }
                        Health::Healthy { .. } => 0,
                    },
                    in_flight: d.in_flight(),
                    answered: d.answered.load(Ordering::Relaxed),
                    failures: d.failures.load(Ordering::Relaxed),
                    cooldowns: d.cooldowns.load(Ordering::Relaxed),
                    latency_ms: (latency > 0).then(|| latency as f64 / 1e3),
                }
            })
            .collect()
    }

    /// Models none of whose deployments is in rotation.
    pub fn models_without_healthy_deployment(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .by_model
            .iter()
            .filter(|(_, ds)| !ds.iter().any(|i| self.deployments[*i].is_healthy()))
            .map(|(m, _)| m.clone())
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(weights: &[u32], failures_before_cooldown: u32) -> Router {
        let deployments = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Arc::new(Deployment {
                    model: "m".into(),
                    upstream: i,
                    upstream_name: format!("u{i}"),
                    upstream_model: "m".into(),
                    weight: *w,
                    in_flight: AtomicU64::new(0),
                    health: Mutex::new(Health::Healthy { failures: 0 }),
                    answered: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    cooldowns: AtomicU64::new(0),
                    latency_us: AtomicU64::new(0),
                })
            })
            .collect::<Vec<_>>();
        Router {
            by_model: HashMap::from([("m".to_string(), (0..weights.len()).collect())]),
            deployments,
            routing: Routing {
                failures_before_cooldown,
                cooldown: Duration::from_secs(30),
                retry_other_deployment: true,
            },
        }
    }

    /// A deterministic generator (xorshift) for the weighted draws.
    fn rng(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut s = seed.max(1);
        move |n| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s % n.max(1)
        }
    }

    #[test]
    fn idle_traffic_follows_the_weights() {
        let r = router(&[3, 1], 3);
        let mut random = rng(7);
        let now = Instant::now();
        let mut counts = [0u32; 2];
        for _ in 0..4000 {
            let (i, attempt) = r.pick("m", &[], now, &mut random).unwrap();
            counts[i] += 1;
            drop(attempt);
        }
        // Two draws by weight, the first kept on a tie: P(first pick = 0) = 3/4.
        let share = f64::from(counts[0]) / 4000.0;
        assert!((0.70..0.80).contains(&share), "{counts:?}");
    }

    #[test]
    fn the_less_busy_deployment_wins_under_load() {
        let r = router(&[1, 1], 3);
        let mut random = rng(3);
        let now = Instant::now();
        let (_, held) = r.pick("m", &[], now, &mut random).unwrap();
        let busy = held.deployment.upstream;
        for _ in 0..50 {
            let (i, attempt) = r.pick("m", &[], now, &mut random).unwrap();
            assert_ne!(i, busy, "the idle deployment is preferred");
            drop(attempt);
        }
        drop(held);
        assert_eq!(r.deployments[busy].in_flight(), 0);
    }

    #[test]
    fn failures_cool_a_deployment_down_and_a_probe_brings_it_back() {
        let r = router(&[1, 1], 2);
        let mut random = rng(5);
        let now = Instant::now();
        let (i, a) = r.pick("m", &[], now, &mut random).unwrap();
        assert!(!r.failed(&a, now));
        assert!(
            r.failed(&a, now),
            "the second consecutive failure cools it down"
        );
        drop(a);
        assert_eq!(r.models_without_healthy_deployment(), Vec::<String>::new());
        for _ in 0..20 {
            let (j, a) = r.pick("m", &[], now, &mut random).unwrap();
            assert_ne!(j, i, "a cooling deployment is out of rotation");
            drop(a);
        }
        assert!(r.due_for_probe(now).is_empty());
        let later = now + Duration::from_secs(31);
        let due = r.due_for_probe(later);
        assert_eq!(due.len(), 1);
        r.probed(&due[0], true, later);
        assert!(r.deployments[i].is_healthy());
    }

    #[test]
    fn a_retry_never_goes_back_to_a_tried_deployment_and_all_cooling_fails_open() {
        let r = router(&[1, 1], 1);
        let mut random = rng(11);
        let now = Instant::now();
        let (i, a) = r.pick("m", &[], now, &mut random).unwrap();
        let (j, b) = r.pick("m", &[i], now, &mut random).unwrap();
        assert_ne!(i, j);
        assert!(r.pick("m", &[i, j], now, &mut random).is_none());
        r.failed(&a, now);
        r.failed(&b, now + Duration::from_secs(1));
        drop((a, b));
        assert_eq!(r.models_without_healthy_deployment(), vec!["m".to_string()]);
        // Both cooling: the one whose cooldown ends first is still tried.
        let (k, _) = r.pick("m", &[], now, &mut random).unwrap();
        assert_eq!(k, i);
        assert!(r.pick("other", &[], now, &mut random).is_none());
    }
}
