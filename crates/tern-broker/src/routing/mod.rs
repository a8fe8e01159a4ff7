//! Exchange routing tables: which destinations a published message goes to.
//!
//! One [`RoutingTable`] per exchange holds that exchange's bindings and
//! answers "where does a message with this routing key and these headers
//! go?". The tables are plain synchronous data structures; the engine owns
//! the locking, the persistence and the exchange-to-exchange recursion.
//!
//! This module owns the binding set that every kind shares (a binding is
//! identified by its destination, routing key and arguments, as in RabbitMQ)
//! and the fanout kind, which needs nothing more. The per-kind indexes live in
//! the private `direct`, `topic` and `headers` modules.

mod direct;
mod headers;
mod topic;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::error::BrokerError;
use crate::name::{ExchangeName, QueueName};
use crate::value::{FieldTable, FieldValue};

pub use topic::topic_matches;

/// Where a binding sends messages: a queue, or another exchange (an
/// exchange-to-exchange binding).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Ord, PartialOrd)]
pub enum Destination {
    /// A queue.
    Queue(QueueName),
    /// Another exchange, which routes the message on by its own bindings.
    Exchange(ExchangeName),
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Queue(q) => write!(f, "queue '{q}'"),
            Destination::Exchange(x) => write!(f, "exchange '{x}'"),
        }
    }
}

/// The four AMQP 0-9-1 exchange types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExchangeKind {
    /// Routes to the bindings whose key equals the routing key.
    Direct,
    /// Routes to every binding, ignoring the routing key.
    Fanout,
    /// Routes to the bindings whose pattern (`*` and `#` wildcards over
    /// `.`-separated words) matches the routing key.
    Topic,
    /// Routes by message headers against binding arguments (`x-match`).
    Headers,
}

impl ExchangeKind {
    /// The AMQP type string: `direct`, `fanout`, `topic` or `headers`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

impl fmt::Display for ExchangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An exchange type string that is not one of the four AMQP types.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown exchange type '{0}'")]
pub struct UnknownExchangeKind(pub String);

impl FromStr for ExchangeKind {
    type Err = UnknownExchangeKind;

    /// Parses an AMQP exchange type. Matching is exact and case-sensitive,
    /// as RabbitMQ's is.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "direct" => Ok(ExchangeKind::Direct),
            "fanout" => Ok(ExchangeKind::Fanout),
            "topic" => Ok(ExchangeKind::Topic),
            "headers" => Ok(ExchangeKind::Headers),
            other => Err(UnknownExchangeKind(other.to_owned())),
        }
    }
}

/// The bindings of one exchange, indexed for routing by the exchange's kind.
///
/// A binding is identified by (destination, routing key, arguments): binding
/// the same queue twice with the same key but different arguments makes two
/// bindings, as in RabbitMQ. Routing delivers to each destination at most
/// once, however many of its bindings match.
#[derive(Clone, Debug)]
pub struct RoutingTable {
    kind: ExchangeKind,
    /// Every binding: destination, then routing key, then the distinct
    /// argument tables bound with that pair (in binding order). Entries are
    /// removed as soon as they are empty, so the keys of the outer map are
    /// exactly the destinations that have at least one binding.
    bindings: BindingSet,
    /// How many bindings there are in all.
    len: usize,
    index: Index,
}

type BindingSet = BTreeMap<Destination, BTreeMap<String, Vec<FieldTable>>>;

/// The per-kind lookup structure. Each is told when a (destination, key)
/// pair gains its first binding and loses its last; argument variants are
/// counted by the shared binding set.
#[derive(Clone, Debug)]
enum Index {
    Direct(direct::DirectIndex),
    Topic(topic::TopicTrie),
    /// Fanout routes to every destination in the binding set, and headers
    /// routing checks every binding's arguments; neither needs more.
    None,
}

impl RoutingTable {
    /// An empty table for an exchange of this kind.
    pub fn new(kind: ExchangeKind) -> RoutingTable {
        let index = match kind {
            ExchangeKind::Direct => Index::Direct(direct::DirectIndex::default()),
            ExchangeKind::Topic => Index::Topic(topic::TopicTrie::default()),
            ExchangeKind::Fanout | ExchangeKind::Headers => Index::None,
        };
        RoutingTable {
            kind,
            bindings: BTreeMap::new(),
            len: 0,
            index,
        }
    }

    /// The exchange kind this table routes for.
    pub fn kind(&self) -> ExchangeKind {
        self.kind
    }

