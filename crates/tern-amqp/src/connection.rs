//! One client connection: the protocol header, the handshake (start, PLAIN
//! or AMQPLAIN authentication against the broker's users, tune, open), heartbeat checks, the channel table, content
//! assembly of `basic.publish`, connection-level errors, and the close
//! handshake in both directions.
//!
//! The connection task reads and demultiplexes frames; each open channel is
//! its own task ([`crate::channel`]); everything is written through the
//! connection's [`Outbox`]. When the connection ends, its channels are
//! dropped (returning their unacked messages) and the broker is told, so
//! that the connection's exclusive queues go.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{basic, channel, connection, AMQPClass, BasicProperties};
use amq_protocol::types::{AMQPValue, FieldTable as WireTable, LongString};
use bytes::{Bytes, BytesMut};
use tern_broker::{
    AuthUser, Broker, ConnectionHandle, ConnectionId, ConnectionMeta, ConnectionTraffic,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::auth;
use crate::channel::{ChannelCommand, ChannelSetup, ChannelTask};
use crate::error::{code, AmqpError, ProtocolError};
use crate::flow::Blocking;
use crate::frame::{self, short, BASIC_CLASS, PROTOCOL_HEADER};
use crate::reply_to::ReplyRegistry;
use crate::writer::Outbox;

/// The most channels a connection may open (channel-max).
pub(crate) const CHANNEL_MAX: u16 = 2047;
/// The largest frame the server accepts and sends (frame-max).
pub(crate) const FRAME_MAX: u32 = 131_072;
/// The smallest frame-max a client may ask for.
const FRAME_MIN: u32 = 4096;
/// The heartbeat interval the server proposes, in seconds.
pub(crate) const HEARTBEAT: u16 = 60;
/// The largest message body accepted.
const MAX_BODY: u64 = 128 << 20;
/// How long the client has to send its protocol header and each handshake step.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing side waits for the other's close-ok.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How much room the read buffer gets when it runs low.
const READ_CHUNK: usize = 64 * 1024;
/// Below this much room, the read buffer is given [`READ_CHUNK`] more.
const READ_SPARE_MIN: usize = 16 * 1024;
/// How many commands queue up for a channel before the reader waits.
const CHANNEL_QUEUE: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    StartOk,
    TuneOk,
    Open,
    Running,
}

/// A `basic.publish` whose content is still arriving.
#[derive(Debug)]
struct Assembly {
    method: basic::Publish,
    properties: Option<BasicProperties>,
    size: u64,
    body: Vec<u8>,
}

#[derive(Debug)]
struct Slot {
    tx: mpsc::Sender<ChannelCommand>,
    assembly: Option<Assembly>,
}

/// What handling a frame asks of the read loop.
enum Flow {
    Continue,
    /// The client closed the connection and was answered.
    Closed,
}

struct Connection {
    broker: Broker,
    id: ConnectionId,
    outbox: Outbox,
    phase: Phase,
    vhost: String,
    channel_max: u16,
    frame_max: u32,
    heartbeat: u16,
    cancel_notify: bool,
    channels: HashMap<u16, Slot>,
    tasks: JoinSet<()>,
    /// Connection-level errors raised inside channel tasks.
    channel_errors: mpsc::UnboundedSender<ProtocolError>,
    replies: ReplyRegistry,
    /// The socket's two ends, for the broker's connection registry.
    addrs: Option<(SocketAddr, SocketAddr)>,
    /// The broker's listing of this connection, once it is open; through it
    /// an operator may ask for the connection to be closed.
    registration: Option<ConnectionHandle>,
    /// Bytes read here and written by the writer task, for the registry.
    traffic: ConnectionTraffic,
    /// Who logged in, once `start-ok` was accepted.
    user: Option<AuthUser>,
    /// Whether resource alarms block this connection (`flow.rs`).
    blocking: Blocking,
}

