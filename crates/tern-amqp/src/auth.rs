//! SASL at `connection.start-ok`: the user and password out of a PLAIN or
//! AMQPLAIN response, and RabbitMQ's refusal text. The check itself is the
//! broker's (`Broker::authenticate`).

use amq_protocol::types::parsing::parse_field_table;
use amq_protocol::types::AMQPValue;

/// The mechanisms offered in `connection.start`, as RabbitMQ lists them.
pub(crate) const MECHANISMS: &str = "PLAIN AMQPLAIN";

/// The user and password a client sent, if the mechanism is one we offer
/// and the response is well formed.
pub(crate) fn credentials(mechanism: &str, response: &[u8]) -> Option<(String, String)> {
    match mechanism {
        "PLAIN" => plain(response),
        "AMQPLAIN" => amqplain(response),
        _ => None,
    }
}

/// The text of a refused login, RabbitMQ's: it says nothing about why, so
/// a client cannot tell an unknown user from a wrong password.
pub(crate) fn refused_text(mechanism: &str) -> String {
    // The mechanism is the client's; keep it printable and short.
    let mechanism: String = mechanism
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(32)
        .collect();
    format!(
        "Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
    )
}

/// PLAIN: `authzid NUL user NUL password`.
fn plain(response: &[u8]) -> Option<(String, String)> {
    let mut parts = response.split(|b| *b == 0);
    let _authzid = parts.next()?;
    let user = parts.next()?;
    let password = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    Some((
        String::from_utf8(user.to_vec()).ok()?,
        String::from_utf8(password.to_vec()).ok()?,
    ))
}

/// AMQPLAIN: a field table with `LOGIN` and `PASSWORD`, without the
/// table's length prefix.
fn amqplain(response: &[u8]) -> Option<(String, String)> {
    let len = u32::try_from(response.len()).ok()?;
    let mut framed = Vec::with_capacity(response.len() + 4);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(response);
    let (rest, table) = parse_field_table(&framed[..]).ok()?;
    if !rest.is_empty() {
        return None;
    }
    let text = |key: &str| match table.inner().iter().find(|(k, _)| k.as_str() == key)?.1 {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    };
    Some((text("LOGIN")?, text("PASSWORD")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::auth::{Credentials, SASLMechanism};

    #[test]
    fn plain_responses() {
        assert_eq!(
            credentials("PLAIN", b"\0bob\0pw"),
            Some(("bob".into(), "pw".into()))
        );
        assert_eq!(credentials("PLAIN", b"bob"), None);
        assert_eq!(credentials("PLAIN", b"\0bob\0pw\0x"), None);
        assert_eq!(credentials("PLAIN", b"\0\xff\0pw"), None);
        assert_eq!(credentials("EXTERNAL", b"\0bob\0pw"), None);
    }

    #[test]
    fn amqplain_responses_as_a_client_writes_them() {
        let c = Credentials::new("bob".into(), "p\0w".into());
        let response = c.sasl_auth_string(SASLMechanism::AMQPlain);
        assert_eq!(
            credentials("AMQPLAIN", response.as_bytes()),
            Some(("bob".into(), "p\0w".into()))
        );
        assert_eq!(credentials("AMQPLAIN", b""), None);
        assert_eq!(credentials("AMQPLAIN", &response.as_bytes()[1..]), None);
    }

    #[test]
    fn the_refusal_names_the_mechanism_only() {
        assert_eq!(
            refused_text("PLAIN"),
            "Login was refused using authentication mechanism PLAIN. For details see the broker logfile."
        );
        assert!(!refused_text("a\nb").contains('\n'));
    }
}