    /// Adds a binding. Returns whether it is new (`false` if an identical
    /// binding already existed, which is not an error in AMQP).
    ///
    /// For a headers exchange the `x-match` argument is validated: it must be
    /// absent or one of the strings `all`, `any`, `all-with-x`, `any-with-x`;
    /// anything else is refused with [`BrokerError::InvalidArgument`] (406)
    /// and the table is left unchanged. Other kinds do not look at the
    /// arguments beyond storing them.
    pub fn bind(
        &mut self,
        dest: Destination,
        routing_key: &str,
        args: &FieldTable,
    ) -> Result<bool, BrokerError> {
        if self.kind == ExchangeKind::Headers {
            headers::XMatch::of(args)?;
        }
        let existing = self
            .bindings
            .get(&dest)
            .and_then(|keys| keys.get(routing_key));
        if existing.is_some_and(|variants| variants.iter().any(|a| tables_identical(a, args))) {
            return Ok(false);
        }
        if existing.is_none() {
            self.index.add(&dest, routing_key);
        }
        self.bindings
            .entry(dest)
            .or_default()
            .entry(routing_key.to_owned())
            .or_default()
            .push(args.clone());
        self.len += 1;
        Ok(true)
    }

    /// Removes the binding identified by (destination, routing key,
    /// arguments). Returns whether it existed. Other bindings of the same
    /// destination, even with the same key, are untouched.
    pub fn unbind(&mut self, dest: &Destination, routing_key: &str, args: &FieldTable) -> bool {
        let Some(keys) = self.bindings.get_mut(dest) else {
            return false;
        };
        let Some(variants) = keys.get_mut(routing_key) else {
            return false;
        };
        let Some(at) = variants.iter().position(|a| tables_identical(a, args)) else {
            return false;
        };
        variants.remove(at);
        self.len -= 1;
        if variants.is_empty() {
            keys.remove(routing_key);
            self.index.remove(dest, routing_key);
            if keys.is_empty() {
                self.bindings.remove(dest);
            }
        }
        true
    }

    /// Removes every binding to `dest` (for when a queue or exchange is
    /// deleted). Returns how many bindings were removed.
    pub fn remove_destination(&mut self, dest: &Destination) -> usize {
        let Some(keys) = self.bindings.remove(dest) else {
            return 0;
        };
        let mut removed = 0;
        for (key, variants) in keys {
            removed += variants.len();
            self.index.remove(dest, &key);
        }
        self.len -= removed;
        removed
    }

    /// Appends to `out` every destination a message with this routing key and
    /// these headers goes to, each at most once, in destination order. What
    /// was in `out` before is left alone and not deduplicated against.
    ///
    /// Direct and topic exchanges look only at the routing key, headers
    /// exchanges only at the headers, fanout exchanges at neither.
    pub fn route(&self, routing_key: &str, headers: &FieldTable, out: &mut Vec<Destination>) {
        match (&self.index, self.kind) {
            (Index::Direct(index), _) => index.route(routing_key, out),
            (Index::Topic(trie), _) => trie.route(routing_key, out),
            (Index::None, ExchangeKind::Headers) => {
                for (dest, keys) in &self.bindings {
                    if keys
                        .values()
                        .flatten()
                        .any(|args| headers::matches(args, headers))
                    {
                        out.push(dest.clone());
                    }
                }
            }
            (Index::None, _) => out.extend(self.bindings.keys().cloned()),
        }
    }

    /// Every binding as (destination, routing key, arguments), ordered by
    /// destination, then routing key, then binding order.
    pub fn bindings(&self) -> Vec<(Destination, String, FieldTable)> {
        let mut all = Vec::with_capacity(self.len);
        for (dest, keys) in &self.bindings {
            for (key, variants) in keys {
                for args in variants {
                    all.push((dest.clone(), key.clone(), args.clone()));
                }
            }
        }
        all
    }

    /// How many bindings the table holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table holds no bindings.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Index {
    fn add(&mut self, dest: &Destination, key: &str) {
        match self {
            Index::Direct(index) => index.add(dest, key),
            Index::Topic(trie) => trie.add(dest, key),
            Index::None => {}
        }
    }

    fn remove(&mut self, dest: &Destination, key: &str) {
        match self {
            Index::Direct(index) => index.remove(dest, key),
            Index::Topic(trie) => trie.remove(dest, key),
            Index::None => {}
        }
    }
}

/// Whether two argument tables are the same binding arguments. This is
/// `==` except that floats compare by bit pattern, so a binding whose
/// arguments hold a NaN can still be found again to unbind it.
fn tables_identical(a: &FieldTable, b: &FieldTable) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, va), (kb, vb))| ka == kb && values_identical(va, vb))
}

