//! Durable state in SQLite: grants, their instances, usage samples and an
//! event log. Every change is one transaction, written before the action it
//! announces, so a `kill -9` loses nothing that was acknowledged.
//!
//! Calls block briefly (one local SQLite transaction each); async callers
//! make them in place rather than hop to a blocking thread for each.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};

use crate::backend::{ProvisionedInstance, UsageMetrics};
use crate::grant::Grant;
use crate::state::{FailureKind, GrantRecord, GrantState, StopCause};

/// The database file inside the state directory.
pub const DB_FILE: &str = "bridge.sqlite3";
/// The schema as numbered steps: step N takes a database from version
/// N-1 (SQLite's `user_version`) to N, in one transaction. A step never
/// changes once released; a change of schema is a new step.
const MIGRATIONS: &[&str] = &[
    // 1: grants, their instances, usage samples, events.
    "
CREATE TABLE IF NOT EXISTS grants (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    stop TEXT,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    grant_id TEXT PRIMARY KEY REFERENCES grants(id),
    backend TEXT NOT NULL,
    data TEXT NOT NULL,
    provision_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS usage_samples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    grant_id TEXT NOT NULL REFERENCES grants(id),
    taken_at TEXT NOT NULL,
    final INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    grant_id TEXT NOT NULL REFERENCES grants(id),
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS grants_by_state ON grants(state);
CREATE INDEX IF NOT EXISTS usage_by_grant ON usage_samples(grant_id, seq);
CREATE INDEX IF NOT EXISTS events_by_grant ON events(grant_id, seq);
",
    // 2: the digest a grant's image tag was pinned to at submit.
    "ALTER TABLE grants ADD COLUMN image_digest TEXT;",
    // 3: why a failed grant failed, as a kind (the reason is for people).
    "ALTER TABLE grants ADD COLUMN failure TEXT;",
    // 4: the backend a grant's provision is calling, stored before the
    // call, so a restart after a crash knows which backend to ask to
    // abandon it.
    "ALTER TABLE grants ADD COLUMN provisioning_backend TEXT;",
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Cannot create state directory {0}")]
    CreateDir(PathBuf, #[source] std::io::Error),
    #[error("Database error")]
    Sqlite(#[from] rusqlite::Error),
    #[error("Database schema version {0} is newer than this build understands")]
    NewerSchema(i64),
    #[error("Stored {what} of grant {grant} is unreadable")]
    Corrupt {
        grant: String,
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("Cannot encode {0}")]
    Encode(&'static str, #[source] serde_json::Error),
}

/// Outcome of storing a new grant.
#[derive(Debug)]
pub enum Inserted {
    Created(GrantRecord),
    /// A grant with that id was already stored; here it is, unchanged.
    Existing(GrantRecord),
}

/// One line of a grant's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub at: DateTime<Utc>,
    pub kind: String,
    pub detail: Option<String>,
}

/// A usage sample and whether it is the final one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageSample {
    pub taken_at: DateTime<Utc>,
    pub r#final: bool,
    pub usage: UsageMetrics,
}

pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating if needed) the database in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| StoreError::CreateDir(state_dir.to_path_buf(), e))?;
        let conn = Connection::open(state_dir.join(DB_FILE))?;
        // WAL keeps readers off the writer's back; FULL sync makes every
        // committed transaction survive a crash of the whole machine too.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut conn = conn;
        migrate(&mut conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    /// Stores a new pending grant, or returns the one already stored under
    /// its id (the caller decides whether that is a resubmission).
    pub fn insert_grant(&self, grant: &Grant) -> Result<Inserted, StoreError> {
        self.insert_pinned(grant, None, None)
    }

    /// As [`Store::insert_grant`], with the digest its image tag was
    /// pinned to and the name of the API token that submitted it.
    pub fn insert_pinned(
        &self,
        grant: &Grant,
        image_digest: Option<&str>,
        by: Option<&str>,
    ) -> Result<Inserted, StoreError> {
        let spec = serde_json::to_string(grant).map_err(|e| StoreError::Encode("grant", e))?;
        let now = Utc::now();
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let added = tx.execute(
            "INSERT INTO grants (id, spec, state, updated_at, image_digest)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(id) DO NOTHING",
            params![
                grant.id,
                spec,
                GrantState::Pending.as_str(),
                now.to_rfc3339(),
                image_digest
            ],
        )?;
        if added == 1 {
            log_event(&tx, &grant.id, "submitted", None)?;
            log_actor(&tx, &grant.id, by)?;
        }
        let record = read_record(&tx, &grant.id)?;
        tx.commit()?;
        let record = record.ok_or_else(|| StoreError::Corrupt {
            grant: grant.id.clone(),
            what: "row",
            source: "vanished inside its own transaction".into(),
        })?;
        Ok(if added == 1 {
            Inserted::Created(record)
        } else {
            Inserted::Existing(record)
        })
    }

    pub fn get(&self, id: &str) -> Result<Option<GrantRecord>, StoreError> {
        read_record(&self.lock(), id)
    }

    /// Every grant, oldest first.
    pub fn list(&self) -> Result<Vec<GrantRecord>, StoreError> {
        let conn = self.lock();
        let ids = query_ids(&conn, "SELECT id FROM grants ORDER BY seq", [])?;
        ids.iter()
            .filter_map(|id| read_record(&conn, id).transpose())
            .collect()
    }

    /// Grants in any of `states`, oldest first.
    pub fn in_states(&self, states: &[GrantState]) -> Result<Vec<GrantRecord>, StoreError> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|r| states.contains(&r.state))
            .collect())
    }

    /// Moves a grant to `to` if it is in one of `from`. Returns whether it moved.
    pub fn transition(
        &self,
        id: &str,
        from: &[GrantState],
        to: GrantState,
        reason: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let moved = set_state(&tx, id, from, to, reason)?;
        tx.commit()?;
        Ok(moved)
    }

    /// Records that the grant's provision is about to call `backend`,
    /// replacing the backend it called before (which, having failed, left
    /// nothing behind).
    pub fn record_provisioning_backend(&self, id: &str, backend: &str) -> Result<(), StoreError> {
        self.lock().execute(
            "UPDATE grants SET provisioning_backend = ?2 WHERE id = ?1",
            params![id, backend],
        )?;
        Ok(())
    }

    /// Records the instance and moves the grant from provisioning to running.
    /// Returns false (storing nothing) if the grant had left provisioning.
    pub fn record_running(
        &self,
        id: &str,
        instance: &ProvisionedInstance,
        provision_ms: u64,
    ) -> Result<bool, StoreError> {
        let data =
            serde_json::to_string(instance).map_err(|e| StoreError::Encode("instance", e))?;
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        if !set_state(
            &tx,
            id,
            &[GrantState::Provisioning],
            GrantState::Running,
            None,
        )? {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO instances (grant_id, backend, data, provision_ms) VALUES (?1, ?2, ?3, ?4)",
            params![
                id,
                instance.backend,
                data,
                i64::try_from(provision_ms).unwrap_or(i64::MAX)
            ],
        )?;
        log_event(&tx, id, "instance", Some(&instance.instance_id))?;
        tx.commit()?;
        Ok(true)
    }

    /// Stores an instance for a grant that is being stopped before it ran,
    /// so that the instance is not forgotten while it is terminated.
    pub fn record_orphan_instance(
        &self,
        id: &str,
        instance: &ProvisionedInstance,
    ) -> Result<(), StoreError> {
        let data =
            serde_json::to_string(instance).map_err(|e| StoreError::Encode("instance", e))?;
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO instances (grant_id, backend, data, provision_ms) VALUES (?1, ?2, ?3, 0)
             ON CONFLICT(grant_id) DO NOTHING",
            params![id, instance.backend, data],
        )?;
        log_event(&tx, id, "instance", Some(&instance.instance_id))?;
        tx.commit()?;
        Ok(())
    }

    /// Records that the grant must stop, unless it has already ended or a
    /// stop was already recorded (the first cause wins). A running grant
    /// becomes terminating. Returns the grant as it now stands.
    pub fn request_stop(
        &self,
        id: &str,
        cause: StopCause,
    ) -> Result<Option<GrantRecord>, StoreError> {
        self.request_stop_by(id, cause, None)
    }

    /// As [`Store::request_stop`], recording the name of the API token
    /// that asked.
    pub fn request_stop_by(
        &self,
        id: &str,
        cause: StopCause,
        by: Option<&str>,
    ) -> Result<Option<GrantRecord>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let Some(before) = read_record(&tx, id)? else {
            return Ok(None);
        };
        if !before.state.is_final() && before.stop.is_none() {
            tx.execute(
                "UPDATE grants SET stop = ?2, updated_at = ?3 WHERE id = ?1",
                params![id, cause.as_str(), Utc::now().to_rfc3339()],
            )?;
            log_event(&tx, id, "stop", Some(cause.as_str()))?;
            log_actor(&tx, id, by)?;
            set_state(
                &tx,
                id,
                &[GrantState::Running],
                GrantState::Terminating,
                Some(cause.reason()),
            )?;
        }
        let after = read_record(&tx, id)?;
        tx.commit()?;
        Ok(after)
    }

    /// Ends a grant as failed, of `kind`. Returns false if it had already
    /// ended.
    pub fn fail(&self, id: &str, kind: FailureKind, reason: &str) -> Result<bool, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        if !set_state(&tx, id, &not_final(), GrantState::Failed, Some(reason))? {
            return Ok(false);
        }
        tx.execute(
            "UPDATE grants SET failure = ?2 WHERE id = ?1",
            params![id, kind.as_str()],
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// Ends a grant in a final state, with its final usage if known.
    /// Returns false if it had already ended.
    pub fn finish(
        &self,
        id: &str,
        state: GrantState,
        reason: Option<&str>,
        usage: Option<&UsageMetrics>,
    ) -> Result<bool, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        if !set_state(&tx, id, &not_final(), state, reason)? {
            return Ok(false);
        }
        if let Some(usage) = usage {
            insert_usage(&tx, id, usage, true)?;
        }
        tx.commit()?;
        Ok(true)
    }

    /// Adds a sample of usage so far to a grant that has not ended.
    /// Returns false (and stores nothing) once it has ended, so a late
    /// sample never follows the final one.
    pub fn record_usage(&self, id: &str, usage: &UsageMetrics) -> Result<bool, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let Some(record) = read_record(&tx, id)? else {
            return Ok(false);
        };
        if record.state.is_final() {
            return Ok(false);
        }
        insert_usage(&tx, id, usage, false)?;
        tx.commit()?;
        Ok(true)
    }

    /// The newest usage sample of a grant.
    pub fn latest_usage(&self, id: &str) -> Result<Option<UsageSample>, StoreError> {
        let conn = self.lock();
        let row = conn
            .query_row(
                "SELECT taken_at, final, data FROM usage_samples WHERE grant_id = ?1
                 ORDER BY seq DESC LIMIT 1",
                [id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, bool>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                },
            )
            .optional()?;
        row.map(|(taken_at, fin, data)| {
            Ok(UsageSample {
                taken_at: parse_time(id, &taken_at)?,
                r#final: fin,
                usage: serde_json::from_str(&data).map_err(|e| corrupt(id, "usage", e))?,
            })
        })
        .transpose()
    }

    /// A grant's history, oldest first.
    pub fn events(&self, id: &str) -> Result<Vec<Event>, StoreError> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare("SELECT at, kind, detail FROM events WHERE grant_id = ?1 ORDER BY seq")?;
        let rows = stmt
            .query_map([id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(at, kind, detail)| {
                Ok(Event {
                    at: parse_time(id, &at)?,
                    kind,
                    detail,
                })
            })
            .collect()
    }

    pub fn counts_by_state(&self) -> Result<BTreeMap<GrantState, u64>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare("SELECT state, COUNT(*) FROM grants GROUP BY state")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        let mut counts: BTreeMap<GrantState, u64> =
            GrantState::ALL.into_iter().map(|s| (s, 0)).collect();
        for (state, n) in rows {
            let state = state
                .parse::<GrantState>()
                .map_err(|e| corrupt("*", "state", e))?;
            counts.insert(state, u64::try_from(n).unwrap_or(0));
        }
        Ok(counts)
    }

    /// How long each successful provisioning took, in milliseconds.
    pub fn provision_times_ms(&self) -> Result<Vec<u64>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare("SELECT provision_ms FROM instances WHERE provision_ms > 0")?;
        let rows = stmt
            .query_map([], |r| r.get::<_, i64>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows
            .into_iter()
            .map(|ms| u64::try_from(ms).unwrap_or(0))
            .collect())
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // Transactions roll back when dropped, so a panic under the lock
        // leaves the database consistent and the connection usable.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn not_final() -> Vec<GrantState> {
    GrantState::ALL
        .into_iter()
        .filter(|s| !s.is_final())
        .collect()
}

