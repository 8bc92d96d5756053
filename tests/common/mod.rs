//! Shared helpers for the tests that run the real `tern` binary.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The binary under test: the one cargo built, or `TERN_BIN` when set (to loop a test
/// against a copy while the workspace is rebuilt).
pub fn tern() -> String {
    std::env::var("TERN_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tern").to_owned())
}

/// Starts `tern edge ARGS…` and waits for its first stdout line ("… listening on ADDR …"),
/// which it returns with the child (killed when dropped).
pub async fn spawn_edge<I, S>(args: I, wait: Duration) -> (Child, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut child = Command::new(tern())
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

/// The regions of the process clusters the tests start.
pub const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-south"];

/// Three `tern edge` configurations (one node per region of [`REGIONS`]) for a backbone
/// mesh on loopback, with development certificates made by `tern certs` in `dir`.
pub struct ProcessCluster {
    /// Client addresses.
    pub client: Vec<SocketAddr>,
    /// Configuration files.
    pub configs: Vec<PathBuf>,
}

impl ProcessCluster {
    /// Writes certificates and configurations; `extra(region)` is appended to each.
    pub fn write(dir: &Path, extra: impl Fn(&str) -> String) -> Self {
        let d = dir.to_str().unwrap();
        let run = |args: &[&str]| {
            assert!(std::process::Command::new(tern()).args(args).status().unwrap().success());
        };
        run(&["certs", "init", "--dir", d]);
        for r in REGIONS {
            run(&["certs", "node", &format!("{r}/edge-1"), "--dir", d]);
        }
        let free_tcp = || TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let free_udp = || UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let client: Vec<SocketAddr> = REGIONS.iter().map(|_| free_tcp()).collect();
        let backbone: Vec<SocketAddr> = REGIONS.iter().map(|_| free_udp()).collect();
        let mut configs = Vec::new();
        for (i, r) in REGIONS.iter().enumerate() {
            let mut toml = format!(
                "[node]\nregion = \"{r}\"\nname = \"edge-1\"\n[listen]\nclient = \"{}\"\n\
                 [heartbeat]\ninterval = \"500ms\"\nidle_timeout = \"5s\"\n\
                 [limits]\npublish_rate = 1000000\npublish_burst = 1000000\n\
                 frame_rate = 1000000\nframe_burst = 1000000\n\
                 [backbone]\nlisten = \"{}\"\nca = \"{d}/ca.pem\"\ncert = \"{d}/{r}-edge-1.pem\"\nkey = \"{d}/{r}-edge-1.key\"\n",
                client[i], backbone[i]
            );
            for (j, r2) in REGIONS.iter().enumerate() {
                if j != i {
                    toml += &format!(
                        "[[backbone.peers]]\nid = \"{r2}/edge-1\"\naddr = \"{}\"\n",
                        backbone[j]
                    );
                }
            }
            toml += &extra(r);
            let path = dir.join(format!("{r}.toml"));
            std::fs::write(&path, toml).unwrap();
            configs.push(path);
        }
        Self { client, configs }
    }

    /// Starts node `i` and waits until it listens.
    pub async fn start(&self, i: usize, wait: Duration) -> Child {
        spawn_edge([OsStr::new("--config"), self.configs[i].as_os_str()], wait).await.0
    }

    /// Node `i`'s client URL.
    pub fn url(&self, i: usize) -> String {
        format!("ws://{}", self.client[i])
    }
}
