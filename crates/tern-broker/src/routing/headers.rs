//! The headers exchange's matching: `x-match` modes and how a binding's
//! arguments are compared with a message's headers.
//!
//! Semantics are RabbitMQ's (`rabbit_exchange_type_headers`):
//!
//! - `x-match` is `all` (the default when absent), `any`, `all-with-x` or
//!   `any-with-x`; anything else is refused at bind time.
//! - With `all` and `any`, binding arguments whose names start with `x-` are
//!   not conditions. The `-with-x` modes count them, except `x-match` itself.
//! - An argument whose value is void asks only that the header be present;
//!   any other value asks that the header be present and equal.
//! - `all` needs every condition to hold, so no conditions match every
//!   message; `any` needs one to hold, so no conditions match none.
//! - The routing key plays no part.
//!
//! Equality follows what RabbitMQ compares, which is the decoded value and
//! not the AMQP field type: integers are equal when their values are,
//! whatever width and signedness the clients encoded them with; 32- and
//! 64-bit floats are equal when their values are; a string equals bytes with
//! the same content. An integer never equals a float, and a string never
//! equals a number. Other values (booleans, decimals, timestamps, tables,
//! arrays) must be equal as [`FieldValue`]s.

use crate::error::BrokerError;
use crate::value::{FieldTable, FieldValue};

/// The argument that selects the mode.
const X_MATCH: &str = "x-match";

/// How a headers binding's conditions combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum XMatch {
    /// Every condition must hold; `x-` arguments are not conditions.
    All,
    /// At least one condition must hold; `x-` arguments are not conditions.
    Any,
    /// Every condition must hold, `x-` arguments included.
    AllWithX,
    /// At least one condition must hold, `x-` arguments included.
    AnyWithX,
}

impl XMatch {
    /// The mode a binding's arguments ask for, or why they are invalid.
    pub(crate) fn of(args: &FieldTable) -> Result<XMatch, BrokerError> {
        let invalid = |reason: String| BrokerError::InvalidArgument {
            argument: X_MATCH.to_owned(),
            reason,
        };
        match args.get(X_MATCH) {
            None => Ok(XMatch::All),
            Some(FieldValue::String(mode)) => match mode.as_str() {
                "all" => Ok(XMatch::All),
                "any" => Ok(XMatch::Any),
                "all-with-x" => Ok(XMatch::AllWithX),
                "any-with-x" => Ok(XMatch::AnyWithX),
                other => Err(invalid(format!(
                    "unknown value '{other}'; expected all, any, all-with-x or any-with-x"
                ))),
            },
            Some(other) => Err(invalid(format!(
                "expected a string, got a {} ({other:?})",
                other.type_name()
            ))),
        }
    }

    /// Whether the binding argument with this name is a condition.
    fn counts(self, name: &str) -> bool {
        match self {
            XMatch::All | XMatch::Any => !name.starts_with("x-"),
            XMatch::AllWithX | XMatch::AnyWithX => name != X_MATCH,
        }
    }

    fn needs_all(self) -> bool {
        matches!(self, XMatch::All | XMatch::AllWithX)
    }
}

/// Whether a message with these headers matches a binding with these
/// arguments. The arguments were validated when bound.
pub(crate) fn matches(args: &FieldTable, headers: &FieldTable) -> bool {
    let mode = XMatch::of(args).unwrap_or(XMatch::All);
    let mut conditions = args
        .iter()
        .filter(|(name, _)| mode.counts(name))
        .map(|(name, wanted)| match (wanted, headers.get(name)) {
            (_, None) => false,
            (FieldValue::Void, Some(_)) => true,
            (wanted, Some(got)) => values_match(wanted, got),
        });
    if mode.needs_all() {
        conditions.all(|holds| holds)
    } else {
        conditions.any(|holds| holds)
    }
}

/// Whether a header value equals a binding argument's, as RabbitMQ decides.
fn values_match(wanted: &FieldValue, got: &FieldValue) -> bool {
    if let (Some(a), Some(b)) = (wanted.as_i64(), got.as_i64()) {
        return a == b;
    }
    if let (Some(a), Some(b)) = (as_f64(wanted), as_f64(got)) {
        return a == b;
    }
    if let (Some(a), Some(b)) = (as_bytes(wanted), as_bytes(got)) {
        return a == b;
    }
    wanted == got
}

