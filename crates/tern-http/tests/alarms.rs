//! Resource alarms as operators see them: `GET /api/overview` lists the
//! raised ones, and `/metrics` has `tern_alarm_active{resource}` at 1 while
//! raised and 0 otherwise, one sample per resource.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod common;

use common::TestServer;
use prometheus_parse::{Scrape, Value};
use serde_json::json;
use tern_broker::alarm::Resource;

async fn alarm_gauges(t: &TestServer) -> Vec<(String, f64)> {
    let reply = t.client.with_auth(None).get("/metrics").await;
    reply.expect(200);
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let mut gauges: Vec<(String, f64)> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "tern_alarm_active")
        .map(|s| {
            let Value::Gauge(v) = s.value else {
                panic!("tern_alarm_active is not a gauge: {:?}", s.value)
            };
            (s.labels.get("resource").unwrap().to_string(), v)
        })
        .collect();
    gauges.sort_by(|a, b| a.0.cmp(&b.0));
    gauges
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_show_in_the_overview_and_the_metrics() {
    let t = TestServer::start().await;
    let overview = t.client.get("/api/overview").await.expect(200).json();
    assert_eq!(overview["alarms"], json!([]));
    assert_eq!(
        alarm_gauges(&t).await,
        [("disk".to_string(), 0.0), ("memory".to_string(), 0.0)]
    );

    t.broker.alarms().set(Resource::Disk, true);
    let overview = t.client.get("/api/overview").await.expect(200).json();
    assert_eq!(overview["alarms"], json!(["disk"]));
    assert_eq!(
        alarm_gauges(&t).await,
        [("disk".to_string(), 1.0), ("memory".to_string(), 0.0)]
    );

    t.broker.alarms().set(Resource::Memory, true);
    let overview = t.client.get("/api/overview").await.expect(200).json();
    assert_eq!(overview["alarms"], json!(["memory", "disk"]));

    t.broker.alarms().set(Resource::Disk, false);
    t.broker.alarms().set(Resource::Memory, false);
    let overview = t.client.get("/api/overview").await.expect(200).json();
    assert_eq!(overview["alarms"], json!([]));
    assert_eq!(
        alarm_gauges(&t).await,
        [("disk".to_string(), 0.0), ("memory".to_string(), 0.0)]
    );
}
