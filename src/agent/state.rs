//! What the agent remembers across restarts: for each schedule, the instant up to which its
//! runs were dealt with, and its last run. Kept in `agent-state.json` under `[agent] state_dir`
//! (by default the configuration file's directory), replaced whole on each change by writing a
//! temporary file and renaming it over the old one, so a crash leaves the old or the new file,
//! never half of one.
//!
//! A restarted agent counts the runs due after `handled_until` as missed (see `schedule`), and
//! keeps waiting for a run a blackout window deferred (`deferred`), which runs when the window
//! closes even if the agent restarted inside it. A job abandoned at shutdown counts as dealt
//! with: its next run starts over.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::schedule::DeferredRun;
use super::status::RunRecord;
use super::AgentError;
use crate::config::Config;

/// The file's name inside the state directory.
pub const STATE_FILE: &str = "agent-state.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScheduleRecord {
    /// Every run due at or before this instant was dealt with.
    pub handled_until: Option<DateTime<Utc>>,
    pub last_run: Option<RunRecord>,
    pub last_success: Option<DateTime<Utc>>,
    /// A run waiting for blackout windows to close, and the windows that deferred it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferred: Option<DeferredRun>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deferred_by: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    schedules: BTreeMap<String, ScheduleRecord>,
}

/// The state file, loaded once and rewritten on each change.
pub struct StateStore {
    path: PathBuf,
    state: Mutex<StateFile>,
}

impl StateStore {
    /// Reads the state of `config`'s agent; a missing file is a first start.
    pub fn open(config: &Config) -> Result<StateStore, AgentError> {
        let base = config
            .path
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_default();
        let dir = match &config.agent.state_dir {
            Some(d) => base.join(d),
            None => base,
        };
        let path = dir.join(STATE_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AgentError::State {
                path: path.display().to_string(),
                reason: format!("{e}; move the file away to start with no record of past runs"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
            Err(e) => {
                return Err(AgentError::State {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })
            }
        };
        let store = StateStore {
            path,
            state: Mutex::new(state),
        };
        // Fails now, not at the first run, when the directory is not writable.
        store.save()?;
        Ok(store)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// What was recorded for `schedule`.
    pub fn get(&self, schedule: &str) -> ScheduleRecord {
        self.lock()
            .schedules
            .get(schedule)
            .cloned()
            .unwrap_or_default()
    }

    /// Changes the record of `schedule` and writes the file.
    pub fn update(
        &self,
        schedule: &str,
        change: impl FnOnce(&mut ScheduleRecord),
    ) -> Result<(), AgentError> {
        change(
            self.lock()
                .schedules
                .entry(schedule.to_string())
                .or_default(),
        );
        self.save()
    }

    fn save(&self) -> Result<(), AgentError> {
        // Held while writing, so two writers never share the temporary file.
        let state = self.lock();
        let text = serde_json::to_vec_pretty(&*state).map_err(|e| self.error(e))?;
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &self.path))
            .map_err(|e| self.error(e))
    }

    fn error(&self, e: impl std::fmt::Display) -> AgentError {
        AgentError::State {
            path: self.path.display().to_string(),
            reason: format!("{e}; make the directory writable or set [agent] state_dir"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StateFile> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
