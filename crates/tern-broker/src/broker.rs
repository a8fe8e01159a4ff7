//! The broker: vhosts with their exchanges, queues and bindings; declaring,
//! binding, publishing and routing; durable definitions and their replay.
//!
//! Definitions are read-mostly: each vhost keeps them under one `RwLock`,
//! which publishes take for reading. Every change to a durable definition is
//! appended to the `definitions` log while the vhost's write lock is held
//! (so the log's order is the order of the changes) and awaited, fsynced,
//! after the lock is released.

use crate::alarm::Alarms;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use tern_storage::{
    Appended, Durability, FsyncHistogram, JournalStats, Log, LogConfig, Message as StoredRecord,
    Store, StoreConfig, Timestamp,
};

use crate::access::{AccessConfig, AccessControl, AccessReplay};
use crate::channel::Channel;
use crate::dead_letter;
use crate::dedup::Dedup;
use crate::definitions::DefEvent;
use crate::delay::{self, DelayLimits, DelayStore, DueRouter};
use crate::error::BrokerError;
use crate::exchange::{exchange_type, Exchange, ExchangeFlavor, PREDECLARED};
use crate::message::Message;
use crate::name::{ExchangeName, QueueName, VhostName};
use crate::policy::QueuePolicy;
use crate::queue::{
    self, ConnectionId, DeadLetterSink, Queue, QueueExpirer, QueueSettings, QueueType,
};
use crate::registry::Registry;
use crate::routing::{Destination, ExchangeKind};
use crate::stream::{StreamOffsets, StreamPolicy};
use crate::super_stream;
use crate::trace::Tracer;
use crate::value::{FieldTable, FieldValue};

/// Where and how the broker keeps its data.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// The data directory.
    pub data_dir: PathBuf,
    /// Storage tuning.
    pub store: StoreConfig,
    /// Users and permissions (`access.rs`).
    pub access: AccessConfig,
}

impl BrokerConfig {
    /// Defaults, keeping data in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> BrokerConfig {
        BrokerConfig {
            data_dir: data_dir.into(),
            store: StoreConfig::default(),
            access: AccessConfig::default(),
        }
    }
}

/// An `exchange.declare`.
#[derive(Debug, Clone)]
pub struct ExchangeDeclare {
    /// The exchange's name.
    pub name: String,
    /// `direct`, `fanout`, `topic` or `headers`.
    pub kind: String,
    /// Whether it survives a restart.
    pub durable: bool,
    /// Whether it is deleted when its last binding goes.
    pub auto_delete: bool,
    /// Whether clients may not publish to it directly.
    pub internal: bool,
    /// Only check that it exists.
    pub passive: bool,
    /// Arguments, such as `alternate-exchange`.
    pub arguments: FieldTable,
}

impl ExchangeDeclare {
    /// A durable exchange of the given kind.
    pub fn new(name: impl Into<String>, kind: ExchangeKind) -> ExchangeDeclare {
        ExchangeDeclare {
            name: name.into(),
            kind: kind.as_str().to_string(),
            durable: true,
            auto_delete: false,
            internal: false,
            passive: false,
            arguments: FieldTable::new(),
        }
    }
}

/// A `queue.declare`.
#[derive(Debug, Clone)]
pub struct QueueDeclare {
    /// The queue's name; empty asks the broker to choose one.
    pub name: String,
    /// Whether it survives a restart.
    pub durable: bool,
    /// Whether only the declaring connection may use it (and it goes with it).
    pub exclusive: bool,
    /// Whether it is deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Only check that it exists.
    pub passive: bool,
    /// Arguments, such as `x-queue-type`.
    pub arguments: FieldTable,
}

impl QueueDeclare {
    /// A durable, shared queue.
    pub fn new(name: impl Into<String>) -> QueueDeclare {
        QueueDeclare {
            name: name.into(),
            durable: true,
            exclusive: false,
            auto_delete: false,
            passive: false,
            arguments: FieldTable::new(),
        }
    }
}

/// The answer to a `queue.declare`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDeclareOk {
    /// The queue's name (chosen by the broker if the declaration left it empty).
    pub queue: QueueName,
    /// Messages ready for delivery.
    pub message_count: u64,
    /// Attached consumers.
    pub consumer_count: u32,
}

/// The outcome of a publish.
#[derive(Debug)]
#[must_use = "a publish is confirmed only once `confirmed` resolves"]
pub struct Published {
    /// How many queues the message was routed to. Zero means unroutable
    /// (a `mandatory` publish is returned to its publisher).
    pub routed: usize,
    /// Whether a full queue (`x-overflow` reject-publish) refused the
    /// message: the publisher gets a nack.
    pub rejected: bool,
    tickets: Vec<Appended>,
}

impl Published {
    /// A message taken by the delay store, to be routed later: it counts as
    /// routed (a `mandatory` publish is not returned, as with RabbitMQ's
    /// plugin), and is confirmed once durable in the store.
    pub(crate) fn accepted(ticket: Appended) -> Published {
        Published {
            routed: 1,
            rejected: false,
            tickets: vec![ticket],
        }
    }

    /// Resolves once every queue the message went to has it on disk under
    /// its fsync policy: the moment a publisher confirm may be sent.
    pub async fn confirmed(self) -> Result<(), BrokerError> {
        if self.rejected {
            return Err(BrokerError::PreconditionFailed(
                "a full queue refused the message (x-overflow reject-publish)".into(),
            ));
        }
        for ticket in self.tickets {
            ticket.durable().await?;
        }
        Ok(())
    }
}

/// A handle to the broker. Clones share it.
#[derive(Debug, Clone)]
pub struct Broker {
    inner: Arc<BrokerInner>,
}

#[derive(Debug)]
struct BrokerInner {
    store: Mutex<Option<Store>>,
    defs: Log,
    /// The durable timer index of delayed messages.
    delays: Arc<DelayStore>,
    vhosts: RwLock<HashMap<VhostName, Arc<Vhost>>>,
    next_id: AtomicU64,
    runtime: tokio::runtime::Handle,
    /// How queues reach the broker to dead-letter, without keeping it alive.
    self_ref: SelfRef,
    /// The live connections, channels and consumers (`registry.rs`).
    registry: Registry,
    /// The message trace index, off by default (`trace.rs`).
    tracer: Tracer,
    /// Users and permissions (`access.rs`).
    access: AccessControl,
    /// The resource alarms (`alarm.rs`); front doors block publishers on them.
    alarms: Alarms,
}

type SelfRef = Arc<OnceLock<Weak<BrokerInner>>>;

/// How a queue unused for its `x-expires` has the broker delete it.
fn expirer_for(self_ref: &SelfRef) -> QueueExpirer {
    let self_ref = Arc::clone(self_ref);
    QueueExpirer(Arc::new(move |queue: &Arc<Queue>| {
        if let Some(inner) = self_ref.get().and_then(Weak::upgrade) {
            Broker { inner }.auto_delete_queue(queue);
        }
    }))
}

/// How the delay store routes due messages, without keeping the broker alive.
fn router_for(self_ref: &SelfRef) -> DueRouter {
    let self_ref = Arc::clone(self_ref);
    DueRouter(Arc::new(
        move |vhost: &str, message: Message| match self_ref.get().and_then(Weak::upgrade) {
            Some(inner) => Broker { inner }.publish_due(vhost, message),
            None => Vec::new(),
        },
    ))
}

/// The sink through which a queue in `vhost` dead-letters messages.
fn sink_for(self_ref: &SelfRef, vhost: VhostName) -> DeadLetterSink {
    let self_ref = Arc::clone(self_ref);
    DeadLetterSink(Arc::new(move |messages: Vec<Message>| {
        let Some(inner) = self_ref.get().and_then(Weak::upgrade) else {
            return;
        };
        let broker = Broker { inner };
        for message in messages {
            broker.republish_dead(&vhost, message);
        }
    }))
}

#[derive(Debug)]
pub(crate) struct Vhost {
    pub(crate) name: VhostName,
    state: RwLock<VhostState>,
}

#[derive(Debug, Default)]
pub(crate) struct VhostState {
    pub(crate) exchanges: HashMap<ExchangeName, Exchange>,
    pub(crate) queues: HashMap<QueueName, Arc<Queue>>,
}

