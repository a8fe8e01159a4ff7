//! The topic exchange's index: a trie over the words of the binding
//! patterns, and the reference matcher [`topic_matches`].
//!
//! Semantics are RabbitMQ's. Keys and patterns are split on `.` into words,
//! and a word may be empty (`a..b` is `a`, ``, `b`; `a.` is `a`, ``). The
//! empty string is the one exception: it has no words at all, exactly as in
//! RabbitMQ (`split_topic_key(<<>>) -> []`). So `*` does not match the empty
//! key, while `#` and the empty pattern do. In a pattern, `*` matches exactly
//! one word and `#` zero or more words; both are wildcards only as whole
//! words (`a*` is a literal word). In a routing key every word is literal.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::Destination;

/// Splits a routing key or binding pattern into its words, RabbitMQ's way:
/// on every `.`, keeping empty words, except that the empty string has none.
pub(crate) fn words(s: &str) -> Vec<&str> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split('.').collect()
    }
}

/// Whether the topic `pattern` matches the routing key `key`.
///
/// This is the straightforward definition, for reference and for callers
/// that match one pattern (the trie is for many). It fills in, from the
/// end, the table of which pattern suffixes match which key suffixes, so it
/// takes O(pattern words × key words) time however many `#`s there are.
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    let pattern = words(pattern);
    let key = words(key);
    let n = key.len();
    // `later[j]`: whether the pattern words after the current one match
    // `key[j..]`; `here[j]`: whether the current word onwards does.
    let mut later = vec![false; n + 1];
    later[n] = true;
    let mut here = vec![false; n + 1];
    for word in pattern.iter().rev() {
        for j in (0..=n).rev() {
            here[j] = match *word {
                "#" => later[j] || (j < n && here[j + 1]),
                "*" => j < n && later[j + 1],
                literal => j < n && key[j] == literal && later[j + 1],
            };
        }
        std::mem::swap(&mut here, &mut later);
    }
    later[0]
}

const ROOT: usize = 0;

/// One trie node: the pattern prefix spelled by the path to it.
#[derive(Clone, Debug, Default)]
struct Node {
    /// Children by literal word (never `*` or `#`).
    literals: HashMap<String, usize>,
    /// The child for a `*` word.
    star: Option<usize>,
    /// The child for a `#` word.
    hash: Option<usize>,
    /// Whether this node is some node's `hash` child: such a node may also
    /// consume any number of further words before its children match.
    is_hash: bool,
    /// The destinations with a binding whose pattern ends here.
    dests: BTreeSet<Destination>,
}

impl Node {
    fn is_vacant(&self) -> bool {
        self.dests.is_empty()
            && self.literals.is_empty()
            && self.star.is_none()
            && self.hash.is_none()
    }
}

/// The topic bindings as a trie over pattern words. Nodes live in an arena
/// (indexes into `nodes`) so that no operation recurses, however long a
/// pattern is; emptied nodes are pruned and their slots reused.
#[derive(Clone, Debug)]
pub(crate) struct TopicTrie {
    nodes: Vec<Node>,
    free: Vec<usize>,
}

impl Default for TopicTrie {
    fn default() -> Self {
        TopicTrie {
            nodes: vec![Node::default()],
            free: Vec::new(),
        }
    }
}

impl TopicTrie {
    /// Records that `dest` now has a binding with this pattern.
    pub(crate) fn add(&mut self, dest: &Destination, pattern: &str) {
        let mut at = ROOT;
        for word in words(pattern) {
            at = match self.child(at, word) {
                Some(child) => child,
                None => self.insert_child(at, word),
            };
        }
        self.nodes[at].dests.insert(dest.clone());
    }