/// Brings the database to the newest schema, one step at a time.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let newest = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    if version > newest {
        return Err(StoreError::NewerSchema(version));
    }
    for (step, sql) in (1..)
        .zip(MIGRATIONS)
        .skip(usize::try_from(version).unwrap_or(0))
    {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", step)?;
        tx.commit()?;
    }
    Ok(())
}

fn set_state(
    tx: &Transaction<'_>,
    id: &str,
    from: &[GrantState],
    to: GrantState,
    reason: Option<&str>,
) -> Result<bool, StoreError> {
    let current: Option<String> = tx
        .query_row("SELECT state FROM grants WHERE id = ?1", [id], |r| r.get(0))
        .optional()?;
    let Some(current) = current else {
        return Ok(false);
    };
    let current: GrantState = current.parse().map_err(|e| corrupt(id, "state", e))?;
    if !from.contains(&current) {
        return Ok(false);
    }
    tx.execute(
        "UPDATE grants SET state = ?2, reason = COALESCE(?3, reason), updated_at = ?4 WHERE id = ?1",
        params![id, to.as_str(), reason, Utc::now().to_rfc3339()],
    )?;
    log_event(tx, id, to.as_str(), reason)?;
    Ok(true)
}

fn insert_usage(
    tx: &Transaction<'_>,
    id: &str,
    usage: &UsageMetrics,
    fin: bool,
) -> Result<(), StoreError> {
    let data = serde_json::to_string(usage).map_err(|e| StoreError::Encode("usage", e))?;
    tx.execute(
        "INSERT INTO usage_samples (grant_id, taken_at, final, data) VALUES (?1, ?2, ?3, ?4)",
        params![id, Utc::now().to_rfc3339(), fin, data],
    )?;
    Ok(())
}

