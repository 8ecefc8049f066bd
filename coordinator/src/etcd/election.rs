//! Leadership among the replicas through etcd's election API: each replica
//! campaigns with its address as the value, holding a lease that it keeps
//! alive; the winner is leader until it cannot renew the lease (it steps down
//! at once), resigns on shutdown, or finds its key gone.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper, ResignOptions};

use super::log::timed;
use super::{Leadership, Shared, LOCK};
use crate::store::StoreError;

/// Why a term (or a try at one) ended.
enum TermEnd {
    Shutdown,
    LeaseLost(String),
    Deposed,
}

impl Shared {
    /// Campaigns until shutdown, one lease per try.
    pub(crate) async fn campaign(self: Arc<Self>) {
        while !self.cancel.is_cancelled() {
            match self.term().await {
                Ok(TermEnd::Shutdown) => return,
                Ok(TermEnd::LeaseLost(why)) => tracing::warn!(reason = %why, "etcd store: lease lost"),
                Ok(TermEnd::Deposed) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "etcd store: campaign failed");
                    self.pause(Duration::from_millis(300)).await;
                }
            }
        }
    }

    /// One lease: campaign with it, lead while it lives, then give it up.
    async fn term(&self) -> Result<TermEnd, StoreError> {
        let t = self.opts.op_timeout;
        let ttl = self.opts.lease_ttl_s.max(1);
        let lease = timed(t, || {
            let mut leases = self.client.lease_client();
            async move { leases.grant(ttl, None).await }
        })
        .await?
        .id();
        let end = self.hold(lease, ttl).await;
        self.leader_tx.send_if_modified(|l| l.take().is_some());
        // Whatever ended the term, give the lease up so that the others need
        // not wait for it to lapse; a lost etcd lets it lapse by itself.
        let revoke = timed(t, || {
            let mut leases = self.client.lease_client();
            async move { leases.revoke(lease).await }
        })
        .await;
        if let Err(e) = revoke {
            tracing::debug!(error = %e, "etcd store: cannot revoke lease");
        }
        end
    }

    async fn hold(&self, lease: i64, ttl: i64) -> Result<TermEnd, StoreError> {
        let t = self.opts.op_timeout;
        let (keeper, stream) = timed(t, || {
            let mut leases = self.client.lease_client();
            async move { leases.keep_alive(lease).await }
        })
        .await?;
        let keep_alive = keep_alive(keeper, stream, Duration::from_millis(ttl as u64 * 1000 / 3));
        tokio::pin!(keep_alive);
        let mut election = self.client.election_client();
        let name = self.keys.election.as_str();
        let won = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return Ok(TermEnd::Shutdown),
            why = &mut keep_alive => return Ok(TermEnd::LeaseLost(why)),
            won = election.campaign(name, self.opts.advertise.as_str(), lease) => won,
        };
        let mut won = won.map_err(|e| StoreError::Unavailable(format!("campaign: {e}")))?;
        let key = won.take_leader().ok_or_else(|| StoreError::Unavailable("campaign answered no key".into()))?;
        let leadership = Leadership { key: key.key().to_vec(), rev: key.rev() };
        // Catch up with the log before taking writes, so that the first
        // proposal does not lose its compare-and-swap.
        let caught_up = async {
            let head = self.read_head().await?;
            self.wait_applied(head, t).await
        };
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => return Ok(TermEnd::Shutdown),
            why = &mut keep_alive => return Ok(TermEnd::LeaseLost(why)),
            r = caught_up => r?,
        }
        tracing::info!(advertise = %self.opts.advertise, "etcd store: elected leader");
        *self.hint.lock().expect(LOCK) = Some(self.opts.advertise.clone());
        self.leader_tx.send_replace(Some(leadership));
        let mut leader_rx = self.leader_tx.subscribe();
        let end = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => TermEnd::Shutdown,
            why = &mut keep_alive => TermEnd::LeaseLost(why),
            _ = leader_rx.wait_for(|l| l.is_none()) => TermEnd::Deposed,
        };
        self.leader_tx.send_if_modified(|l| l.take().is_some());
        tracing::info!(advertise = %self.opts.advertise, "etcd store: stepped down");
        if matches!(end, TermEnd::Shutdown) {
            let resign = ResignOptions::new().with_leader(key);
            let _ = timed(t, || {
                let mut election = self.client.election_client();
                let resign = resign.clone();
                async move { election.resign(Some(resign)).await }
            })
            .await;
        }
        Ok(end)
    }

    /// Follows who leads, for the hint that followers answer with.
    pub(crate) async fn observe(self: Arc<Self>) {
        let mut election = self.client.election_client();
        while !self.cancel.is_cancelled() {
            let stream = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return,
                s = election.observe(self.keys.election.as_str()) => s,
            };
            if let Ok(mut stream) = stream {
                loop {
                    let msg = tokio::select! {
                        biased;
                        _ = self.cancel.cancelled() => return,
                        m = stream.message() => m,
                    };
                    let Ok(Some(resp)) = msg else { break };
                    if let Some(kv) = resp.kv() {
                        let value = String::from_utf8_lossy(kv.value()).into_owned();
                        *self.hint.lock().expect(LOCK) = Some(value);
                    }
                }
            }
            self.pause(Duration::from_millis(300)).await;
        }
    }

    /// The leader's address: asked from etcd, or the last one observed when
    /// etcd does not answer.
    pub(crate) async fn current_leader(&self) -> Option<String> {
        let asked = timed(self.opts.op_timeout.min(Duration::from_secs(1)), || {
            let mut election = self.client.election_client();
            let name = self.keys.election.clone();
            async move { election.leader(name).await }
        })
        .await;
        let fresh = asked.ok().and_then(|r| r.kv().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()));
        let mut hint = self.hint.lock().expect(LOCK);
        if fresh.is_some() {
            hint.clone_from(&fresh);
        }
        hint.clone().filter(|h| *h != self.opts.advertise || self.leader_tx.borrow().is_some())
    }
}

/// Renews the lease every `every` until a renewal fails; returns why.
async fn keep_alive(mut keeper: LeaseKeeper, mut stream: LeaseKeepAliveStream, every: Duration) -> String {
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = keeper.keep_alive().await {
            return format!("keep-alive request: {e}");
        }
        match tokio::time::timeout(every, stream.message()).await {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => {}
            Ok(Ok(Some(_))) => return "lease expired".into(),
            Ok(Ok(None)) => return "keep-alive stream closed".into(),
            Ok(Err(e)) => return format!("keep-alive: {e}"),
            Err(_) => return "keep-alive not answered in time".into(),
        }
    }
}
