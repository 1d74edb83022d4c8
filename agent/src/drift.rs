//! The drift file: the clock's frequency correction and its error, so a restarted agent starts
//! close to the right frequency. Written at most hourly and on shutdown (atomically, via a
//! temporary file, synced), loaded at start, ignored when stale, unreadable or out of range.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use stratum_ntp::discipline::DriftState;

/// Minimum interval between periodic writes (chrony's default `driftfile` interval).
pub const WRITE_INTERVAL: Duration = Duration::from_secs(3600);
/// A drift saved longer ago than this is no longer trusted (temperature, hardware changes).
pub const MAX_AGE: Duration = Duration::from_secs(14 * 86_400);

/// The file's content.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DriftFile {
    /// Frequency correction, ppm.
    pub frequency_ppm: f64,
    /// One-sigma error, ppm.
    pub error_ppm: f64,
    /// When it was written, Unix seconds.
    pub saved_at_unix: i64,
}

/// Why a drift file was not used.
#[derive(Debug, thiserror::Error)]
pub enum DriftLoadError {
    /// No file yet (first start).
    #[error("no drift file at {0}")]
    Missing(PathBuf),
    /// Unreadable or not our format.
    #[error("drift file {0} is unreadable: {1}")]
    Corrupt(PathBuf, String),
    /// Too old to trust.
    #[error("drift file {0} is {1} days old; ignoring it")]
    Stale(PathBuf, i64),
}

/// Loads the drift saved at `path`, judged against `now_unix`.
pub fn load(path: &Path, now_unix: i64) -> Result<DriftState, DriftLoadError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DriftLoadError::Missing(path.into()));
        }
        Err(e) => return Err(DriftLoadError::Corrupt(path.into(), e.to_string())),
    };
    let file: DriftFile = serde_json::from_str(&text)
        .map_err(|e| DriftLoadError::Corrupt(path.into(), e.to_string()))?;
    let age = now_unix - file.saved_at_unix;
    if age > MAX_AGE.as_secs() as i64 || age < -86_400 {
        return Err(DriftLoadError::Stale(path.into(), age / 86_400));
    }
    Ok(DriftState {
        frequency_ppm: file.frequency_ppm,
        error_ppm: file.error_ppm,
    })
}

/// Saves `drift` to `path` atomically (and durably: see [`crate::state_file`]).
pub fn save(path: &Path, drift: DriftState, now_unix: i64) -> std::io::Result<()> {
    let file = DriftFile {
        frequency_ppm: drift.frequency_ppm,
        error_ppm: drift.error_ppm,
        saved_at_unix: now_unix,
    };
    crate::state_file::write_atomically(
        path,
        &serde_json::to_vec(&file).map_err(std::io::Error::other)?,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("stratum-drift-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("drift.json")
    }

    #[test]
    fn a_saved_drift_loads_back() {
        let path = temp_path("roundtrip");
        save(
            &path,
            DriftState {
                frequency_ppm: -12.5,
                error_ppm: 0.3,
            },
            1_000_000,
        )
        .unwrap();
        let d = load(&path, 1_000_000 + 3600).unwrap();
        assert_eq!((d.frequency_ppm, d.error_ppm), (-12.5, 0.3));
    }

    #[test]
    fn a_stale_drift_is_ignored() {
        let path = temp_path("stale");
        save(
            &path,
            DriftState {
                frequency_ppm: 1.0,
                error_ppm: 0.1,
            },
            0,
        )
        .unwrap();
        assert!(matches!(
            load(&path, 15 * 86_400),
            Err(DriftLoadError::Stale(..))
        ));
    }

    #[test]
    fn a_missing_or_corrupt_drift_is_reported_not_fatal() {
        let path = temp_path("corrupt");
        let _ = std::fs::remove_file(&path);
        assert!(matches!(load(&path, 0), Err(DriftLoadError::Missing(_))));
        std::fs::write(&path, "not json").unwrap();
        assert!(matches!(load(&path, 0), Err(DriftLoadError::Corrupt(..))));
    }
}