/// Serves one accepted stream (TCP, or TLS over TCP: `addrs` are the
/// socket's peer and local addresses) until the connection ends.
pub(crate) async fn serve<R, W>(
    mut read: R,
    mut write: W,
    addrs: Option<(SocketAddr, SocketAddr)>,
    broker: Broker,
    replies: ReplyRegistry,
    shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = BytesMut::with_capacity(8192);
    // A socket that has not sent its protocol header yet is simply dropped at
    // shutdown, rather than holding the shutdown up until its handshake times out.
    let mut stop = shutdown.clone();
    let header = tokio::select! {
        header = read_protocol_header(&mut read, &mut buf) => header,
        _ = stop.wait_for(|stopped| *stopped) => None,
    };
    match header {
        Some(true) => {}
        Some(false) => {
            let _ = write.write_all(PROTOCOL_HEADER).await;
            let _ = write.shutdown().await;
            return;
        }
        None => return,
    }
    // Everything read so far: the header and whatever came with it.
    let traffic = ConnectionTraffic::default();
    traffic.add_received(PROTOCOL_HEADER.len() + buf.len());
    let (outbox, writer) = Outbox::start(write, traffic.clone());
    let id = broker.new_connection_id();
    let (channel_errors, escalated) = mpsc::unbounded_channel();
    let mut conn = Connection {
        broker: broker.clone(),
        id,
        outbox,
        phase: Phase::StartOk,
        vhost: String::new(),
        channel_max: CHANNEL_MAX,
        frame_max: FRAME_MAX,
        heartbeat: 0,
        cancel_notify: false,
        channels: HashMap::new(),
        tasks: JoinSet::new(),
        channel_errors,
        replies,
        addrs,
        registration: None,
        traffic,
        user: None,
        blocking: Blocking::new(broker.alarms()),
    };
    let _ = conn.run(read, buf, shutdown, escalated).await;
    conn.end().await;
    let _ = broker.connection_closed(id).await;
    drop(conn);
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, writer).await;
}

/// Reads the 8-byte protocol header: `Some(true)` if it is AMQP 0-9-1,
/// `Some(false)` as soon as the bytes cannot be it, `None` on EOF or timeout.
async fn read_protocol_header<R: AsyncRead + Unpin>(
    read: &mut R,
    buf: &mut BytesMut,
) -> Option<bool> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    while buf.len() < PROTOCOL_HEADER.len() {
        let n = PROTOCOL_HEADER.len().min(buf.len());
        if buf[..n] != PROTOCOL_HEADER[..n] {
            return Some(false);
        }
        match tokio::time::timeout_at(deadline, read.read_buf(buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(_)) => {}
        }
    }
    let ok = buf[..PROTOCOL_HEADER.len()] == PROTOCOL_HEADER[..];
    let _ = buf.split_to(PROTOCOL_HEADER.len());
    Some(ok)
}

fn server_properties() -> WireTable {
    let mut caps = WireTable::default();
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "per_consumer_qos",
        "consumer_priorities",
        "authentication_failure_close",
        "direct_reply_to",
        "connection.blocked",
    ] {
        caps.insert(short(cap), AMQPValue::Boolean(true));
    }
    let mut props = WireTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes()));
    props.insert(short("product"), text("Tern"));
    props.insert(short("version"), text(env!("CARGO_PKG_VERSION")));
    props.insert(short("platform"), text("Rust"));
    props.insert(
        short("information"),
        text("Tern, a RabbitMQ-compatible message broker"),
    );
    props.insert(short("capabilities"), AMQPValue::FieldTable(caps));
    props
}