fn log_event(
    tx: &Connection,
    id: &str,
    kind: &str,
    detail: Option<&str>,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO events (grant_id, at, kind, detail) VALUES (?1, ?2, ?3, ?4)",
        params![id, Utc::now().to_rfc3339(), kind, detail],
    )?;
    Ok(())
}

/// The event naming the API token behind the event just logged.
pub const BY_TOKEN_EVENT: &str = "by_token";

fn log_actor(tx: &Connection, id: &str, by: Option<&str>) -> Result<(), StoreError> {
    match by {
        Some(name) => log_event(tx, id, BY_TOKEN_EVENT, Some(name)),
        None => Ok(()),
    }
}

fn query_ids<P: rusqlite::Params>(
    conn: &Connection,
    sql: &str,
    params: P,
) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare(sql)?;
    let ids = stmt
        .query_map(params, |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ids)
}

fn read_record(conn: &Connection, id: &str) -> Result<Option<GrantRecord>, StoreError> {
    let row = conn
        .query_row(
            "SELECT g.spec, g.state, g.reason, g.stop, g.updated_at, i.data, g.image_digest,
                    g.failure, g.provisioning_backend
             FROM grants g LEFT JOIN instances i ON i.grant_id = g.id WHERE g.id = ?1",
            [id],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, Option<String>>(7)?,
                    r.get::<_, Option<String>>(8)?,
                ))
            },
        )
        .optional()?;
    let Some((
        spec,
        state,
        reason,
        stop,
        updated_at,
        instance,
        image_digest,
        failure,
        provisioning_backend,
    )) = row
    else {
        return Ok(None);
    };
    Ok(Some(GrantRecord {
        grant: serde_json::from_str(&spec).map_err(|e| corrupt(id, "grant", e))?,
        state: state.parse().map_err(|e| corrupt(id, "state", e))?,
        reason,
        stop: stop.as_deref().and_then(StopCause::parse),
        failure: failure.as_deref().and_then(FailureKind::parse),
        image_digest,
        provisioning_backend,
        instance: instance
            .map(|d| serde_json::from_str(&d))
            .transpose()
            .map_err(|e| corrupt(id, "instance", e))?,
        updated_at: parse_time(id, &updated_at)?,
    }))
}

