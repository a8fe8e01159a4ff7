//! The direct exchange's index: routing key to the destinations bound with
//! exactly that key.

use std::collections::{BTreeSet, HashMap};

use super::Destination;

/// For each binding key, the destinations with at least one binding under it.
#[derive(Clone, Debug, Default)]
pub(crate) struct DirectIndex {
    by_key: HashMap<String, BTreeSet<Destination>>,
}

impl DirectIndex {
    /// Records that `dest` now has a binding with key `key`.
    pub(crate) fn add(&mut self, dest: &Destination, key: &str) {
        match self.by_key.get_mut(key) {
            Some(dests) => {
                dests.insert(dest.clone());
            }
            None => {
                self.by_key
                    .insert(key.to_owned(), BTreeSet::from([dest.clone()]));
            }
        }
    }

    /// Records that `dest` no longer has any binding with key `key`.
    pub(crate) fn remove(&mut self, dest: &Destination, key: &str) {
        if let Some(dests) = self.by_key.get_mut(key) {
            dests.remove(dest);
            if dests.is_empty() {
                self.by_key.remove(key);
            }
        }
    }

    /// Appends the destinations bound with exactly `routing_key`.
    pub(crate) fn route(&self, routing_key: &str, out: &mut Vec<Destination>) {
        if let Some(dests) = self.by_key.get(routing_key) {
            out.extend(dests.iter().cloned());
        }
    }

    #[cfg(test)]
    pub(crate) fn key_count(&self) -> usize {
        self.by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::{ExchangeKind, Index, RoutingTable};
    use super::*;

    fn route(table: &RoutingTable, key: &str) -> Vec<Destination> {
        let mut out = Vec::new();
        table.route(key, &no_args(), &mut out);
        out
    }

    fn direct() -> RoutingTable {
        RoutingTable::new(ExchangeKind::Direct)
    }

    #[test]
    fn routes_to_the_destinations_bound_with_exactly_the_routing_key() {
        let mut t = direct();
        t.bind(q("orders"), "order.created", &no_args()).unwrap();
        t.bind(q("audit"), "order.created", &no_args()).unwrap();
        t.bind(q("refunds"), "order.refunded", &no_args()).unwrap();

        assert_eq!(route(&t, "order.created"), vec![q("audit"), q("orders")]);
        assert_eq!(route(&t, "order.refunded"), vec![q("refunds")]);
        assert_eq!(
            route(&t, "order.*"),
            Vec::<Destination>::new(),
            "no wildcards in a direct exchange"
        );
        assert_eq!(
            route(&t, "Order.Created"),
            Vec::<Destination>::new(),
            "keys are case-sensitive"
        );
        assert_eq!(
            route(&t, "order.created "),
            Vec::<Destination>::new(),
            "and compared byte for byte"
        );
    }

    #[test]
    fn the_empty_key_is_a_key_like_any_other() {
        let mut t = direct();
        t.bind(q("a"), "", &no_args()).unwrap();
        assert_eq!(route(&t, ""), vec![q("a")]);
        assert_eq!(route(&t, "x"), Vec::<Destination>::new());
    }

    #[test]
    fn headers_are_ignored() {
        let mut t = direct();
        t.bind(q("a"), "k", &table(&[("h", s("1"))])).unwrap();
        let mut out = Vec::new();
        t.route("k", &table(&[("h", s("2"))]), &mut out);
        assert_eq!(out, vec![q("a")]);
    }

    #[test]
    fn several_bindings_of_one_queue_to_one_key_deliver_once() {
        let mut t = direct();
        t.bind(q("a"), "k", &no_args()).unwrap();
        t.bind(q("a"), "k", &table(&[("v", s("1"))])).unwrap();
        t.bind(q("a"), "k", &table(&[("v", s("2"))])).unwrap();
        assert_eq!(route(&t, "k"), vec![q("a")]);
    }

    #[test]
    fn unbinding_the_last_binding_of_a_key_forgets_the_key() {
        let mut t = direct();
        t.bind(q("a"), "k", &no_args()).unwrap();
        t.bind(q("a"), "k", &table(&[("v", s("1"))])).unwrap();
        t.unbind(&q("a"), "k", &no_args());
        assert_eq!(route(&t, "k"), vec![q("a")]);
        t.unbind(&q("a"), "k", &table(&[("v", s("1"))]));
        assert_eq!(route(&t, "k"), Vec::<Destination>::new());
        let Index::Direct(index) = &t.index else {
            panic!("a direct table has a direct index")
        };
        assert_eq!(index.key_count(), 0);
    }

    #[test]
    fn thousands_of_bindings_route_correctly() {
        let mut t = direct();
        for i in 0..5000 {
            t.bind(
                q(&format!("q{i}")),
                &format!("key.{}", i % 1000),
                &no_args(),
            )
            .unwrap();
        }
        assert_eq!(t.len(), 5000);
        let mut expected: Vec<_> = (0..5).map(|j| q(&format!("q{}", 7 + j * 1000))).collect();
        expected.sort();
        assert_eq!(route(&t, "key.7"), expected);
        assert_eq!(route(&t, "key.1000"), Vec::<Destination>::new());
    }
}
