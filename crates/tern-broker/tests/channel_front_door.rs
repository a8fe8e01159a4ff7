//! The channel methods that exist for front doors' transactions and direct
//! reply-to: `unacked_tags` reads what an ack would settle without settling
//! it, and `next_delivery_tag` numbers a delivery made outside any queue in
//! the same sequence as queue deliveries.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::time::Duration;

use bytes::Bytes;
use tern_broker::*;

async fn next_delivery(ch: &mut Channel) -> Delivery {
    match tokio::time::timeout(Duration::from_secs(5), ch.recv()).await {
        Ok(Some(ChannelEvent::Delivery(d))) => d,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_tags_names_what_an_ack_would_settle_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    broker
        .declare_queue("/", QueueDeclare::new("q"), conn)
        .await
        .unwrap();
    for i in 0..4 {
        let message = Message {
            exchange: ExchangeName::new("").unwrap(),
            routing_key: "q".into(),
            properties: Properties::default(),
            body: Bytes::from(format!("m{i}")),
        };
        broker
            .publish("/", message)
            .unwrap()
            .confirmed()
            .await
            .unwrap();
    }
    let mut ch = broker.open_channel("/", conn).unwrap();
    ch.consume("q", ConsumeOptions::default()).unwrap();
    let mut tags = Vec::new();
    for _ in 0..4 {
        tags.push(next_delivery(&mut ch).await.tag);
    }
    ch.ack(tags[1], false).unwrap();

    assert_eq!(ch.unacked_tags(tags[2], false).unwrap(), vec![tags[2]]);
    assert_eq!(
        ch.unacked_tags(tags[2], true).unwrap(),
        vec![tags[0], tags[2]]
    );
    assert_eq!(
        ch.unacked_tags(DeliveryTag(0), true).unwrap(),
        vec![tags[0], tags[2], tags[3]]
    );
    // Settled and never-given tags are unknown, as for ack: 406.
    for unknown in [tags[1], DeliveryTag(99)] {
        let err = ch.unacked_tags(unknown, false).unwrap_err();
        assert_eq!(err.reply_code() as u16, 406, "{err}");
        assert!(ch.unacked_tags(unknown, true).is_err());
    }
    // Nothing was settled by asking.
    let info = broker.queue_info("/", "q").unwrap();
    assert_eq!((info.ready, info.unacked), (0, 3));

    // A delivery made outside the queue takes the next tag; the queue's next
    // delivery comes after it.
    let own = ch.next_delivery_tag();
    assert_eq!(own, DeliveryTag(tags[3].0 + 1));
    ch.nack(tags[0], false, true).unwrap();
    let again = next_delivery(&mut ch).await;
    assert_eq!(again.tag, DeliveryTag(own.0 + 1));
    // The outside delivery is never unacked.
    assert!(ch.ack(own, false).is_err());
}