fn values_identical(a: &FieldValue, b: &FieldValue) -> bool {
    match (a, b) {
        (FieldValue::F32(x), FieldValue::F32(y)) => x.to_bits() == y.to_bits(),
        (FieldValue::F64(x), FieldValue::F64(y)) => x.to_bits() == y.to_bits(),
        (FieldValue::Table(x), FieldValue::Table(y)) => tables_identical(x, y),
        (FieldValue::Array(x), FieldValue::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| values_identical(p, q))
        }
        _ => a == b,
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Shorthands shared by the routing tests.

    use super::Destination;
    use crate::name::{ExchangeName, QueueName};
    use crate::value::{FieldTable, FieldValue};

    pub(crate) fn q(name: &str) -> Destination {
        Destination::Queue(QueueName::new(name).unwrap())
    }

    pub(crate) fn x(name: &str) -> Destination {
        Destination::Exchange(ExchangeName::new(name).unwrap())
    }

    pub(crate) fn no_args() -> FieldTable {
        FieldTable::new()
    }

    pub(crate) fn table(entries: &[(&str, FieldValue)]) -> FieldTable {
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    pub(crate) fn s(v: &str) -> FieldValue {
        FieldValue::String(v.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    fn route(table: &RoutingTable, key: &str) -> Vec<Destination> {
        let mut out = Vec::new();
        table.route(key, &no_args(), &mut out);
        out
    }

    #[test]
    fn exchange_kinds_parse_from_and_print_as_their_amqp_type_strings() {
        for kind in [
            ExchangeKind::Direct,
            ExchangeKind::Fanout,
            ExchangeKind::Topic,
            ExchangeKind::Headers,
        ] {
            assert_eq!(kind.as_str().parse::<ExchangeKind>(), Ok(kind));
            assert_eq!(kind.to_string(), kind.as_str());
        }
    }

    #[test]
    fn an_unknown_exchange_type_is_refused_and_named_in_the_error() {
        let err = "x-delayed-message".parse::<ExchangeKind>().unwrap_err();
        assert_eq!(err, UnknownExchangeKind("x-delayed-message".to_owned()));
        assert_eq!(err.to_string(), "unknown exchange type 'x-delayed-message'");
        assert!(
            "Direct".parse::<ExchangeKind>().is_err(),
            "type strings are case-sensitive"
        );
    }

    #[test]
    fn destinations_display_their_kind_and_name() {
        assert_eq!(q("orders").to_string(), "queue 'orders'");
        assert_eq!(x("audit").to_string(), "exchange 'audit'");
    }

    #[test]
    fn binding_twice_identically_is_one_binding() {
        let mut t = RoutingTable::new(ExchangeKind::Direct);
        assert_eq!(t.bind(q("a"), "k", &no_args()), Ok(true));
        assert_eq!(t.bind(q("a"), "k", &no_args()), Ok(false));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_binding_is_identified_by_destination_key_and_arguments() {
        let mut t = RoutingTable::new(ExchangeKind::Direct);
        let args = table(&[("tag", s("1"))]);
        assert_eq!(t.bind(q("a"), "k", &no_args()), Ok(true));
        assert_eq!(
            t.bind(q("a"), "k", &args),
            Ok(true),
            "different arguments: a second binding"
        );
        assert_eq!(
            t.bind(q("a"), "j", &no_args()),
            Ok(true),
            "different key: a third"
        );
        assert_eq!(
            t.bind(q("b"), "k", &no_args()),
            Ok(true),
            "different destination: a fourth"
        );
        assert_eq!(
            t.bind(x("a"), "k", &no_args()),
            Ok(true),
            "an exchange is not the queue of the same name"
        );
        assert_eq!(t.len(), 5);
        assert_eq!(
            t.bindings(),
            vec![
                (q("a"), "j".to_owned(), no_args()),
                (q("a"), "k".to_owned(), no_args()),
                (q("a"), "k".to_owned(), args.clone()),
                (q("b"), "k".to_owned(), no_args()),
                (x("a"), "k".to_owned(), no_args()),
            ]
        );
    }

    #[test]
    fn unbind_removes_only_the_binding_that_matches_exactly() {
        let mut t = RoutingTable::new(ExchangeKind::Direct);
        let args = table(&[("tag", s("1"))]);
        t.bind(q("a"), "k", &no_args()).unwrap();
        t.bind(q("a"), "k", &args).unwrap();
        t.bind(q("b"), "k", &no_args()).unwrap();

        assert!(
            !t.unbind(&q("a"), "k", &table(&[("tag", s("2"))])),
            "no binding with those arguments"
        );
        assert!(
            !t.unbind(&q("a"), "other", &no_args()),
            "no binding with that key"
        );
        assert!(
            !t.unbind(&q("c"), "k", &no_args()),
            "no binding to that queue"
        );
        assert_eq!(t.len(), 3);

        assert!(t.unbind(&q("a"), "k", &no_args()));
        assert_eq!(
            route(&t, "k"),
            vec![q("a"), q("b")],
            "a is still bound by its other binding"
        );
        assert!(t.unbind(&q("a"), "k", &args));
        assert_eq!(route(&t, "k"), vec![q("b")]);
        assert!(!t.unbind(&q("a"), "k", &args), "already gone");
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn remove_destination_removes_all_its_bindings_and_counts_them() {
        for kind in [
            ExchangeKind::Direct,
            ExchangeKind::Fanout,
            ExchangeKind::Topic,
            ExchangeKind::Headers,
        ] {
            let mut t = RoutingTable::new(kind);
            t.bind(q("gone"), "a", &no_args()).unwrap();
            t.bind(q("gone"), "b.*", &no_args()).unwrap();
            t.bind(q("gone"), "a", &table(&[("h", s("v"))])).unwrap();
            t.bind(q("kept"), "a", &no_args()).unwrap();

            assert_eq!(t.remove_destination(&q("gone")), 3, "{kind}");
            assert_eq!(t.remove_destination(&q("gone")), 0, "{kind}");
            assert_eq!(t.len(), 1, "{kind}");
            assert_eq!(
                t.bindings(),
                vec![(q("kept"), "a".to_owned(), no_args())],
                "{kind}"
            );
            let mut out = Vec::new();
            t.route("a", &no_args(), &mut out);
            assert_eq!(out, vec![q("kept")], "{kind}");
        }
    }

    #[test]
    fn a_table_is_empty_until_bound_and_again_after_the_last_unbind() {
        for kind in [
            ExchangeKind::Direct,
            ExchangeKind::Fanout,
            ExchangeKind::Topic,
            ExchangeKind::Headers,
        ] {
            let mut t = RoutingTable::new(kind);
            assert!(t.is_empty());
            assert_eq!(t.kind(), kind);
            t.bind(q("a"), "k", &no_args()).unwrap();
            assert!(!t.is_empty());
            t.unbind(&q("a"), "k", &no_args());
            assert!(t.is_empty());
            assert!(t.bindings().is_empty());
            assert!(route(&t, "k").is_empty());
        }
    }

    #[test]
    fn route_appends_to_what_is_already_in_the_output() {
        let mut t = RoutingTable::new(ExchangeKind::Fanout);
        t.bind(q("a"), "", &no_args()).unwrap();
        let mut out = vec![q("a")];
        t.route("", &no_args(), &mut out);
        assert_eq!(out, vec![q("a"), q("a")]);
    }

    #[test]
    fn fanout_routes_to_every_destination_once_whatever_the_key() {
        let mut t = RoutingTable::new(ExchangeKind::Fanout);
        t.bind(q("a"), "", &no_args()).unwrap();
        t.bind(q("a"), "ignored", &no_args()).unwrap();
        t.bind(q("b"), "x.y", &no_args()).unwrap();
        t.bind(x("downstream"), "", &no_args()).unwrap();
        assert_eq!(route(&t, ""), vec![q("a"), q("b"), x("downstream")]);
        assert_eq!(
            route(&t, "anything.at.all"),
            vec![q("a"), q("b"), x("downstream")]
        );
    }

    #[test]
    fn fanout_stops_routing_to_a_destination_after_its_last_binding_goes() {
        let mut t = RoutingTable::new(ExchangeKind::Fanout);
        t.bind(q("a"), "one", &no_args()).unwrap();
        t.bind(q("a"), "two", &no_args()).unwrap();
        t.unbind(&q("a"), "one", &no_args());
        assert_eq!(route(&t, ""), vec![q("a")]);
        t.unbind(&q("a"), "two", &no_args());
        assert_eq!(route(&t, ""), Vec::<Destination>::new());
    }

    #[test]
    fn non_headers_exchanges_do_not_validate_x_match() {
        for kind in [
            ExchangeKind::Direct,
            ExchangeKind::Fanout,
            ExchangeKind::Topic,
        ] {
            let mut t = RoutingTable::new(kind);
            assert_eq!(
                t.bind(q("a"), "k", &table(&[("x-match", s("bogus"))])),
                Ok(true),
                "{kind}"
            );
        }
    }

    #[test]
    fn arguments_holding_nan_can_still_be_unbound() {
        let mut t = RoutingTable::new(ExchangeKind::Direct);
        let args = table(&[("f", FieldValue::F64(f64::NAN))]);
        assert_eq!(t.bind(q("a"), "k", &args), Ok(true));
        assert_eq!(t.bind(q("a"), "k", &args), Ok(false));
        assert!(t.unbind(&q("a"), "k", &args));
        assert!(t.is_empty());
    }
}
