//! Durable channel history: an embedded redb database under the node's data directory.
//!
//! Why redb: pure Rust (nothing to install, no C toolchain), one file, ACID commits that
//! survive a crash (copy-on-write B-trees with checksums), MVCC so history reads never block
//! the writer, a stable 2.x file format, and ordered range scans — a channel log keyed by
//! (channel, offset) is exactly a range. An LSM store (fjall) would take higher write rates
//! at the cost of compaction tuning; a relay's history writes are small and are grouped here,
//! well within a B-tree's reach.
//!
//! ```text
//!  hub (under the channel lock) ──append──▶ bounded queue ──▶ writer thread
//!                                                              one transaction per group,
//!                                                              commit (fsync per policy),
//!                                                              retention trim every second
//!  HTTP GET /v1/channels/{ch}/messages ──▶ read transaction (never waits for the writer)
//! ```
//!
//! Sync policy ([`SyncPolicy`]): `group` makes every group durable before the next starts
//! (an fsync per group; a crash loses at most the group being written); `interval` commits
//! groups without fsync (`redb::Durability::Eventual`: a crash of the process loses
//! nothing committed) and fsyncs every `sync_interval` (a crash of the machine loses at most
//! that interval). Publish acks on history channels wait until the message's group is
//! committed (and, with `DURABILITY_REPLICATED`, until another region has it); so does its
//! delivery (see `crate::channel`). The same transaction records, per channel and origin,
//! the newest message logged ([`Store::positions`]): after a restart the node knows exactly
//! which messages it holds.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::{Database, Durability, ReadableTable, TableDefinition};
use tern_proto::types::ChannelName;

/// (channel, offset) → 8-byte big-endian unix-ms timestamp, then the protobuf `Message`.
const LOG: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("log");
/// Node-wide values (the log epoch).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// (channel, origin) → (origin epoch, origin sequence) of the newest message of that origin
/// in the channel's log, written in the same transaction as the log rows: after a restart
/// the node knows exactly which messages it holds, so nothing is appended or delivered twice.
const POSITIONS: TableDefinition<(&str, &str), (u64, u64)> = TableDefinition::new("positions");

/// When groups are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// fsync every group before the next.
    Group,
    /// fsync at most this often; groups in between are committed without it.
    Interval(Duration),
}

/// Retention of one namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Messages kept per channel.
    pub max_messages: u64,
    /// Older messages are deleted.
    pub max_age: Duration,
}

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Directory holding `tern.redb`.
    pub dir: PathBuf,
    /// When commits are made durable.
    pub sync: SyncPolicy,
    /// Retention per namespace; only these namespaces are stored.
    pub namespaces: HashMap<String, Retention>,
    /// Entries queued for the writer before publishers wait for it.
    pub queue: usize,
    /// Observes each group commit's duration (metrics), when given.
    pub write_seconds: Option<prometheus::Histogram>,
    /// Counts the messages committed (metrics), when given.
    pub writes: Option<prometheus::IntCounter>,
}

/// Why the store could not open or answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created.
    #[error("data directory {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    /// The database failed.
    #[error("history store: {0}")]
    Db(String),
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                db_err(e)
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

enum Msg {
    Append(Entry),
    /// Commit durably, release the database, and answer.
    Close(std::sync::mpsc::Sender<()>),
}

struct Entry {
    /// Append order, from 1; the writer publishes the last committed one.
    ticket: u64,
    channel: ChannelName,
    offset: u64,
    timestamp_ms: u64,
    message: Bytes,
    /// The message's origin identity (for [`POSITIONS`]).
    origin: Identity,
}

/// A message's origin identity: origin node, its epoch and sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Origin node id.
    pub origin: tern_proto::types::NodeId,
    /// Origin epoch.
    pub epoch: u64,
    /// Origin sequence.
    pub seq: u64,
}

