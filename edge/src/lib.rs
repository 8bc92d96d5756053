//! The Tern edge server.
//!
//! A tour of the modules, following a message:
//!
//! ```text
//!  client ─ws─▶ server (accept, HTTP/1.1) ─▶ http (/v1/ws upgrade, HTTP API)
//!                                                │
//!                                                ▼
//!                          session (one task per connection: decode, handle, write)
//!                                                │ publish (validated in `publish`)
//!                                                ▼
//!                     channel::Hub (sequence, de-duplicate, fan out under the channel lock)
//!                                                │ Arc<EncodedMessage>, encoded once per format
//!                                                ▼
//!                         fanout::Outbox (bounded; overflow = slow consumer, 4001)
//!                                                │ batches: many messages, one frame
//!                                                ▼
//!                                       subscriber sessions ─ws─▶ clients
//! ```
//!
//! - [`config`]: the TOML configuration and its validation.
//! - [`node`]: shared state (settings, hub, connection slots, shutdown token, task tracker).
//! - [`server`]: the listener and graceful shutdown.
//! - [`tls`]: the client listener's certificate, reloaded when its files change.

pub mod auth;
pub mod channel;
pub mod config;
pub mod fanout;
pub mod fuzzing;
pub mod http;
pub mod metrics;
pub mod node;
pub mod presence;
pub mod publish;
pub mod resume;
pub mod server;
pub mod session;
pub mod store;
pub mod tls;

pub use config::{Config, ConfigError, Settings};
pub use server::{BindError, Server};
