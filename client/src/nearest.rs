//! Nearest-edge selection: probe each candidate's `/v1/ping` and rank them by round-trip
//! time.
//!
//! Each candidate gets its own TCP connection; the first request pays for the connection
//! set-up, so the figure kept is the fastest of `probes` requests on that kept-alive
//! connection (a connect-time figure would count the handshake twice). Probes run
//! concurrently, bounded by `timeout` each; an unreachable candidate ranks last.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A connection to an edge: plain, or TLS for `wss://` and `https://`.
pub(crate) trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// Connects to `url`'s host, with TLS (verified by `tls`) for `wss://` and `https://`.
pub(crate) async fn dial(
    url: &str,
    tls: &Arc<rustls::ClientConfig>,
) -> std::io::Result<Box<dyn Conn>> {
    let host = authority(url)?;
    let stream = TcpStream::connect(host).await?;
    stream.set_nodelay(true)?;
    if !(url.starts_with("wss://") || url.starts_with("https://")) {
        return Ok(Box::new(stream));
    }
    let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let name = name.trim_start_matches('[').trim_end_matches(']');
    let name = rustls_pki_types::ServerName::try_from(name.to_owned())
        .map_err(|e| std::io::Error::other(format!("{host}: {e}")))?;
    let tls = tokio_rustls::TlsConnector::from(tls.clone()).connect(name, stream).await?;
    Ok(Box::new(tls))
}

/// A probed candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// The candidate's URL, as given.
    pub url: String,
    /// Fastest `/v1/ping` round trip, or `None` when it could not be reached.
    pub rtt: Option<Duration>,
    /// The region the edge reported (`x-tern-region`), if any.
    pub region: Option<String>,
}

/// Probes every candidate (`ws://` or `http://` base URLs) with `probes` pings each and
/// returns them fastest first; unreachable ones last, in the given order.
pub async fn rank(candidates: &[String], probes: usize, timeout: Duration) -> Vec<Probe> {
    rank_with(candidates, probes, timeout, &crate::ClientOptions::default().tls_config()).await
}

/// [`rank`], verifying `wss://`/`https://` candidates with `tls`.
pub async fn rank_with(
    candidates: &[String],
    probes: usize,
    timeout: Duration,
    tls: &Arc<rustls::ClientConfig>,
) -> Vec<Probe> {
    let tasks = candidates.iter().map(|url| {
        let url = url.clone();
        async move {
            let res = tokio::time::timeout(timeout, probe(&url, probes.max(1), tls)).await;
            let (rtt, region) = match res {
                Ok(Ok((rtt, region))) => (Some(rtt), region),
                _ => (None, None),
            };
            Probe { url, rtt, region }
        }
    });
    let mut out = futures_util::future::join_all(tasks).await;
    // Stable: equal or unreachable candidates keep their given order.
    out.sort_by_key(|p| p.rtt.unwrap_or(Duration::MAX));
    out
}

/// A region and its public URL, as `/v1/regions` lists them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Region {
    /// Region id.
    pub region: String,
    /// Base URL.
    pub url: String,
}

#[derive(serde::Deserialize)]
struct RegionsBody {
    regions: Vec<Region>,
}

/// Asks an edge (`seed`, any region) for every region's URL (`GET /v1/regions`).
pub async fn regions(seed: &str, timeout: Duration) -> std::io::Result<Vec<Region>> {
    regions_with(seed, timeout, &crate::ClientOptions::default().tls_config()).await
}

/// [`regions`], verifying a `wss://`/`https://` seed with `tls`.
pub async fn regions_with(
    seed: &str,
    timeout: Duration,
    tls: &Arc<rustls::ClientConfig>,
) -> std::io::Result<Vec<Region>> {
    let fetch = async {
        let host = authority(seed)?;
        let mut stream = dial(seed, tls).await?;
        let request =
            format!("GET /v1/regions HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::new();
        // Bounded: a region list is small.
        (&mut stream).take(1 << 20).read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| std::io::Error::other("truncated /v1/regions response"))?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(std::io::Error::other(format!(
                "/v1/regions: {}",
                head.lines().next().unwrap_or("")
            )));
        }
        let parsed: RegionsBody =
            serde_json::from_str(body.trim()).map_err(std::io::Error::other)?;
        Ok(parsed.regions)
    };
    tokio::time::timeout(timeout, fetch).await.map_err(|_| std::io::ErrorKind::TimedOut)?
}

/// The authority (`host:port`) of a `ws://`, `wss://`, `http://` or `https://` URL.
fn authority(url: &str) -> std::io::Result<&str> {
    let rest = ["ws://", "http://", "wss://", "https://"]
        .iter()
        .find_map(|s| url.strip_prefix(s))
        .ok_or_else(|| std::io::Error::other(format!("unsupported URL {url:?}")))?;
    Ok(rest.split('/').next().unwrap_or(rest))
}

async fn probe(
    url: &str,
    probes: usize,
    tls: &Arc<rustls::ClientConfig>,
) -> std::io::Result<(Duration, Option<String>)> {
    let host = authority(url)?;
    let mut stream = dial(url, tls).await?;
    let request = format!("GET /v1/ping HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut best = Duration::MAX;
    let mut region = None;
    let mut buf = Vec::with_capacity(512);
    for _ in 0..probes {
        let start = Instant::now();
        stream.write_all(request.as_bytes()).await?;
        buf.clear();
        // A 204 has no body: the response ends with the blank line after the headers.
        loop {
            let mut chunk = [0u8; 512];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
            if buf.len() > 16 * 1024 {
                return Err(std::io::Error::other("oversized ping response"));
            }
        }
        best = best.min(start.elapsed());
        let head = String::from_utf8_lossy(&buf);
        if !head.starts_with("HTTP/1.1 2") {
            return Err(std::io::Error::other("ping refused"));
        }
        region = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-tern-region").then(|| v.trim().to_owned())
        });
    }
    Ok((best, region))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_of_urls() {
        assert_eq!(authority("ws://127.0.0.1:7400/v1/ws").unwrap(), "127.0.0.1:7400");
        assert_eq!(authority("http://h:1").unwrap(), "h:1");
        assert!(authority("ftp://h").is_err());
    }
}