/// The newest logged message of one origin in one channel (see [`Store::positions`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedPosition {
    /// The channel.
    pub channel: String,
    /// The origin node id.
    pub origin: String,
    /// Origin epoch.
    pub epoch: u64,
    /// Origin sequence.
    pub seq: u64,
}

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its offset in the channel log.
    pub offset: u64,
    /// When it was logged, unix ms.
    pub timestamp_ms: u64,
    /// The protobuf `Message`.
    pub message: Vec<u8>,
}

/// A history request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    /// First offset (inclusive) in the direction of travel: the lowest when forwards, the
    /// highest when backwards. `None`: the oldest (forwards) or newest (backwards).
    pub from: Option<u64>,
    /// Last offset (inclusive) in the direction of travel.
    pub to: Option<u64>,
    /// Only messages logged at or after this unix ms.
    pub since_ms: Option<u64>,
    /// Only messages logged at or before this unix ms.
    pub until_ms: Option<u64>,
    /// Most messages returned.
    pub limit: usize,
    /// Most bytes of stored messages returned: the page ends before a message that would
    /// take it past this (a page holds at least one message whatever its size).
    pub max_bytes: usize,
    /// Most log entries the read looks at: a time filter that skips more ends the page
    /// there (see [`Page::next_from`]). Client reads use [`PAGE_SCAN_MAX`].
    pub max_scan: usize,
    /// Newest first.
    pub backwards: bool,
}

impl Query {
    /// Every message from the newest (or, forwards, the oldest), at most `limit`, of any size.
    pub fn newest(limit: usize) -> Self {
        Self {
            from: None,
            to: None,
            since_ms: None,
            until_ms: None,
            limit,
            max_bytes: usize::MAX,
            max_scan: usize::MAX,
            backwards: true,
        }
    }
}

/// Most log entries one client's history page looks at: a time filter that skips more
/// ends the page there (see [`Page::next_from`]).
pub const PAGE_SCAN_MAX: usize = 20_000;

/// A page of a channel's log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// The messages, in the direction of travel.
    pub messages: Vec<Stored>,
    /// The `from` of the next page, when the page ended at its `limit`, its `max_bytes` or
    /// after [`PAGE_SCAN_MAX`] entries (the page, or the next, may then be short or empty);
    /// `None` when the log holds no more.
    pub next_from: Option<u64>,
}

impl Page {
    /// Ends the page before its message at `index` (fewer bytes for a smaller frame): the
    /// next page starts there.
    pub fn truncate(&mut self, index: usize) {
        if let Some(cut) = self.messages.get(index) {
            self.next_from = Some(cut.offset);
            self.messages.truncate(index);
        }
    }
}

/// The durable channel logs of a node.
///
/// The writer thread owns the database; handles reach it weakly, so [`Store::close`]
/// releases the file (and its lock) at once.
#[derive(Clone)]
pub struct Store {
    db: Weak<Database>,
    /// The queue, with the last ticket handed out: taken together so tickets enter the
    /// queue in order.
    tx: Arc<std::sync::Mutex<(SyncSender<Msg>, u64)>>,
    committed: tokio::sync::watch::Receiver<u64>,
    /// Ticket ranges whose write failed.
    failed: Arc<Failures>,
    /// Test hook: the next group's write fails as a full disk would make it.
    fail_next: Arc<std::sync::atomic::AtomicBool>,
    /// Test hook: the writer takes no new group while set (a slow disk).
    paused: Arc<std::sync::atomic::AtomicBool>,
    namespaces: Arc<HashMap<String, Retention>>,
    path: PathBuf,
}

/// Failed write ranges remembered: far more than publishers can be waiting on at once.
const FAILURES_KEPT: usize = 1024;