impl Vhost {
    fn new(name: VhostName) -> Vhost {
        let vhost_name = name.clone();
        let mut state = VhostState::default();
        for (n, kind) in PREDECLARED {
            let name = ExchangeName::new(n).unwrap_or_else(|_| ExchangeName::default_exchange());
            state.exchanges.insert(
                name.clone(),
                Exchange::new(
                    &vhost_name,
                    name,
                    kind,
                    true,
                    false,
                    false,
                    FieldTable::new(),
                ),
            );
        }
        Vhost {
            name,
            state: RwLock::new(state),
        }
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, VhostState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, VhostState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }
}

const DEFINITIONS_LOG: &str = "definitions";
/// How often a queue's acks reach the disk; a crash may redeliver messages
/// acked within this window, which at-least-once allows.
const ACK_SYNC_INTERVAL: Duration = Duration::from_millis(50);

fn queue_log_name(id: u64) -> String {
    format!("q{id}")
}

fn ack_log_name(id: u64) -> String {
    format!("a{id}")
}

/// The log of a queue's deduplication window.
fn dedup_log_name(id: u64) -> String {
    format!("u{id}")
}

/// The log of a deduplicating exchange's window. Exchanges have no id, so
/// the name is a 64-bit FNV-1a hash of vhost and name (a collision would
/// only merge two windows). The `xd` prefix keeps it from reading as a
/// queue's `<letter><id>` when ids are recovered from log names.
fn exchange_dedup_log_name(vhost: &VhostName, exchange: &ExchangeName) -> String {
    let hash = vhost
        .as_str()
        .bytes()
        .chain([0])
        .chain(exchange.as_str().bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    format!("xd{hash:016x}")
}

fn vhost_name(name: &str) -> Result<VhostName, BrokerError> {
    Ok(VhostName::new(name)?)
}

/// Checks that two argument tables are the same, naming the first difference.
pub(crate) fn check_arguments_equivalent(
    entity: &str,
    current: &FieldTable,
    received: &FieldTable,
) -> Result<(), BrokerError> {
    for key in current.keys().chain(received.keys()) {
        let (a, b) = (current.get(key), received.get(key));
        if a != b {
            let show = |v: Option<&FieldValue>| v.map_or("none".to_string(), |v| format!("{v:?}"));
            return Err(BrokerError::Inequivalent {
                entity: entity.to_string(),
                property: key.clone(),
                current: show(a),
                received: show(b),
            });
        }
    }
    Ok(())
}

/// Reads the queue type and checks the arguments, refusing those this broker
/// does not implement yet rather than accepting and ignoring them.
fn parse_queue_arguments(
    d: &QueueDeclare,
) -> Result<(QueueType, QueuePolicy, Option<StreamPolicy>), BrokerError> {
    let queue_type = match d.arguments.get("x-queue-type") {
        None => QueueType::Classic,
        Some(v) => match v.as_str() {
            Some("classic") => QueueType::Classic,
            Some("quorum") => QueueType::Quorum,
            Some("stream") => QueueType::Stream,
            Some(other) => {
                return Err(BrokerError::InvalidArgument {
                    argument: "x-queue-type".into(),
                    reason: format!("unknown queue type '{other}'; use classic, quorum or stream"),
                })
            }
            None => {
                return Err(BrokerError::InvalidArgument {
                    argument: "x-queue-type".into(),
                    reason: format!("expected a string, got a {}", v.type_name()),
                })
            }
        },
    };
    if queue_type == QueueType::Stream {
        // RabbitMQ's refusals and words for them.
        let refuse = |property: &str| {
            Err(BrokerError::PreconditionFailed(format!(
                "invalid property '{property}' for queue '{}': a stream must be durable, \
                 and neither exclusive nor auto-delete",
                d.name
            )))
        };
        if !d.durable {
            return refuse("non-durable");
        }
        if d.exclusive {
            return refuse("exclusive-owner");
        }
        if d.auto_delete {
            return refuse("auto-delete");
        }
        let stream = StreamPolicy::from_arguments(&d.arguments)?;
        return Ok((queue_type, QueuePolicy::default(), Some(stream)));
    }
    let policy = QueuePolicy::from_arguments(&d.arguments)?;
    if queue_type == QueueType::Quorum {
        let refuse = |what: &str| {
            Err(BrokerError::InvalidArgument {
                argument: "x-queue-type".into(),
                reason: format!("a quorum queue cannot be {what}"),
            })
        };
        if !d.durable {
            return refuse("non-durable");
        }
        if d.exclusive {
            return refuse("exclusive");
        }
        if d.auto_delete {
            return refuse("auto-delete");
        }
    }
    Ok((queue_type, policy, None))
}

/// How a queue's message log is configured: a stream's segment size is its own.
fn message_log_config(durability: Durability, stream: Option<&StreamPolicy>) -> LogConfig {
    LogConfig {
        segment_bytes: stream.map_or(LogConfig::default().segment_bytes, |s| s.segment_bytes),
        ..LogConfig::with_durability(durability)
    }
}

/// The state replayed from the definitions log, before queues are opened.
#[derive(Debug, Default)]
struct ReplayedVhost {
    /// Name to ((routing kind, flavor), auto-delete, internal, arguments).
    exchanges: BTreeMap<String, ((ExchangeKind, ExchangeFlavor), bool, bool, FieldTable)>,
    queues: BTreeMap<String, (u64, bool, FieldTable)>,
    bindings: Vec<(String, Destination, String, FieldTable)>,
}

/// Rewrites the definitions log as one snapshot when it has grown to many
/// times the live definitions. The snapshot is a single append, so a single
/// checksummed batch: after a crash it is either wholly there or absent.
/// Only then are the log's older segments deleted.
fn compact_definitions(
    defs: &Log,
    live: &BTreeMap<String, ReplayedVhost>,
    access: &AccessReplay,
    recorded: usize,
) -> Result<(), BrokerError> {
    let mut events = vec![DefEvent::Snapshot];
    for (vhost, v) in live {
        events.push(DefEvent::VhostAdded {
            vhost: vhost.clone(),
        });
        for (name, (kind, auto_delete, internal, arguments)) in &v.exchanges {
            events.push(DefEvent::ExchangeDeclared {
                vhost: vhost.clone(),
                name: name.clone(),
                kind: kind.0,
                flavor: kind.1,
                auto_delete: *auto_delete,
                internal: *internal,
                arguments: arguments.clone(),
            });
        }
        for (name, (id, auto_delete, arguments)) in &v.queues {
            events.push(DefEvent::QueueDeclared {
                vhost: vhost.clone(),
                name: name.clone(),
                id: *id,
                auto_delete: *auto_delete,
                arguments: arguments.clone(),
            });
        }
        for (source, destination, routing_key, arguments) in &v.bindings {
            events.push(DefEvent::Bound {
                vhost: vhost.clone(),
                source: source.clone(),
                destination: destination.clone(),
                routing_key: routing_key.clone(),
                arguments: arguments.clone(),
            });
        }
    }
    // After the vhosts, which permissions refer to.
    events.extend(access.snapshot());
    if recorded < 4 * events.len() + 1024 {
        return Ok(());
    }
    let records: Vec<StoredRecord> = events
        .iter()
        .map(|e| StoredRecord {
            timestamp: Timestamp::now(),
            headers: Bytes::new(),
            body: e.encode().freeze(),
        })
        .collect();
    // A snapshot larger than one batch may hold is left for later, not split.
    let Ok(appended) = defs.append(&records) else {
        return Ok(());
    };
    let start = appended.offsets().start;
    wait_blocking(appended)?;
    defs.delete_before(start)?;
    Ok(())
}

/// Waits for a durable append from synchronous code that may run on a tokio
/// worker (where blocking on the ticket directly would panic).
fn wait_blocking(appended: Appended) -> Result<(), BrokerError> {
    let wait = move || appended.wait().map(|_| ()).map_err(BrokerError::from);
    match tokio::runtime::Handle::try_current() {
        Ok(_) => std::thread::scope(|s| {
            s.spawn(wait).join().unwrap_or_else(|_| {
                Err(BrokerError::Storage(
                    "waiting for the definitions snapshot failed".into(),
                ))
            })
        }),
        Err(_) => wait(),
    }
}

fn replay(events: Vec<DefEvent>) -> (BTreeMap<String, ReplayedVhost>, AccessReplay) {
    let mut vhosts: BTreeMap<String, ReplayedVhost> = BTreeMap::new();
    let mut access = AccessReplay::default();
    for ev in events {
        match ev {
            DefEvent::Snapshot => {
                vhosts.clear();
                access.clear();
            }
            DefEvent::VhostAdded { vhost } => {
                vhosts.entry(vhost).or_default();
            }
            DefEvent::VhostDeleted { vhost } => {
                access.vhost_deleted(&vhost);
                vhosts.remove(&vhost);
            }
            ev @ (DefEvent::AccessInitialised
            | DefEvent::UserPut { .. }
            | DefEvent::UserDeleted { .. }
            | DefEvent::PermissionSet { .. }
            | DefEvent::PermissionCleared { .. }) => {
                access.apply(ev, |v| vhosts.contains_key(v));
            }
            DefEvent::ExchangeDeclared {
                vhost,
                name,
                kind,
                flavor,
                auto_delete,
                internal,
                arguments,
            } => {
                if let Some(v) = vhosts.get_mut(&vhost) {
                    v.exchanges
                        .insert(name, ((kind, flavor), auto_delete, internal, arguments));
                }
            }
            DefEvent::ExchangeDeleted { vhost, name } => {
                if let Some(v) = vhosts.get_mut(&vhost) {
                    v.exchanges.remove(&name);
                    v.bindings.retain(|(source, dest, _, _)| {
                        source != &name
                            && dest
                                != &Destination::Exchange(
                                    ExchangeName::new(name.clone())
                                        .unwrap_or_else(|_| ExchangeName::default_exchange()),
                                )
                    });
                }
            }
            DefEvent::QueueDeclared {
                vhost,
                name,
                id,
                auto_delete,
                arguments,
            } => {
                if let Some(v) = vhosts.get_mut(&vhost) {
                    v.queues.insert(name, (id, auto_delete, arguments));
                }
            }
            DefEvent::QueueDeleted { vhost, name } => {
                if let Some(v) = vhosts.get_mut(&vhost) {
                    v.queues.remove(&name);
                    v.bindings
                        .retain(|(_, dest, _, _)| !matches!(dest, Destination::Queue(q) if q.as_str() == name));
                }
            }
            DefEvent::Bound {
                vhost,
                source,
                destination,
                routing_key,
                arguments,
            } => {
                if let Some(v) = vhosts.get_mut(&vhost) {
                    let b = (source, destination, routing_key, arguments);
                    if !v.bindings.contains(&b) {
                        v.bindings.push(b);
                    }
                }
            }
            DefEvent::Unbound {
                vhost,
                source,
                destination,
                routing_key,
                arguments,
            } => {
                if let Some(v) = vhosts.get_mut(&vhost) {
                    let b = (source, destination, routing_key, arguments);
                    v.bindings.retain(|x| x != &b);
                }
            }
        }
    }
    (vhosts, access)
}

impl Broker {
    /// Opens the broker on its data directory, restoring every durable
    /// definition and every queue's messages. Must be called from inside a
    /// tokio runtime, which runs the queues' delivery tasks.
    pub fn open(config: BrokerConfig) -> Result<Broker, BrokerError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            BrokerError::NotAllowed("Broker::open must be called inside a tokio runtime".into())
        })?;
        crate::observe::describe();
        let store = Store::open(config.data_dir.join("store"), config.store.clone())?;
        // Small segments, so that compaction can drop the old events soon.
        let defs = store.open_log(
            DEFINITIONS_LOG,
            LogConfig {
                segment_bytes: 64 * 1024,
                ..LogConfig::with_durability(Durability::Always)
            },
        )?;
        let mut events = Vec::new();
        let mut reader = defs.reader(defs.start())?;
        loop {
            let batch = reader.read(4096, 16 << 20)?;
            if batch.is_empty() {
                break;
            }
            for rec in batch {
                events.push(DefEvent::decode(&rec.body).map_err(|reason| {
                    BrokerError::Storage(format!(
                        "definitions record {} cannot be read: {reason}",
                        rec.offset
                    ))
                })?);
            }
        }
        let first_start = events.is_empty();
        let self_ref: SelfRef = Arc::new(OnceLock::new());
        let recorded = events.len();
        let (replayed, access) = replay(events);
        compact_definitions(&defs, &replayed, &access, recorded)?;
        let mut max_id = 0u64;
        let mut live_logs: Vec<String> = vec![DEFINITIONS_LOG.to_string()];
        let mut vhosts = HashMap::new();
        let mut queues_to_run = Vec::new();
        for (vname, rv) in replayed {
            let vname = vhost_name(&vname)?;
            let vhost = Vhost::new(vname.clone());
            {
                let mut st = vhost.write();
                for (name, ((kind, flavor), auto_delete, internal, arguments)) in rv.exchanges {
                    let name = ExchangeName::new(name)?;
                    let mut exchange = Exchange::new(
                        &vname,
                        name.clone(),
                        kind,
                        true,
                        auto_delete,
                        internal,
                        arguments,
                    );
                    exchange.flavor = flavor;
                    if let ExchangeFlavor::Deduplicating(policy) = flavor {
                        let log_name = exchange_dedup_log_name(&vname, &name);
                        live_logs.push(log_name.clone());
                        let log = store
                            .open_log(&log_name, LogConfig::with_durability(Durability::Always))?;
                        exchange.dedup = Some(Arc::new(Dedup::open(log, policy)?));
                    }
                    st.exchanges.insert(name, exchange);
                }
                for (name, (id, auto_delete, arguments)) in rv.queues {
                    max_id = max_id.max(id);
                    let name = QueueName::new(name)?;
                    let queue_type = match arguments.get("x-queue-type").and_then(|v| v.as_str()) {
                        Some("quorum") => QueueType::Quorum,
                        Some("stream") => QueueType::Stream,
                        _ => QueueType::Classic,
                    };
                    let stream = match queue_type {
                        QueueType::Stream => {
                            // Checked when declared; a value a later version
                            // refuses falls back to keeping everything.
                            Some(StreamPolicy::from_arguments(&arguments).unwrap_or_default())
                        }
                        _ => None,
                    };
                    let log = store.open_log(
                        &queue_log_name(id),
                        message_log_config(Durability::Always, stream.as_ref()),
                    )?;
                    let acks = store.open_log(
                        &ack_log_name(id),
                        LogConfig::with_durability(Durability::Interval(ACK_SYNC_INTERVAL)),
                    )?;
                    live_logs.push(queue_log_name(id));
                    live_logs.push(ack_log_name(id));
                    let policy = match stream {
                        Some(_) => QueuePolicy::default(),
                        None => QueuePolicy::from_arguments(&arguments).unwrap_or_default(),
                    };
                    let dedup_log = match policy.dedup {
                        Some(_) => {
                            live_logs.push(dedup_log_name(id));
                            Some(store.open_log(
                                &dedup_log_name(id),
                                LogConfig::with_durability(Durability::Always),
                            )?)
                        }
                        None => None,
                    };
                    let queue = Queue::open(
                        QueueSettings {
                            vhost: vname.clone(),
                            name: name.clone(),
                            id,
                            durable: true,
                            exclusive_owner: None,
                            auto_delete,
                            policy,
                            arguments,
                            queue_type,
                            sink: Some(sink_for(&self_ref, vname.clone())),
                            expirer: Some(expirer_for(&self_ref)),
                            dedup_log,
                            stream,
                        },
                        log,
                        acks,
                    )?;
                    queues_to_run.push(Arc::clone(&queue));
                    st.queues.insert(name, queue);
                }
                for (source, dest, key, args) in rv.bindings {
                    let Ok(source) = ExchangeName::new(source) else {
                        continue;
                    };
                    if let Some(ex) = st.exchanges.get_mut(&source) {
                        ex.table.bind(dest, &key, &args)?;
                    }
                }
            }
            vhosts.insert(vname, Arc::new(vhost));
        }
        let delays = DelayStore::open(&store, DelayLimits::default())?;
        live_logs.push(delay::DELAY_LOG.to_string());
        live_logs.push(delay::FIRED_LOG.to_string());
        // Logs of queues that are gone: transient queues of the last run, or
        // deletions that a crash interrupted.
        for name in store.log_names()? {
            if !live_logs.contains(&name) {
                store.delete_log(&name)?;
            }
            if let Some(id) = name.get(1..).and_then(|n| n.parse::<u64>().ok()) {
                max_id = max_id.max(id);
            }
        }
        let broker = Broker {
            inner: Arc::new(BrokerInner {
                store: Mutex::new(Some(store)),
                defs,
                delays: Arc::clone(&delays),
                vhosts: RwLock::new(vhosts),
                next_id: AtomicU64::new(max_id + 1),
                runtime,
                self_ref: Arc::clone(&self_ref),
                registry: Registry::default(),
                tracer: Tracer::default(),
                access: access.into_control(config.access.clone()),
                alarms: Alarms::default(),
            }),
        };
        let _ = self_ref.set(Arc::downgrade(&broker.inner));
        for queue in queues_to_run {
            broker.spawn_queue(queue);
        }
        broker
            .inner
            .runtime
            .spawn(delay::run(delays, router_for(&self_ref)));
        if first_start {
            let ticket = broker.add_vhost_inner("/")?;
            if let Some(t) = ticket {
                // Opening is synchronous; the first vhost is durable by the
                // next commit, and a crash before it only means it is recreated.
                drop(t);
            }
        }
        broker.seed_default_user()?;
        Ok(broker)
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    pub(crate) fn tracer(&self) -> &Tracer {
        &self.inner.tracer
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A new, unique connection identity, which owns exclusive queues.
    pub fn new_connection_id(&self) -> ConnectionId {
        ConnectionId(self.next_id())
    }

    fn spawn_queue(&self, queue: Arc<Queue>) {
        self.inner.runtime.spawn(queue::run(queue));
    }

    pub(crate) fn access(&self) -> &AccessControl {
        &self.inner.access
    }

    /// Appends events to the definitions log as one batch: after a crash
    /// all of them are there or none.
    pub(crate) fn persist_all(&self, events: &[DefEvent]) -> Result<Appended, BrokerError> {
        let records: Vec<StoredRecord> = events
            .iter()
            .map(|e| StoredRecord {
                timestamp: Timestamp::now(),
                headers: Bytes::new(),
                body: e.encode().freeze(),
            })
            .collect();
        Ok(self.inner.defs.append(&records)?)
    }

    fn persist(&self, event: &DefEvent) -> Result<Appended, BrokerError> {
        let record = StoredRecord {
            timestamp: Timestamp::now(),
            headers: Bytes::new(),
            body: event.encode().freeze(),
        };
        Ok(self.inner.defs.append(std::slice::from_ref(&record))?)
    }

    pub(crate) fn vhost(&self, name: &str) -> Result<Arc<Vhost>, BrokerError> {
        let name = vhost_name(name)?;
        self.inner
            .vhosts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
            .cloned()
            .ok_or_else(|| BrokerError::VhostNotFound(name.to_string()))
    }

    /// The names of every vhost.
    pub fn vhosts(&self) -> Vec<VhostName> {
        let mut names: Vec<_> = self
            .inner
            .vhosts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    fn add_vhost_inner(&self, name: &str) -> Result<Option<Appended>, BrokerError> {
        let name = vhost_name(name)?;
        let mut vhosts = self.inner.vhosts.write().unwrap_or_else(|p| p.into_inner());
        if vhosts.contains_key(&name) {
            return Ok(None);
        }
        let ticket = self.persist(&DefEvent::VhostAdded {
            vhost: name.to_string(),
        })?;
        vhosts.insert(name.clone(), Arc::new(Vhost::new(name)));
        Ok(Some(ticket))
    }

    /// Creates a vhost (with RabbitMQ's predeclared exchanges). Creating one
    /// that exists does nothing.
    pub async fn add_vhost(&self, name: &str) -> Result<(), BrokerError> {
        if let Some(ticket) = self.add_vhost_inner(name)? {
            ticket.durable().await?;
        }
        Ok(())
    }

    /// Deletes a vhost with everything in it.
    pub async fn delete_vhost(&self, name: &str) -> Result<(), BrokerError> {
        let vname = vhost_name(name)?;
        let (vhost, ticket) = {
            let mut vhosts = self.inner.vhosts.write().unwrap_or_else(|p| p.into_inner());
            let vhost = vhosts
                .remove(&vname)
                .ok_or_else(|| BrokerError::VhostNotFound(vname.to_string()))?;
            let ticket = self.persist(&DefEvent::VhostDeleted {
                vhost: vname.to_string(),
            })?;
            (vhost, ticket)
        };
        // After the vhosts lock is released: setting permissions takes the
        // access lock, then looks the vhost up.
        self.access().vhost_deleted(vname.as_str());
        let (queues, exchanges): (Vec<Arc<Queue>>, Vec<Exchange>) = {
            let mut st = vhost.write();
            (
                st.queues.drain().map(|(_, q)| q).collect(),
                st.exchanges.drain().map(|(_, x)| x).collect(),
            )
        };
        for q in queues {
            self.drop_queue_storage(&q)?;
        }
        for x in exchanges {
            self.drop_exchange_storage(&vname, &x)?;
        }
        ticket.durable().await?;
        Ok(())
    }

    /// Declares an exchange, or checks an existing one (`passive`, or a
    /// redeclaration, which must ask for the same properties).
    pub async fn declare_exchange(
        &self,
        vhost: &str,
        d: ExchangeDeclare,
    ) -> Result<(), BrokerError> {
        let vh = self.vhost(vhost)?;
        let name = ExchangeName::new(d.name.clone())?;
        let (ticket, partitions) = {
            let mut st = vh.write();
            if let Some(ex) = st.exchanges.get(&name) {
                if d.passive {
                    return Ok(());
                }
                let kind = exchange_type(&d.kind, &d.arguments)?;
                ex.check_equivalent(
                    &vh.name,
                    kind,
                    d.durable,
                    d.auto_delete,
                    d.internal,
                    &d.arguments,
                )?;
                return Ok(());
            }
            if d.passive {
                return Err(BrokerError::ExchangeNotFound {
                    vhost: vh.name.to_string(),
                    exchange: name.to_string(),
                });
            }
            if name.is_default() || name.as_str().starts_with("amq.") {
                return Err(BrokerError::AccessRefused(format!(
                    "exchange name '{name}' contains reserved prefix 'amq.'"
                )));
            }
            let (kind, flavor) = exchange_type(&d.kind, &d.arguments)?;
            if let Some(v) = d.arguments.get("alternate-exchange") {
                if v.as_str().is_none() {
                    return Err(BrokerError::InvalidArgument {
                        argument: "alternate-exchange".into(),
                        reason: format!("expected a string, got a {}", v.type_name()),
                    });
                }
            }
            if let ExchangeFlavor::SuperStream(partitions) = flavor {
                let (ticket, queues) =
                    self.create_super_stream(&vh.name, &mut st, &name, &d, partitions)?;
                (Some(ticket), queues)
            } else {
                let ticket = if d.durable {
                    Some(self.persist(&DefEvent::ExchangeDeclared {
                        vhost: vh.name.to_string(),
                        name: name.to_string(),
                        kind,
                        flavor,
                        auto_delete: d.auto_delete,
                        internal: d.internal,
                        arguments: d.arguments.clone(),
                    })?)
                } else {
                    None
                };
                let mut exchange = Exchange::new(
                    &vh.name,
                    name.clone(),
                    kind,
                    d.durable,
                    d.auto_delete,
                    d.internal,
                    d.arguments,
                );
                exchange.flavor = flavor;
                if let ExchangeFlavor::Deduplicating(policy) = flavor {
                    let log_name = exchange_dedup_log_name(&vh.name, &name);
                    let log = {
                        let store = self.inner.store.lock().unwrap_or_else(|p| p.into_inner());
                        let store = store.as_ref().ok_or_else(|| {
                            BrokerError::NotAllowed("the broker is closed".into())
                        })?;
                        // A window left by an earlier exchange of this name (a
                        // transient one, or a deletion a crash interrupted)
                        // is not this exchange's.
                        store.delete_log(&log_name)?;
                        store.open_log(&log_name, LogConfig::with_durability(Durability::Always))?
                    };
                    exchange.dedup = Some(Arc::new(Dedup::open(log, policy)?));
                }
                st.exchanges.insert(name, exchange);
                (ticket, Vec::new())
            }
        };
        for queue in partitions {
            self.spawn_queue(queue);
        }
        if let Some(t) = ticket {
            t.durable().await?;
        }
        Ok(())
    }

    /// Creates a super stream under its vhost's lock: the exchange, its
    /// partition streams and their bindings, recorded as one batch of
    /// definition events, so after a crash all of them exist or none.
    /// Returns the batch's ticket and the partitions, whose tasks the
    /// caller starts.
    fn create_super_stream(
        &self,
        vhost: &VhostName,
        st: &mut VhostState,
        name: &ExchangeName,
        d: &ExchangeDeclare,
        partitions: u32,
    ) -> Result<(Appended, Vec<Arc<Queue>>), BrokerError> {
        let refuse = |property: &str| {
            BrokerError::PreconditionFailed(format!(
                "invalid property '{property}' for exchange '{name}' in vhost '{vhost}': \
                 a super stream must be durable and not auto-delete"
            ))
        };
        if !d.durable {
            return Err(refuse("non-durable"));
        }
        if d.auto_delete {
            return Err(refuse("auto-delete"));
        }
        let mut declares = Vec::with_capacity(partitions as usize);
        for index in 0..partitions {
            let queue = QueueName::new(super_stream::partition_queue_name(name.as_str(), index))?;
            if st.queues.contains_key(&queue) {
                return Err(BrokerError::PreconditionFailed(format!(
                    "queue '{queue}' in vhost '{vhost}' already exists, and super stream \
                     '{name}' needs that name for its partition {index}; delete the queue or \
                     choose another name"
                )));
            }
            let declare = QueueDeclare {
                arguments: super_stream::partition_arguments(&d.arguments, index),
                ..QueueDeclare::new(queue.as_str())
            };
            // Refuses a bad stream argument before anything is created.
            parse_queue_arguments(&declare)?;
            declares.push((queue, declare));
        }
        let mut events = vec![DefEvent::ExchangeDeclared {
            vhost: vhost.to_string(),
            name: name.to_string(),
            kind: ExchangeKind::Direct,
            flavor: ExchangeFlavor::SuperStream(partitions),
            auto_delete: false,
            internal: d.internal,
            arguments: d.arguments.clone(),
        }];
        let owner = self.new_connection_id();
        let mut queues: Vec<Arc<Queue>> = Vec::with_capacity(declares.len());
        for (queue, declare) in &declares {
            match self.open_new_queue(vhost, queue, declare, owner) {
                Ok((q, event)) => {
                    events.extend(event);
                    queues.push(q);
                }
                Err(e) => {
                    for q in &queues {
                        self.drop_queue_storage(q)?;
                    }
                    return Err(e);
                }
            }
        }
        let mut exchange = Exchange::new(
            vhost,
            name.clone(),
            ExchangeKind::Direct,
            true,
            false,
            d.internal,
            d.arguments.clone(),
        );
        exchange.flavor = ExchangeFlavor::SuperStream(partitions);
        for (index, (queue, _)) in (0u32..).zip(&declares) {
            let (key, arguments) = super_stream::partition_binding(index);
            exchange
                .table
                .bind(Destination::Queue(queue.clone()), &key, &arguments)?;
            events.push(DefEvent::Bound {
                vhost: vhost.to_string(),
                source: name.to_string(),
                destination: Destination::Queue(queue.clone()),
                routing_key: key,
                arguments,
            });
        }
        let ticket = match self.persist_all(&events) {
            Ok(t) => t,
            Err(e) => {
                for q in &queues {
                    self.drop_queue_storage(q)?;
                }
                return Err(e);
            }
        };
        for q in &queues {
            st.queues.insert(q.name.clone(), Arc::clone(q));
        }
        st.exchanges.insert(name.clone(), exchange);
        Ok((ticket, queues))
    }

    /// Deletes an exchange and its bindings. With `if_unused`, refuses (406)
    /// while it has bindings.
    pub async fn delete_exchange(
        &self,
        vhost: &str,
        name: &str,
        if_unused: bool,
    ) -> Result<(), BrokerError> {
        let vh = self.vhost(vhost)?;
        let name = ExchangeName::new(name)?;
        if name.is_default() || name.as_str().starts_with("amq.") {
            return Err(BrokerError::AccessRefused(format!(
                "exchange '{name}' in vhost '{}' is predeclared and cannot be deleted",
                vh.name
            )));
        }
        let (ticket, partitions) = {
            let mut st = vh.write();
            let Some(ex) = st.exchanges.get(&name) else {
                return Err(BrokerError::ExchangeNotFound {
                    vhost: vh.name.to_string(),
                    exchange: name.to_string(),
                });
            };
            if if_unused && !ex.table.is_empty() {
                return Err(BrokerError::PreconditionFailed(format!(
                    "exchange '{name}' in vhost '{}' in use",
                    vh.name
                )));
            }
            // A super stream's partitions go with it (the streams of those
            // names that still exist).
            let partitions: Vec<Arc<Queue>> = match ex.flavor {
                ExchangeFlavor::SuperStream(n) => (0..n)
                    .filter_map(|i| {
                        QueueName::new(super_stream::partition_queue_name(name.as_str(), i)).ok()
                    })
                    .filter_map(|q| st.queues.get(&q).filter(|q| q.is_stream()).cloned())
                    .collect(),
                _ => Vec::new(),
            };
            let ticket = if ex.durable {
                let mut events = vec![DefEvent::ExchangeDeleted {
                    vhost: vh.name.to_string(),
                    name: name.to_string(),
                }];
                events.extend(partitions.iter().map(|q| DefEvent::QueueDeleted {
                    vhost: vh.name.to_string(),
                    name: q.name.to_string(),
                }));
                Some(self.persist_all(&events)?)
            } else {
                None
            };
            if let Some(ex) = st.exchanges.remove(&name) {
                self.drop_exchange_storage(&vh.name, &ex)?;
            }
            let mut dests = vec![Destination::Exchange(name)];
            for q in &partitions {
                st.queues.remove(&q.name);
                dests.push(Destination::Queue(q.name.clone()));
            }
            for ex in st.exchanges.values_mut() {
                for dest in &dests {
                    ex.table.remove_destination(dest);
                }
            }
            (ticket, partitions)
        };
        for q in &partitions {
            self.drop_queue_storage(q)?;
        }
        if let Some(t) = ticket {
            t.durable().await?;
        }
        Ok(())
    }

    /// Looks a queue up, enforcing exclusivity (405 for another connection's exclusive queue).
    pub(crate) fn find_queue(
        &self,
        vhost: &VhostName,
        name: &str,
        owner: Option<ConnectionId>,
    ) -> Result<Arc<Queue>, BrokerError> {
        let vh = self.vhost(vhost.as_str())?;
        let name = QueueName::new(name)?;
        let st = vh.read();
        let queue = st
            .queues
            .get(&name)
            .cloned()
            .ok_or_else(|| BrokerError::QueueNotFound {
                vhost: vh.name.to_string(),
                queue: name.to_string(),
            })?;
        check_owner(&queue, owner)?;
        Ok(queue)
    }

    /// Declares a queue, or checks an existing one.
    pub async fn declare_queue(
        &self,
        vhost: &str,
        d: QueueDeclare,
        owner: ConnectionId,
    ) -> Result<QueueDeclareOk, BrokerError> {
        let vh = self.vhost(vhost)?;
        let mut name = QueueName::new(d.name.clone())?;
        let (queue, ticket) = {
            let mut st = vh.write();
            if !name.as_str().is_empty() {
                if let Some(q) = st.queues.get(&name) {
                    check_owner(q, Some(owner))?;
                    q.touch();
                    if !d.passive {
                        check_queue_equivalent(q, &d)?;
                    }
                    return Ok(QueueDeclareOk {
                        queue: q.name.clone(),
                        message_count: q.message_count(),
                        consumer_count: q.consumer_count() as u32,
                    });
                }
            }
            if d.passive {
                return Err(BrokerError::QueueNotFound {
                    vhost: vh.name.to_string(),
                    queue: name.to_string(),
                });
            }
            if name.as_str().is_empty() {
                name = QueueName::new(format!(
                    "amq.gen-{:016x}",
                    self.next_id().wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ))?;
            } else if name.as_str().starts_with("amq.") {
                return Err(BrokerError::AccessRefused(format!(
                    "queue name '{name}' contains reserved prefix 'amq.'"
                )));
            }
            let (queue, event) = self.open_new_queue(&vh.name, &name, &d, owner)?;
            let ticket = match event {
                Some(event) => Some(self.persist(&event)?),
                None => None,
            };
            st.queues.insert(name.clone(), Arc::clone(&queue));
            (queue, ticket)
        };
        self.spawn_queue(Arc::clone(&queue));
        if let Some(t) = ticket {
            t.durable().await?;
        }
        Ok(QueueDeclareOk {
            queue: name,
            message_count: 0,
            consumer_count: 0,
        })
    }

    /// Opens a new queue's logs and state; the caller records the returned
    /// definition event (with others, for a super stream's partitions) and
    /// inserts the queue into its vhost.
    fn open_new_queue(
        &self,
        vhost: &VhostName,
        name: &QueueName,
        d: &QueueDeclare,
        owner: ConnectionId,
    ) -> Result<(Arc<Queue>, Option<DefEvent>), BrokerError> {
        let (queue_type, policy, stream) = parse_queue_arguments(d)?;
        let id = self.next_id();
        let persistent = d.durable && !d.exclusive;
        let durability = if persistent {
            Durability::Always
        } else {
            Durability::Never
        };
        let (log, acks, dedup_log) =
            {
                let store = self.inner.store.lock().unwrap_or_else(|p| p.into_inner());
                let store = store
                    .as_ref()
                    .ok_or_else(|| BrokerError::NotAllowed("the broker is closed".into()))?;
                (
                    store.open_log(
                        &queue_log_name(id),
                        message_log_config(durability, stream.as_ref()),
                    )?,
                    store.open_log(
                        &ack_log_name(id),
                        LogConfig::with_durability(if persistent {
                            Durability::Interval(ACK_SYNC_INTERVAL)
                        } else {
                            Durability::Never
                        }),
                    )?,
                    match policy.dedup {
                        Some(_) => Some(store.open_log(
                            &dedup_log_name(id),
                            LogConfig::with_durability(durability),
                        )?),
                        None => None,
                    },
                )
            };
        let queue = Queue::open(
            QueueSettings {
                vhost: vhost.clone(),
                name: name.clone(),
                id,
                durable: d.durable,
                exclusive_owner: d.exclusive.then_some(owner),
                auto_delete: d.auto_delete,
                arguments: d.arguments.clone(),
                queue_type,
                policy,
                sink: Some(self.dead_letter_sink(vhost.clone())),
                expirer: Some(expirer_for(&self.inner.self_ref)),
                dedup_log,
                stream,
            },
            log,
            acks,
        )?;
        let event = if persistent {
            Some(DefEvent::QueueDeclared {
                vhost: vhost.to_string(),
                name: name.to_string(),
                id,
                auto_delete: d.auto_delete,
                arguments: d.arguments.clone(),
            })
        } else {
            None
        };
        Ok((queue, event))
    }

    /// Deletes a queue and its messages. With `if_unused` it refuses (406)
    /// while the queue has consumers; with `if_empty`, while it has ready
    /// messages. Returns how many messages it held.
    pub async fn delete_queue(
        &self,
        vhost: &str,
        name: &str,
        if_unused: bool,
        if_empty: bool,
        owner: ConnectionId,
    ) -> Result<u64, BrokerError> {
        let vh = self.vhost(vhost)?;
        let queue = self.find_queue(&vh.name, name, Some(owner))?;
        if if_unused && queue.consumer_count() > 0 {
            return Err(BrokerError::PreconditionFailed(format!(
                "queue '{}' in vhost '{}' in use",
                queue.name, vh.name
            )));
        }
        let count = queue.message_count();
        if if_empty && count > 0 {
            return Err(BrokerError::PreconditionFailed(format!(
                "queue '{}' in vhost '{}' not empty",
                queue.name, vh.name
            )));
        }
        if let Some(t) = self.remove_queue(&vh, &queue)? {
            t.durable().await?;
        }
        Ok(count)
    }

    /// Removes a queue from its vhost and deletes its logs. Returns the
    /// ticket of its durable deletion, if it was durable.
    fn remove_queue(
        &self,
        vh: &Vhost,
        queue: &Arc<Queue>,
    ) -> Result<Option<Appended>, BrokerError> {
        let ticket = {
            let mut st = vh.write();
            match st.queues.get(&queue.name) {
                Some(q) if Arc::ptr_eq(q, queue) => {}
                _ => return Ok(None),
            }
            st.queues.remove(&queue.name);
            let dest = Destination::Queue(queue.name.clone());
            let mut emptied = Vec::new();
            for ex in st.exchanges.values_mut() {
                if ex.table.remove_destination(&dest) > 0 && ex.auto_delete && ex.table.is_empty() {
                    emptied.push(ex.name.clone());
                }
            }
            for name in emptied {
                if let Some(ex) = st.exchanges.remove(&name) {
                    self.drop_exchange_storage(&vh.name, &ex)?;
                    if ex.durable {
                        drop(self.persist(&DefEvent::ExchangeDeleted {
                            vhost: vh.name.to_string(),
                            name: name.to_string(),
                        })?);
                    }
                }
            }
            if queue.durable && queue.exclusive_owner.is_none() {
                Some(self.persist(&DefEvent::QueueDeleted {
                    vhost: vh.name.to_string(),
                    name: queue.name.to_string(),
                })?)
            } else {
                None
            }
        };
        self.drop_queue_storage(queue)?;
        Ok(ticket)
    }

    /// Deletes a removed exchange's files: a deduplicating exchange's
    /// window.
    fn drop_exchange_storage(&self, vhost: &VhostName, ex: &Exchange) -> Result<(), BrokerError> {
        if ex.dedup.is_none() {
            return Ok(());
        }
        let store = self.inner.store.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(store) = store.as_ref() {
            store.delete_log(&exchange_dedup_log_name(vhost, &ex.name))?;
        }
        Ok(())
    }

    fn drop_queue_storage(&self, queue: &Arc<Queue>) -> Result<(), BrokerError> {
        queue.mark_deleted();
        let store = self.inner.store.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(store) = store.as_ref() {
            store.delete_log(&queue_log_name(queue.id))?;
            store.delete_log(&ack_log_name(queue.id))?;
            store.delete_log(&dedup_log_name(queue.id))?;
        }
        Ok(())
    }

    /// Deletes an auto-delete queue whose last consumer went (called by channels).
    pub(crate) fn auto_delete_queue(&self, queue: &Arc<Queue>) {
        if let Ok(vh) = self.vhost(queue.vhost.as_str()) {
            // The deletion is durable by the next commit; nothing waits on it here.
            let _ = self.remove_queue(&vh, queue);
        }
    }

    /// Removes every ready message from a queue. Returns how many.
    pub fn purge_queue(
        &self,
        vhost: &str,
        name: &str,
        owner: ConnectionId,
    ) -> Result<u64, BrokerError> {
        let vh = self.vhost(vhost)?;
        let queue = self.find_queue(&vh.name, name, Some(owner))?;
        if queue.is_stream() {
            return Err(BrokerError::NotImplemented(format!(
                "queue.purge not supported by stream queues queue '{}' in vhost '{}'",
                queue.name, vh.name
            )));
        }
        Ok(queue.purge())
    }

    /// A stream's extent and every consumer's position and lag: attached
    /// consumers, and named ones that are away (their committed offsets).
    /// 406 if the queue is not a stream.
    pub fn stream_offsets(&self, vhost: &str, name: &str) -> Result<StreamOffsets, BrokerError> {
        let vh = self.vhost(vhost)?;
        let queue = self.find_queue(&vh.name, name, None)?;
        queue.stream_offsets().ok_or_else(|| {
            BrokerError::PreconditionFailed(format!(
                "queue '{}' in vhost '{}' is not a stream",
                queue.name, vh.name
            ))
        })
    }

    /// Applies a stream's retention now, as its task does on a timer and
    /// when appends start a new segment; `now` (ms since the epoch) is the
    /// clock `x-max-age` is measured against, so tests and tools can look
    /// ahead. Returns how many segments were deleted.
    pub fn apply_stream_retention(
        &self,
        vhost: &str,
        name: &str,
        now_ms: u64,
    ) -> Result<u64, BrokerError> {
        let vh = self.vhost(vhost)?;
        let queue = self.find_queue(&vh.name, name, None)?;
        if !queue.is_stream() {
            return Err(BrokerError::PreconditionFailed(format!(
                "queue '{}' in vhost '{}' is not a stream",
                queue.name, vh.name
            )));
        }
        let deleted = queue.apply_stream_retention(tern_storage::Timestamp(now_ms))?;
        queue.pump();
        Ok(deleted)
    }

    /// Facts about a queue: its properties and arguments; ready, unacked
    /// and consumer counts.
    pub fn queue_info(&self, vhost: &str, name: &str) -> Result<QueueInfo, BrokerError> {
        let vh = self.vhost(vhost)?;
        let queue = self.find_queue(&vh.name, name, None).or_else(|e| match e {
            BrokerError::ResourceLocked { .. } => {
                let name = QueueName::new(name)?;
                vh.read().queues.get(&name).cloned().ok_or(e)
            }
            other => Err(other),
        })?;
        Ok(QueueInfo::of(&queue))
    }

    /// The names of every queue in a vhost.
    pub fn queue_names(&self, vhost: &str) -> Result<Vec<QueueName>, BrokerError> {
        let vh = self.vhost(vhost)?;
        let mut names: Vec<_> = vh.read().queues.keys().cloned().collect();
        names.sort();
        Ok(names)
    }

    #[allow(clippy::too_many_arguments)] // one private helper behind four public calls
    async fn change_binding(
        &self,
        vhost: &str,
        source: &str,
        destination: Destination,
        routing_key: &str,
        arguments: &FieldTable,
        owner: Option<ConnectionId>,
        bind: bool,
    ) -> Result<(), BrokerError> {
        let vh = self.vhost(vhost)?;
        let source = ExchangeName::new(source)?;
        if source.is_default() {
            return Err(BrokerError::AccessRefused(format!(
                "operation not permitted on the default exchange in vhost '{}'",
                vh.name
            )));
        }
        let ticket = {
            let mut st = vh.write();
            let dest_durable = match &destination {
                Destination::Queue(q) => {
                    let queue = st.queues.get(q).ok_or_else(|| BrokerError::QueueNotFound {
                        vhost: vh.name.to_string(),
                        queue: q.to_string(),
                    })?;
                    check_owner(queue, owner)?;
                    queue.durable && queue.exclusive_owner.is_none()
                }
                Destination::Exchange(x) => {
                    st.exchanges
                        .get(x)
                        .ok_or_else(|| BrokerError::ExchangeNotFound {
                            vhost: vh.name.to_string(),
                            exchange: x.to_string(),
                        })?
                        .durable
                }
            };
            let ex =
                st.exchanges
                    .get_mut(&source)
                    .ok_or_else(|| BrokerError::ExchangeNotFound {
                        vhost: vh.name.to_string(),
                        exchange: source.to_string(),
                    })?;
            let durable = ex.durable && dest_durable;
            let changed = if bind {
                ex.table.bind(destination.clone(), routing_key, arguments)?
            } else {
                ex.table.unbind(&destination, routing_key, arguments)
            };
            let auto_delete_now = !bind && changed && ex.auto_delete && ex.table.is_empty();
            let mut ticket = None;
            if changed && durable {
                let (vhost, source, routing_key, arguments) = (
                    vh.name.to_string(),
                    source.to_string(),
                    routing_key.to_string(),
                    arguments.clone(),
                );
                let ev = if bind {
                    DefEvent::Bound {
                        vhost,
                        source,
                        destination,
                        routing_key,
                        arguments,
                    }
                } else {
                    DefEvent::Unbound {
                        vhost,
                        source,
                        destination,
                        routing_key,
                        arguments,
                    }
                };
                ticket = Some(self.persist(&ev)?);
            }
            if auto_delete_now {
                if let Some(ex) = st.exchanges.remove(&source) {
                    self.drop_exchange_storage(&vh.name, &ex)?;
                    if ex.durable {
                        ticket = Some(self.persist(&DefEvent::ExchangeDeleted {
                            vhost: vh.name.to_string(),
                            name: source.to_string(),
                        })?);
                    }
                }
            }
            ticket
        };
        if let Some(t) = ticket {
            t.durable().await?;
        }
        Ok(())
    }

    /// Binds a queue to an exchange.
    pub async fn bind_queue(
        &self,
        vhost: &str,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
        owner: ConnectionId,
    ) -> Result<(), BrokerError> {
        let dest = Destination::Queue(QueueName::new(queue)?);
        self.change_binding(
            vhost,
            exchange,
            dest,
            routing_key,
            arguments,
            Some(owner),
            true,
        )
        .await
    }

    /// Removes a queue's binding. Removing one that does not exist does nothing.
    pub async fn unbind_queue(
        &self,
        vhost: &str,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: &FieldTable,
        owner: ConnectionId,
    ) -> Result<(), BrokerError> {
        let dest = Destination::Queue(QueueName::new(queue)?);
        self.change_binding(
            vhost,
            exchange,
            dest,
            routing_key,
            arguments,
            Some(owner),
            false,
        )
        .await
    }

    /// Binds `destination` exchange to `source` exchange (exchange-to-exchange).
    pub async fn bind_exchange(
        &self,
        vhost: &str,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<(), BrokerError> {
        let dest = Destination::Exchange(ExchangeName::new(destination)?);
        self.change_binding(vhost, source, dest, routing_key, arguments, None, true)
            .await
    }

    /// Removes an exchange-to-exchange binding.
    pub async fn unbind_exchange(
        &self,
        vhost: &str,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<(), BrokerError> {
        let dest = Destination::Exchange(ExchangeName::new(destination)?);
        self.change_binding(vhost, source, dest, routing_key, arguments, None, false)
            .await
    }

    /// Routes and stores a message. Returns at once with the number of
    /// queues it reached; await [`Published::confirmed`] before confirming it.
    pub fn publish(&self, vhost: &str, message: Message) -> Result<Published, BrokerError> {
        let vh = self.vhost(vhost)?;
        let st = vh.read();
        let delay = st
            .exchanges
            .get(&message.exchange)
            .and_then(|ex| delay::requested_delay(ex, &message));
        let queues = match delay {
            None => route(&vh.name, &st, &message)?,
            Some(_) => Vec::new(),
        };
        if let Some(expiration) = &message.properties.expiration {
            crate::policy::parse_expiration(expiration)?;
        }
        if let Some(ms) = delay {
            // Routed when due, by the delay store.
            let due = Timestamp::now().0.saturating_add(ms);
            let ticket = self.inner.delays.insert(vh.name.as_str(), &message, due)?;
            return Ok(Published::accepted(ticket));
        }
        let mut rejected = false;
        let mut store = || -> Result<Vec<Appended>, BrokerError> {
            let mut tickets = Vec::with_capacity(queues.len());
            for q in &queues {
                if q.refuses(&message) {
                    rejected = true;
                    continue;
                }
                tickets.extend(q.append_published(&message)?);
            }
            Ok(tickets)
        };
        let dedup = st
            .exchanges
            .get(&message.exchange)
            .and_then(|x| x.dedup.as_ref());
        let tickets = match dedup {
            // A duplicate is confirmed (once its marker is durable) and
            // counts as routed where the original went, so a mandatory
            // publish of it is not returned.
            Some(window) => window.admit(&message, store)?.0,
            None => store()?,
        };
        if self.tracer().key(&message).is_some() {
            let names = queues.iter().map(|q| q.name.clone()).collect();
            self.tracer().published(&message, &vh.name, names);
        }
        Ok(Published {
            routed: queues.len(),
            rejected,
            tickets,
        })
    }

    fn dead_letter_sink(&self, vhost: VhostName) -> DeadLetterSink {
        sink_for(&self.inner.self_ref, vhost)
    }

    /// Routes a dead-lettered message like a publish, but never back into a
    /// queue it would cycle through, and without waiting: a dead letter that
    /// cannot be routed is dropped, as in RabbitMQ.
    fn republish_dead(&self, vhost: &VhostName, message: Message) {
        let Ok(vh) = self.vhost(vhost.as_str()) else {
            return;
        };
        let st = vh.read();
        let Ok(queues) = route(&vh.name, &st, &message) else {
            return;
        };
        for q in queues {
            if dead_letter::is_cycle(&message, q.name.as_str()) || q.refuses(&message) {
                continue;
            }
            let _ = q.append(&message);
        }
    }

    /// Routes a delayed message that is due, as a publish at this moment
    /// would (but never into the delay store again). Returns the tickets of
    /// its appends; a message that cannot be routed is dropped.
    fn publish_due(&self, vhost: &str, message: Message) -> Vec<Appended> {
        let Ok(vh) = self.vhost(vhost) else {
            return Vec::new();
        };
        let st = vh.read();
        let Ok(queues) = route(&vh.name, &st, &message) else {
            return Vec::new();
        };
        queues
            .iter()
            .filter(|q| !q.refuses(&message))
            // Through the queue's deduplication window like any arrival:
            // a delayed message reaches its queue only now.
            .filter_map(|q| q.append_published(&message).ok())
            .flatten()
            .collect()
    }

    /// The delay store, for [`Broker::publish_delayed`].
    pub(crate) fn delays(&self) -> &DelayStore {
        &self.inner.delays
    }

    /// Checks that `vhost` exists and holds the message's exchange, which a
    /// client may publish to. Returns the vhost's name.
    pub(crate) fn check_exchange(
        &self,
        vhost: &str,
        message: &Message,
    ) -> Result<VhostName, BrokerError> {
        let vh = self.vhost(vhost)?;
        let st = vh.read();
        match st.exchanges.get(&message.exchange) {
            None => Err(BrokerError::ExchangeNotFound {
                vhost: vh.name.to_string(),
                exchange: message.exchange.to_string(),
            }),
            Some(ex) if ex.internal => Err(BrokerError::AccessRefused(format!(
                "cannot publish to internal exchange '{}' in vhost '{}'",
                ex.name, vh.name
            ))),
            Some(_) => Ok(vh.name.clone()),
        }
    }

    /// Opens a channel in `vhost` for a connection.
    pub fn open_channel(
        &self,
        vhost: &str,
        connection: ConnectionId,
    ) -> Result<Channel, BrokerError> {
        let vh = self.vhost(vhost)?;
        Ok(Channel::new(
            self.clone(),
            self.next_id(),
            connection,
            vh.name.clone(),
        ))
    }

    /// A connection went away: its exclusive queues are deleted.
    pub async fn connection_closed(&self, connection: ConnectionId) -> Result<(), BrokerError> {
        let vhosts: Vec<Arc<Vhost>> = self
            .inner
            .vhosts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for vh in vhosts {
            let owned: Vec<Arc<Queue>> = vh
                .read()
                .queues
                .values()
                .filter(|q| q.exclusive_owner == Some(connection))
                .cloned()
                .collect();
            for q in owned {
                self.remove_queue(&vh, &q)?;
            }
        }
        Ok(())
    }

    /// The broker's resource alarms: none raised until something raises
    /// them, such as the monitor [`Alarms::monitor`] starts.
    pub fn alarms(&self) -> &Alarms {
        &self.inner.alarms
    }

    /// What the storage journal has done since the broker opened: group
    /// commits (one fsync each), batches, records and bytes. `None` once closed.
    pub fn journal_stats(&self) -> Option<JournalStats> {
        self.inner
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(Store::journal_stats)
    }

    /// How long the storage's commit fsyncs have taken since the broker
    /// opened, as a histogram. `None` once closed.
    pub fn fsync_histogram(&self) -> Option<FsyncHistogram> {
        self.inner
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(Store::fsync_histogram)
    }

    /// Stops every queue and closes the store, flushing it to disk. Other
    /// clones of the handle stop working.
    pub fn close(self) -> Result<(), BrokerError> {
        let vhosts: Vec<Arc<Vhost>> = self
            .inner
            .vhosts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for vh in vhosts {
            for q in vh.read().queues.values() {
                q.sync();
                q.mark_deleted();
            }
        }
        self.inner.delays.close();
        let store = self
            .inner
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(store) = store {
            store.close()?;
        }
        Ok(())
    }
}

/// Facts about a queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueInfo {
    /// Its name.
    pub name: QueueName,
    /// Whether it survives a restart.
    pub durable: bool,
    /// Whether it belongs to one connection.
    pub exclusive: bool,
    /// Whether it goes with its last consumer.
    pub auto_delete: bool,
    /// Its type.
    pub queue_type: QueueType,
    /// The arguments it was declared with (`x-max-length`...).
    pub arguments: FieldTable,
    /// Messages ready for delivery.
    pub ready: u64,
    /// Messages delivered and not yet acknowledged.
    pub unacked: u64,
    /// Attached consumers.
    pub consumers: u32,
}

fn check_owner(queue: &Queue, owner: Option<ConnectionId>) -> Result<(), BrokerError> {
    match queue.exclusive_owner {
        Some(o) if Some(o) != owner => Err(BrokerError::ResourceLocked {
            vhost: queue.vhost.to_string(),
            queue: queue.name.to_string(),
        }),
        _ => Ok(()),
    }
}

fn check_queue_equivalent(q: &Queue, d: &QueueDeclare) -> Result<(), BrokerError> {
    let entity = format!("queue '{}' in vhost '{}'", q.name, q.vhost);
    let differ = |property: &str, current: bool, received: bool| BrokerError::Inequivalent {
        entity: entity.clone(),
        property: property.to_string(),
        current: current.to_string(),
        received: received.to_string(),
    };
    if q.durable != d.durable {
        return Err(differ("durable", q.durable, d.durable));
    }
    if q.exclusive_owner.is_some() != d.exclusive {
        return Err(differ(
            "exclusive",
            q.exclusive_owner.is_some(),
            d.exclusive,
        ));
    }
    if q.auto_delete != d.auto_delete {
        return Err(differ("auto_delete", q.auto_delete, d.auto_delete));
    }
    // A missing x-queue-type means classic, so declaring it explicitly is equivalent.
    let normalize = |args: &FieldTable| {
        let mut a = args.clone();
        if a.get("x-queue-type").and_then(|v| v.as_str()) == Some("classic") {
            a.remove("x-queue-type");
        }
        a
    };
    check_arguments_equivalent(&entity, &normalize(&q.arguments), &normalize(&d.arguments))
}

/// Finds the queues a message goes to: through exchange-to-exchange
/// bindings (each exchange visited once, so cycles end), and through the
/// alternate exchange of any exchange that routed it nowhere.
fn route(
    vhost: &VhostName,
    st: &VhostState,
    message: &Message,
) -> Result<Vec<Arc<Queue>>, BrokerError> {
    let start =
        st.exchanges
            .get(&message.exchange)
            .ok_or_else(|| BrokerError::ExchangeNotFound {
                vhost: vhost.to_string(),
                exchange: message.exchange.to_string(),
            })?;
    if start.internal {
        return Err(BrokerError::AccessRefused(format!(
            "cannot publish to internal exchange '{}' in vhost '{vhost}'",
            start.name
        )));
    }
    let empty = FieldTable::new();
    let headers = message.properties.headers.as_ref().unwrap_or(&empty);
    let mut queues: Vec<Arc<Queue>> = Vec::new();
    let mut visited: Vec<&ExchangeName> = Vec::new();
    let mut pending: Vec<&Exchange> = vec![start];
    let mut dests = Vec::new();
    while let Some(ex) = pending.pop() {
        if visited.contains(&&ex.name) {
            continue;
        }
        visited.push(&ex.name);
        dests.clear();
        if ex.name.is_default() {
            if let Ok(q) = QueueName::new(message.routing_key.clone()) {
                dests.push(Destination::Queue(q));
            }
        } else if let Some(key) = super_stream::routing_key(ex, message) {
            ex.table.route(&key, headers, &mut dests);
        } else {
            ex.table.route(&message.routing_key, headers, &mut dests);
        }
        let mut routed_here = false;
        for d in dests.drain(..) {
            match d {
                Destination::Queue(q) => {
                    if let Some(queue) = st.queues.get(&q) {
                        routed_here = true;
                        if !queues.iter().any(|x| Arc::ptr_eq(x, queue)) {
                            queues.push(Arc::clone(queue));
                        }
                    }
                }
                Destination::Exchange(x) => {
                    if let Some(next) = st.exchanges.get(&x) {
                        routed_here = true;
                        pending.push(next);
                    }
                }
            }
        }
        if !routed_here {
            if let Some(ae) = ex.alternate().and_then(|n| ExchangeName::new(n).ok()) {
                if let Some(next) = st.exchanges.get(&ae) {
                    pending.push(next);
                }
            }
        }
    }
    start.metrics.published.increment(1);
    if queues.is_empty() {
        start.metrics.unroutable.increment(1);
    }
    Ok(queues)
}