fn as_f64(v: &FieldValue) -> Option<f64> {
    match *v {
        FieldValue::F32(x) => Some(f64::from(x)),
        FieldValue::F64(x) => Some(x),
        _ => None,
    }
}

fn as_bytes(v: &FieldValue) -> Option<&[u8]> {
    match v {
        FieldValue::String(s) => Some(s.as_bytes()),
        FieldValue::Bytes(b) => Some(b),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::test_support::*;
    use super::super::{Destination, ExchangeKind, RoutingTable};
    use super::*;
    use crate::error::ReplyCode;

    fn headers_table() -> RoutingTable {
        RoutingTable::new(ExchangeKind::Headers)
    }

    fn route(table: &RoutingTable, headers: &FieldTable) -> Vec<Destination> {
        let mut out = Vec::new();
        table.route("ignored", headers, &mut out);
        out
    }

    /// Whether a message with `headers` reaches a queue bound with `args`.
    fn delivers(args: &[(&str, FieldValue)], headers: &[(&str, FieldValue)]) -> bool {
        let mut t = headers_table();
        t.bind(q("q"), "", &table(args)).unwrap();
        let routed = route(&t, &table(headers));
        assert_eq!(routed.is_empty(), !matches(&table(args), &table(headers)));
        !routed.is_empty()
    }

    fn int(v: i32) -> FieldValue {
        FieldValue::I32(v)
    }

    #[test]
    fn all_is_the_default_and_needs_every_argument_to_match() {
        let args = [("format", s("pdf")), ("type", s("report"))];
        assert!(delivers(
            &args,
            &[("format", s("pdf")), ("type", s("report"))]
        ));
        assert!(delivers(
            &args,
            &[
                ("format", s("pdf")),
                ("type", s("report")),
                ("extra", int(1))
            ]
        ));
        assert!(
            !delivers(&args, &[("format", s("pdf"))]),
            "a header is missing"
        );
        assert!(
            !delivers(&args, &[("format", s("pdf")), ("type", s("log"))]),
            "a value differs"
        );
        assert!(!delivers(&args, &[]));

        let explicit = [
            ("x-match", s("all")),
            ("format", s("pdf")),
            ("type", s("report")),
        ];
        assert!(delivers(
            &explicit,
            &[("format", s("pdf")), ("type", s("report"))]
        ));
        assert!(!delivers(&explicit, &[("format", s("pdf"))]));
    }

    #[test]
    fn any_needs_one_argument_to_match() {
        let args = [
            ("x-match", s("any")),
            ("format", s("tiff")),
            ("dpi", int(300)),
        ];
        assert!(delivers(&args, &[("format", s("tiff"))]));
        assert!(delivers(&args, &[("dpi", int(300))]));
        assert!(delivers(&args, &[("format", s("png")), ("dpi", int(300))]));
        assert!(!delivers(&args, &[("format", s("png")), ("dpi", int(72))]));
        assert!(!delivers(&args, &[("other", s("tiff"))]));
        assert!(!delivers(&args, &[]));
    }

    #[test]
    fn all_with_no_conditions_matches_every_message_and_any_matches_none() {
        assert!(delivers(&[], &[]));
        assert!(delivers(&[], &[("a", int(1))]));
        assert!(delivers(&[("x-match", s("all"))], &[]));
        assert!(!delivers(&[("x-match", s("any"))], &[]));
        assert!(!delivers(&[("x-match", s("any"))], &[("a", int(1))]));
        assert!(
            delivers(&[("x-match", s("all-with-x"))], &[]),
            "x-match itself is never a condition"
        );
        assert!(!delivers(
            &[("x-match", s("any-with-x"))],
            &[("x-match", s("any-with-x"))]
        ));
    }

    #[test]
    fn all_and_any_ignore_arguments_starting_with_x_dash() {
        let all = [("x-custom", s("special")), ("format", s("csv"))];
        assert!(
            delivers(&all, &[("format", s("csv"))]),
            "x-custom is not a condition"
        );
        assert!(
            delivers(&[("x-custom", s("special"))], &[]),
            "so all has no conditions left"
        );

        let any = [("x-match", s("any")), ("x-custom", s("special"))];
        assert!(
            !delivers(&any, &[("x-custom", s("special"))]),
            "and any has none to satisfy"
        );
    }

    #[test]
    fn all_with_x_counts_x_dash_arguments_too() {
        let args = [
            ("x-match", s("all-with-x")),
            ("x-custom", s("special")),
            ("format", s("csv")),
        ];
        assert!(!delivers(&args, &[("format", s("csv"))]));
        assert!(delivers(
            &args,
            &[("format", s("csv")), ("x-custom", s("special"))]
        ));
        assert!(!delivers(
            &args,
            &[("format", s("csv")), ("x-custom", s("other"))]
        ));
    }

    #[test]
    fn any_with_x_is_satisfied_by_an_x_dash_argument_alone() {
        let args = [
            ("x-match", s("any-with-x")),
            ("x-custom", s("special")),
            ("format", s("csv")),
        ];
        assert!(delivers(&args, &[("x-custom", s("special"))]));
        assert!(delivers(&args, &[("format", s("csv"))]));
        assert!(!delivers(&args, &[("x-custom", s("other"))]));
    }

    #[test]
    fn a_void_argument_asks_only_that_the_header_be_present() {
        let args = [("trace", FieldValue::Void)];
        assert!(delivers(&args, &[("trace", s("anything"))]));
        assert!(delivers(&args, &[("trace", int(0))]));
        assert!(delivers(&args, &[("trace", FieldValue::Void)]));
        assert!(!delivers(&args, &[("other", s("x"))]));
        assert!(!delivers(&args, &[]));

        let any = [
            ("x-match", s("any")),
            ("trace", FieldValue::Void),
            ("k", s("v")),
        ];
        assert!(delivers(&any, &[("trace", FieldValue::Bool(false))]));
    }

    #[test]
    fn a_non_void_argument_does_not_match_a_void_header() {
        assert!(!delivers(&[("k", s("v"))], &[("k", FieldValue::Void)]));
    }

    #[test]
    fn values_of_different_kinds_never_match() {
        assert!(
            !delivers(&[("n", s("1"))], &[("n", int(1))]),
            "string and integer"
        );
        assert!(
            !delivers(&[("n", int(1))], &[("n", FieldValue::F64(1.0))]),
            "integer and float"
        );
        assert!(
            !delivers(&[("b", FieldValue::Bool(true))], &[("b", int(1))]),
            "boolean and integer"
        );
        assert!(
            !delivers(
                &[("t", FieldValue::Timestamp(5))],
                &[("t", FieldValue::I64(5))]
            ),
            "timestamp"
        );
    }

    #[test]
    fn integers_match_by_value_whatever_width_the_clients_encoded_them_with() {
        assert!(delivers(
            &[("n", FieldValue::I32(300))],
            &[("n", FieldValue::I64(300))]
        ));
        assert!(delivers(
            &[("n", FieldValue::U8(7))],
            &[("n", FieldValue::I16(7))]
        ));
        assert!(delivers(
            &[("n", FieldValue::U32(u32::MAX))],
            &[("n", FieldValue::I64(u32::MAX.into()))]
        ));
        assert!(!delivers(
            &[("n", FieldValue::I8(-1))],
            &[("n", FieldValue::U8(255))]
        ));
    }

    #[test]
    fn floats_match_by_value_whatever_their_precision() {
        assert!(delivers(
            &[("f", FieldValue::F32(1.5))],
            &[("f", FieldValue::F64(1.5))]
        ));
        assert!(
            !delivers(
                &[("f", FieldValue::F32(0.1))],
                &[("f", FieldValue::F64(0.1))]
            ),
            "0.1f32 is not 0.1f64"
        );
    }

    #[test]
    fn strings_match_bytes_with_the_same_content() {
        let bytes = FieldValue::Bytes(Bytes::from_static(b"pdf"));
        assert!(delivers(&[("f", s("pdf"))], &[("f", bytes.clone())]));
        assert!(delivers(&[("f", bytes)], &[("f", s("pdf"))]));
        assert!(
            !delivers(&[("f", s("pdf"))], &[("f", s("PDF"))]),
            "byte for byte, case included"
        );
    }

    #[test]
    fn nested_values_match_when_equal() {
        let array = FieldValue::Array(vec![s("a"), int(1)]);
        assert!(delivers(&[("v", array.clone())], &[("v", array)]));
        assert!(!delivers(
            &[("v", FieldValue::Array(vec![s("a")]))],
            &[("v", FieldValue::Array(vec![s("b")]))]
        ));
    }

    #[test]
    fn the_routing_key_plays_no_part() {
        let mut t = headers_table();
        t.bind(q("a"), "some.key", &table(&[("h", s("1"))]))
            .unwrap();
        let mut out = Vec::new();
        t.route("another.key", &table(&[("h", s("1"))]), &mut out);
        assert_eq!(out, vec![q("a")]);
    }

    #[test]
    fn a_queue_matched_by_several_of_its_bindings_gets_the_message_once() {
        let mut t = headers_table();
        t.bind(q("a"), "", &table(&[("h", s("1"))])).unwrap();
        t.bind(
            q("a"),
            "",
            &table(&[("x-match", s("any")), ("h", s("1")), ("k", s("2"))]),
        )
        .unwrap();
        t.bind(q("a"), "other", &table(&[("h", s("1"))])).unwrap();
        t.bind(q("b"), "", &table(&[("h", s("2"))])).unwrap();
        t.bind(x("e"), "", &no_args()).unwrap();
        assert_eq!(route(&t, &table(&[("h", s("1"))])), vec![q("a"), x("e")]);
        assert_eq!(route(&t, &table(&[("h", s("2"))])), vec![q("b"), x("e")]);
    }

    #[test]
    fn unbinding_needs_the_same_arguments_and_removes_only_that_binding() {
        let mut t = headers_table();
        let pdf = table(&[("format", s("pdf"))]);
        let any_pdf = table(&[("x-match", s("any")), ("format", s("pdf"))]);
        t.bind(q("a"), "", &pdf).unwrap();
        t.bind(q("a"), "", &any_pdf).unwrap();
        assert!(!t.unbind(&q("a"), "", &no_args()));
        assert!(t.unbind(&q("a"), "", &pdf));
        assert_eq!(t.bindings(), vec![(q("a"), String::new(), any_pdf)]);
        assert_eq!(route(&t, &table(&[("format", s("pdf"))])), vec![q("a")]);
    }

    #[test]
    fn an_unknown_x_match_value_is_refused_at_bind_time_with_406() {
        let mut t = headers_table();
        let err = t
            .bind(q("a"), "", &table(&[("x-match", s("some"))]))
            .unwrap_err();
        assert_eq!(err.reply_code(), ReplyCode::PreconditionFailed);
        let BrokerError::InvalidArgument { argument, reason } = &err else {
            panic!("wrong error: {err:?}")
        };
        assert_eq!(argument, "x-match");
        assert!(reason.contains("'some'"), "{reason}");
        assert!(t.is_empty(), "nothing was bound");

        assert!(
            t.bind(q("a"), "", &table(&[("x-match", s("ALL"))]))
                .is_err(),
            "values are case-sensitive"
        );
    }

    #[test]
    fn a_non_string_x_match_is_refused_at_bind_time_with_406() {
        let mut t = headers_table();
        for bad in [
            int(1),
            FieldValue::Bool(true),
            FieldValue::Void,
            FieldValue::Bytes(Bytes::from_static(b"all")),
        ] {
            let err = t
                .bind(q("a"), "", &table(&[("x-match", bad.clone())]))
                .unwrap_err();
            assert_eq!(err.reply_code(), ReplyCode::PreconditionFailed, "{bad:?}");
            assert!(
                matches!(&err, BrokerError::InvalidArgument { argument, .. } if argument == "x-match")
            );
        }
        assert!(t.is_empty());
    }

    #[test]
    fn every_valid_x_match_value_is_accepted() {
        let mut t = headers_table();
        for mode in ["all", "any", "all-with-x", "any-with-x"] {
            assert_eq!(
                t.bind(q("a"), "", &table(&[("x-match", s(mode))])),
                Ok(true),
                "{mode}"
            );
        }
    }

    #[test]
    fn thousands_of_bindings_route_correctly() {
        let mut t = headers_table();
        for i in 0..3000 {
            let args = table(&[
                ("x-match", s("any")),
                ("id", int(i)),
                ("group", int(i % 10)),
            ]);
            t.bind(q(&format!("q{i}")), "", &args).unwrap();
        }
        let mut out = route(&t, &table(&[("id", int(1234))]));
        assert_eq!(out, vec![q("q1234")]);
        out = route(&t, &table(&[("group", int(3))]));
        assert_eq!(out.len(), 300);
        assert!(out.contains(&q("q2993")));
        assert!(route(&t, &table(&[("id", int(5000))])).is_empty());
    }
}
