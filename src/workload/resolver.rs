//! Resolutions for a round, shared: one per (image, credential) whatever the number of
//! workloads using it, a bounded number in flight per registry host, and a registry's
//! `Retry-After` honoured for every request to that host.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OnceCell, Semaphore};
use tokio::time::Instant;

use super::plan::{Check, Finding, Plan, blocked_finding, verdict};
use crate::registry::{Login, PullError, Reference, RegistryClient, Resolved, login_key};

/// Requests in flight per registry host unless told otherwise.
pub const DEFAULT_PER_HOST: usize = 4;
/// The longest `Retry-After` waited for; a longer one is reported as `RateLimited`.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(30);
/// Attempts per resolution while a registry keeps asking to wait.
const ATTEMPTS: usize = 3;

type Outcome = Result<Resolved, PullError>;
/// One round's answers by (image, login digest), each computed once.
type Answers = HashMap<(String, String), Arc<OnceCell<Outcome>>>;

#[derive(Default)]
struct Host {
    permits: Option<Arc<Semaphore>>,
    paused_until: Option<Instant>,
    /// Why the host could not be reached this round: the resolutions still queued for it
    /// fail at once rather than each waiting out its own timeout.
    unreachable: Option<PullError>,
}

/// Resolves images for a round of checks.
pub struct Resolver {
    client: RegistryClient,
    per_host: usize,
    max_wait: Duration,
    read_platforms: bool,
    hosts: Mutex<HashMap<String, Host>>,
    cache: Mutex<Answers>,
}

/// How long a failure asks to wait before trying again, if at all and at most `max`.
pub fn retry_delay(e: &PullError, max: Duration) -> Option<Duration> {
    match e {
        PullError::RateLimited {
            retry_after: Some(s), ..
        } => s
            .trim()
            .parse::<u64>()
            .ok()
            .map(Duration::from_secs)
            .filter(|d| *d <= max),
        _ => None,
    }
}

impl Resolver {
    /// A resolver over `client`; `read_platforms` reads each image's platforms (needed
    /// when any check of the round needs platforms).
    pub fn new(client: RegistryClient, per_host: usize, max_wait: Duration, read_platforms: bool) -> Self {
        Self {
            client,
            per_host: per_host.max(1),
            max_wait,
            read_platforms,
            hosts: Mutex::default(),
            cache: Mutex::default(),
        }
    }

    /// Distinct resolutions so far this round.
    pub fn resolutions(&self) -> usize {
        crate::lock(&self.cache).len()
    }

    /// Forgets this round's answers (the next round asks the registries again).
    pub fn new_round(&self) {
        crate::lock(&self.cache).clear();
        for h in crate::lock(&self.hosts).values_mut() {
            h.unreachable = None;
        }
    }

    /// Resolves `reference` with `login` once per round; concurrent callers share it.
    pub async fn resolve(&self, reference: &Reference, login: Option<&Login>) -> Outcome {
        let cell = crate::lock(&self.cache)
            .entry((reference.to_string(), login_key(login)))
            .or_default()
            .clone();
        cell.get_or_init(|| self.resolve_politely(reference, login))
            .await
            .clone()
    }

    async fn resolve_politely(&self, reference: &Reference, login: Option<&Login>) -> Outcome {
        let host = reference.api_host().to_owned();
        let permits = crate::lock(&self.hosts)
            .entry(host.clone())
            .or_default()
            .permits
            .get_or_insert_with(|| Arc::new(Semaphore::new(self.per_host)))
            .clone();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let paused = crate::lock(&self.hosts).get(&host).and_then(|h| h.paused_until);
            if let Some(until) = paused {
                tokio::time::sleep_until(until).await;
            }
            let outcome = {
                let _permit = permits.acquire().await;
                let known = crate::lock(&self.hosts).get(&host).and_then(|h| h.unreachable.clone());
                match known {
                    Some(e) => Err(e),
                    None => self.client.inspect(reference, login, self.read_platforms).await,
                }
            };
            if let Err(e @ PullError::Unreachable { .. }) = &outcome {
                crate::lock(&self.hosts).entry(host.clone()).or_default().unreachable = Some(e.clone());
            }
            match outcome.as_ref().err().and_then(|e| retry_delay(e, self.max_wait)) {
                Some(wait) if attempt < ATTEMPTS => {
                    let until = Instant::now() + wait;
                    let mut hosts = crate::lock(&self.hosts);
                    let h = hosts.entry(host.clone()).or_default();
                    h.paused_until = Some(h.paused_until.map_or(until, |u| u.max(until)));
                }
                _ => return outcome,
            }
        }
    }

    /// Runs every check: each tries its credentials in order like the kubelet (stopping
    /// at the first that pulls), all checks concurrently within the per-host bounds.
    /// Returns the findings in the order of `checks`.
    pub async fn run(&self, checks: &[Check]) -> Vec<Finding> {
        futures::future::join_all(checks.iter().map(|c| self.run_one(c)))
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    async fn run_one(&self, check: &Check) -> Option<Finding> {
        let (reference, candidates) = match &check.plan {
            Plan::Blocked(b) => return Some(blocked_finding(&check.target, b)),
            Plan::Resolve {
                reference, candidates, ..
            } => (reference, candidates),
        };
        let logins: Vec<Option<&Login>> = if candidates.is_empty() {
            vec![None]
        } else {
            candidates.iter().map(|c| Some(&c.login)).collect()
        };
        let mut outcomes = Vec::new();
        for login in logins {
            let o = self.resolve(reference, login).await;
            let pulled = o.is_ok();
            outcomes.push(o);
            if pulled {
                break;
            }
        }
        verdict(check, &outcomes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resolves the `repos` on a loopback port nothing listens on, one at a time; returns
    /// the requests sent and the reasons.
    async fn unreachable(repos: &[&str]) -> (u64, Vec<&'static str>) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let client = RegistryClient::new(&crate::registry::TlsOptions::default()).expect("client");
        let resolver = Resolver::new(client.clone(), 1, DEFAULT_MAX_WAIT, false);
        let mut reasons = Vec::new();
        for repo in repos {
            let reference = Reference::parse(&format!("127.0.0.1:{port}/{repo}")).expect("reference");
            let e = resolver.resolve(&reference, None).await.expect_err("unreachable");
            reasons.push(e.reason());
        }
        (client.requests(), reasons)
    }

    #[tokio::test]
    async fn a_host_that_cannot_be_reached_is_tried_once_per_round() {
        let (one, _) = unreachable(&["a:v1"]).await;
        let (many, reasons) = unreachable(&["a:v1", "b:v1", "c:v2"]).await;
        assert_eq!(reasons, vec!["Unreachable"; 3]);
        assert_eq!(one, many, "the later images were not tried");
    }

    #[test]
    fn retry_after_in_seconds_is_honoured_up_to_a_cap() {
        let limited = |r: Option<&str>| PullError::RateLimited {
            registry: "r".into(),
            retry_after: r.map(str::to_owned),
        };
        let cap = Duration::from_secs(30);
        assert_eq!(retry_delay(&limited(Some("2")), cap), Some(Duration::from_secs(2)));
        assert_eq!(retry_delay(&limited(Some("3600")), cap), None, "too long: reported");
        assert_eq!(retry_delay(&limited(Some("Wed, 21 Oct 2015 07:28:00 GMT")), cap), None);
        assert_eq!(retry_delay(&limited(None), cap), None);
        let other = PullError::NotFound { reference: "x".into() };
        assert_eq!(retry_delay(&other, cap), None);
    }
}