/// Whether a client may send this method on a channel other than 0.
fn channel_method(method: &AMQPClass) -> bool {
    use amq_protocol::protocol::{confirm, exchange, queue, tx};
    matches!(
        method,
        AMQPClass::Channel(
            channel::AMQPMethod::Open(_)
                | channel::AMQPMethod::Flow(_)
                | channel::AMQPMethod::FlowOk(_)
                | channel::AMQPMethod::Close(_)
                | channel::AMQPMethod::CloseOk(_)
        ) | AMQPClass::Exchange(
            exchange::AMQPMethod::Declare(_)
                | exchange::AMQPMethod::Delete(_)
                | exchange::AMQPMethod::Bind(_)
                | exchange::AMQPMethod::Unbind(_)
        ) | AMQPClass::Queue(
            queue::AMQPMethod::Declare(_)
                | queue::AMQPMethod::Bind(_)
                | queue::AMQPMethod::Purge(_)
                | queue::AMQPMethod::Delete(_)
                | queue::AMQPMethod::Unbind(_)
        ) | AMQPClass::Basic(
            basic::AMQPMethod::Qos(_)
                | basic::AMQPMethod::Consume(_)
                | basic::AMQPMethod::Cancel(_)
                | basic::AMQPMethod::Publish(_)
                | basic::AMQPMethod::Get(_)
                | basic::AMQPMethod::Ack(_)
                | basic::AMQPMethod::Reject(_)
                | basic::AMQPMethod::RecoverAsync(_)
                | basic::AMQPMethod::Recover(_)
                | basic::AMQPMethod::Nack(_)
        ) | AMQPClass::Confirm(confirm::AMQPMethod::Select(_))
            | AMQPClass::Tx(
                tx::AMQPMethod::Select(_) | tx::AMQPMethod::Commit(_) | tx::AMQPMethod::Rollback(_)
            )
    )
}

fn ids(method: &AMQPClass) -> (u16, u16) {
    (method.get_amqp_class_id(), method.get_amqp_method_id())
}

