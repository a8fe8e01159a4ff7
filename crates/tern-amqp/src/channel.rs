//! One AMQP channel: a task that owns a `tern_broker::Channel` and serves
//! the channel's methods in order, forwards the broker's deliveries and
//! consumer cancellations as `basic.deliver` / `basic.cancel`, and sends
//! publisher confirms in publish order once the broker has made each message
//! durable.
//!
//! A broker error with a soft reply code (403 to 406) closes only this
//! channel: the task drops its broker channel (so its unacked messages return
//! to their queues), sends `channel.close` with the error's reply code, and
//! then ignores everything but `channel.close` / `channel.close-ok`. A hard
//! code (such as 530 or 503) is handed to the connection, which closes the
//! whole connection with it, as RabbitMQ does.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use amq_protocol::protocol::{
    basic, channel, confirm, exchange, queue, tx, AMQPClass, BasicProperties,
};
use bytes::Bytes;
use tern_broker::{
    Access, AuthUser, Broker, BrokerError, ChannelEvent, ConnectionId, ConsumeOptions, Delivery,
    DeliveryTag, ExchangeDeclare, ExchangeKind, ExchangeName, Message, Published, QueueDeclare,
    Resource,
};
use tokio::sync::mpsc;

use crate::convert::{properties_from_wire, properties_to_wire, table_from_wire};
use crate::error::{code, AmqpError, ProtocolError};
use crate::frame::{self, short};
use crate::reply_to::{self, Reply, ReplyAddress, ReplyRegistry};
use crate::transaction::{BufferedPublish, Settle, Transaction};
use crate::writer::Outbox;

/// What the connection hands a channel.
#[derive(Debug)]
pub(crate) enum ChannelCommand {
    /// A method without content.
    Method(AMQPClass),
    /// A complete `basic.publish`: method, properties and body.
    Publish {
        /// The method.
        method: basic::Publish,
        /// The content header's properties (boxed: they are large).
        properties: Box<BasicProperties>,
        /// The assembled body.
        body: Bytes,
    },
}

type Outcome = Pin<Box<dyn Future<Output = bool> + Send>>;

struct PendingConfirm {
    tag: u64,
    outcome: Outcome,
}

/// Why handling a command stopped.
enum Stop {
    /// Close the channel with this error.
    Fail(ProtocolError),
    /// The connection is gone.
    Gone,
}

impl From<AmqpError> for Stop {
    fn from(_: AmqpError) -> Stop {
        Stop::Gone
    }
}

enum Next {
    Continue,
    Exit,
}

/// How many bytes of waiting deliveries a channel gathers into one writer item.
const DELIVERY_BATCH_BYTES: usize = 64 * 1024;

/// How many granted checks a channel remembers (RabbitMQ keeps 12).
const GRANTED_CACHE: usize = 16;

/// What permission checks take a server-named queue's name to be.
const SERVER_NAMED_SAMPLE: &str = "amq.gen-0000000000000000";

/// The state of one open channel, run by [`ChannelTask::run`].
pub(crate) struct ChannelTask {
    id: u16,
    user: AuthUser,
    /// Granted permission checks, valid while the broker's access epoch
    /// is the first field.
    granted: (u64, Vec<(Resource, Access)>),
    broker: Broker,
    vhost: String,
    connection: ConnectionId,
    channel: Option<tern_broker::Channel>,
    outbox: Outbox,
    commands: mpsc::Receiver<ChannelCommand>,
    /// The next publish sequence number, once `confirm.select` was received.
    next_confirm: Option<u64>,
    confirms: VecDeque<PendingConfirm>,
    /// Publishes made without confirm mode that may not be durable yet.
    unconfirmed: VecDeque<Outcome>,
    /// The buffered work, once `tx.select` was received.
    transaction: Option<Transaction>,
    replies: ReplyRegistry,
    /// The direct reply-to consumer, once one consumes `amq.rabbitmq.reply-to`.
    reply_consumer: Option<ReplyConsumer>,
    cancel_notify: bool,
    flow: bool,
    last_queue: Option<String>,
    closing: bool,
    connection_errors: mpsc::UnboundedSender<ProtocolError>,
}

/// The settings a channel takes from its connection.
#[derive(Debug, Clone)]
pub(crate) struct ChannelSetup {
    /// Who the connection logged in as: every method is checked against
    /// their permissions.
    pub(crate) user: AuthUser,
    pub(crate) broker: Broker,
    pub(crate) vhost: String,
    pub(crate) connection: ConnectionId,
    pub(crate) outbox: Outbox,
    pub(crate) cancel_notify: bool,
    /// Where a connection-level error raised by a channel method goes.
    pub(crate) connection_errors: mpsc::UnboundedSender<ProtocolError>,
    /// The server's direct reply-to addresses.
    pub(crate) replies: ReplyRegistry,
}

