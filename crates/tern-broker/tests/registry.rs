//! The registry of connections, channels and consumers follows what
//! happens to them: channels appear on open and go on close or drop,
//! consumers go on cancel, on their channel's close and when the broker
//! cancels them (queue deleted); a registered connection is listed until
//! its handle drops, and a close request reaches the handle with its
//! reason.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::time::Duration;

use tern_broker::{
    AckMode, Broker, BrokerConfig, ChannelEvent, ConnectionMeta, ConnectionTraffic, ConsumeOptions,
    QueueDeclare,
};

fn meta(port: u16) -> ConnectionMeta {
    ConnectionMeta {
        peer: format!("127.0.0.1:{port}").parse().unwrap(),
        local: "127.0.0.1:5672".parse().unwrap(),
        user: "guest".into(),
        vhost: "/".into(),
        protocol: "test".into(),
        traffic: ConnectionTraffic::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lists_the_bytes_its_front_door_counted() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let m = meta(4100);
    let traffic = m.traffic.clone();
    traffic.add_received(8);
    let _handle = broker.register_connection(broker.new_connection_id(), m);
    traffic.add_received(300);
    traffic.add_sent(42);
    let c = &broker.connections()[0];
    assert_eq!((c.received_bytes, c.sent_bytes), (308, 42));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_follows_connections_channels_and_consumers() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let conn = broker.new_connection_id();
    let mut handle = broker.register_connection(conn, meta(4000));
    let other = broker.register_connection(broker.new_connection_id(), meta(4001));
    let names: Vec<String> = broker.connections().into_iter().map(|c| c.name).collect();
    assert_eq!(
        names,
        [
            "127.0.0.1:4000 -> 127.0.0.1:5672",
            "127.0.0.1:4001 -> 127.0.0.1:5672"
        ]
    );
    for q in ["a", "b"] {
        broker
            .declare_queue("/", QueueDeclare::new(q), conn)
            .await
            .unwrap();
    }

    let mut ch1 = broker.open_channel("/", conn).unwrap();
    ch1.set_number(1);
    ch1.qos(7, false);
    let ch2 = broker.open_channel("/", conn).unwrap();
    assert_eq!(broker.connections()[0].channels, 2);
    let t1 = ch1.consume("a", ConsumeOptions::default()).unwrap();
    let t2 = ch1
        .consume(
            "b",
            ConsumeOptions {
                no_ack: true,
                ..ConsumeOptions::default()
            },
        )
        .unwrap();
    let consumers = broker.consumers(None).unwrap();
    assert_eq!(consumers.len(), 2);
    assert_eq!(consumers[0].tag, t1);
    assert_eq!(consumers[0].prefetch, 7);
    assert_eq!(consumers[0].ack_mode, AckMode::Manual);
    assert_eq!(consumers[1].ack_mode, AckMode::Auto);
    assert_eq!(
        consumers[0].connection_name.as_deref(),
        Some("127.0.0.1:4000 -> 127.0.0.1:5672")
    );
    assert!(broker.consumers(Some("nope")).is_err());
    let channels = broker.channels();
    let numbered = channels.iter().find(|c| c.number == Some(1)).unwrap();
    assert_eq!(numbered.consumers, 2);

    // Cancel takes one out; deleting its queue takes the other out once
    // the channel sees the cancellation.
    assert!(ch1.cancel(&t1));
    assert_eq!(broker.consumers(None).unwrap().len(), 1);
    broker
        .delete_queue("/", "b", false, false, conn)
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), ch1.recv())
        .await
        .unwrap();
    assert!(matches!(event, Some(ChannelEvent::Cancelled { consumer_tag }) if consumer_tag == t2));
    assert!(broker.consumers(None).unwrap().is_empty());

    // Closing and dropping channels unregisters them and their consumers.
    ch1.consume("a", ConsumeOptions::default()).unwrap();
    ch1.close();
    drop(ch2);
    assert!(broker.channels().is_empty());
    assert!(broker.consumers(None).unwrap().is_empty());
    assert_eq!(broker.connections()[0].channels, 0);

    // A close request reaches the handle; unknown names are refused.
    assert!(!broker.close_connection("nobody", "x"));
    assert!(broker.close_connection("127.0.0.1:4000 -> 127.0.0.1:5672", "maintenance"));
    let reason = tokio::time::timeout(Duration::from_secs(5), handle.close_requested())
        .await
        .unwrap();
    assert_eq!(reason, "maintenance");
    drop(handle);
    drop(other);
    assert!(broker.connections().is_empty());
}