fn parse_time(id: &str, s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| corrupt(id, "time", e))
}

fn corrupt(
    id: &str,
    what: &'static str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> StoreError {
    StoreError::Corrupt {
        grant: id.to_string(),
        what,
        source: Box::new(e),
    }
}

impl crate::backends::LiveGrants for Store {
    fn is_live(&self, grant_id: &str) -> bool {
        match self.get(grant_id) {
            Ok(Some(record)) => !record.state.is_final(),
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(grant = %grant_id, error = %crate::error_chain(&e), "cannot tell whether a grant is live; keeping its instance");
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::PublishedPort;
    use crate::grant::TdxPolicy;

    fn grant(id: &str) -> Grant {
        Grant {
            id: id.into(),
            image: "alpine".into(),
            vcpus: 1,
            cpu_millicores: None,
            ram_mib: 128,
            region: "home".into(),
            tdx: TdxPolicy::No,
            ssh_keys: vec!["ssh-ed25519 AAAA".into()],
            valid_to: "2030-01-01T00:00:00Z".parse().unwrap(),
            command: None,
            env: Default::default(),
            publish: Vec::new(),
            submitted_at: "2029-01-01T00:00:00Z".parse().unwrap(),
        }
    }

    fn instance() -> ProvisionedInstance {
        ProvisionedInstance {
            backend: "b".into(),
            instance_id: "i-1".into(),
            host: "127.0.0.1".into(),
            ssh_port: 2222,
            user: "root".into(),
            host_key_fingerprint: "SHA256:x".into(),
            host_key: String::new(),
            published: Vec::new(),
            started_at: "2029-01-01T00:00:01Z".parse().unwrap(),
            location: None,
            private: serde_json::json!({"pid": 42}),
        }
    }

    fn usage() -> UsageMetrics {
        UsageMetrics {
            guest: kiln_protocol::Usage {
                cpu_user_ms: 7,
                ..Default::default()
            },
            exit_status: Some(kiln_protocol::ExitStatus::Code(3)),
            host: Default::default(),
            ended_at: "2029-01-01T00:00:09Z".parse().unwrap(),
        }
    }

    #[test]
    fn a_grant_lives_through_its_states_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            assert!(matches!(
                store.insert_grant(&grant("a")).unwrap(),
                Inserted::Created(_)
            ));
            let Inserted::Existing(again) = store.insert_grant(&grant("a")).unwrap() else {
                panic!("inserted twice");
            };
            assert_eq!(again.state, GrantState::Pending);
            // Only from the listed states.
            assert!(!store
                .transition("a", &[GrantState::Running], GrantState::Exited, None)
                .unwrap());
            assert!(store
                .transition("a", &[GrantState::Pending], GrantState::Provisioning, None)
                .unwrap());
            assert!(store.record_running("a", &instance(), 150).unwrap());
            assert!(!store.record_running("a", &instance(), 150).unwrap());
        }
        let store = Store::open(dir.path()).unwrap();
        let r = store.get("a").unwrap().unwrap();
        assert_eq!(r.state, GrantState::Running);
        assert_eq!(r.instance, Some(instance()));
        assert_eq!(store.provision_times_ms().unwrap(), vec![150]);
        // Usage so far is kept while the grant runs, and is not final.
        let mut so_far = usage();
        so_far.exit_status = None;
        assert!(store.record_usage("a", &so_far).unwrap());
        let sample = store.latest_usage("a").unwrap().unwrap();
        assert!(!sample.r#final);
        assert_eq!(sample.usage, so_far);
        assert!(!store.record_usage("nobody", &so_far).unwrap());

        let r = store
            .request_stop("a", StopCause::Deadline)
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.state, r.stop),
            (GrantState::Terminating, Some(StopCause::Deadline))
        );
        // The first cause wins.
        let r = store
            .request_stop("a", StopCause::Requested)
            .unwrap()
            .unwrap();
        assert_eq!(r.stop, Some(StopCause::Deadline));

