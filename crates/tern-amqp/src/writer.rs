//! The connection's writer: one task owns the socket's write half, takes
//! serialised frames from a bounded queue (so a client that does not read
//! slows its producers down), writes them in batches, and sends a heartbeat
//! whenever nothing else was written for half the heartbeat interval.
//! [`Outbox`] is the cloneable handle the connection and its channels write
//! through; a whole message (method, header, body frames) is one queue item,
//! so its frames are never interleaved with another channel's.

use std::time::Duration;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{AMQPClass, BasicProperties};
use tern_broker::ConnectionTraffic;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::AmqpError;
use crate::frame;

/// How many queued items the writer holds before producers wait.
const QUEUE_DEPTH: usize = 256;

/// How many bytes the writer gathers before one write.
const BATCH_BYTES: usize = 64 * 1024;

enum Outgoing {
    Bytes(Vec<u8>),
    Heartbeat(u16),
}

/// The handle for sending frames to the client.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    frame_max: u32,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outgoing::Bytes(b) => write!(f, "Bytes({})", b.len()),
            Outgoing::Heartbeat(s) => write!(f, "Heartbeat({s})"),
        }
    }
}

impl Outbox {
    /// Starts the writer task on `write`. The task ends when every
    /// [`Outbox`] clone is dropped (after flushing) or the socket fails.
    /// Every batch written is counted in `traffic`.
    pub(crate) fn start<W>(
        write: W,
        traffic: ConnectionTraffic,
    ) -> (Outbox, tokio::task::JoinHandle<()>)
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let task = tokio::spawn(async move {
            let _ = run(write, rx, traffic).await;
        });
        (Outbox { tx, frame_max: 0 }, task)
    }

    /// The negotiated frame-max that content is cut to (0: not yet negotiated).
    pub(crate) fn set_frame_max(&mut self, frame_max: u32) {
        self.frame_max = frame_max;
    }

    /// The negotiated frame-max (0: not yet negotiated).
    pub(crate) fn frame_max(&self) -> u32 {
        self.frame_max
    }

    /// Queues serialised frames.
    pub(crate) async fn send(&self, bytes: Vec<u8>) -> Result<(), AmqpError> {
        self.tx
            .send(Outgoing::Bytes(bytes))
            .await
            .map_err(|_| AmqpError::Closed)
    }

    /// Queues one method frame.
    pub(crate) async fn method(&self, channel: u16, method: AMQPClass) -> Result<(), AmqpError> {
        self.send(frame::method(channel, method)?).await
    }

    /// Queues a method with content, cut to the negotiated frame-max.
    pub(crate) async fn content(
        &self,
        channel: u16,
        method: AMQPClass,
        properties: BasicProperties,
        body: &[u8],
    ) -> Result<(), AmqpError> {
        self.send(frame::content(
            channel,
            method,
            properties,
            body,
            self.frame_max,
        )?)
        .await
    }

    /// Starts sending heartbeats for a negotiated interval in seconds (0: none).
    pub(crate) async fn heartbeat(&self, seconds: u16) -> Result<(), AmqpError> {
        self.tx
            .send(Outgoing::Heartbeat(seconds))
            .await
            .map_err(|_| AmqpError::Closed)
    }
}

async fn run<W: AsyncWrite + Unpin>(
    mut write: W,
    mut rx: mpsc::Receiver<Outgoing>,
    traffic: ConnectionTraffic,
) -> Result<(), AmqpError> {
    let mut heartbeat_frame = Vec::new();
    frame::encode(&mut heartbeat_frame, &AMQPFrame::Heartbeat)?;
    let mut every: Option<Duration> = None;
    let mut last_write = Instant::now();
    loop {
        let idle = async {
            match every {
                Some(d) => tokio::time::sleep_until(last_write + d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            item = rx.recv() => {
                let Some(item) = item else { break };
                let mut batch = match item {
                    Outgoing::Bytes(b) => b,
                    Outgoing::Heartbeat(s) => {
                        every = (s > 0).then(|| Duration::from_millis(u64::from(s) * 500));
                        continue;
                    }
                };
                while batch.len() < BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(Outgoing::Bytes(more)) => batch.extend_from_slice(&more),
                        Ok(Outgoing::Heartbeat(s)) => {
                            every = (s > 0).then(|| Duration::from_millis(u64::from(s) * 500));
                        }
                        Err(_) => break,
                    }
                }
                write.write_all(&batch).await?;
                traffic.add_sent(batch.len());
                last_write = Instant::now();
            }
            _ = idle => {
                write.write_all(&heartbeat_frame).await?;
                traffic.add_sent(heartbeat_frame.len());
                last_write = Instant::now();
            }
        }
    }
    write.flush().await?;
    write.shutdown().await?;
    Ok(())
}
