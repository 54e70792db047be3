//! A process's working directory and environment, which a forkserver child adopts from its
//! requester.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A process's working directory and environment.
///
/// The server is a snapshot of its parent at first use; a child forked from it would see the
/// directory and environment of that moment, not the requester's (Python's forkserver has
/// this flaw). So each request carries the requester's when they changed since the server
/// started, and the child adopts them before it runs anything: a forkserver child starts in
/// the same surroundings as a spawned one would.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Surroundings {
    cwd: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
}

impl Surroundings {
    /// This process's, now.
    pub(super) fn current() -> Self {
        Surroundings {
            cwd: std::env::current_dir().ok(),
            env: std::env::vars_os().collect(),
        }
    }

    /// Makes them this process's.
    ///
    /// # Safety
    ///
    /// The process must have a single thread (changing the environment while another
    /// thread reads it is undefined behaviour).
    pub(super) unsafe fn adopt(self) -> Result<(), String> {
        if let Some(cwd) = &self.cwd {
            std::env::set_current_dir(cwd)
                .map_err(|e| format!("cannot enter the working directory {cwd:?}: {e}"))?;
        }
        let wanted: HashMap<OsString, OsString> = self.env.into_iter().collect();
        for (key, _) in std::env::vars_os() {
            if !wanted.contains_key(&key) {
                // SAFETY: single-threaded, by this function's contract.
                unsafe { std::env::remove_var(&key) };
            }
        }
        for (key, value) in wanted {
            if std::env::var_os(&key).as_ref() != Some(&value) {
                // SAFETY: single-threaded, by this function's contract.
                unsafe { std::env::set_var(&key, &value) };
            }
        }
        Ok(())
    }
}
