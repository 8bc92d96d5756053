//! The WebSocket transport: one frame per server frame (text for JSON, binary for
//! protobuf), pings as WebSocket pings, the end as a close frame with its code.

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tern_proto::close;
use tern_proto::codec::Format;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message as WsMessage, Utf8Bytes};
use tracing::debug;

use super::core::{End, Input};
use super::driver::{self, Wire};
use crate::node::{Admission, Node};

/// Runs a session over an upgraded WebSocket to its end.
/// `token` is the one given in the upgrade URL, if any (`Connect.token` takes precedence).
pub async fn run<S>(
    ws: WebSocketStream<S>,
    format: Format,
    admission: Admission,
    token: Option<String>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let node = admission.node().clone();
    let mut wire = WsWire { ws, format };
    driver::run(&mut wire, &node, admission.id, format, token).await;
    drop(admission);
}

struct WsWire<S> {
    ws: WebSocketStream<S>,
    format: Format,
}

/// What a read of the WebSocket means for the session.
fn input(frame: Option<Result<WsMessage, WsError>>) -> Input {
    let msg = match frame {
        None => return Input::End(End::Gone),
        Some(Ok(msg)) => msg,
        Some(Err(WsError::Capacity(e))) => {
            return Input::End(End::Close(close::MESSAGE_TOO_BIG, e.to_string()));
        }
        Some(Err(WsError::Utf8(e))) => {
            return Input::End(End::Close(close::INVALID_PAYLOAD, format!("invalid UTF-8: {e}")));
        }
        Some(Err(WsError::Protocol(e))) => {
            return Input::End(End::Close(close::PROTOCOL_ERROR, e.to_string()));
        }
        Some(Err(e)) => {
            debug!(error = %e, "read failed");
            return Input::End(End::Gone);
        }
    };
    match msg {
        WsMessage::Text(t) => Input::Frame(Bytes::from(t), true),
        WsMessage::Binary(b) => Input::Frame(b, false),
        // The library answers pings itself; a close is answered by the library too, and the
        // next read ends the stream.
        WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) | WsMessage::Close(_) => {
            Input::Control
        }
    }
}

impl<S> Wire for WsWire<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn recv(&mut self, frames: bool) -> Input {
        if !frames {
            // (Never asked: a WebSocket is always writable.)
            return std::future::pending().await;
        }
        input(self.ws.next().await)
    }

    fn try_recv(&mut self) -> Option<Input> {
        self.ws.next().now_or_never().map(input)
    }

    async fn feed(&mut self, frame: Bytes) -> std::io::Result<()> {
        let msg = match self.format {
            Format::Protobuf => WsMessage::Binary(frame),
            // Our JSON encoder only produces UTF-8.
            Format::Json => WsMessage::Text(Utf8Bytes::try_from(frame).unwrap_or_default()),
        };
        self.ws.feed(msg).await.map_err(std::io::Error::other)
    }

    async fn ping(&mut self) -> std::io::Result<()> {
        self.ws.feed(WsMessage::Ping(Bytes::new())).await.map_err(std::io::Error::other)
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.ws.flush().await.map_err(std::io::Error::other)
    }

    async fn close(&mut self, end: End, node: &Node) {
        let End::Close(code, mut reason) = end else { return };
        // A close frame's reason fits in 123 bytes (control frames carry at most 125).
        if reason.len() > 123 {
            let mut cut = 120;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
            reason.push('…');
        }
        let frame = CloseFrame { code: CloseCode::from(code), reason: Utf8Bytes::from(reason) };
        // The peer gets `timeouts.close` to take the close frame (after whatever is still
        // buffered for it); then the socket is dropped regardless.
        let ws = &mut self.ws;
        let _ = tokio::time::timeout(node.settings().config.timeouts.close, async {
            ws.close(Some(frame)).await?;
            // Wait for the peer's close reply so the close frame is not lost to a reset.
            while ws.next().await.is_some() {}
            Ok::<_, WsError>(())
        })
        .await;
    }
}