/// Failed write ranges (the newest [`FAILURES_KEPT`]), and the newest failed ticket, so
/// confirming a ticket past it (every ack while the disk is healthy) takes no lock.
#[derive(Debug, Default)]
struct Failures {
    newest: std::sync::atomic::AtomicU64,
    ranges: std::sync::Mutex<VecDeque<(u64, u64)>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// The wall clock in unix milliseconds (log timestamps, message timestamps).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Store {
    /// Opens (or creates) `dir/tern.redb` and starts the writer thread.
    pub fn open(options: StoreOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&options.dir)
            .map_err(|e| StoreError::Dir(options.dir.clone(), e))?;
        let path = options.dir.join("tern.redb");
        let db = Arc::new(Database::create(&path).map_err(db_err)?);
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(LOG).map_err(db_err)?;
        txn.open_table(META).map_err(db_err)?;
        txn.open_table(POSITIONS).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        let (tx, rx) = sync_channel(options.queue.max(1));
        let observe = (options.write_seconds.clone(), options.writes.clone());
        let namespaces = Arc::new(options.namespaces);
        let (weak, ns2) = (Arc::downgrade(&db), namespaces.clone());
        let (committed_tx, committed) = tokio::sync::watch::channel(0u64);
        let failed = Arc::new(Failures::default());
        let fail_next = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let outcome = Outcome { committed: committed_tx, failed: failed.clone() };
        let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hooks = Hooks { fail_next: fail_next.clone(), paused: paused.clone() };
        std::thread::Builder::new()
            .name("tern-history".into())
            .spawn(move || writer(db, rx, options.sync, ns2, outcome, hooks, observe))
            .map_err(|e| StoreError::Db(format!("cannot start the writer: {e}")))?;
        let tx = Arc::new(std::sync::Mutex::new((tx, 0)));
        Ok(Self { db: weak, tx, committed, failed, fail_next, paused, namespaces, path })
    }

    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.db.upgrade().ok_or_else(|| StoreError::Db("the history store is closed".into()))
    }

    /// The last ticket the writer is done with (see [`Store::append`]); watch it to learn
    /// when a message is logged — or, rarely, that its write failed: check
    /// [`Store::failed`] before confirming.
    pub fn committed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Whether the write of `ticket` failed (the message was delivered but is not in the
    /// log). Meaningful once [`Store::committed`] reached the ticket.
    pub fn failed(&self, ticket: u64) -> bool {
        if ticket > self.failed.newest.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        let ranges = self.failed.ranges.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        ranges.iter().any(|&(first, last)| (first..=last).contains(&ticket))
    }

    /// Test hook: the next group of writes fails, as a full or broken disk would make it.
    #[doc(hidden)]
    pub fn fail_next_write(&self) {
        self.fail_next.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Test hook: while `on`, the writer commits nothing (a disk that stalls).
    #[doc(hidden)]
    pub fn pause_writes(&self, on: bool) {
        self.paused.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// The last ticket handed out: once [`Store::committed`] reaches it, everything appended
    /// so far is in the log.
    pub fn last_ticket(&self) -> u64 {
        self.lock_tx().1
    }

    /// Writes everything queued durably and releases the database (graceful shutdown).
    pub fn close(&self) {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let sent = self.lock_tx().0.send(Msg::Close(done_tx)).is_ok();
        if sent {
            let _ = done_rx.recv_timeout(Duration::from_secs(10));
        }
        // A reader still inside a transaction holds the database a moment longer.
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.db.strong_count() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The log epoch kept across restarts: the stored one, or `fresh` (stored now).
    pub fn epoch_or(&self, fresh: u64) -> Result<u64, StoreError> {
        let txn = self.db()?.begin_write().map_err(db_err)?;
        let epoch = {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let stored = meta.get("epoch").map_err(db_err)?.map(|v| v.value());
            match stored {
                Some(e) => e,
                None => {
                    meta.insert("epoch", fresh).map_err(db_err)?;
                    fresh
                }
            }
        };
        txn.commit().map_err(db_err)?;
        Ok(epoch)
    }

    /// This start's origin epoch: `now` (microseconds), or one above the previous start's
    /// when the clock is behind it (a machine that booted before its clock was set), stored
    /// durably. A node's epochs must grow across restarts: peers take a smaller one for an
    /// old one.
    pub fn start_epoch(&self, now: u64) -> Result<u64, StoreError> {
        let txn = self.db()?.begin_write().map_err(db_err)?;
        let epoch = {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let last = meta.get("start").map_err(db_err)?.map_or(0, |v| v.value());
            let epoch = now.max(last.saturating_add(1));
            meta.insert("start", epoch).map_err(db_err)?;
            epoch
        };
        txn.commit().map_err(db_err)?;
        Ok(epoch)
    }

    /// Whether `channel`'s namespace keeps history.
    pub fn keeps(&self, channel: &str) -> bool {
        self.namespaces.contains_key(tern_proto::types::namespace_of(channel))
    }

    /// The last offset logged for `channel` (0 when none).
    pub fn last_offset(&self, channel: &str) -> Result<u64, StoreError> {
        let txn = self.db()?.begin_read().map_err(db_err)?;
        let log = txn.open_table(LOG).map_err(db_err)?;
        let last = log
            .range((channel, 0)..=(channel, u64::MAX))
            .map_err(db_err)?
            .next_back()
            .transpose()
            .map_err(db_err)?
            .map_or(0, |(k, _)| k.value().1);
        Ok(last)
    }

    fn lock_tx(&self) -> std::sync::MutexGuard<'_, (SyncSender<Msg>, u64)> {
        self.tx.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a message (whose origin identity is `origin`) for the log and returns its
    /// ticket: it is logged once [`Store::committed`] reaches the ticket. Waits only when the
    /// writer is `queue` entries behind (back-pressure; nothing is dropped). `None` if the
    /// writer is gone.
    pub fn append(
        &self,
        channel: &ChannelName,
        offset: u64,
        message: Bytes,
        origin: Identity,
    ) -> Option<u64> {
        let mut tx = self.lock_tx();
        let ticket = tx.1 + 1;
        let entry = Msg::Append(Entry {
            ticket,
            channel: channel.clone(),
            offset,
            timestamp_ms: now_ms(),
            message,
            origin,
        });
        let sent = match tx.0.try_send(entry) {
            Ok(()) => true,
            Err(TrySendError::Full(entry)) => tx.0.send(entry).is_ok(),
            Err(TrySendError::Disconnected(_)) => false,
        };
        if !sent {
            return None;
        }
        tx.1 = ticket;
        Some(ticket)
    }

    /// Per origin, the newest message of `channel` its log holds (see [`POSITIONS`]).
    pub fn positions(&self, channel: &str) -> Result<Vec<LoggedPosition>, StoreError> {
        let txn = self.db()?.begin_read().map_err(db_err)?;
        let table = txn.open_table(POSITIONS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in table.range((channel, "")..).map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            let (c, origin) = k.value();
            if c != channel {
                break;
            }
            let (epoch, seq) = v.value();
            out.push(LoggedPosition {
                channel: c.to_owned(),
                origin: origin.to_owned(),
                epoch,
                seq,
            });
        }
        Ok(out)
    }

    /// [`Store::positions`] of every channel.
    pub fn all_positions(&self) -> Result<Vec<LoggedPosition>, StoreError> {
        let txn = self.db()?.begin_read().map_err(db_err)?;
        let table = txn.open_table(POSITIONS).map_err(db_err)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            let (channel, origin) = k.value();
            let (epoch, seq) = v.value();
            out.push(LoggedPosition {
                channel: channel.to_owned(),
                origin: origin.to_owned(),
                epoch,
                seq,
            });
        }
        Ok(out)
    }

    /// `origin`'s newest messages of `epoch` in `channel`'s log, oldest first: the run of
    /// consecutive sequences that ends at `last`, at most `max` of them, reading the log
    /// backwards a page at a time and at most `max_rows` rows (other origins' messages lie
    /// in between). The backbone resends them after a restart.
    pub fn origin_tail(
        &self,
        channel: &str,
        origin: &str,
        (epoch, last): (u64, u64),
        max: usize,
        max_rows: usize,
    ) -> Result<Vec<(u64, Bytes)>, StoreError> {
        const PAGE: usize = 1024;
        let mut out = Vec::new();
        let mut expect = last;
        let mut from = None;
        let mut read = 0;
        'scan: while read < max_rows && out.len() < max && expect > 0 {
            let q = Query { from, limit: PAGE.min(max_rows - read), ..Query::newest(0) };
            let rows = self.read(channel, q)?;
            let page = rows.len();
            for row in rows {
                read += 1;
                from = Some(row.offset.saturating_sub(1));
                let Ok(m) =
                    <tern_proto::client::Message as prost::Message>::decode(row.message.as_slice())
                else {
                    continue;
                };
                if m.origin != origin {
                    continue;
                }
                if m.origin_epoch != epoch || m.origin_seq != expect {
                    break 'scan; // an older epoch, or a gap: the run ends
                }
                out.push((expect, Bytes::from(row.message)));
                expect -= 1;
                if out.len() >= max || expect == 0 || row.offset <= 1 {
                    break 'scan;
                }
            }
            if page < PAGE.min(max_rows) {
                break;
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Every channel with a log (in name order).
    pub fn channels(&self) -> Result<Vec<String>, StoreError> {
        let txn = self.db()?.begin_read().map_err(db_err)?;
        let log = txn.open_table(LOG).map_err(db_err)?;
        let mut out = Vec::new();
        let mut next = log.first().map_err(db_err)?.map(|(k, _)| k.value().0.to_owned());
        while let Some(channel) = next {
            let after = (channel.as_str(), u64::MAX);
            next = log
                .range(after..)
                .map_err(db_err)?
                .find(|r| r.as_ref().is_ok_and(|(k, _)| k.value().0 != channel))
                .transpose()
                .map_err(db_err)?
                .map(|(k, _)| k.value().0.to_owned());
            out.push(channel);
        }
        Ok(out)
    }

    /// Reads a page of `channel`'s log.
    pub fn read(&self, channel: &str, q: Query) -> Result<Vec<Stored>, StoreError> {
        self.page(channel, q).map(|p| p.messages)
    }

    /// A page of `channel`'s log, and where the next one starts.
    pub fn page(&self, channel: &str, q: Query) -> Result<Page, StoreError> {
        let txn = self.db()?.begin_read().map_err(db_err)?;
        let log = txn.open_table(LOG).map_err(db_err)?;
        let (lo, hi) = if q.backwards {
            (q.to.unwrap_or(0), q.from.unwrap_or(u64::MAX))
        } else {
            (q.from.unwrap_or(0), q.to.unwrap_or(u64::MAX))
        };
        if lo > hi || q.limit == 0 {
            return Ok(Page::default());
        }
        let range = log.range((channel, lo)..=(channel, hi)).map_err(db_err)?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        // Whether the page ended at a limit: the next one starts after its last message,
        // or at `cut_at` (the message that would have taken it past `max_bytes`).
        let mut ended = false;
        let mut cut_at = None;
        let mut scanned = 0usize;
        let mut take = |offset: u64, v: &[u8]| -> bool {
            // A time filter that skips most of a long log ends the page early (maybe
            // empty, with the `from` of the next), rather than read all of it at once.
            scanned += 1;
            if scanned > q.max_scan {
                cut_at = Some(offset);
                return false;
            }
            if v.len() < 8 {
                return true;
            }
            let ts = u64::from_be_bytes(v[..8].try_into().unwrap_or_default());
            if q.since_ms.is_some_and(|s| ts < s) || q.until_ms.is_some_and(|u| ts > u) {
                return true;
            }
            let len = v.len() - 8;
            if !out.is_empty() && bytes.saturating_add(len) > q.max_bytes {
                cut_at = Some(offset);
                return false;
            }
            bytes = bytes.saturating_add(len);
            out.push(Stored { offset, timestamp_ms: ts, message: v[8..].to_vec() });
            ended = out.len() >= q.limit;
            !ended
        };
        if q.backwards {
            for item in range.rev() {
                let (k, v) = item.map_err(db_err)?;
                if !take(k.value().1, v.value()) {
                    break;
                }
            }
        } else {
            for item in range {
                let (k, v) = item.map_err(db_err)?;
                if !take(k.value().1, v.value()) {
                    break;
                }
            }
        }
        let next_from = match (cut_at, out.last()) {
            (Some(at), _) => Some(at),
            (None, Some(last)) if ended => {
                if q.backwards {
                    last.offset.checked_sub(1).filter(|o| *o > 0)
                } else {
                    last.offset.checked_add(1)
                }
            }
            _ => None,
        };
        Ok(Page { messages: out, next_from })
    }
}

/// The writer: groups queued entries into one transaction each, commits per the sync
/// policy, and trims by retention every second.
fn writer(
    db: Arc<Database>,
    rx: Receiver<Msg>,
    sync: SyncPolicy,
    namespaces: Arc<HashMap<String, Retention>>,
    outcome: Outcome,
    hooks: Hooks,
    (write_seconds, writes): (Option<prometheus::Histogram>, Option<prometheus::IntCounter>),
) {
    const GROUP: usize = 4096;
    const GROUP_BYTES: usize = 1 << 20;
    let mut last_sync = Instant::now();
    let mut last_trim = Instant::now();
    let mut pending_sync = false;
    // Channels written since the start, with their last offset (trimmed every second).
    let mut touched: HashMap<ChannelName, u64> = HashMap::new();
    let mut group = Vec::with_capacity(GROUP);
    let mut closing: Option<std::sync::mpsc::Sender<()>> = None;
    loop {
        let wait = Duration::from_millis(200);
        let mut take = |msg: Msg, group: &mut Vec<Entry>| match msg {
            Msg::Append(e) => group.push(e),
            Msg::Close(done) => closing = Some(done),
        };
        match rx.recv_timeout(wait) {
            Ok(first) => {
                take(first, &mut group);
                // A group is released to subscribers at once when it commits: its bytes
                // are bounded too, so a burst of big messages reaches a subscriber's send
                // queue a group at a time (see `limits.send_queue_bytes`).
                let mut bytes: usize = group.iter().map(|e| e.message.len()).sum();
                while group.len() < GROUP && bytes < GROUP_BYTES {
                    match rx.try_recv() {
                        Ok(m) => {
                            let before = group.len();
                            take(m, &mut group);
                            bytes += group[before..].iter().map(|e| e.message.len()).sum::<usize>();
                        }
                        Err(_) => break,
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                if pending_sync || !group.is_empty() {
                    let _ = commit_group(&db, &mut group, true);
                }
                return;
            }
        }
        while hooks.paused.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let tickets = group.first().zip(group.last()).map(|(a, b)| (a.ticket, b.ticket));
        if let Some(done) = closing.take() {
            if let Err(e) = commit_group(&db, &mut group, true) {
                tracing::error!(error = %e, "history write failed at close");
                group.clear();
                outcome.failed(tickets);
            } else {
                outcome.written(tickets);
            }
            drop(db);
            let _ = done.send(());
            return;
        }
        let durable = match sync {
            SyncPolicy::Group => true,
            SyncPolicy::Interval(every) => last_sync.elapsed() >= every,
        };
        let trim = last_trim.elapsed() >= Duration::from_secs(1);
        if group.is_empty() && !trim && !(durable && pending_sync) {
            continue;
        }
        let (started, entries) = (Instant::now(), group.len() as u64);
        let result = (|| -> Result<(), StoreError> {
            if !group.is_empty() && hooks.fail_next.swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                return Err(StoreError::Db("injected write failure (test hook)".into()));
            }
            let mut txn = db.begin_write()?;
            // `Eventual`: committed without an fsync. It survives a crash of the process
            // (the operating system holds the write), not one of the machine.
            txn.set_durability(if durable { Durability::Immediate } else { Durability::Eventual });
            {
                let mut log = txn.open_table(LOG)?;
                for e in &group {
                    touched.insert(e.channel.clone(), e.offset);
                }
                insert_positions(&mut txn.open_table(POSITIONS)?, &group)?;
                insert_all(&mut log, &mut group)?;
                if trim {
                    let now = now_ms();
                    for (channel, &last) in &touched {
                        let Some(r) = namespaces.get(channel.namespace()) else { continue };
                        let keep_from = last.saturating_sub(r.max_messages.saturating_sub(1));
                        let cutoff = now.saturating_sub(r.max_age.as_millis() as u64);
                        let c = channel.as_str();
                        log.retain_in((c, 0)..(c, keep_from), |_, _| false)?;
                        log.retain_in((c, keep_from)..=(c, last), |_, v| {
                            v.len() < 8
                                || u64::from_be_bytes(v[..8].try_into().unwrap_or_default())
                                    >= cutoff
                        })?;
                    }
                }
            }
            txn.commit()?;
            Ok(())
        })();
        if result.is_ok() && entries > 0 {
            if let Some(h) = &write_seconds {
                h.observe(started.elapsed().as_secs_f64());
            }
            if let Some(c) = &writes {
                c.inc_by(entries);
            }
        }
        match result {
            Ok(()) => outcome.written(tickets),
            Err(e) => {
                // The publishers waiting for these tickets are told: the messages were
                // delivered but are not in the log.
                tracing::error!(error = %e, "history write failed");
                group.clear();
                outcome.failed(tickets);
            }
        }
        if trim {
            last_trim = Instant::now();
        }
        if durable {
            last_sync = Instant::now();
            pending_sync = false;
        } else {
            pending_sync = true;
        }
    }
}

/// The writer's test hooks (see [`Store::fail_next_write`], [`Store::pause_writes`]).
struct Hooks {
    fail_next: Arc<std::sync::atomic::AtomicBool>,
    paused: Arc<std::sync::atomic::AtomicBool>,
}

/// How the writer tells waiting publishers what became of their tickets.
struct Outcome {
    committed: tokio::sync::watch::Sender<u64>,
    failed: Arc<Failures>,
}

impl Outcome {
    fn written(&self, tickets: Option<(u64, u64)>) {
        if let Some((_, last)) = tickets {
            self.committed.send_replace(last);
        }
    }

    /// Records the failed range before waking the waiters, so each sees it.
    fn failed(&self, tickets: Option<(u64, u64)>) {
        let Some(range) = tickets else { return };
        {
            let mut ranges =
                self.failed.ranges.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if ranges.len() == FAILURES_KEPT {
                ranges.pop_front();
            }
            ranges.push_back(range);
        }
        self.failed.newest.store(range.1, std::sync::atomic::Ordering::Release);
        self.committed.send_replace(range.1);
    }
}

/// Writes `group` in one transaction (durably when `durable`).
fn commit_group(db: &Database, group: &mut Vec<Entry>, durable: bool) -> Result<(), StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(if durable { Durability::Immediate } else { Durability::Eventual });
    insert_positions(&mut txn.open_table(POSITIONS)?, group)?;
    insert_all(&mut txn.open_table(LOG)?, group)?;
    txn.commit()?;
    Ok(())
}

/// Records, per (channel, origin), the newest message of `group` (see [`POSITIONS`]).
fn insert_positions(
    table: &mut redb::Table<(&'static str, &'static str), (u64, u64)>,
    group: &[Entry],
) -> Result<(), StoreError> {
    let mut newest: HashMap<(&str, &str), (u64, u64)> = HashMap::new();
    for e in group {
        let key = (e.channel.as_str(), e.origin.origin.as_str());
        let at = (e.origin.epoch, e.origin.seq);
        newest.entry(key).and_modify(|v| *v = (*v).max(at)).or_insert(at);
    }
    for (key, at) in newest {
        table.insert(key, at)?;
    }
    Ok(())
}

/// Inserts (and drains) `group`: each value is the timestamp, then the message.
fn insert_all(
    log: &mut redb::Table<(&'static str, u64), &'static [u8]>,
    group: &mut Vec<Entry>,
) -> Result<(), StoreError> {
    let mut value = Vec::new();
    for e in group.drain(..) {
        value.clear();
        value.extend_from_slice(&e.timestamp_ms.to_be_bytes());
        value.extend_from_slice(&e.message);
        log.insert((e.channel.as_str(), e.offset), value.as_slice())?;
    }
    Ok(())
}