/// A channel's direct reply-to consumer: its tag, its address (removed when
/// this is dropped) and the replies sent to it.
struct ReplyConsumer {
    tag: String,
    address: ReplyAddress,
    replies: mpsc::UnboundedReceiver<Reply>,
}

impl ChannelTask {
    /// A channel over an opened broker channel.
    pub(crate) fn new(
        id: u16,
        setup: ChannelSetup,
        channel: tern_broker::Channel,
        commands: mpsc::Receiver<ChannelCommand>,
    ) -> ChannelTask {
        ChannelTask {
            id,
            user: setup.user,
            granted: (u64::MAX, Vec::new()),
            broker: setup.broker,
            vhost: setup.vhost,
            connection: setup.connection,
            channel: Some(channel),
            outbox: setup.outbox,
            commands,
            next_confirm: None,
            confirms: VecDeque::new(),
            unconfirmed: VecDeque::new(),
            transaction: None,
            replies: setup.replies,
            reply_consumer: None,
            cancel_notify: setup.cancel_notify,
            flow: true,
            last_queue: None,
            closing: false,
            connection_errors: setup.connection_errors,
        }
    }

    /// Serves the channel until it is closed or the connection goes.
    pub(crate) async fn run(mut self) {
        loop {
            let flow = self.flow;
            let result = tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.handle(command).await,
                    None => return,
                },
                event = next_event(&mut self.channel), if flow => self.forward(event).await,
                reply = next_reply(&mut self.reply_consumer), if flow => self.forward_reply(reply).await,
                ok = front_outcome(&mut self.confirms) => self.confirm(ok).await,
            };
            match result {
                Ok(Next::Continue) => {}
                Ok(Next::Exit) | Err(Stop::Gone) => return,
                Err(Stop::Fail(e)) if e.is_connection_error() => {
                    // The connection closes every channel, this one included.
                    let _ = self.connection_errors.send(e);
                    return;
                }
                Err(Stop::Fail(e)) => {
                    if self.fail(e).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Closes the channel from the server's side.
    async fn fail(&mut self, e: ProtocolError) -> Result<(), AmqpError> {
        self.channel = None;
        self.reply_consumer = None;
        self.confirms.clear();
        self.unconfirmed.clear();
        // A closed channel's transaction is rolled back.
        self.transaction = None;
        self.closing = true;
        self.outbox
            .method(
                self.id,
                AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                    reply_code: e.code,
                    reply_text: short(&e.text),
                    class_id: e.class_id,
                    method_id: e.method_id,
                })),
            )
            .await
    }

    fn broker_channel(&mut self) -> Result<&mut tern_broker::Channel, Stop> {
        self.channel.as_mut().ok_or_else(|| {
            Stop::Fail(ProtocolError::new(
                code::INTERNAL_ERROR,
                "channel is closed",
            ))
        })
    }

    /// RabbitMQ's permission check: 403 on this channel, naming the
    /// resource, the vhost and the user, if the user may not. Granted
    /// checks are remembered until users or permissions change, so a
    /// publisher pays for the regex once, not per message.
    fn allow(&mut self, resource: Resource, access: Access, ids: (u16, u16)) -> Result<(), Stop> {
        let epoch = self.broker.access_epoch();
        let (cached_epoch, granted) = &mut self.granted;
        if *cached_epoch != epoch {
            *cached_epoch = epoch;
            granted.clear();
        }
        if granted.iter().any(|(r, a)| *a == access && *r == resource) {
            return Ok(());
        }
        self.broker
            .check_permission(&self.user, &self.vhost, &resource, access)
            .map_err(|e| Stop::Fail(ProtocolError::for_method(code::ACCESS_REFUSED, e, ids)))?;
        let (_, granted) = &mut self.granted;
        if granted.len() >= GRANTED_CACHE {
            granted.remove(0);
        }
        granted.push((resource, access));
        Ok(())
    }

    async fn reply(&mut self, method: AMQPClass) -> Result<Next, Stop> {
        self.outbox.method(self.id, method).await?;
        Ok(Next::Continue)
    }

    /// The queue a method names; an empty name means the channel's last declared queue.
    fn queue_name(&self, name: &str, method: (u16, u16)) -> Result<String, Stop> {
        if !name.is_empty() {
            return Ok(name.to_string());
        }
        self.last_queue.clone().ok_or_else(|| {
            Stop::Fail(ProtocolError::for_method(
                code::NOT_FOUND,
                "no previously declared queue",
                method,
            ))
        })
    }

    async fn handle(&mut self, command: ChannelCommand) -> Result<Next, Stop> {
        match command {
            ChannelCommand::Method(AMQPClass::Channel(channel::AMQPMethod::Close(_))) => {
                self.channel = None;
                self.reply_consumer = None;
                self.outbox
                    .method(
                        self.id,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    )
                    .await?;
                Ok(Next::Exit)
            }
            ChannelCommand::Method(AMQPClass::Channel(channel::AMQPMethod::CloseOk(_))) => {
                Ok(Next::Exit)
            }
            _ if self.closing => Ok(Next::Continue),
            ChannelCommand::Publish {
                method,
                properties,
                body,
            } => self.publish(method, *properties, body).await,
            ChannelCommand::Method(method) => {
                let ids = (method.get_amqp_class_id(), method.get_amqp_method_id());
                let fail = |e: BrokerError| Stop::Fail(ProtocolError::from_broker(&e, ids));
                self.method(method, ids, fail).await
            }
        }
    }

    async fn method(
        &mut self,
        method: AMQPClass,
        ids: (u16, u16),
        fail: impl Fn(BrokerError) -> Stop,
    ) -> Result<Next, Stop> {
        let vhost = self.vhost.clone();
        match method {
            AMQPClass::Channel(channel::AMQPMethod::Flow(f)) => {
                self.flow = f.active;
                self.reply(AMQPClass::Channel(channel::AMQPMethod::FlowOk(
                    channel::FlowOk { active: f.active },
                )))
                .await
            }
            AMQPClass::Channel(channel::AMQPMethod::FlowOk(_)) => Ok(Next::Continue),
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(d)) => {
                if !d.passive && !tern_broker::is_exchange_type(d.kind.as_str()) {
                    return Err(Stop::Fail(ProtocolError::for_method(
                        code::COMMAND_INVALID,
                        format!("unknown exchange type '{}'", d.kind),
                        ids,
                    )));
                }
                if !d.passive {
                    self.allow(
                        Resource::exchange(d.exchange.as_str()),
                        Access::Configure,
                        ids,
                    )?;
                }
                let declare = ExchangeDeclare {
                    name: d.exchange.as_str().to_string(),
                    kind: d.kind.as_str().to_string(),
                    durable: d.durable,
                    auto_delete: d.auto_delete,
                    internal: d.internal,
                    passive: d.passive,
                    arguments: table_from_wire(&d.arguments),
                };
                self.broker
                    .declare_exchange(&vhost, declare)
                    .await
                    .map_err(fail)?;
                self.reply_unless(
                    d.nowait,
                    AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {})),
                )
                .await
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Delete(d)) => {
                self.allow(
                    Resource::exchange(d.exchange.as_str()),
                    Access::Configure,
                    ids,
                )?;
                match self
                    .broker
                    .delete_exchange(&vhost, d.exchange.as_str(), d.if_unused)
                    .await
                {
                    Ok(()) | Err(BrokerError::ExchangeNotFound { .. }) => {}
                    Err(e) => return Err(fail(e)),
                }
                self.reply_unless(
                    d.nowait,
                    AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})),
                )
                .await
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Bind(b)) => {
                self.allow(
                    Resource::exchange(b.destination.as_str()),
                    Access::Write,
                    ids,
                )?;
                self.allow(Resource::exchange(b.source.as_str()), Access::Read, ids)?;
                self.broker
                    .bind_exchange(
                        &vhost,
                        b.destination.as_str(),
                        b.source.as_str(),
                        b.routing_key.as_str(),
                        &table_from_wire(&b.arguments),
                    )
                    .await
                    .map_err(fail)?;
                self.reply_unless(
                    b.nowait,
                    AMQPClass::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})),
                )
                .await
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Unbind(b)) => {
                self.allow(
                    Resource::exchange(b.destination.as_str()),
                    Access::Write,
                    ids,
                )?;
                self.allow(Resource::exchange(b.source.as_str()), Access::Read, ids)?;
                self.broker
                    .unbind_exchange(
                        &vhost,
                        b.destination.as_str(),
                        b.source.as_str(),
                        b.routing_key.as_str(),
                        &table_from_wire(&b.arguments),
                    )
                    .await
                    .map_err(fail)?;
                self.reply_unless(
                    b.nowait,
                    AMQPClass::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})),
                )
                .await
            }
            AMQPClass::Queue(queue::AMQPMethod::Declare(d))
                if d.passive
                    && (d.queue.as_str() == reply_to::PSEUDO_QUEUE
                        || reply_to::is_address(d.queue.as_str())) =>
            {
                // The pseudo queue always "exists"; an address while its channel consumes.
                let name = d.queue.as_str();
                if name != reply_to::PSEUDO_QUEUE && !self.replies.contains(name) {
                    return Err(Stop::Fail(ProtocolError::for_method(
                        code::NOT_FOUND,
                        format!("no queue '{name}' in vhost '{vhost}'"),
                        ids,
                    )));
                }
                self.reply_unless(
                    d.nowait,
                    AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                        queue: d.queue,
                        message_count: 0,
                        consumer_count: 0,
                    })),
                )
                .await
            }
            AMQPClass::Queue(queue::AMQPMethod::Declare(d)) => {
                if !d.passive {
                    // RabbitMQ checks a server-named queue under its generated
                    // name; the broker chooses it inside the declare, so the
                    // check uses one of the same shape (`amq.gen-` and 16 hex
                    // digits): only the prefix can sensibly decide.
                    let name = match d.queue.as_str() {
                        "" => SERVER_NAMED_SAMPLE,
                        name => name,
                    };
                    self.allow(Resource::queue(name), Access::Configure, ids)?;
                }
                self.own_publishes_visible().await?;
                let declare = QueueDeclare {
                    name: d.queue.as_str().to_string(),
                    durable: d.durable,
                    exclusive: d.exclusive,
                    auto_delete: d.auto_delete,
                    passive: d.passive,
                    arguments: table_from_wire(&d.arguments),
                };
                let ok = self
                    .broker
                    .declare_queue(&vhost, declare, self.connection)
                    .await
                    .map_err(fail)?;
                self.last_queue = Some(ok.queue.as_str().to_string());
                self.reply_unless(
                    d.nowait,
                    AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                        queue: short(ok.queue.as_str()),
                        message_count: saturate(ok.message_count),
                        consumer_count: ok.consumer_count,
                    })),
                )
                .await
            }
            AMQPClass::Queue(queue::AMQPMethod::Bind(b)) => {
                let name = self.queue_name(b.queue.as_str(), ids)?;
                self.allow(Resource::queue(&name), Access::Write, ids)?;
                self.allow(Resource::exchange(b.exchange.as_str()), Access::Read, ids)?;
                self.broker
                    .bind_queue(
                        &vhost,
                        &name,
                        b.exchange.as_str(),
                        b.routing_key.as_str(),
                        &table_from_wire(&b.arguments),
                        self.connection,
                    )
                    .await
                    .map_err(fail)?;
                self.reply_unless(
                    b.nowait,
                    AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
                )
                .await
            }
            AMQPClass::Queue(queue::AMQPMethod::Unbind(b)) => {
                let name = self.queue_name(b.queue.as_str(), ids)?;
                self.allow(Resource::queue(&name), Access::Write, ids)?;
                self.allow(Resource::exchange(b.exchange.as_str()), Access::Read, ids)?;
                self.broker
                    .unbind_queue(
                        &vhost,
                        &name,
                        b.exchange.as_str(),
                        b.routing_key.as_str(),
                        &table_from_wire(&b.arguments),
                        self.connection,
                    )
                    .await
                    .map_err(fail)?;
                self.reply(AMQPClass::Queue(queue::AMQPMethod::UnbindOk(
                    queue::UnbindOk {},
                )))
                .await
            }
            AMQPClass::Queue(queue::AMQPMethod::Purge(p)) => {
                let name = self.queue_name(p.queue.as_str(), ids)?;
                // Purge is a read in RabbitMQ.
                self.allow(Resource::queue(&name), Access::Read, ids)?;
                self.own_publishes_visible().await?;
                let count = self
                    .broker
                    .purge_queue(&vhost, &name, self.connection)
                    .map_err(fail)?;
                self.reply_unless(
                    p.nowait,
                    AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                        message_count: saturate(count),
                    })),
                )
                .await
            }
            AMQPClass::Queue(queue::AMQPMethod::Delete(d)) => {
                let name = self.queue_name(d.queue.as_str(), ids)?;
                self.allow(Resource::queue(&name), Access::Configure, ids)?;
                self.own_publishes_visible().await?;
                let count = match self
                    .broker
                    .delete_queue(&vhost, &name, d.if_unused, d.if_empty, self.connection)
                    .await
                {
                    Ok(count) => count,
                    Err(BrokerError::QueueNotFound { .. }) => 0,
                    Err(e) => return Err(fail(e)),
                };
                self.reply_unless(
                    d.nowait,
                    AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                        message_count: saturate(count),
                    })),
                )
                .await
            }
            AMQPClass::Basic(basic::AMQPMethod::Qos(q)) => {
                self.broker_channel()?.qos(q.prefetch_count, q.global);
                self.reply(AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})))
                    .await
            }
            AMQPClass::Basic(basic::AMQPMethod::Consume(c))
                if c.queue.as_str() == reply_to::PSEUDO_QUEUE =>
            {
                if !c.no_ack {
                    return Err(precondition("reply consumer cannot acknowledge", ids));
                }
                if self.reply_consumer.is_some() {
                    return Err(precondition("reply consumer already set", ids));
                }
                let tag = match c.consumer_tag.as_str() {
                    "" => reply_to::consumer_tag(),
                    tag => tag.to_string(),
                };
                let (address, replies) = self.replies.register();
                self.reply_consumer = Some(ReplyConsumer {
                    tag: tag.clone(),
                    address,
                    replies,
                });
                self.reply_unless(
                    c.nowait,
                    AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                        consumer_tag: short(&tag),
                    })),
                )
                .await
            }
            AMQPClass::Basic(basic::AMQPMethod::Consume(c)) => {
                let name = self.queue_name(c.queue.as_str(), ids)?;
                self.allow(Resource::queue(&name), Access::Read, ids)?;
                let arguments = table_from_wire(&c.arguments);
                let priority = match arguments.get("x-priority") {
                    None => 0,
                    Some(v) => v
                        .as_i64()
                        .and_then(|p| i32::try_from(p).ok())
                        .ok_or_else(|| {
                            Stop::Fail(ProtocolError::for_method(
                                406,
                                format!("invalid x-priority of type {}", v.type_name()),
                                ids,
                            ))
                        })?,
                };
                let options = ConsumeOptions {
                    consumer_tag: c.consumer_tag.as_str().to_string(),
                    no_ack: c.no_ack,
                    exclusive: c.exclusive,
                    priority,
                    arguments,
                };
                let tag = self
                    .broker_channel()?
                    .consume(&name, options)
                    .map_err(fail)?;
                self.reply_unless(
                    c.nowait,
                    AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                        consumer_tag: short(&tag),
                    })),
                )
                .await
            }
            AMQPClass::Basic(basic::AMQPMethod::Cancel(c)) => {
                if matches!(&self.reply_consumer, Some(r) if r.tag == c.consumer_tag.as_str()) {
                    self.reply_consumer = None;
                } else {
                    self.broker_channel()?.cancel(c.consumer_tag.as_str());
                }
                self.reply_unless(
                    c.nowait,
                    AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                        consumer_tag: c.consumer_tag,
                    })),
                )
                .await
            }
            AMQPClass::Basic(basic::AMQPMethod::Get(g)) => {
                let name = self.queue_name(g.queue.as_str(), ids)?;
                self.allow(Resource::queue(&name), Access::Read, ids)?;
                self.own_publishes_visible().await?;
                let got = self.broker_channel()?.get(&name, g.no_ack).map_err(fail)?;
                match got {
                    None => {
                        self.reply(AMQPClass::Basic(basic::AMQPMethod::GetEmpty(
                            basic::GetEmpty {},
                        )))
                        .await
                    }
                    Some(ok) => {
                        let method = AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                            delivery_tag: ok.tag.0,
                            redelivered: ok.redelivered,
                            exchange: short(ok.message.exchange.as_str()),
                            routing_key: short(&ok.message.routing_key),
                            message_count: saturate(ok.message_count),
                        }));
                        self.outbox
                            .content(
                                self.id,
                                method,
                                properties_to_wire(&ok.message.properties),
                                &ok.message.body,
                            )
                            .await?;
                        Ok(Next::Continue)
                    }
                }
            }
            AMQPClass::Basic(basic::AMQPMethod::Ack(a)) => {
                self.settle(DeliveryTag(a.delivery_tag), a.multiple, Settle::Ack)
                    .map_err(fail)?;
                Ok(Next::Continue)
            }
            AMQPClass::Basic(basic::AMQPMethod::Nack(n)) => {
                let how = Settle::Reject { requeue: n.requeue };
                self.settle(DeliveryTag(n.delivery_tag), n.multiple, how)
                    .map_err(fail)?;
                Ok(Next::Continue)
            }
            AMQPClass::Basic(basic::AMQPMethod::Reject(r)) => {
                let how = Settle::Reject { requeue: r.requeue };
                self.settle(DeliveryTag(r.delivery_tag), false, how)
                    .map_err(fail)?;
                Ok(Next::Continue)
            }
            AMQPClass::Basic(basic::AMQPMethod::Recover(_)) => {
                self.recover().map_err(fail)?;
                self.reply(AMQPClass::Basic(basic::AMQPMethod::RecoverOk(
                    basic::RecoverOk {},
                )))
                .await
            }
            AMQPClass::Basic(basic::AMQPMethod::RecoverAsync(_)) => {
                self.recover().map_err(fail)?;
                Ok(Next::Continue)
            }
            AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                if self.transaction.is_some() {
                    return Err(precondition("cannot switch from tx to confirm mode", ids));
                }
                if self.next_confirm.is_none() {
                    self.next_confirm = Some(1);
                }
                self.reply_unless(
                    s.nowait,
                    AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                )
                .await
            }
            AMQPClass::Tx(tx::AMQPMethod::Select(_)) => {
                if self.next_confirm.is_some() {
                    return Err(precondition("cannot switch from confirm to tx mode", ids));
                }
                self.transaction.get_or_insert_with(Transaction::default);
                self.reply(AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})))
                    .await
            }
            AMQPClass::Tx(tx::AMQPMethod::Commit(_)) => {
                self.commit(ids).await?;
                self.reply(AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})))
                    .await
            }
            AMQPClass::Tx(tx::AMQPMethod::Rollback(_)) => {
                self.transaction
                    .as_mut()
                    .ok_or_else(|| precondition("channel is not transactional", ids))?
                    .rollback();
                self.reply(AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})))
                    .await
            }
            // The connection forwards only the methods above.
            other => Err(Stop::Fail(ProtocolError::for_method(
                code::NOT_IMPLEMENTED,
                format!("method {}.{} is not implemented", ids.0, ids.1),
                (other.get_amqp_class_id(), other.get_amqp_method_id()),
            ))),
        }
    }

    async fn reply_unless(&mut self, nowait: bool, method: AMQPClass) -> Result<Next, Stop> {
        if nowait {
            return Ok(Next::Continue);
        }
        self.reply(method).await
    }

    async fn publish(
        &mut self,
        method: basic::Publish,
        properties: BasicProperties,
        body: Bytes,
    ) -> Result<Next, Stop> {
        let ids = (60, 40);
        self.allow(
            Resource::exchange(method.exchange.as_str()),
            Access::Write,
            ids,
        )?;
        // As RabbitMQ: a message may not claim to be from someone else.
        if let Some(claimed) = properties.user_id() {
            if claimed.as_str() != self.user.name().as_str() {
                return Err(precondition(
                    &format!(
                        "user_id property set to '{claimed}' but authenticated user was '{}'",
                        self.user.name()
                    ),
                    ids,
                ));
            }
        }
        let properties = self.rewrite_reply_to(properties, ids)?;
        if self.transaction.is_some() {
            // As RabbitMQ does, a missing exchange fails the publish itself,
            // not the commit.
            let exchange = method.exchange.as_str();
            if !exchange.is_empty() {
                let check = ExchangeDeclare {
                    passive: true,
                    ..ExchangeDeclare::new(exchange, ExchangeKind::Direct)
                };
                self.broker
                    .declare_exchange(&self.vhost, check)
                    .await
                    .map_err(|e| Stop::Fail(ProtocolError::from_broker(&e, ids)))?;
            }
            if let Some(tx) = self.transaction.as_mut() {
                tx.publish(BufferedPublish {
                    method,
                    properties,
                    body,
                });
            }
            return Ok(Next::Continue);
        }
        let published = self.route(method, properties, body).await?;
        if let Some(tag) = self.next_confirm {
            self.next_confirm = Some(tag + 1);
            let outcome: Outcome = match published {
                Some(published) => Box::pin(async move { published.confirmed().await.is_ok() }),
                // A direct reply is stored nowhere: nothing to wait for.
                None => Box::pin(std::future::ready(true)),
            };
            self.confirms.push_back(PendingConfirm { tag, outcome });
        } else if let Some(published) = published {
            // Nobody waits for a confirm, but a later look at the queues on
            // this channel must see the message.
            self.unconfirmed
                .push_back(Box::pin(async move { published.confirmed().await.is_ok() }));
            prune_resolved(&mut self.unconfirmed);
        }
        Ok(Next::Continue)
    }

    /// Waits until every message this channel published is in its queues:
    /// queues show only durable messages, but RabbitMQ's channels read
    /// their own writes, so a `basic.get`, a queue's message count, a purge
    /// or an `if-empty` delete after a publish on the same channel must
    /// see it. In confirm mode this sends the confirms as they resolve.
    async fn own_publishes_visible(&mut self) -> Result<(), Stop> {
        while let Some(outcome) = self.unconfirmed.pop_front() {
            outcome.await;
        }
        while !self.confirms.is_empty() {
            let ok = front_outcome(&mut self.confirms).await;
            self.confirm(ok).await?;
        }
        Ok(())
    }

    /// A request asking for direct reply-to (`reply_to` is the pseudo
    /// queue) gets the channel's reply address instead, if it has one.
    fn rewrite_reply_to(
        &self,
        properties: BasicProperties,
        ids: (u16, u16),
    ) -> Result<BasicProperties, Stop> {
        if !matches!(properties.reply_to(), Some(r) if r.as_str() == reply_to::PSEUDO_QUEUE) {
            return Ok(properties);
        }
        match &self.reply_consumer {
            Some(consumer) => Ok(properties.with_reply_to(short(consumer.address.as_str()))),
            None => Err(precondition("fast reply consumer does not exist", ids)),
        }
    }

    /// Routes and stores one message (`None`: a direct reply, handed to
    /// its channel, or dropped if that is gone); a `mandatory` one routed
    /// nowhere is returned at once (before its confirm or its commit-ok).
    async fn route(
        &mut self,
        method: basic::Publish,
        properties: BasicProperties,
        body: Bytes,
    ) -> Result<Option<Published>, Stop> {
        let ids = (60, 40);
        if method.exchange.as_str().is_empty() && reply_to::is_address(method.routing_key.as_str())
        {
            let reply = Reply {
                routing_key: method.routing_key.as_str().to_string(),
                properties,
                body,
            };
            let returned = method
                .mandatory
                .then(|| (reply.properties.clone(), reply.body.clone()));
            if !self.replies.deliver(reply) {
                if let Some((properties, body)) = returned {
                    self.send_return(method, properties, &body).await?;
                }
            }
            return Ok(None);
        }
        let fail = |e: BrokerError| Stop::Fail(ProtocolError::from_broker(&e, ids));
        let exchange =
            ExchangeName::new(method.exchange.as_str()).map_err(|e| fail(BrokerError::from(e)))?;
        let message = Message {
            exchange,
            routing_key: method.routing_key.as_str().to_string(),
            properties: properties_from_wire(&properties),
            body,
        };
        let returned = method.mandatory.then(|| message.body.clone());
        let published = self.broker.publish(&self.vhost, message).map_err(fail)?;
        if let (Some(body), 0) = (returned, published.routed) {
            self.send_return(method, properties, &body).await?;
        }
        Ok(Some(published))
    }

    /// Sends an unroutable `mandatory` message back (312 NO_ROUTE).
    async fn send_return(
        &mut self,
        method: basic::Publish,
        properties: BasicProperties,
        body: &[u8],
    ) -> Result<(), Stop> {
        let ret = AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
            reply_code: code::NO_ROUTE,
            reply_text: short("NO_ROUTE"),
            exchange: method.exchange,
            routing_key: method.routing_key,
        }));
        self.outbox.content(self.id, ret, properties, body).await?;
        Ok(())
    }

    /// Settles deliveries, or in a transaction checks and buffers the settlement.
    fn settle(&mut self, tag: DeliveryTag, multiple: bool, how: Settle) -> Result<(), BrokerError> {
        let Some(channel) = self.channel.as_mut() else {
            return Err(BrokerError::PreconditionFailed("channel is closed".into()));
        };
        match (self.transaction.as_mut(), how) {
            (Some(tx), how) => tx.settle(tag, multiple, channel.unacked_tags(tag, multiple)?, how),
            (None, Settle::Ack) => channel.ack(tag, multiple),
            (None, Settle::Reject { requeue }) => channel.nack(tag, multiple, requeue),
        }
    }

    /// `basic.recover`: every unacked delivery back to its queue, except,
    /// in a transaction, those the transaction already settles (as in
    /// RabbitMQ, they are no longer unacked for the channel).
    fn recover(&mut self) -> Result<(), BrokerError> {
        let Some(channel) = self.channel.as_mut() else {
            return Err(BrokerError::PreconditionFailed("channel is closed".into()));
        };
        match &self.transaction {
            None => channel.recover(),
            Some(tx) => {
                for tag in channel.unacked_tags(DeliveryTag(0), true)? {
                    if !tx.settles(tag) {
                        channel.nack(tag, false, true)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// `tx.commit`: publishes, then settlements, in the order received; the
    /// caller answers commit-ok only once every published message is
    /// durable in every queue it reached.
    async fn commit(&mut self, ids: (u16, u16)) -> Result<(), Stop> {
        let (publishes, settlements) = self
            .transaction
            .as_mut()
            .ok_or_else(|| precondition("channel is not transactional", ids))?
            .take();
        let mut stored = Vec::with_capacity(publishes.len());
        for p in publishes {
            stored.push(self.route(p.method, p.properties, p.body).await?);
        }
        let fail = |e: BrokerError| Stop::Fail(ProtocolError::from_broker(&e, ids));
        let channel = self.broker_channel()?;
        for settlement in settlements {
            for tag in settlement.tags {
                match settlement.how {
                    Settle::Ack => channel.ack(tag, false),
                    Settle::Reject { requeue } => channel.nack(tag, false, requeue),
                }
                .map_err(fail)?;
            }
        }
        for published in stored.into_iter().flatten() {
            // A full queue that refused a message (reject-publish) has nothing
            // to make durable; a transaction has no nack to tell it with.
            if !published.rejected {
                published.confirmed().await.map_err(fail)?;
            }
        }
        Ok(())
    }

    /// Sends confirms: the front one that just resolved, then every
    /// following one that has resolved too, acks coalesced with `multiple`.
    async fn confirm(&mut self, first: bool) -> Result<Next, Stop> {
        let mut acked: Option<u64> = None;
        let mut run = 0usize;
        let mut outcome = Some(first);
        loop {
            let ok = match outcome.take() {
                Some(ok) => ok,
                None => {
                    let Some(front) = self.confirms.front_mut() else {
                        break;
                    };
                    let polled =
                        std::future::poll_fn(|cx| Poll::Ready(front.outcome.as_mut().poll(cx)))
                            .await;
                    match polled {
                        Poll::Ready(ok) => ok,
                        Poll::Pending => break,
                    }
                }
            };
            let Some(done) = self.confirms.pop_front() else {
                break;
            };
            if ok {
                acked = Some(done.tag);
                run += 1;
            } else {
                self.flush_acks(&mut acked, &mut run).await?;
                self.outbox
                    .method(
                        self.id,
                        AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                            delivery_tag: done.tag,
                            multiple: false,
                            requeue: false,
                        })),
                    )
                    .await?;
            }
        }
        self.flush_acks(&mut acked, &mut run).await?;
        Ok(Next::Continue)
    }

    async fn flush_acks(&mut self, acked: &mut Option<u64>, run: &mut usize) -> Result<(), Stop> {
        if let Some(tag) = acked.take() {
            self.outbox
                .method(
                    self.id,
                    AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                        delivery_tag: tag,
                        multiple: *run > 1,
                    })),
                )
                .await?;
        }
        *run = 0;
        Ok(())
    }

    /// Delivers a direct reply to the reply consumer (no-ack: nothing to settle).
    async fn forward_reply(&mut self, reply: Reply) -> Result<Next, Stop> {
        let Some(consumer_tag) = self.reply_consumer.as_ref().map(|c| short(&c.tag)) else {
            return Ok(Next::Continue);
        };
        let tag = self.broker_channel()?.next_delivery_tag();
        let method = AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag,
            delivery_tag: tag.0,
            redelivered: false,
            exchange: short(""),
            routing_key: short(&reply.routing_key),
        }));
        self.outbox
            .content(self.id, method, reply.properties, &reply.body)
            .await?;
        Ok(Next::Continue)
    }

    async fn forward(&mut self, event: ChannelEvent) -> Result<Next, Stop> {
        match event {
            ChannelEvent::Delivery(d) => {
                // Every delivery already waiting goes out with this one as
                // one writer item: one queue hand-off and one wake-up of the
                // writer per batch rather than per message.
                let mut frames = Vec::new();
                self.encode_delivery(&mut frames, &d)?;
                let mut cancelled = None;
                while frames.len() < DELIVERY_BATCH_BYTES {
                    let Some(event) = self.channel.as_mut().and_then(|c| c.try_recv()) else {
                        break;
                    };
                    match event {
                        ChannelEvent::Delivery(d) => self.encode_delivery(&mut frames, &d)?,
                        ChannelEvent::Cancelled { consumer_tag } => {
                            cancelled = Some(consumer_tag);
                            break;
                        }
                    }
                }
                self.outbox.send(frames).await?;
                if let Some(consumer_tag) = cancelled {
                    self.notify_cancel(&consumer_tag).await?;
                }
            }
            ChannelEvent::Cancelled { consumer_tag } => self.notify_cancel(&consumer_tag).await?,
        }
        Ok(Next::Continue)
    }

    /// Tells the client that the broker cancelled one of its consumers, if
    /// it said it understands `basic.cancel` from the server.
    async fn notify_cancel(&mut self, consumer_tag: &str) -> Result<(), Stop> {
        if self.cancel_notify {
            self.reply(AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                consumer_tag: short(consumer_tag),
                nowait: true,
            })))
            .await?;
        }
        Ok(())
    }

    /// Appends one delivery's frames (method, header, body cut to frame-max).
    fn encode_delivery(&self, out: &mut Vec<u8>, d: &Delivery) -> Result<(), Stop> {
        let method = AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: short(&d.consumer_tag),
            delivery_tag: d.tag.0,
            redelivered: d.redelivered,
            exchange: short(d.message.exchange.as_str()),
            routing_key: short(&d.message.routing_key),
        }));
        frame::content_into(
            out,
            self.id,
            method,
            properties_to_wire(&d.message.properties),
            &d.message.body,
            self.outbox.frame_max(),
        )?;
        Ok(())
    }
}

