//! Helpers shared by the integration tests: where `../shared` is, and skipping outside CI.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// `TAMING_SHARED`, or `../shared` beside the repository root.
pub fn shared_dir() -> PathBuf {
    match std::env::var_os("TAMING_SHARED") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
    }
}

/// `shared/<sub>` when it exists; otherwise prints why the test is skipped and returns None,
/// except under CI (env `CI` set), where a missing folder fails the test.
pub fn shared(sub: &str) -> Option<PathBuf> {
    let dir = shared_dir().join(sub);
    if dir.exists() {
        return Some(dir);
    }
    let reason = format!("{} not found (set TAMING_SHARED)", dir.display());
    if std::env::var_os("CI").is_some() {
        panic!("{reason}");
    }
    eprintln!("skipping: {reason}");
    None
}

/// A fixture folder `shared/fixtures/<name>`.
pub fn fixture(name: &str) -> Option<PathBuf> {
    shared(&format!("fixtures/{name}"))
}