        assert!(store
            .finish(
                "a",
                GrantState::Terminated,
                Some("valid_to reached"),
                Some(&usage())
            )
            .unwrap());
        assert!(!store
            .finish("a", GrantState::Failed, Some("late"), None)
            .unwrap());
        let r = store.get("a").unwrap().unwrap();
        assert_eq!(
            (r.state, r.reason.as_deref()),
            (GrantState::Terminated, Some("valid_to reached"))
        );
        let sample = store.latest_usage("a").unwrap().unwrap();
        assert!(sample.r#final);
        assert_eq!(sample.usage, usage());
        // A late sample never follows the final one.
        assert!(!store.record_usage("a", &so_far).unwrap());
        assert!(store.latest_usage("a").unwrap().unwrap().r#final);

        let kinds: Vec<String> = store
            .events("a")
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                "submitted",
                "provisioning",
                "running",
                "instance",
                "stop",
                "terminating",
                "terminated"
            ]
        );
        let counts = store.counts_by_state().unwrap();
        assert_eq!(counts[&GrantState::Terminated], 1);
        assert_eq!(counts[&GrantState::Running], 0);
    }

    #[test]
    fn the_token_behind_a_submit_or_a_stop_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.insert_pinned(&grant("a"), None, Some("ci")).unwrap();
        // A resubmission changes nothing, its token included.
        store.insert_pinned(&grant("a"), None, Some("bob")).unwrap();
        store
            .transition("a", &[GrantState::Pending], GrantState::Running, None)
            .unwrap();
        store
            .request_stop_by("a", StopCause::Requested, Some("alice"))
            .unwrap();
        let events: Vec<(String, Option<String>)> = store
            .events("a")
            .unwrap()
            .into_iter()
            .map(|e| (e.kind, e.detail))
            .collect();
        let want = [
            ("submitted", None),
            (BY_TOKEN_EVENT, Some("ci")),
            ("running", None),
            ("stop", Some("requested")),
            (BY_TOKEN_EVENT, Some("alice")),
            ("terminating", Some(StopCause::Requested.reason())),
        ]
        .map(|(k, d)| (k.to_string(), d.map(str::to_string)));
        assert_eq!(events, want);
    }

    #[test]
    fn lists_keep_submission_order_and_filter_by_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for id in ["c", "a", "b"] {
            store.insert_grant(&grant(id)).unwrap();
        }
        store
            .transition("a", &[GrantState::Pending], GrantState::Failed, Some("x"))
            .unwrap();
        let ids: Vec<String> = store
            .list()
            .unwrap()
            .into_iter()
            .map(|r| r.grant.id)
            .collect();
        assert_eq!(ids, ["c", "a", "b"]);
        let pending: Vec<String> = store
            .in_states(&[GrantState::Pending])
            .unwrap()
            .into_iter()
            .map(|r| r.grant.id)
            .collect();
        assert_eq!(pending, ["c", "b"]);
        assert!(store.get("zzz").unwrap().is_none());
        assert!(store
            .request_stop("zzz", StopCause::Requested)
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_first_version_database_is_migrated_keeping_its_grants() {
        let dir = tempfile::tempdir().unwrap();
        {
            // As the first release left it: schema 1, one grant.
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO grants (id, spec, state, updated_at) VALUES ('old', ?1, 'running', ?2)",
                params![
                    serde_json::to_string(&grant("old")).unwrap(),
                    "2029-01-01T00:00:00Z"
                ],
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let old = store.get("old").unwrap().unwrap();
        assert_eq!((old.state, old.image_digest), (GrantState::Running, None));
        let digest = format!("sha256:{}", "c".repeat(64));
        store
            .insert_pinned(&grant("new"), Some(&digest), None)
            .unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.get("new").unwrap().unwrap().image_digest,
            Some(digest)
        );
        assert!(store
            .fail("new", FailureKind::NoCapacity, "No capacity: full")
            .unwrap());
        assert!(!store.fail("new", FailureKind::Lost, "late").unwrap());
        let new = store.get("new").unwrap().unwrap();
        assert_eq!(
            (new.state, new.failure, new.reason.as_deref()),
            (
                GrantState::Failed,
                Some(FailureKind::NoCapacity),
                Some("No capacity: full")
            )
        );
        let version: i64 = store
            .lock()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
    }

    #[test]
    fn the_backend_a_provision_calls_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.insert_grant(&grant("a")).unwrap();
            assert_eq!(store.get("a").unwrap().unwrap().provisioning_backend, None);
            store
                .transition("a", &[GrantState::Pending], GrantState::Provisioning, None)
                .unwrap();
            store.record_provisioning_backend("a", "first").unwrap();
            // Moving on to the next backend replaces it.
            store.record_provisioning_backend("a", "second").unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let a = store.get("a").unwrap().unwrap();
        assert_eq!(
            (a.state, a.provisioning_backend.as_deref()),
            (GrantState::Provisioning, Some("second"))
        );
        // Not an event: the grant's history is unchanged by it.
        let kinds: Vec<String> = store
            .events("a")
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, ["submitted", "provisioning"]);
    }

    #[test]
    fn a_grant_provisioning_before_backends_were_recorded_loads_without_one() {
        let dir = tempfile::tempdir().unwrap();
        {
            // As schema 3 left it: a grant caught provisioning.
            let mut conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            let tx = conn.transaction().unwrap();
            for step in &MIGRATIONS[..3] {
                tx.execute_batch(step).unwrap();
            }
            tx.pragma_update(None, "user_version", 3).unwrap();
            tx.execute(
                "INSERT INTO grants (id, spec, state, updated_at) VALUES ('old', ?1, 'provisioning', ?2)",
                params![
                    serde_json::to_string(&grant("old")).unwrap(),
                    "2029-01-01T00:00:00Z"
                ],
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let old = store.get("old").unwrap().unwrap();
        assert_eq!(
            (old.state, old.provisioning_backend),
            (GrantState::Provisioning, None)
        );
        store.record_provisioning_backend("old", "b").unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store
                .get("old")
                .unwrap()
                .unwrap()
                .provisioning_backend
                .as_deref(),
            Some("b")
        );
    }

    #[test]
    fn published_ports_survive_reopening_and_rows_stored_before_them_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let mut with_ports = grant("p");
        with_ports.publish = vec![8000, 8080];
        let mut inst = instance();
        inst.published = vec![
            PublishedPort {
                guest_port: 8000,
                host: "127.0.0.1".into(),
                port: 40001,
            },
            PublishedPort {
                guest_port: 8080,
                host: "127.0.0.1".into(),
                port: 40002,
            },
        ];
        {
            let store = Store::open(dir.path()).unwrap();
            store.insert_grant(&with_ports).unwrap();
            assert!(store
                .transition("p", &[GrantState::Pending], GrantState::Provisioning, None)
                .unwrap());
            assert!(store.record_running("p", &inst, 10).unwrap());
            // A grant and its instance as stored before ports could be
            // published: neither JSON has the field.
            let mut old_grant = serde_json::to_value(grant("old")).unwrap();
            let mut old_inst = serde_json::to_value(instance()).unwrap();
            assert!(old_grant
                .as_object_mut()
                .unwrap()
                .remove("publish")
                .is_none());
            assert!(old_inst
                .as_object_mut()
                .unwrap()
                .remove("published")
                .is_some());
            let conn = store.lock();
            conn.execute(
                "INSERT INTO grants (id, spec, state, updated_at) VALUES ('old', ?1, 'running', ?2)",
                params![old_grant.to_string(), "2029-01-01T00:00:00Z"],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO instances (grant_id, backend, data, provision_ms) VALUES ('old', 'b', ?1, 5)",
                params![old_inst.to_string()],
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let p = store.get("p").unwrap().unwrap();
        assert_eq!(p.grant.publish, [8000, 8080]);
        assert_eq!(p.instance.as_ref().unwrap().published, inst.published);
        let view = crate::view::GrantView::from(p);
        assert_eq!(view.connection.unwrap().published, inst.published);
        let old = store.get("old").unwrap().unwrap();
        assert!(old.grant.publish.is_empty());
        assert_eq!(old.instance, Some(instance()));
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::NewerSchema(99))
        ));
    }
}
