//! Runs a [`Session`] over a transport: one task, one `select!` loop, whatever the wire.
//!
//! ```text
//!   wire ──recv──▶ Session::on_input (connect/subscribe/publish/…) ─▶ replies ─┐
//!                              │ publish                                        │
//!                              ▼                                                ▼
//!                        channel::Hub ──push──▶ Outbox ──poll_transmit──▶ wire.feed
//! ```
//!
//! A session is one task, so an idle connection costs one task and its buffers. It ends with
//! a close code that says why (see `tern_proto::close`), and removes every subscription it
//! held: no zombies. The [`Wire`] decides how frames travel (WebSocket frames, lines of an
//! HTTP stream, SSE events, long-poll answers); everything the protocol says happens in the
//! session, so every transport behaves the same.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tern_proto::close;
use tern_proto::codec::{self, EncodedMessage};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::core::{End, Input, PARKED_CHECK, Session, StepFuture, Transmit};
use crate::fanout::{self, OutboxReceiver};
use crate::node::Node;

/// How a transport moves a session's frames. Every method is cancel-safe where the driver
/// selects on it (`recv`).
pub trait Wire: Send {
    /// Waits for the next thing the client sent (or for the transport to end); client
    /// frames only if `frames` (else the session is held back: see [`READ_GATE`]).
    fn recv(&mut self, frames: bool) -> impl Future<Output = Input> + Send;
    /// What already arrived, without waiting.
    fn try_recv(&mut self) -> Option<Input>;
    /// Whether frames can be written now (a long-polling session between polls cannot).
    fn writable(&self) -> bool {
        true
    }
    /// Whether the client counts as present without sending anything (a long poll waiting,
    /// an open HTTP stream): the idle timeout does not apply meanwhile.
    fn held(&self) -> bool {
        false
    }
    /// Queues one server frame for writing.
    fn feed(&mut self, frame: Bytes) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Whether deliveries come as shared messages ([`Wire::feed_messages`]) rather than
    /// `Deliver` frames: for a wire that writes each message in a form of its own.
    fn messages_apart(&self) -> bool {
        false
    }
    /// Queues messages to deliver (only for a wire whose [`Wire::messages_apart`] is true;
    /// by default, as one `Deliver` frame in protobuf).
    fn feed_messages(
        &mut self,
        messages: Vec<Arc<EncodedMessage>>,
    ) -> impl Future<Output = std::io::Result<()>> + Send {
        let frame = codec::deliver_frame(messages.iter().map(|m| &**m), codec::Format::Protobuf);
        self.feed(frame)
    }
    /// Queues a liveness probe.
    fn ping(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Sends what was queued.
    fn flush(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Whether what is still queued is written before the close (HTTP sessions: a long
    /// poll must not lose the acks and deliveries queued since the last poll). A WebSocket
    /// closes at once, as it always did.
    fn drains(&self) -> bool {
        false
    }
    /// Ends the transport, telling the client why where it can.
    fn close(&mut self, end: End, node: &Node) -> impl Future<Output = ()> + Send;
}

/// Frames already received that one loop turn handles before writing the replies.
const READ_AHEAD_FRAMES: usize = 64;

/// While deliveries keep coming, the wire is still read at least this often (in deliveries).
const FORCED_READ_EVERY: u32 = 8;

/// A session's client frames are not read while this much waits to be written to it
/// (its replies and replays queued, see [`Session::backlog`]).
const READ_GATE: usize = 1 << 20;

/// Bytes the writer sends per loop turn (at least one frame): between chunks the session
/// reads the client's frames and takes new deliveries, so a long replay neither starves
/// the client's requests nor makes it look idle.
pub const WRITE_CHUNK: usize = 256 * 1024;

/// The end of a session whose client reads too slowly.
pub fn slow_consumer() -> End {
    End::Close(close::SLOW_CONSUMER, "send queue overflow: reading too slowly".into())
}

/// Why the session's stop token fired: its outbox overflowed, or the node drains (it shuts
/// down, or was told to drain).
fn stopped(rx: &OutboxReceiver, node: &Node) -> End {
    if rx.overflowed() {
        slow_consumer()
    } else {
        End::Close(close::GOING_AWAY, node.drain_reason().into())
    }
}

/// Runs a session over `wire` to its end, and closes the wire with the reason.
/// `url_token` is a token given with the transport's request (`Connect.token` takes
/// precedence). A bug must not cost the client its close code (it would see the transport
/// fail and retry as if the network failed): a panic ends the session with 1011, its
/// subscriptions left (see `Drop for Session`).
pub async fn run<W: Wire>(
    wire: &mut W,
    node: &Arc<Node>,
    id: tern_proto::types::ConnectionId,
    format: tern_proto::codec::Format,
    url_token: Option<String>,
) {
    use futures_util::FutureExt;
    use tracing::Instrument;
    let span = tracing::info_span!("session", conn = %id, ?format);
    let served = std::panic::AssertUnwindSafe(serve(wire, node, id, format, url_token))
        .catch_unwind()
        .instrument(span.clone())
        .await;
    let end = served.unwrap_or_else(|_| {
        tracing::error!(parent: &span, "session failed; closing with 1011");
        End::Close(close::INTERNAL_ERROR, "internal error".into())
    });
    debug!(parent: &span, ?end, "session ended");
    let code = match &end {
        End::Close(code, _) => Some(*code),
        End::Gone => None,
    };
    node.metrics().disconnected(code);
    wire.close(end, node).await;
}

async fn serve<W: Wire>(
    wire: &mut W,
    node: &Arc<Node>,
    id: tern_proto::types::ConnectionId,
    format: tern_proto::codec::Format,
    url_token: Option<String>,
) -> End {
    // Settings are read from the shared node, not copied into every connection.
    let cfg = &node.settings().config;
    // One token per session, a child of the node's: cancelled on shutdown or on outbox
    // overflow. One uncontended token to watch keeps the per-wakeup cost low.
    let stop = node.drain_token().child_token();
    let (outbox, mut rx) =
        fanout::outbox(cfg.limits.send_queue_messages, cfg.limits.send_queue_bytes, stop.clone());
    let mut session = Session::new(node.clone(), id, format, url_token, outbox);
    if wire.messages_apart() {
        session.messages_apart();
    }
    // The replay step in flight, if any.
    let mut step: Option<StepFuture> = None;
    // A second watcher of the same value, to wait on in the loop below.
    let mut committed = node.hub().store().map(|s| s.committed());
    let mut replicated = node.hub().replicated_watch();
    let hb = cfg.heartbeat.interval;
    let idle = cfg.heartbeat.idle_timeout;
    let mut ping = tokio::time::interval_at(Instant::now() + hb, hb);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_seen = Instant::now();
    let mut parked_tick = tokio::time::interval(PARKED_CHECK);
    parked_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let connect_deadline = sleep_until(Instant::now() + cfg.timeouts.connect);
    tokio::pin!(connect_deadline);
    // Deliveries handled since the wire was last read.
    let mut unread = 0u32;
    // Once the node shuts down: when this session closes (its client was told to go).
    let mut draining: Option<Instant> = None;

    let end = loop {
        // A replay reads its next step once the last one is (nearly) written.
        if step.is_none() && session.out_bytes < WRITE_CHUNK {
            step = session.start_step();
        }
        let writable = wire.writable();
        // Order matters: deliveries come before reads, so a wake-up for a delivery does not
        // also poll the wire (each read attempt costs a buffer fill in the WebSocket
        // library); a read is forced every few deliveries so a flooded client is still heard.
        let turn = tokio::select! {
            biased;
            _ = stop.cancelled(), if draining.is_none() => match stopped(&rx, node) {
                // The node shuts down: a connected client is told to go elsewhere first,
                // and the session lives on for `timeouts.drain` (the client's requests are
                // answered, deliveries go on) before it is closed.
                End::Close(close::GOING_AWAY, _)
                    if session.connected() && !cfg.timeouts.drain_time().is_zero() =>
                {
                    session.drain_notice(cfg.timeouts.drain_time());
                    draining = Some(Instant::now() + cfg.timeouts.drain_time());
                    Ok(())
                }
                end => Err(end),
            },
            _ = async {
                match draining {
                    Some(at) => sleep_until(at).await,
                    None => std::future::pending().await,
                }
            }, if draining.is_some() => Err(stopped(&rx, node)),
            // An outbox that overflows while draining still ends the session as too slow.
            _ = std::future::ready(()), if draining.is_some() && rx.overflowed() => {
                Err(slow_consumer())
            }
            _ = &mut connect_deadline, if !session.connected() => Err(End::Close(
                close::PROTOCOL_VIOLATION,
                "no Connect frame within the connect timeout".into(),
            )),
            _ = async {
                match session.expires {
                    Some(at) => sleep_until(at).await,
                    None => std::future::pending().await,
                }
            }, if session.expires.is_some() => Err(End::Close(
                close::UNAUTHORIZED,
                "the token expired".into(),
            )),
            _ = ping.tick() => {
                if wire.held() {
                    last_seen = Instant::now();
                }
                if last_seen.elapsed() >= idle {
                    Err(End::Close(close::IDLE_TIMEOUT, format!("nothing received for {idle:?}")))
                } else {
                    session.ping = true;
                    // Acks whose log write is overdue get their answer.
                    if !session.acks.is_empty() {
                        session.flush_acks();
                    }
                    Ok(())
                }
            }
            // Taken only while the writer is nearly done: what the client has not read yet
            // waits in the outbox, whose limits make a client that stopped reading a slow
            // consumer.
            _ = rx.ready(), if session.out_bytes < WRITE_CHUNK => {
                session.take_outbox(&mut rx);
                unread += 1;
                if unread >= FORCED_READ_EVERY && session.backlog() < READ_GATE {
                    unread = 0;
                    match wire.try_recv() {
                        Some(input) => {
                            last_seen = Instant::now();
                            session.on_input(input)
                        }
                        None => Ok(()),
                    }
                } else {
                    Ok(())
                }
            }
            _ = async {
                match committed.as_mut() {
                    Some(c) => { let _ = c.changed().await; }
                    None => std::future::pending().await,
                }
            }, if !session.acks.is_empty() => {
                session.flush_acks();
                Ok(())
            }
            _ = async {
                let deadline = session.acks.front().and_then(|a| a.replicated.as_ref()).map(|r| r.2);
                match deadline {
                    Some(d) => tokio::select! {
                        _ = replicated.changed() => {}
                        _ = sleep_until(d) => {}
                    },
                    None => std::future::pending().await,
                }
            }, if session.acks.front().is_some_and(|a| a.replicated.is_some()) => {
                session.flush_acks();
                Ok(())
            }
            _ = parked_tick.tick(), if !session.parked.is_empty() => {
                session.retry_parked();
                Ok(())
            }
            (id, timed_out, result) = async {
                match step.as_mut() {
                    Some(f) => f.await,
                    None => std::future::pending().await,
                }
            }, if step.is_some() => {
                step = None;
                session.on_step(id, timed_out, result);
                Ok(())
            }
            // Not while a backlog waits to be written: a client asking for replay after
            // replay (each within its bounds) without reading them is held back by TCP.
            // (A wire that cannot write yet is still listened to: a long poll arriving
            // makes it writable.)
            input = wire.recv(session.backlog() < READ_GATE),
                if session.backlog() < READ_GATE || !writable =>
            {
                unread = 0;
                last_seen = Instant::now();
                // Handle the frames that already arrived too, so their replies (e.g. a
                // pipelining publisher's acks) leave in one write.
                let mut r = session.on_input(input);
                for _ in 0..READ_AHEAD_FRAMES {
                    let Ok(()) = r else { break };
                    if session.backlog() >= READ_GATE {
                        break;
                    }
                    match wire.try_recv() {
                        Some(input) => r = session.on_input(input),
                        None => break,
                    }
                }
                r
            }
            // Nothing else to do: write on.
            _ = std::future::ready(()), if writable && session.has_output() => Ok(()),
        };
        if let Err(end) = turn {
            break end;
        }
        if session.has_output() && wire.writable() {
            let gated = session.backlog() >= READ_GATE;
            match write(&mut session, wire, &stop, &rx, idle, draining.is_some()).await {
                Err(end) => break end,
                // While its frames are not read, a client that reads what it is sent is
                // alive (its pongs wait in the socket).
                Ok(()) if gated => last_seen = Instant::now(),
                Ok(()) => {}
            }
        }
    };

    session.leave_all();
    if matches!(end, End::Close(..)) && wire.drains() {
        // What was queued goes before the close frame (at most a write chunk, never waiting
        // on the client: the wire's `close` sends it with the close frame).
        session.take_outbox(&mut rx);
        let mut written = 0;
        while written < WRITE_CHUNK {
            match session.poll_transmit() {
                Some(Transmit::Frame(frame, _)) => {
                    written += frame.len();
                    if wire.feed(frame).await.is_err() {
                        break;
                    }
                }
                Some(Transmit::Messages(ms)) => {
                    written += ms.iter().map(|m| m.piece_len(codec::Format::Json)).sum::<usize>();
                    if wire.feed_messages(ms).await.is_err() {
                        break;
                    }
                }
                Some(Transmit::Ping) => {}
                None => break,
            }
        }
    }
    end
}

/// Writes the next chunk of the session's output (see [`WRITE_CHUNK`]). Gives up when the
/// peer reads nothing for `stall`, or the session is stopped (overflow, shutdown) meanwhile.
async fn write<W: Wire>(
    session: &mut Session,
    wire: &mut W,
    stop: &CancellationToken,
    rx: &OutboxReceiver,
    stall: Duration,
    draining: bool,
) -> Result<(), End> {
    let write = async {
        let mut written = 0;
        while written < WRITE_CHUNK {
            match session.poll_transmit() {
                None => break,
                Some(Transmit::Ping) => wire.ping().await?,
                Some(Transmit::Frame(frame, held)) => {
                    written += frame.len();
                    wire.feed(frame).await?;
                    drop(held);
                }
                Some(Transmit::Messages(ms)) => {
                    written += ms.iter().map(|m| m.piece_len(codec::Format::Json)).sum::<usize>();
                    wire.feed_messages(ms).await?;
                }
            }
        }
        session.compact();
        wire.flush().await
    };
    // Write first: in the usual case it completes at once, and the stop token and the
    // stall timer are never polled (no timer registered per turn).
    tokio::select! {
        biased;
        r = write => r.map_err(|e| {
            debug!(error = %e, "write failed");
            End::Gone
        }),
        // While draining the token is cancelled already: the drain's own deadline ends it.
        _ = stop.cancelled(), if !draining => Err(stopped(rx, &session.node)),
        _ = tokio::time::sleep(stall) => Err(slow_consumer()),
    }
}
