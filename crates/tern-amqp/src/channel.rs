//! One AMQP channel: a task that owns a `tern_broker::Channel` and serves
//! the channel's methods in order, forwards the broker's deliveries and
//! consumer cancellations as `basic.deliver` / `basic.cancel`, and sends
//! publisher confirms in publish order once the broker has made each message
//! durable.
//!
//! A broker error closes only this channel: the task drops its broker
//! channel (so its unacked messages return to their queues), sends
//! `channel.close` with the error's reply code, and then ignores everything
//! but `channel.close` / `channel.close-ok`.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use amq_protocol::protocol::{
    basic, channel, confirm, exchange, queue, AMQPClass, BasicProperties,
};
use bytes::Bytes;
use tern_broker::{
    Broker, BrokerError, ChannelEvent, ConnectionId, ConsumeOptions, DeliveryTag, ExchangeDeclare,
    ExchangeName, Message, QueueDeclare,
};
use tokio::sync::mpsc;

use crate::convert::{properties_from_wire, properties_to_wire, table_from_wire};
use crate::error::{code, AmqpError, ProtocolError};
use crate::frame::short;
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

/// The state of one open channel, run by [`ChannelTask::run`].
pub(crate) struct ChannelTask {
    id: u16,
    broker: Broker,
    vhost: String,
    connection: ConnectionId,
    channel: Option<tern_broker::Channel>,
    outbox: Outbox,
    commands: mpsc::Receiver<ChannelCommand>,
    /// The next publish sequence number, once `confirm.select` was received.
    next_confirm: Option<u64>,
    confirms: VecDeque<PendingConfirm>,
    cancel_notify: bool,
    flow: bool,
    last_queue: Option<String>,
    closing: bool,
}

/// The settings a channel takes from its connection.
#[derive(Debug, Clone)]
pub(crate) struct ChannelSetup {
    pub(crate) broker: Broker,
    pub(crate) vhost: String,
    pub(crate) connection: ConnectionId,
    pub(crate) outbox: Outbox,
    pub(crate) cancel_notify: bool,
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
            broker: setup.broker,
            vhost: setup.vhost,
            connection: setup.connection,
            channel: Some(channel),
            outbox: setup.outbox,
            commands,
            next_confirm: None,
            confirms: VecDeque::new(),
            cancel_notify: setup.cancel_notify,
            flow: true,
            last_queue: None,
            closing: false,
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
                ok = front_outcome(&mut self.confirms) => self.confirm(ok).await,
            };
            match result {
                Ok(Next::Continue) => {}
                Ok(Next::Exit) | Err(Stop::Gone) => return,
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
        self.confirms.clear();
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
            AMQPClass::Queue(queue::AMQPMethod::Declare(d)) => {
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
            AMQPClass::Basic(basic::AMQPMethod::Consume(c)) => {
                let name = self.queue_name(c.queue.as_str(), ids)?;
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
                self.broker_channel()?.cancel(c.consumer_tag.as_str());
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
                self.broker_channel()?
                    .ack(DeliveryTag(a.delivery_tag), a.multiple)
                    .map_err(fail)?;
                Ok(Next::Continue)
            }
            AMQPClass::Basic(basic::AMQPMethod::Nack(n)) => {
                self.broker_channel()?
                    .nack(DeliveryTag(n.delivery_tag), n.multiple, n.requeue)
                    .map_err(fail)?;
                Ok(Next::Continue)
            }
            AMQPClass::Basic(basic::AMQPMethod::Reject(r)) => {
                self.broker_channel()?
                    .reject(DeliveryTag(r.delivery_tag), r.requeue)
                    .map_err(fail)?;
                Ok(Next::Continue)
            }
            AMQPClass::Basic(basic::AMQPMethod::Recover(_)) => {
                self.broker_channel()?.recover();
                self.reply(AMQPClass::Basic(basic::AMQPMethod::RecoverOk(
                    basic::RecoverOk {},
                )))
                .await
            }
            AMQPClass::Basic(basic::AMQPMethod::RecoverAsync(_)) => {
                self.broker_channel()?.recover();
                Ok(Next::Continue)
            }
            AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                if self.next_confirm.is_none() {
                    self.next_confirm = Some(1);
                }
                self.reply_unless(
                    s.nowait,
                    AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                )
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
        let fail = |e: BrokerError| Stop::Fail(ProtocolError::from_broker(&e, ids));
        let exchange =
            ExchangeName::new(method.exchange.as_str()).map_err(|e| fail(BrokerError::from(e)))?;
        let message = Message {
            exchange,
            routing_key: method.routing_key.as_str().to_string(),
            properties: properties_from_wire(&properties),
            body,
        };
        let returned = method.mandatory.then(|| message.clone());
        let published = self.broker.publish(&self.vhost, message).map_err(fail)?;
        if let (Some(message), 0) = (returned, published.routed) {
            let ret = AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                reply_code: code::NO_ROUTE,
                reply_text: short("NO_ROUTE"),
                exchange: method.exchange,
                routing_key: method.routing_key,
            }));
            self.outbox
                .content(self.id, ret, properties, &message.body)
                .await?;
        }
        if let Some(tag) = self.next_confirm {
            self.next_confirm = Some(tag + 1);
            let outcome: Outcome = Box::pin(async move { published.confirmed().await.is_ok() });
            self.confirms.push_back(PendingConfirm { tag, outcome });
        } else {
            // Without confirms nobody waits; the message is stored all the same.
            drop(published);
        }
        Ok(Next::Continue)
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

    async fn forward(&mut self, event: ChannelEvent) -> Result<Next, Stop> {
        match event {
            ChannelEvent::Delivery(d) => {
                let method = AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                    consumer_tag: short(&d.consumer_tag),
                    delivery_tag: d.tag.0,
                    redelivered: d.redelivered,
                    exchange: short(d.message.exchange.as_str()),
                    routing_key: short(&d.message.routing_key),
                }));
                self.outbox
                    .content(
                        self.id,
                        method,
                        properties_to_wire(&d.message.properties),
                        &d.message.body,
                    )
                    .await?;
            }
            ChannelEvent::Cancelled { consumer_tag } => {
                if self.cancel_notify {
                    self.reply(AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                        consumer_tag: short(&consumer_tag),
                        nowait: true,
                    })))
                    .await?;
                }
            }
        }
        Ok(Next::Continue)
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

/// Resolves with the oldest pending confirm's outcome (without removing it).
async fn front_outcome(confirms: &mut VecDeque<PendingConfirm>) -> bool {
    std::future::poll_fn(|cx| match confirms.front_mut() {
        Some(front) => front.outcome.as_mut().poll(cx),
        None => Poll::Pending,
    })
    .await
}

fn saturate(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