/// The next direct reply; never resolves without a reply consumer.
async fn next_reply(consumer: &mut Option<ReplyConsumer>) -> Reply {
    match consumer {
        Some(c) => match c.replies.recv().await {
            Some(reply) => reply,
            // The registry holds the sender as long as the address lives.
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// The broker channel's next event; never resolves once the channel is gone.
async fn next_event(channel: &mut Option<tern_broker::Channel>) -> ChannelEvent {
    match channel {
        Some(ch) => match ch.recv().await {
            Some(event) => event,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Drops the oldest outcomes that have resolved, so that a channel
/// publishing without confirms holds only those still in flight.
fn prune_resolved(outcomes: &mut VecDeque<Outcome>) {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    while let Some(front) = outcomes.front_mut() {
        match front.as_mut().poll(&mut cx) {
            Poll::Ready(_) => {
                outcomes.pop_front();
            }
            Poll::Pending => break,
        }
    }
}

/// Resolves with the oldest pending confirm's outcome (without removing it).
async fn front_outcome(confirms: &mut VecDeque<PendingConfirm>) -> bool {
    std::future::poll_fn(|cx| match confirms.front_mut() {
        Some(front) => front.outcome.as_mut().poll(cx),
        None => Poll::Pending,
    })
    .await
}

fn precondition(text: &str, ids: (u16, u16)) -> Stop {
    Stop::Fail(ProtocolError::for_method(
        code::PRECONDITION_FAILED,
        text,
        ids,
    ))
}

fn saturate(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
