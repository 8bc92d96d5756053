//! Shared helpers for the tests that run the real `tern` binary.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The binary under test.
pub const TERN: &str = env!("CARGO_BIN_EXE_tern");

/// Starts `tern edge ARGS…` and waits for its first stdout line ("… listening on ADDR …"),
/// which it returns with the child (killed when dropped).
pub async fn spawn_edge<I, S>(args: I, wait: Duration) -> (Child, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut child = Command::new(TERN)
        .arg("edge")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(wait, lines.next_line()).await.unwrap().unwrap().unwrap();
    assert!(line.contains("listening"), "{line}");
    (child, line)
}
