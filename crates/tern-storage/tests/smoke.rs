//! Quick end-to-end checks of the public API.
use std::time::Duration;
use tern_storage::*;

fn msg(i: u64) -> Message {
    Message {
        timestamp: Timestamp(1000 + i),
        headers: format!("h{i}").into(),
        body: vec![(i % 251) as u8; (i % 3000) as usize].into(),
    }
}

#[test]
fn appends_survive_reopen_under_every_policy() {
    let dir = tempfile::tempdir().unwrap();
    for (name, d) in [
        ("always", Durability::Always),
        ("never", Durability::Never),
        ("interval", Durability::Interval(Duration::from_millis(5))),
    ] {
        let cfg = LogConfig {
            segment_bytes: 64 * 1024,
            ..LogConfig::with_durability(d)
        };
        {
            let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
            let log = store.open_log(name, cfg.clone()).unwrap();
            let mut pending = Vec::new();
            for i in 0..500u64 {
                pending.push(log.append(&[msg(i)]).unwrap());
            }
            for (i, p) in pending.into_iter().enumerate() {
                assert_eq!(p.wait().unwrap().start, Offset(i as u64));
            }
            assert!(log.segment_count() > 1, "{name} should have rolled");
            store.close().unwrap();
        }
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let log = store.open_log(name, cfg).unwrap();
        assert_eq!(log.end(), Offset(500), "{name}");
        let mut r = log.reader(Offset(0)).unwrap();
        let mut all = Vec::new();
        loop {
            let batch = r.read(77, 100_000).unwrap();
            if batch.is_empty() {
                break;
            }
            all.extend(batch);
        }
        assert_eq!(all.len(), 500, "{name}");
        for (i, rec) in all.iter().enumerate() {
            let m = msg(i as u64);
            assert_eq!(rec.offset, Offset(i as u64));
            assert_eq!(rec.body, m.body);
            assert_eq!(rec.headers, m.headers);
        }
        let r = log.reader_at_time(Timestamp(1250)).unwrap();
        assert_eq!(r.position(), Offset(250));
        let mut r = log.reader(Offset(321)).unwrap();
        assert_eq!(r.read(1, 1).unwrap()[0].offset, Offset(321));
        store.close().unwrap();
    }
}
