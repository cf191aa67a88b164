//! Leader election on a `coordination.k8s.io/v1` Lease, so that with several replicas
//! exactly one reconciles. The holder renews the Lease every `renew_every`; others take
//! it over once it has not been renewed for `duration`. A holder that cannot renew
//! within `duration` (or finds the Lease taken) stops: [`Elector::lost`] resolves and
//! the process exits, so a replica that lost the Lease never writes again. On shutdown
//! the holder releases the Lease so a standby takes over at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

/// Lease settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub duration: Duration,
    /// How often the holder renews, and others retry.
    pub renew_every: Duration,
}

/// Errors talking to the Lease API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the Lease failed.
    #[error("lease {namespace}/{name}: {source}")]
    Api {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
}

/// What one attempt found.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    Held,
    HeldByOther(String),
}

/// Pure: may `me` take a Lease last held by `holder`, renewed at `renewed`, valid for `duration`?
pub fn can_take(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> bool {
    let Some(spec) = spec else { return true };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == me {
        return true;
    }
    let renewed = spec.renew_time.as_ref().map(|t| t.0);
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    match renewed.and_then(|r| r.checked_add(duration).ok()) {
        Some(valid_until) => now > valid_until,
        None => true,
    }
}

/// Competes for and holds the Lease.
pub struct Elector {
    api: Api<Lease>,
    config: Config,
}

impl Elector {
    /// For `config`.
    pub fn new(client: Client, config: Config) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
        }
    }

    fn err(&self, source: kube::Error) -> Error {
        Error::Api {
            namespace: self.config.namespace.clone(),
            name: self.config.name.clone(),
            source,
        }
    }

    async fn try_once(&self) -> Result<Attempt, Error> {
        let now = Timestamp::now();
        let me = self.config.identity.clone();
        let secs = i32::try_from(self.config.duration.as_secs()).unwrap_or(15);
        match self.api.get_opt(&self.config.name).await.map_err(|e| self.err(e))? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        namespace: Some(self.config.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(me),
                        lease_duration_seconds: Some(secs),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(Attempt::Held),
                    // Someone created it first.
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::HeldByOther(String::new())),
                    Err(e) => Err(self.err(e)),
                }
            }
            Some(mut lease) => {
                let spec = lease.spec.clone().unwrap_or_default();
                if !can_take(Some(&spec), &me, now) {
                    return Ok(Attempt::HeldByOther(spec.holder_identity.unwrap_or_default()));
                }
                let taking_over = spec.holder_identity.as_deref() != Some(me.as_str());
                let mut next = spec.clone();
                next.holder_identity = Some(me);
                next.lease_duration_seconds = Some(secs);
                next.renew_time = Some(MicroTime(now));
                if taking_over {
                    next.acquire_time = Some(MicroTime(now));
                    next.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                lease.spec = Some(next);
                // replace() sends the resourceVersion we read: a concurrent change makes it fail.
                match self
                    .api
                    .replace(&self.config.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(Attempt::Held),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::HeldByOther(String::new())),
                    Err(e) => Err(self.err(e)),
                }
            }
        }
    }

    /// Waits until this replica holds the Lease. Returns false if shut down first.
    pub async fn acquire(&self, shutdown: &CancellationToken) -> bool {
        let mut logged = false;
        loop {
            match self.try_once().await {
                Ok(Attempt::Held) => {
                    tracing::info!(lease = %self.config.name, identity = %self.config.identity, "became leader");
                    return true;
                }
                Ok(Attempt::HeldByOther(holder)) => {
                    if !logged {
                        tracing::info!(lease = %self.config.name, %holder, "standing by: another replica is leader");
                        logged = true;
                    }
                }
                Err(e) => {
                    crate::warn_repeated!("leader-acquire", &self.config.name, error = %e, "leader election attempt failed; retrying")
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep(self.config.renew_every) => {}
            }
        }
    }

    /// Renews the Lease for as long as it can; returns only when the Lease is lost (taken,
    /// or not renewed within its duration). The caller must then stop writing at once.
    pub async fn hold(&self) {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.config.renew_every).await;
            match self.try_once().await {
                Ok(Attempt::Held) => last_renewed = tokio::time::Instant::now(),
                Ok(Attempt::HeldByOther(holder)) => {
                    tracing::error!(%holder, "lost the leader lease to another replica");
                    return;
                }
                Err(e) => {
                    crate::warn_repeated!("leader-renew", &self.config.name, error = %e, "could not renew the leader lease");
                    if last_renewed.elapsed() >= self.config.duration {
                        tracing::error!("leader lease not renewed within its duration");
                        return;
                    }
                }
            }
        }
    }

    /// Gives the Lease up (on shutdown) so a standby takes over at once.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await {
            let mine =
                lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(self.config.identity.as_str());
            if mine {
                if let Some(spec) = lease.spec.as_mut() {
                    spec.holder_identity = None;
                    spec.renew_time = None;
                }
                match self
                    .api
                    .replace(&self.config.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => tracing::info!("released the leader lease"),
                    Err(e) => tracing::warn!(error = %e, "could not release the leader lease"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_owned()),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).expect("t"))),
            lease_duration_seconds: Some(duration),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn free_own_or_expired_leases_can_be_taken() {
        let now = Timestamp::from_second(1_800_000_100).expect("t");
        assert!(can_take(None, "a", now));
        assert!(can_take(Some(&spec("", 0, 15)), "a", now));
        assert!(can_take(Some(&spec("a", 1_800_000_099, 15)), "a", now));
        assert!(!can_take(Some(&spec("b", 1_800_000_090, 15)), "a", now));
        assert!(can_take(Some(&spec("b", 1_800_000_080, 15)), "a", now));
    }
}