    /// Records that `dest` no longer has any binding with this pattern, and
    /// prunes the nodes that leaves with nothing below them.
    pub(crate) fn remove(&mut self, dest: &Destination, pattern: &str) {
        let words = words(pattern);
        // path[k] is the node reached after the first k words.
        let mut path = Vec::with_capacity(words.len() + 1);
        path.push(ROOT);
        for word in &words {
            match self.child(path[path.len() - 1], word) {
                Some(child) => path.push(child),
                None => return,
            }
        }
        let end = path[path.len() - 1];
        self.nodes[end].dests.remove(dest);
        for k in (1..path.len()).rev() {
            let (node, parent) = (path[k], path[k - 1]);
            if !self.nodes[node].is_vacant() {
                break;
            }
            match words[k - 1] {
                "*" => self.nodes[parent].star = None,
                "#" => self.nodes[parent].hash = None,
                literal => {
                    self.nodes[parent].literals.remove(literal);
                }
            }
            self.nodes[node] = Node::default();
            self.free.push(node);
        }
    }

    /// Appends, each once and in order, the destinations of every pattern
    /// that matches `routing_key`.
    ///
    /// A depth-first walk over states (node, words consumed). A `#` node may
    /// stay put and consume one more word, so the same `#` state can be
    /// reached along many paths (`#.#.#.a`); those states are remembered and
    /// visited once, which bounds the work by (nodes × key words). States of
    /// other nodes have a single predecessor and need no memo.
    pub(crate) fn route(&self, routing_key: &str, out: &mut Vec<Destination>) {
        let key = words(routing_key);
        let n = key.len();
        let mut found: Vec<&Destination> = Vec::new();
        let mut seen_hash_states: HashSet<(usize, usize)> = HashSet::new();
        let mut stack = vec![(ROOT, 0)];
        while let Some((at, i)) = stack.pop() {
            let node = &self.nodes[at];
            if i == n {
                found.extend(&node.dests);
            } else {
                if let Some(&child) = node.literals.get(key[i]) {
                    stack.push((child, i + 1));
                }
                if let Some(child) = node.star {
                    stack.push((child, i + 1));
                }
                if node.is_hash && seen_hash_states.insert((at, i + 1)) {
                    stack.push((at, i + 1));
                }
            }
            if let Some(child) = node.hash {
                if seen_hash_states.insert((child, i)) {
                    stack.push((child, i));
                }
            }
        }
        found.sort_unstable();
        found.dedup();
        out.extend(found.into_iter().cloned());
    }

    fn child(&self, at: usize, word: &str) -> Option<usize> {
        let node = &self.nodes[at];
        match word {
            "*" => node.star,
            "#" => node.hash,
            literal => node.literals.get(literal).copied(),
        }
    }