impl Connection {
    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        mut read: R,
        mut buf: BytesMut,
        mut shutdown: watch::Receiver<bool>,
        mut escalated: mpsc::UnboundedReceiver<ProtocolError>,
    ) -> Result<(), AmqpError> {
        self.outbox
            .method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
                    version_major: 0,
                    version_minor: 9,
                    server_properties: server_properties(),
                    mechanisms: LongString::from(auth::MECHANISMS),
                    locales: LongString::from("en_US"),
                })),
            )
            .await?;
        let started = Instant::now();
        let mut last_read = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            // Unblocked is told before the held frames are handled, so that
            // it comes before their confirms.
            if let Some(note) = self.blocking.notification() {
                self.outbox.method(0, note).await?;
            }
            // A blocked connection's frames wait, read or not, until the
            // alarms clear: a publish under way is held, not routed.
            while !self.blocking.blocked() {
                match frame::take_frame(&mut buf, self.frame_max) {
                    Ok(Some(frame)) => match self.handle(frame).await {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Closed) => return Ok(()),
                        Err(e) => return self.fail(e, &mut read, &mut buf).await,
                    },
                    Ok(None) => break,
                    Err(e) => return self.fail(e, &mut read, &mut buf).await,
                }
            }
            if let Some(note) = self.blocking.notification() {
                self.outbox.method(0, note).await?;
            }
            // Room for many frames per read: a busy publisher's frames are
            // then taken in with few system calls.
            if buf.capacity() - buf.len() < READ_SPARE_MIN {
                buf.reserve(READ_CHUNK);
            }
            tokio::select! {
                n = read.read_buf(&mut buf), if !self.blocking.blocked() => match n {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(n) => {
                        // One add per read, which holds many frames under load.
                        self.traffic.add_received(n);
                        last_read = Instant::now();
                    }
                },
                () = self.blocking.changed() => {}
                _ = tick.tick() => {
                    if self.blocking.blocked() {
                        // Its heartbeats are not read while it is blocked.
                        last_read = Instant::now();
                    }
                    if self.phase != Phase::Running && started.elapsed() > HANDSHAKE_TIMEOUT {
                        return Ok(());
                    }
                    let limit = Duration::from_secs(u64::from(self.heartbeat) * 2);
                    if self.heartbeat > 0 && last_read.elapsed() > limit {
                        return Ok(());
                    }
                }
                Some(e) = escalated.recv() => {
                    return self.fail(e, &mut read, &mut buf).await;
                }
                reason = close_request(&mut self.registration) => {
                    let e = ProtocolError::new(code::CONNECTION_FORCED, reason);
                    return self.fail(e, &mut read, &mut buf).await;
                }
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        let e = ProtocolError::new(code::CONNECTION_FORCED, "broker shutdown");
                        return self.fail(e, &mut read, &mut buf).await;
                    }
                }
            }
        }
    }

    /// Closes the connection from the server's side: sends `connection.close`,
    /// drops the channels, and waits a little for the client's close-ok.
    async fn fail<R: AsyncRead + Unpin>(
        &mut self,
        e: ProtocolError,
        read: &mut R,
        buf: &mut BytesMut,
    ) -> Result<(), AmqpError> {
        self.abort_channels().await;
        let close = self.outbox.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: e.code,
                reply_text: short(&e.text),
                class_id: e.class_id,
                method_id: e.method_id,
            })),
        );
        // A client that reads nothing cannot be told; it is simply dropped.
        match tokio::time::timeout(CLOSE_TIMEOUT, close).await {
            Ok(sent) => sent?,
            Err(_) => return Ok(()),
        }
        let wait = async {
            loop {
                loop {
                    match frame::take_frame(buf, 0) {
                        Ok(Some(AMQPFrame::Method(
                            0,
                            AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)),
                        ))) => return,
                        Ok(Some(AMQPFrame::Method(
                            0,
                            AMQPClass::Connection(connection::AMQPMethod::Close(_)),
                        ))) => {
                            let _ = self
                                .outbox
                                .method(
                                    0,
                                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                                        connection::CloseOk {},
                                    )),
                                )
                                .await;
                            return;
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(_) => return,
                    }
                }
                match read.read_buf(buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => self.traffic.add_received(n),
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, wait).await;
        Ok(())
    }

    /// Drops every channel at once (their tasks stop; unacked messages return).
    async fn abort_channels(&mut self) {
        self.channels.clear();
        self.tasks.shutdown().await;
    }

    /// Lets the channels finish the commands they were given, then stops them.
    async fn drain_channels(&mut self) {
        self.channels.clear();
        let tasks = &mut self.tasks;
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.shutdown().await;
    }

    async fn end(&mut self) {
        self.abort_channels().await;
    }

    async fn handle(&mut self, frame: AMQPFrame) -> Result<Flow, ProtocolError> {
        match frame {
            AMQPFrame::Heartbeat => Ok(Flow::Continue),
            AMQPFrame::Method(0, AMQPClass::Connection(method)) => {
                self.connection_method(method).await
            }
            AMQPFrame::Method(0, method) => Err(ProtocolError::for_method(
                code::COMMAND_INVALID,
                "channel 0 carries only connection methods",
                ids(&method),
            )),
            _ if self.phase != Phase::Running => Err(ProtocolError::new(
                code::COMMAND_INVALID,
                "the connection is not open yet",
            )),
            AMQPFrame::Method(ch, method) => self.channel_frame_method(ch, method).await,
            AMQPFrame::Header(ch, header) => {
                let slot = self.slot(ch)?;
                let Some(assembly) = slot.assembly.as_mut() else {
                    return Err(unexpected(ch, "content header without basic.publish"));
                };
                if assembly.properties.is_some() || header.class_id != BASIC_CLASS {
                    return Err(unexpected(ch, "unexpected content header"));
                }
                if header.body_size > MAX_BODY {
                    return Err(ProtocolError::new(
                        code::FRAME_ERROR,
                        format!(
                            "message body of {} bytes exceeds the maximum of {MAX_BODY}",
                            header.body_size
                        ),
                    ));
                }
                assembly.properties = Some(header.properties);
                assembly.size = header.body_size;
                self.maybe_publish(ch).await
            }
            AMQPFrame::Body(ch, bytes) => {
                let slot = self.slot(ch)?;
                let Some(assembly) = slot.assembly.as_mut() else {
                    return Err(unexpected(ch, "content body without basic.publish"));
                };
                if assembly.properties.is_none() {
                    return Err(unexpected(ch, "content body before content header"));
                }
                if assembly.body.is_empty() && bytes.len() as u64 == assembly.size {
                    // The usual case, a body in one frame: the frame's own
                    // buffer becomes the message's, without another copy.
                    assembly.body = bytes;
                } else {
                    if assembly.body.is_empty() {
                        // Reserve what is likely to arrive soon, not what a
                        // client claims.
                        assembly.body.reserve(assembly.size.min(1 << 20) as usize);
                    }
                    assembly.body.extend_from_slice(&bytes);
                }
                if assembly.body.len() as u64 > assembly.size {
                    return Err(ProtocolError::new(
                        code::FRAME_ERROR,
                        format!("content body on channel {ch} longer than announced"),
                    ));
                }
                self.maybe_publish(ch).await
            }
            AMQPFrame::ProtocolHeader(_) | AMQPFrame::InvalidHeartbeat(_) => Err(
                ProtocolError::new(code::FRAME_ERROR, "unexpected frame type"),
            ),
        }
    }

    fn slot(&mut self, ch: u16) -> Result<&mut Slot, ProtocolError> {
        self.channels.get_mut(&ch).ok_or_else(|| {
            ProtocolError::new(code::CHANNEL_ERROR, format!("channel {ch} is not open"))
        })
    }

    /// Hands a publish whose content is complete to its channel.
    async fn maybe_publish(&mut self, ch: u16) -> Result<Flow, ProtocolError> {
        let slot = self.slot(ch)?;
        let complete = matches!(&slot.assembly,
            Some(a) if a.properties.is_some() && a.body.len() as u64 == a.size);
        if !complete {
            return Ok(Flow::Continue);
        }
        let Some(Assembly {
            method,
            properties: Some(properties),
            body,
            ..
        }) = slot.assembly.take()
        else {
            return Ok(Flow::Continue);
        };
        let command = ChannelCommand::Publish {
            method,
            properties: Box::new(properties),
            body: Bytes::from(body),
        };
        // A channel whose task has ended is closing: the publish is dropped.
        let _ = slot.tx.send(command).await;
        Ok(Flow::Continue)
    }

    async fn channel_frame_method(
        &mut self,
        ch: u16,
        method: AMQPClass,
    ) -> Result<Flow, ProtocolError> {
        let method_ids = ids(&method);
        if let AMQPClass::Channel(channel::AMQPMethod::Open(_)) = method {
            return self.open_channel(ch, method_ids).await;
        }
        match &method {
            AMQPClass::Access(_) => {
                return Err(ProtocolError::for_method(
                    code::NOT_IMPLEMENTED,
                    "access is not implemented",
                    method_ids,
                ))
            }
            m if !channel_method(m) => {
                return Err(ProtocolError::for_method(
                    code::COMMAND_INVALID,
                    format!(
                        "method {}.{} is not valid from a client",
                        method_ids.0, method_ids.1
                    ),
                    method_ids,
                ))
            }
            _ => {}
        }
        if matches!(method, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)))
            && !self.channels.contains_key(&ch)
        {
            // Both sides closed the channel at once: it is already gone.
            return Ok(Flow::Continue);
        }
        if matches!(method, AMQPClass::Basic(basic::AMQPMethod::Publish(_))) {
            self.blocking.published();
        }
        let slot = self.slot(ch)?;
        if slot.assembly.is_some() {
            return Err(unexpected(ch, "method frame while content was expected"));
        }
        match method {
            AMQPClass::Basic(basic::AMQPMethod::Publish(p)) => {
                if p.immediate {
                    return Err(ProtocolError::for_method(
                        code::NOT_IMPLEMENTED,
                        "immediate=true",
                        method_ids,
                    ));
                }
                slot.assembly = Some(Assembly {
                    method: p,
                    properties: None,
                    size: 0,
                    body: Vec::new(),
                });
                Ok(Flow::Continue)
            }
            AMQPClass::Channel(channel::AMQPMethod::Close(_) | channel::AMQPMethod::CloseOk(_)) => {
                // The id is free once the channel answers (or was answered).
                if let Some(slot) = self.channels.remove(&ch) {
                    let _ = slot.tx.send(ChannelCommand::Method(method)).await;
                }
                Ok(Flow::Continue)
            }
            method => {
                let _ = slot.tx.send(ChannelCommand::Method(method)).await;
                Ok(Flow::Continue)
            }
        }
    }

    async fn open_channel(
        &mut self,
        ch: u16,
        method_ids: (u16, u16),
    ) -> Result<Flow, ProtocolError> {
        if self.channels.contains_key(&ch) {
            return Err(ProtocolError::for_method(
                code::CHANNEL_ERROR,
                format!("second 'channel.open' seen on channel {ch}"),
                method_ids,
            ));
        }
        if ch > self.channel_max {
            return Err(ProtocolError::for_method(
                code::NOT_ALLOWED,
                format!("channel {ch} is above channel_max {}", self.channel_max),
                method_ids,
            ));
        }
        let broker_channel = self
            .broker
            .open_channel(&self.vhost, self.id)
            .map_err(|e| ProtocolError::from_broker(&e, method_ids))?;
        broker_channel.set_number(ch);
        self.outbox
            .method(
                ch,
                AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
            )
            .await
            .map_err(|e| ProtocolError::new(code::INTERNAL_ERROR, e))?;
        let (tx, rx) = mpsc::channel(CHANNEL_QUEUE);
        let Some(user) = self.user.clone() else {
            return Err(ProtocolError::new(
                code::COMMAND_INVALID,
                "channel.open before login",
            ));
        };
        let setup = ChannelSetup {
            user,
            broker: self.broker.clone(),
            vhost: self.vhost.clone(),
            connection: self.id,
            outbox: self.outbox.clone(),
            cancel_notify: self.cancel_notify,
            connection_errors: self.channel_errors.clone(),
            replies: self.replies.clone(),
        };
        let task = ChannelTask::new(ch, setup, broker_channel, rx);
        self.tasks.spawn(task.run());
        self.channels.insert(ch, Slot { tx, assembly: None });
        Ok(Flow::Continue)
    }

    async fn connection_method(
        &mut self,
        method: connection::AMQPMethod,
    ) -> Result<Flow, ProtocolError> {
        let method_ids = ids(&AMQPClass::Connection(method.clone()));
        let send_failed = |e: AmqpError| ProtocolError::new(code::INTERNAL_ERROR, e);
        match (self.phase, method) {
            (Phase::StartOk, connection::AMQPMethod::StartOk(ok)) => {
                self.cancel_notify =
                    client_capability(&ok.client_properties, "consumer_cancel_notify");
                self.blocking.set_notify(client_capability(
                    &ok.client_properties,
                    "connection.blocked",
                ));
                let mechanism = ok.mechanism.as_str();
                // A socket without a peer address is not vouched for as
                // loopback (`None` would mean an in-process caller).
                let peer = Some(self.addrs.map_or(
                    std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                    |(peer, _)| peer.ip(),
                ));
                let user = match auth::credentials(mechanism, ok.response.as_bytes()) {
                    Some((user, password)) => {
                        self.broker.authenticate(&user, &password, peer).await.ok()
                    }
                    None => None,
                };
                let Some(user) = user else {
                    return Err(ProtocolError::for_method(
                        code::ACCESS_REFUSED,
                        auth::refused_text(mechanism),
                        method_ids,
                    ));
                };
                self.user = Some(user);
                self.phase = Phase::TuneOk;
                self.outbox
                    .method(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                            channel_max: CHANNEL_MAX,
                            frame_max: FRAME_MAX,
                            heartbeat: HEARTBEAT,
                        })),
                    )
                    .await
                    .map_err(send_failed)?;
                Ok(Flow::Continue)
            }
            (Phase::TuneOk, connection::AMQPMethod::TuneOk(tune)) => {
                if tune.frame_max != 0 && tune.frame_max < FRAME_MIN {
                    return Err(ProtocolError::for_method(
                        code::NOT_ALLOWED,
                        format!(
                            "frame_max {} is below the minimum {FRAME_MIN}",
                            tune.frame_max
                        ),
                        method_ids,
                    ));
                }
                self.channel_max = match tune.channel_max {
                    0 => CHANNEL_MAX,
                    n => n.min(CHANNEL_MAX),
                };
                self.frame_max = match tune.frame_max {
                    0 => FRAME_MAX,
                    n => n.min(FRAME_MAX),
                };
                self.heartbeat = tune.heartbeat.min(HEARTBEAT);
                self.outbox.set_frame_max(self.frame_max);
                self.outbox
                    .heartbeat(self.heartbeat)
                    .await
                    .map_err(send_failed)?;
                self.phase = Phase::Open;
                Ok(Flow::Continue)
            }
            (Phase::Open, connection::AMQPMethod::Open(open)) => {
                let vhost = open.virtual_host.as_str();
                if !self.broker.vhosts().iter().any(|v| v.as_str() == vhost) {
                    return Err(ProtocolError::for_method(
                        code::NOT_ALLOWED,
                        format!("vhost '{vhost}' not found"),
                        method_ids,
                    ));
                }
                let user = self.user.as_ref().ok_or_else(|| {
                    ProtocolError::for_method(code::COMMAND_INVALID, "not logged in", method_ids)
                })?;
                self.broker
                    .check_vhost_access(user, vhost)
                    .map_err(|e| ProtocolError::for_method(code::NOT_ALLOWED, e, method_ids))?;
                self.vhost = vhost.to_string();
                self.phase = Phase::Running;
                if let Some((peer, local)) = self.addrs {
                    self.registration = Some(self.broker.register_connection(
                        self.id,
                        ConnectionMeta {
                            peer,
                            local,
                            user: user.name().to_string(),
                            vhost: self.vhost.clone(),
                            protocol: "AMQP 0-9-1".to_string(),
                            traffic: self.traffic.clone(),
                        },
                    ));
                }
                self.outbox
                    .method(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::OpenOk(
                            connection::OpenOk {},
                        )),
                    )
                    .await
                    .map_err(send_failed)?;
                Ok(Flow::Continue)
            }
            (_, connection::AMQPMethod::Close(_)) => {
                self.drain_channels().await;
                self.outbox
                    .method(
                        0,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                            connection::CloseOk {},
                        )),
                    )
                    .await
                    .map_err(send_failed)?;
                Ok(Flow::Closed)
            }
            (_, method) => Err(ProtocolError::for_method(
                code::COMMAND_INVALID,
                format!(
                    "unexpected connection method {} in this state",
                    AMQPClass::Connection(method).get_amqp_method_id()
                ),
                method_ids,
            )),
        }
    }
}

/// The reason an operator gave for closing the connection; pending while
/// the connection is not registered or nobody asks.
async fn close_request(registration: &mut Option<ConnectionHandle>) -> String {
    match registration {
        Some(handle) => handle.close_requested().await,
        None => std::future::pending().await,
    }
}

/// Whether the client's properties announce a capability.
fn client_capability(properties: &WireTable, name: &str) -> bool {
    match properties.inner().get("capabilities") {
        Some(AMQPValue::FieldTable(caps)) => {
            matches!(caps.inner().get(name), Some(AMQPValue::Boolean(true)))
        }
        _ => false,
    }
}

fn unexpected(ch: u16, what: &str) -> ProtocolError {
    ProtocolError::new(code::UNEXPECTED_FRAME, format!("{what} on channel {ch}"))
}
