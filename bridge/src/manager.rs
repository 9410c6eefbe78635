//! The grant manager: takes validated grants, stores them, and drives each
//! through provisioning, watching, deadline enforcement and termination.
//! Every transition is stored before the action it leads to, so a new
//! manager on the same store picks up where a killed one stopped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{watch, Notify};
use tokio::task::AbortHandle;

use crate::backend::{BackendError, ProvisionedInstance, UsageMetrics};
use crate::error_chain;
use crate::fleet::{Fleet, FleetError};
use crate::grant::{Grant, GrantError, ValidationContext};
use crate::state::{FailureKind, GrantRecord, GrantState, StopCause};
use crate::store::{Inserted, Store, StoreError};
use crate::tags::{TagError, TagResolver};
use crate::view::UsageView;

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("Invalid grant")]
    Invalid(#[from] GrantError),
    #[error("Request id {0} is already used by a different grant")]
    IdInUse(String),
    #[error("Cannot store the grant")]
    Store(#[from] StoreError),
    /// The image's tag could not be pinned to a digest.
    #[error("Invalid field image")]
    Tag(#[from] TagError),
}

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("No grant {0}")]
    NotFound(String),
    #[error("State store failed")]
    Store(#[from] StoreError),
}

/// How long a resolved tag is reused by default: long enough for a burst
/// of grants, short enough that a pushed tag is seen within a minute.
pub const DEFAULT_TAG_TTL: Duration = Duration::from_secs(30);

/// Timing knobs; the defaults suit real VMs, tests shorten them.
#[derive(Clone, Debug)]
pub struct ManagerSettings {
    /// How long `terminate` waits for the grant to end before answering.
    pub stop_wait: Duration,
    /// How long to wait for final usage after terminating an instance.
    pub final_usage_wait: Duration,
    /// Pause before retrying a transient backend failure.
    pub retry_delay: Duration,
    /// Attempts at terminating an instance before giving up on it.
    pub terminate_attempts: u32,
    /// How often a running grant's usage so far is stored.
    pub usage_interval: Duration,
    /// How long the digest a tag was resolved to at submit is reused.
    /// None: tags are not resolved at submit (a backend resolves the tag
    /// when it builds, as for simulated backends that fetch nothing).
    pub tag_ttl: Option<Duration>,
    /// Registries reached over plain HTTP (`host:port`), as Docker's
    /// `insecure-registries`; loopback ones always are.
    pub insecure_registries: Vec<String>,
}

impl Default for ManagerSettings {
    fn default() -> Self {
        ManagerSettings {
            stop_wait: Duration::from_secs(60),
            final_usage_wait: Duration::from_secs(30),
            retry_delay: Duration::from_secs(2),
            terminate_attempts: 5,
            usage_interval: Duration::from_secs(30),
            tag_ttl: Some(DEFAULT_TAG_TTL),
            insecure_registries: Vec::new(),
        }
    }
}

/// The result of a submission.
#[derive(Debug)]
pub struct Submitted {
    pub record: GrantRecord,
    /// False when the same request had been submitted before.
    pub created: bool,
}

struct Supervisor {
    wake: Arc<Notify>,
    done: watch::Receiver<bool>,
    abort: AbortHandle,
}

pub struct GrantManager {
    store: Arc<Store>,
    fleet: Arc<Fleet>,
    settings: ManagerSettings,
    tags: Option<TagResolver>,
    supervisors: Mutex<HashMap<String, Supervisor>>,
}

impl GrantManager {
    /// Starts a manager on `store` and re-adopts every grant the store says
    /// is unfinished. Must be called inside a tokio runtime.
    pub fn open(
        store: Arc<Store>,
        fleet: Arc<Fleet>,
        settings: ManagerSettings,
    ) -> Result<Arc<Self>, ManagerError> {
        let manager = Arc::new(GrantManager {
            store,
            fleet,
            tags: settings
                .tag_ttl
                .map(|ttl| TagResolver::new(ttl, settings.insecure_registries.clone())),
            settings,
            supervisors: Mutex::new(HashMap::new()),
        });
        manager.recover()?;
        Ok(manager)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// Validates a grant, pins its image tag to a digest, stores it, then
    /// provisions it in the background. Resubmitting the same request id
    /// returns the stored grant (its image as pinned the first time).
    pub async fn submit(self: &Arc<Self>, body: &[u8]) -> Result<Submitted, SubmitError> {
        self.submit_by(body, None).await
    }

    /// As [`GrantManager::submit`], recording the name of the API token
    /// that submitted the grant.
    pub async fn submit_by(
        self: &Arc<Self>,
        body: &[u8],
        by: Option<&str>,
    ) -> Result<Submitted, SubmitError> {
        let ctx = ValidationContext {
            regions: self.fleet.regions(),
            now: Utc::now(),
        };
        let grant = Grant::from_json(body, &ctx)?;
        self.fleet.check_admissible(&grant)?;
        let stored = match self.store.get(&grant.id)? {
            Some(record) => Inserted::Existing(record),
            None => {
                let digest = self.pin(&grant).await?;
                self.store.insert_pinned(&grant, digest.as_deref(), by)?
            }
        };
        match stored {
            Inserted::Created(record) => {
                tracing::info!(grant = %grant.id, image = %grant.image, digest = record.image_digest.as_deref().unwrap_or("-"), vcpus = grant.vcpus, ram_mib = grant.ram_mib, "grant accepted");
                self.supervise(record.clone());
                Ok(Submitted {
                    record,
                    created: true,
                })
            }
            Inserted::Existing(record) if record.grant.same_request_as(&grant) => Ok(Submitted {
                record,
                created: false,
            }),
            Inserted::Existing(_) => Err(SubmitError::IdInUse(grant.id)),
        }
    }

    /// The digest the grant's image tag names now, when tags are pinned.
    async fn pin(&self, grant: &Grant) -> Result<Option<String>, SubmitError> {
        let Some(tags) = &self.tags else {
            return Ok(None);
        };
        // Validation parsed it already; this cannot fail.
        let Ok(reference) = kiln_image::reference::Reference::parse(&grant.image) else {
            return Ok(None);
        };
        Ok(tags.resolve(&reference).await?)
    }

    pub fn get(&self, id: &str) -> Result<GrantRecord, ManagerError> {
        self.store
            .get(id)?
            .ok_or_else(|| ManagerError::NotFound(id.to_string()))
    }

    pub fn list(&self) -> Result<Vec<GrantRecord>, ManagerError> {
        Ok(self.store.list()?)
    }

    /// A grant's latest usage: fresh from its backend while it runs, else
    /// the newest stored sample. (Fresh figures are not stored here: the
    /// supervisor stores a sample every `usage_interval`, however often
    /// clients ask.)
    pub async fn usage(&self, id: &str) -> Result<UsageView, ManagerError> {
        let record = self.get(id)?;
        if let (GrantState::Running, Some(instance)) = (record.state, &record.instance) {
            if let Some(usage) = self.current_usage(id, instance).await {
                return Ok(UsageView {
                    grant_id: record.grant.id,
                    state: record.state,
                    r#final: false,
                    taken_at: Some(usage.ended_at),
                    usage: Some(usage),
                });
            }
        }
        let sample = self.store.latest_usage(id)?;
        Ok(UsageView {
            grant_id: record.grant.id,
            state: record.state,
            // An ended grant's figures are final, even when it never ran
            // and so has no sample at all.
            r#final: record.state.is_final(),
            taken_at: sample.as_ref().map(|s| s.taken_at),
            usage: sample.map(|s| s.usage),
        })
    }

    /// Stops a grant (idempotent) and waits, up to the configured time, for
    /// it to end. Returns the grant as it then stands.
    pub async fn terminate(self: &Arc<Self>, id: &str) -> Result<GrantRecord, ManagerError> {
        self.terminate_by(id, None).await
    }

    /// As [`GrantManager::terminate`], recording the name of the API token
    /// that asked.
    pub async fn terminate_by(
        self: &Arc<Self>,
        id: &str,
        by: Option<&str>,
    ) -> Result<GrantRecord, ManagerError> {
        let record = self
            .store
            .request_stop_by(id, StopCause::Requested, by)?
            .ok_or_else(|| ManagerError::NotFound(id.to_string()))?;
        if record.state.is_final() {
            return Ok(record);
        }
        let mut done = self.supervise(record);
        // Either the grant ends in time, or the caller sees it terminating.
        let _ = tokio::time::timeout(self.settings.stop_wait, done.wait_for(|d| *d)).await;
        self.get(id)
    }

    /// Stops supervising without touching any instance, as a crash would;
    /// a manager opened later on the same store re-adopts them.
    pub fn shutdown(&self) {
        for (_, s) in self.lock_supervisors().drain() {
            s.abort.abort();
        }
    }

    /// Number of grants being supervised now.
    pub fn supervised(&self) -> usize {
        self.lock_supervisors().len()
    }

    fn recover(self: &Arc<Self>) -> Result<(), ManagerError> {
        let unfinished: Vec<GrantState> = GrantState::ALL
            .into_iter()
            .filter(|s| !s.is_final())
            .collect();
        for record in self.store.in_states(&unfinished)? {
            let id = record.grant.id.clone();
            match record.state {
                GrantState::Provisioning => {
                    // Whatever the backend was doing is unknown: it may have
                    // left an instance this store never learnt about.
                    tracing::warn!(grant = %id, backend = record.provisioning_backend.as_deref().unwrap_or("-"), "was provisioning when kilnd stopped; marking failed");
                    self.store.fail(
                        &id,
                        FailureKind::Interrupted,
                        "kilnd stopped while provisioning",
                    )?;
                    let fleet = Arc::clone(&self.fleet);
                    let backend = record.provisioning_backend;
                    tokio::spawn(async move { fleet.abandon(&id, backend.as_deref()).await });
                }
                GrantState::Running | GrantState::Terminating if record.instance.is_none() => {
                    self.store
                        .fail(&id, FailureKind::Lost, "stored without its instance")?;
                }
                _ => {
                    tracing::info!(grant = %id, state = %record.state, "re-adopting");
                    self.supervise(record);
                }
            }
        }
        Ok(())
    }

    /// Starts supervising a grant, or wakes its supervisor if it has one.
    /// The receiver turns true when supervision ends.
    fn supervise(self: &Arc<Self>, record: GrantRecord) -> watch::Receiver<bool> {
        let id = record.grant.id.clone();
        let wake = Arc::new(Notify::new());
        let (done_tx, done_rx) = watch::channel(false);
        // Held across the spawn so the task cannot deregister before it is
        // registered.
        let mut supervisors = self.lock_supervisors();
        if let Some(existing) = supervisors.get(&id) {
            existing.wake.notify_one();
            return existing.done.clone();
        }
        let manager = Arc::clone(self);
        let task_wake = Arc::clone(&wake);
        let task = tokio::spawn(async move {
            let id = record.grant.id.clone();
            if let Err(e) = manager.drive(record, &task_wake).await {
                tracing::error!(grant = %id, error = %error_chain(&e), "supervision stopped");
            }
            manager.lock_supervisors().remove(&id);
            let _ = done_tx.send(true);
        });
        supervisors.insert(
            id,
            Supervisor {
                wake,
                done: done_rx.clone(),
                abort: task.abort_handle(),
            },
        );
        done_rx
    }

    /// One grant's whole life from wherever the store says it is.
    async fn drive(&self, record: GrantRecord, wake: &Notify) -> Result<(), StoreError> {
        let instance = match (record.state, record.instance.clone()) {
            (GrantState::Pending, _) => match self.provision(&record.pinned_grant(), wake).await? {
                Some(instance) => instance,
                None => return Ok(()),
            },
            (GrantState::Running | GrantState::Terminating, Some(instance)) => instance,
            _ => return Ok(()),
        };
        self.run(&record.grant, &instance, wake).await
    }

    /// Provisions a pending grant. None when it ended without an instance.
    /// A stop requested meanwhile interrupts the provision (a build or a
    /// boot can take minutes) and ends the grant terminated.
    async fn provision(
        &self,
        grant: &Grant,
        wake: &Notify,
    ) -> Result<Option<ProvisionedInstance>, StoreError> {
        let id = grant.id.as_str();
        let current = self.store.get(id)?;
        if let Some(cause) = current.and_then(|r| r.stop) {
            self.store
                .finish(id, GrantState::Terminated, Some(cause.reason()), None)?;
            return Ok(None);
        }
        if grant.valid_to <= Utc::now() {
            self.store.request_stop(id, StopCause::Deadline)?;
            self.store.finish(
                id,
                GrantState::Terminated,
                Some(StopCause::Deadline.reason()),
                None,
            )?;
            return Ok(None);
        }
        if !self
            .store
            .transition(id, &[GrantState::Pending], GrantState::Provisioning, None)?
        {
            return Ok(None);
        }
        let started = Instant::now();
        // The backend being called, as stored before the call.
        let mut calling: Option<String> = None;
        let attempting = |backend: &str| {
            self.store.record_provisioning_backend(id, backend)?;
            calling = Some(backend.to_string());
            Ok::<_, StoreError>(())
        };
        let outcome = tokio::select! {
            // A provision that has finished wins: its instance is then
            // stopped like any running one, never dropped.
            biased;
            outcome = self.fleet.provision(grant, attempting) => outcome?,
            cause = self.stop_requested(id, wake) => {
                let cause = cause?;
                // The provision future is dropped by now; whatever it had
                // started (a build, a booting VM, a reservation) goes too.
                tracing::info!(grant = %id, cause = cause.as_str(), "interrupting the provision");
                self.fleet.abandon(id, calling.as_deref()).await;
                self.store
                    .finish(id, GrantState::Terminated, Some(cause.reason()), None)?;
                return Ok(None);
            }
        };
        let instance = match outcome {
            Ok(instance) => instance,
            Err(e) => {
                // A grant stopped while it provisioned ends as asked, not
                // as whatever its provision then ran into.
                if let Some(cause) = self.store.get(id)?.and_then(|r| r.stop) {
                    self.store
                        .finish(id, GrantState::Terminated, Some(cause.reason()), None)?;
                    return Ok(None);
                }
                let (kind, reason) = if e.is_capacity() {
                    (
                        FailureKind::NoCapacity,
                        format!("No capacity: {}", error_chain(&e)),
                    )
                } else {
                    (FailureKind::Provision, error_chain(&e))
                };
                tracing::warn!(grant = %id, error = %reason, "provisioning failed");
                self.store.fail(id, kind, &reason)?;
                return Ok(None);
            }
        };
        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match self.store.record_running(id, &instance, ms) {
            Ok(true) => Ok(Some(instance)),
            Ok(false) => {
                // Cannot happen while this task owns the grant; never leave
                // an instance nobody tracks.
                tracing::error!(grant = %id, "grant left provisioning under us; terminating its instance");
                self.store.record_orphan_instance(id, &instance)?;
                // Failures are logged inside; nothing more to do here.
                let _ = self.terminate_instance(id, &instance).await;
                Ok(None)
            }
            Err(e) => {
                // The instance cannot be recorded, so it must not live on.
                let _ = self.terminate_instance(id, &instance).await;
                Err(e)
            }
        }
    }

    /// Completes once a stop of the grant is recorded.
    async fn stop_requested(&self, id: &str, wake: &Notify) -> Result<StopCause, StoreError> {
        loop {
            if let Some(cause) = self.store.get(id)?.and_then(|r| r.stop) {
                return Ok(cause);
            }
            // `terminate` records the stop, then wakes the supervisor; a
            // wake that comes before this wait is kept as a permit.
            wake.notified().await;
        }
    }

    /// Watches a running instance until it exits, is stopped, or its
    /// deadline passes, and records how it ended.
    async fn run(
        &self,
        grant: &Grant,
        instance: &ProvisionedInstance,
        wake: &Notify,
    ) -> Result<(), StoreError> {
        let id = grant.id.as_str();
        let mut sampling = tokio::time::interval(self.settings.usage_interval);
        sampling.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; the first sample is due one interval in.
        sampling.tick().await;
        loop {
            let Some(record) = self.store.get(id)? else {
                return Ok(());
            };
            if record.state.is_final() {
                return Ok(());
            }
            if let Some(cause) = record.stop {
                return self.stop(id, instance, cause).await;
            }
            tokio::select! {
                ended = self.fleet.watch_until_exit(instance) => match ended {
                    Ok(usage) if usage.ended_at >= grant.valid_to => {
                        // Ended past its deadline with nobody here to stop
                        // it: the host's shim did (kilnd was down, or the
                        // host cut off from it).
                        self.store.request_stop(id, StopCause::Deadline)?;
                        let _ = self.terminate_instance(id, instance).await;
                        self.store.finish(
                            id,
                            GrantState::Terminated,
                            Some(StopCause::Deadline.reason()),
                            Some(&usage),
                        )?;
                        return Ok(());
                    }
                    Ok(usage) => return self.exited(id, instance, usage).await,
                    Err(e) if is_transient(&e) => {
                        tracing::warn!(grant = %id, error = %error_chain(&e), "watch failed; retrying");
                        tokio::time::sleep(self.settings.retry_delay).await;
                    }
                    Err(e) => {
                        let reason = format!("instance lost: {}", error_chain(&e));
                        tracing::error!(grant = %id, %reason);
                        // Best effort: whatever is left of it should go.
                        let _ = self.terminate_instance(id, instance).await;
                        self.store.fail(id, FailureKind::Lost, &reason)?;
                        return Ok(());
                    }
                },
                _ = tokio::time::sleep(until(grant.valid_to)) => {
                    if Utc::now() >= grant.valid_to {
                        tracing::info!(grant = %id, "valid_to reached");
                        self.store.request_stop(id, StopCause::Deadline)?;
                    }
                }
                _ = wake.notified() => {}
                _ = sampling.tick() => {
                    if let Some(usage) = self.current_usage(id, instance).await {
                        self.store.record_usage(id, &usage)?;
                    }
                }
            }
        }
    }

    /// The instance's usage so far, when its backend can tell; a backend
    /// failure is logged and only costs this sample.
    async fn current_usage(
        &self,
        id: &str,
        instance: &ProvisionedInstance,
    ) -> Option<UsageMetrics> {
        const LIMIT: Duration = Duration::from_secs(5);
        match tokio::time::timeout(LIMIT, self.fleet.current_usage(instance)).await {
            Ok(Ok(usage)) => usage,
            Ok(Err(e)) => {
                tracing::warn!(grant = %id, error = %error_chain(&e), "no usage sample");
                None
            }
            Err(_) => {
                tracing::warn!(grant = %id, "usage sample timed out");
                None
            }
        }
    }

    async fn exited(
        &self,
        id: &str,
        instance: &ProvisionedInstance,
        usage: UsageMetrics,
    ) -> Result<(), StoreError> {
        let reason = match usage.exit_status {
            Some(kiln_protocol::ExitStatus::Code(c)) => format!("exited with code {c}"),
            Some(kiln_protocol::ExitStatus::Signal(s)) => format!("killed by signal {s}"),
            None => "ended without an exit status".to_string(),
        };
        tracing::info!(grant = %id, %reason, "workload ended");
        // Release first: if kilnd dies in between, re-adoption finds the
        // instance ended and records this again. A failure is logged inside;
        // the workload has ended either way.
        let _ = self.terminate_instance(id, instance).await;
        self.store
            .finish(id, GrantState::Exited, Some(&reason), Some(&usage))?;
        Ok(())
    }

    async fn stop(
        &self,
        id: &str,
        instance: &ProvisionedInstance,
        cause: StopCause,
    ) -> Result<(), StoreError> {
        tracing::info!(grant = %id, cause = cause.as_str(), "terminating");
        // An instance that may still run is never forgotten: transient
        // failures are retried until they pass; only a permanent one ends
        // the grant as failed.
        loop {
            match self.terminate_instance(id, instance).await {
                Ok(()) => break,
                Err(e) if is_transient(&e) => {
                    tokio::time::sleep(self.settings.retry_delay * 10).await;
                }
                Err(e) => {
                    let reason = format!("could not terminate: {}", error_chain(&e));
                    self.store.fail(id, FailureKind::Lost, &reason)?;
                    return Ok(());
                }
            }
        }
        let usage = match tokio::time::timeout(
            self.settings.final_usage_wait,
            self.fleet.watch_until_exit(instance),
        )
        .await
        {
            Ok(Ok(usage)) => Some(usage),
            Ok(Err(e)) => {
                tracing::warn!(grant = %id, error = %error_chain(&e), "no final usage");
                None
            }
            Err(_) => {
                tracing::warn!(grant = %id, "final usage did not arrive in time");
                None
            }
        };
        self.store.finish(
            id,
            GrantState::Terminated,
            Some(cause.reason()),
            usage.as_ref(),
        )?;
        Ok(())
    }

    /// Terminates, retrying transient failures a few times.
    async fn terminate_instance(
        &self,
        id: &str,
        instance: &ProvisionedInstance,
    ) -> Result<(), FleetError> {
        let attempts = self.settings.terminate_attempts.max(1);
        let mut attempt = 1;
        loop {
            match self.fleet.terminate(instance).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(grant = %id, attempt, error = %error_chain(&e), "terminate failed");
                    if !is_transient(&e) || attempt >= attempts {
                        return Err(e);
                    }
                    attempt += 1;
                    tokio::time::sleep(self.settings.retry_delay).await;
                }
            }
        }
    }

    fn lock_supervisors(&self) -> MutexGuard<'_, HashMap<String, Supervisor>> {
        // Each update is a single insert or remove; a poisoned map is whole.
        self.supervisors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn is_transient(e: &FleetError) -> bool {
    matches!(
        e,
        FleetError::Backend {
            error: BackendError::Transient(_),
            ..
        }
    )
}

/// Time left until `t` (zero if past), capped so a far-off deadline cannot
/// overflow the timer; the caller checks the clock when the sleep ends.
fn until(t: chrono::DateTime<Utc>) -> Duration {
    const LONGEST: Duration = Duration::from_secs(24 * 3600);
    (t - Utc::now())
        .to_std()
        .unwrap_or(Duration::ZERO)
        .min(LONGEST)
}