    fn insert_child(&mut self, at: usize, word: &str) -> usize {
        let child = Node {
            is_hash: word == "#",
            ..Node::default()
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.nodes[id] = child;
                id
            }
            None => {
                self.nodes.push(child);
                self.nodes.len() - 1
            }
        };
        let parent = &mut self.nodes[at];
        match word {
            "*" => parent.star = Some(id),
            "#" => parent.hash = Some(id),
            literal => {
                parent.literals.insert(literal.to_owned(), id);
            }
        }
        id
    }

    /// How many nodes are in use, the root included.
    #[cfg(test)]
    pub(crate) fn live_nodes(&self) -> usize {
        self.nodes.len() - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::test_support::*;
    use super::super::{ExchangeKind, Index, RoutingTable};
    use super::*;

    fn topic() -> RoutingTable {
        RoutingTable::new(ExchangeKind::Topic)
    }

    fn route(table: &RoutingTable, key: &str) -> Vec<Destination> {
        let mut out = Vec::new();
        table.route(key, &no_args(), &mut out);
        out
    }

    fn live_nodes(table: &RoutingTable) -> usize {
        match &table.index {
            Index::Topic(trie) => trie.live_nodes(),
            _ => panic!("not a topic table"),
        }
    }

    /// Asserts, for one pattern, which keys the trie routes and which it does
    /// not, and that the reference matcher agrees on every one.
    fn check(pattern: &str, matching: &[&str], not_matching: &[&str]) {
        let mut t = topic();
        t.bind(q("q"), pattern, &no_args()).unwrap();
        for key in matching {
            assert_eq!(
                route(&t, key),
                vec![q("q")],
                "pattern {pattern:?} should match key {key:?}"
            );
            assert!(
                topic_matches(pattern, key),
                "reference: {pattern:?} should match {key:?}"
            );
        }
        for key in not_matching {
            assert_eq!(
                route(&t, key),
                Vec::<Destination>::new(),
                "pattern {pattern:?} should not match key {key:?}"
            );
            assert!(
                !topic_matches(pattern, key),
                "reference: {pattern:?} should not match {key:?}"
            );
        }
    }

    /// The obvious recursive definition, exponential on `#`-heavy patterns:
    /// the oracle the trie and [`topic_matches`] are checked against.
    fn naive(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|skip| naive(rest, &key[skip..])),
            Some((&"*", rest)) => !key.is_empty() && naive(rest, &key[1..]),
            Some((literal, rest)) => key.first() == Some(literal) && naive(rest, &key[1..]),
        }
    }

    #[test]
    fn keys_split_on_every_dot_keeping_empty_words_but_the_empty_key_has_none() {
        assert_eq!(words(""), Vec::<&str>::new());
        assert_eq!(words("a"), vec!["a"]);
        assert_eq!(words("a.b"), vec!["a", "b"]);
        assert_eq!(words("a..b"), vec!["a", "", "b"]);
        assert_eq!(words("."), vec!["", ""]);
        assert_eq!(words("a."), vec!["a", ""]);
        assert_eq!(words(".a"), vec!["", "a"]);
    }

    #[test]
    fn a_literal_pattern_matches_only_the_identical_key() {
        check(
            "a.b",
            &["a.b"],
            &["a", "a.b.c", "b.a", "a.bb", "ab", "a..b", "A.B", ""],
        );
    }

    #[test]
    fn hash_alone_matches_every_key_including_the_empty_one() {
        check("#", &["", "a", "a.b", "a.b.c", ".", "a..b", "*", "#"], &[]);
    }

    #[test]
    fn hash_hash_matches_every_key_too() {
        check("#.#", &["", "a", "a.b", "a.b.c", "."], &[]);
        check("#.#.#.#", &["", "a", "a.b.c.d.e.f"], &[]);
    }

    #[test]
    fn hash_between_two_words_matches_zero_or_more_words_between_them() {
        check(
            "a.#.b",
            &["a.b", "a.x.b", "a.x.y.b", "a..b", "a.b.b", "a.b.x.b"],
            &["a", "b", "a.x", "x.b", "a.b.x", ""],
        );
    }

    #[test]
    fn leading_hash_matches_keys_ending_in_the_word() {
        check(
            "#.a",
            &["a", "x.a", "x.y.a", ".a", "a.a"],
            &["", "a.x", "x", "xa", "a."],
        );
    }

    #[test]
    fn trailing_hash_matches_keys_starting_with_the_word_and_the_word_alone() {
        check(
            "a.#",
            &["a", "a.b", "a.b.c", "a.", "a.a"],
            &["", "b", "b.a", "ab", "ab.c"],
        );
    }

    #[test]
    fn star_matches_exactly_one_word() {
        check("*", &["a", "abc", "*", "#"], &["a.b", ".", "a.", ""]);
        check("a.*", &["a.b", "a.a", "a."], &["a", "a.b.c", "b.a", ""]);
        check("*.b", &["a.b", ".b", "b.b"], &["b", "a.a.b", "a.c"]);
        check("*.*", &["a.b", ".", "a."], &["a", "a.b.c", ""]);
    }

    #[test]
    fn the_empty_key_has_no_words_so_only_hash_and_the_empty_pattern_match_it() {
        check("", &[""], &["a", ".", "a.b"]);
        check("*", &[], &[""]);
        check("#", &[""], &[]);
        check("#.*", &["a", "a.b", "."], &[""]);
    }

    #[test]
    fn empty_words_inside_a_key_are_words() {
        check("a..b", &["a..b"], &["a.b", "a...b"]);
        check("a.*.b", &["a..b", "a.x.b"], &["a.b", "a...b"]);
        check(".", &["."], &["", "a", ".."]);
        check("*.*.*", &["..", "a..", "a.b.c"], &[".", "...", ""]);
    }

    #[test]
    fn star_and_hash_are_wildcards_only_as_whole_words() {
        check("a*", &["a*"], &["a", "ab", "a.b"]);
        check("a#", &["a#"], &["a", "ab", "a.b"]);
        check("a.b*.#", &["a.b*", "a.b*.c"], &["a.bc", "a.b"]);
    }

    #[test]
    fn wildcards_combine() {
        check("*.#", &["a", "a.b", "a.b.c", "."], &[""]);
        check("#.*", &["a", "a.b"], &[""]);
        check("*.#.*", &["a.b", "a.b.c", "a.b.c.d"], &["a", ""]);
        check(
            "#.a.#",
            &["a", "x.a", "a.x", "x.a.y", "a.a"],
            &["", "x", "x.y", "ab"],
        );
        check(
            "a.#.#.b",
            &["a.b", "a.x.b", "a.x.y.z.b"],
            &["a", "b", "a.x"],
        );
        check("#.*.#", &["a", "a.b.c"], &[""]);
        check(
            "*.a.#.b.*",
            &["x.a.b.y", "x.a.m.n.b.y"],
            &["a.b.y", "x.a.b", "x.a.b.y.z"],
        );
    }

    #[test]
    fn routing_key_words_that_look_like_wildcards_are_literal() {
        check("a", &["a"], &["*", "#"]);
        check("a.b", &["a.b"], &["a.*", "a.#", "#"]);
    }

    #[test]
    fn headers_are_ignored() {
        let mut t = topic();
        t.bind(q("a"), "k.*", &table(&[("h", s("1"))])).unwrap();
        let mut out = Vec::new();
        t.route("k.x", &table(&[("h", s("2"))]), &mut out);
        assert_eq!(out, vec![q("a")]);
    }

    #[test]
    fn a_queue_matched_by_several_of_its_bindings_gets_the_message_once() {
        let mut t = topic();
        t.bind(q("a"), "#", &no_args()).unwrap();
        t.bind(q("a"), "x.*", &no_args()).unwrap();
        t.bind(q("a"), "x.y", &no_args()).unwrap();
        t.bind(q("a"), "*.y", &no_args()).unwrap();
        t.bind(q("a"), "x.y", &table(&[("v", s("1"))])).unwrap();
        t.bind(q("b"), "x.#", &no_args()).unwrap();
        t.bind(x("e"), "#.y", &no_args()).unwrap();
        assert_eq!(route(&t, "x.y"), vec![q("a"), q("b"), x("e")]);
        assert_eq!(route(&t, "z"), vec![q("a")]);
    }

    #[test]
    fn unbinding_one_pattern_leaves_the_others_of_the_same_queue() {
        let mut t = topic();
        t.bind(q("a"), "x.*", &no_args()).unwrap();
        t.bind(q("a"), "x.y", &no_args()).unwrap();
        t.bind(q("b"), "x.*", &no_args()).unwrap();

        assert!(t.unbind(&q("a"), "x.*", &no_args()));
        assert_eq!(route(&t, "x.y"), vec![q("a"), q("b")]);
        assert_eq!(route(&t, "x.z"), vec![q("b")]);
        assert!(t.unbind(&q("a"), "x.y", &no_args()));
        assert_eq!(route(&t, "x.y"), vec![q("b")]);
    }

    #[test]
    fn unbinding_prunes_nodes_nothing_else_uses() {
        let mut t = topic();
        assert_eq!(live_nodes(&t), 1, "just the root");
        t.bind(q("a"), "a.b.c", &no_args()).unwrap();
        t.bind(q("a"), "a.b.d", &no_args()).unwrap();
        t.bind(q("a"), "a.*.#", &no_args()).unwrap();
        assert_eq!(live_nodes(&t), 1 + 4 + 2, "root; a, b, c, d; *, #");

        t.unbind(&q("a"), "a.b.c", &no_args());
        assert_eq!(live_nodes(&t), 1 + 3 + 2, "c goes; a.b stays for a.b.d");
        t.unbind(&q("a"), "a.*.#", &no_args());
        assert_eq!(live_nodes(&t), 1 + 3);
        t.bind(q("a"), "a", &no_args()).unwrap();
        t.unbind(&q("a"), "a.b.d", &no_args());
        assert_eq!(live_nodes(&t), 1 + 1, "node a still ends a binding");
        assert_eq!(route(&t, "a"), vec![q("a")]);
        t.unbind(&q("a"), "a", &no_args());
        assert_eq!(live_nodes(&t), 1);
        assert!(route(&t, "a").is_empty());
    }

    #[test]
    fn a_node_is_kept_while_another_destination_ends_there() {
        let mut t = topic();
        t.bind(q("a"), "x.y", &no_args()).unwrap();
        t.bind(q("b"), "x.y", &no_args()).unwrap();
        t.unbind(&q("a"), "x.y", &no_args());
        assert_eq!(live_nodes(&t), 3);
        assert_eq!(route(&t, "x.y"), vec![q("b")]);
    }

    #[test]
    fn removing_a_destination_prunes_its_patterns() {
        let mut t = topic();
        for i in 0..50 {
            t.bind(q("gone"), &format!("p{i}.#.x"), &no_args()).unwrap();
        }
        t.bind(q("kept"), "p1.#", &no_args()).unwrap();
        assert_eq!(t.remove_destination(&q("gone")), 50);
        assert_eq!(live_nodes(&t), 1 + 2, "root, p1, #");
        assert_eq!(route(&t, "p1.a.x"), vec![q("kept")]);
    }

    #[test]
    fn freed_nodes_are_reused() {
        let mut t = topic();
        for round in 0..3 {
            for i in 0..100 {
                t.bind(q("a"), &format!("w{i}.*.{round}"), &no_args())
                    .unwrap();
            }
            assert_eq!(live_nodes(&t), 1 + 300);
            t.remove_destination(&q("a"));
            assert_eq!(live_nodes(&t), 1);
        }
        let Index::Topic(trie) = &t.index else {
            panic!("a topic table has a trie")
        };
        assert_eq!(
            trie.nodes.len(),
            301,
            "the arena did not grow after the first round"
        );
    }

    #[test]
    fn many_hashes_do_not_make_matching_exponential() {
        let pattern = ["#"; 20].join(".") + ".a";
        let miss = ["b"; 40].join(".");
        let hit = miss.clone() + ".a";
        let mut t = topic();
        t.bind(q("q"), &pattern, &no_args()).unwrap();
        assert!(route(&t, &miss).is_empty());
        assert_eq!(route(&t, &hit), vec![q("q")]);
        assert!(!topic_matches(&pattern, &miss));
        assert!(topic_matches(&pattern, &hit));
    }

    #[test]
    fn very_long_keys_and_patterns_do_not_overflow_the_stack() {
        let long = ["w"; 100_000].join(".");
        let mut t = topic();
        t.bind(q("q"), &long, &no_args()).unwrap();
        t.bind(q("h"), &(long.clone() + ".#"), &no_args()).unwrap();
        assert_eq!(route(&t, &long), vec![q("h"), q("q")]);
        assert!(!topic_matches(&long, "w.w"));
        assert!(topic_matches("#.w", &long));
        assert!(t.unbind(&q("q"), &long, &no_args()));
        t.remove_destination(&q("h"));
        assert_eq!(live_nodes(&t), 1);
    }

    #[test]
    fn thousands_of_bindings_route_correctly() {
        let mut t = topic();
        let mut patterns = Vec::new();
        for region in 0..20 {
            for service in 0..50 {
                patterns.push(format!("r{region}.s{service}.*"));
                patterns.push(format!("r{region}.#.s{service}"));
            }
            patterns.push(format!("r{region}.#"));
        }
        patterns.push("*.*.error".to_owned());
        patterns.push("#".to_owned());
        for (i, p) in patterns.iter().enumerate() {
            t.bind(q(&format!("q{i}")), p, &no_args()).unwrap();
        }
        assert_eq!(t.len(), patterns.len());
        assert!(patterns.len() > 2000);

        for key in [
            "r3.s7.error",
            "r3.x.y.s7",
            "r19.s49.info",
            "r5",
            "nope",
            "",
            "r1.s1",
            "a.b.error",
        ] {
            let mut expected: Vec<_> = patterns
                .iter()
                .enumerate()
                .filter(|(_, p)| topic_matches(p, key))
                .map(|(i, _)| q(&format!("q{i}")))
                .collect();
            expected.sort();
            assert_eq!(route(&t, key), expected, "key {key:?}");
        }
        assert_eq!(
            route(&t, "r3.s7.error").len(),
            4,
            "r3.s7.*, r3.#, *.*.error and #, but no r3.#.sN"
        );
    }

    /// Words for random patterns and keys: few enough to collide often.
    fn word() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "b", "", "*", "#"])
    }

    fn topic_string() -> impl Strategy<Value = String> {
        prop::collection::vec(word(), 0..6).prop_map(|ws| ws.join("."))
    }

    #[derive(Clone, Debug)]
    enum Op {
        Bind(u8, String),
        /// Unbinds the n-th (mod count) binding made so far, if any.
        Unbind(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..4u8, topic_string()).prop_map(|(d, p)| Op::Bind(d, p)),
            1 => any::<usize>().prop_map(Op::Unbind),
        ]
    }

    proptest! {
        #[test]
        fn the_reference_matcher_agrees_with_the_naive_definition(pattern in topic_string(), key in topic_string()) {
            prop_assert_eq!(topic_matches(&pattern, &key), naive(&words(&pattern), &words(&key)));
        }

        #[test]
        fn the_trie_routes_exactly_where_the_naive_definition_says(
            ops in prop::collection::vec(op(), 0..40),
            keys in prop::collection::vec(topic_string(), 1..12),
        ) {
            let mut t = topic();
            let mut model: Vec<(Destination, String)> = Vec::new();
            for op in ops {
                match op {
                    Op::Bind(d, pattern) => {
                        let dest = q(&format!("q{d}"));
                        let new = t.bind(dest.clone(), &pattern, &no_args()).unwrap();
                        let known = model.contains(&(dest.clone(), pattern.clone()));
                        prop_assert_eq!(new, !known);
                        if new {
                            model.push((dest, pattern));
                        }
                    }
                    Op::Unbind(n) if !model.is_empty() => {
                        let (dest, pattern) = model.remove(n % model.len());
                        prop_assert!(t.unbind(&dest, &pattern, &no_args()));
                        prop_assert!(!t.unbind(&dest, &pattern, &no_args()));
                    }
                    Op::Unbind(_) => {}
                }
            }
            prop_assert_eq!(t.len(), model.len());
            for key in &keys {
                let mut expected: Vec<Destination> = model
                    .iter()
                    .filter(|(_, p)| naive(&words(p), &words(key)))
                    .map(|(d, _)| d.clone())
                    .collect();
                expected.sort();
                expected.dedup();
                prop_assert_eq!(route(&t, key), expected, "key {:?}", key);
            }
            for (dest, pattern) in &model {
                t.unbind(dest, pattern, &no_args());
            }
            prop_assert_eq!(live_nodes(&t), 1, "unbinding everything prunes the trie to its root");
        }
    }
}
