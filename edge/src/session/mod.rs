//! Client sessions: the protocol state of one client ([`core`]), run by one task
//! ([`driver`]) over a transport: a WebSocket ([`ws`]), or HTTP streaming, server-sent events
//! and long polling ([`http`]), and plain server-sent events for `EventSource` ([`sse`]).
//!
//! A session ends with a close code that says why (see `tern_proto::close`), and removes
//! every subscription it held: no zombies.

pub mod core;
pub mod driver;
pub mod http;
pub mod sse;
pub mod ws;

pub use self::core::End;
pub use ws::run;
