//! The `Channel` object through the public runtime API: ids, resume, gaps, idempotency,
//! hibernation with connected subscribers, slow consumers and fan-out, asserted as the exact
//! frames a client reads.

mod support;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use dormouse_actors::channel::{
    ChannelInfo, ChannelRequest, ChannelResponse, ChannelSettings, NewMessage, Published, Start,
};
use dormouse_runtime::storage::{
    Durability, MemoryStorage, SegmentConfig, SegmentStorage, Storage,
};
use dormouse_runtime::{ObjectState, Outbound, Socket, Transport};
use support::{
    Frame, ROOMY, Subscriber, assert_consecutive, channels, channels_on, delete, gap, history, id,
    info, keyed, message, page_frames, publish, publish_each, subscribe, subscribe_bounded, text,
    until_hibernated,
};

const IDLE: Duration = Duration::from_millis(20);
const AWAKE: Duration = Duration::from_secs(600);
const TRANSPORTS: [Transport; 4] = [
    Transport::Sse,
    Transport::WebSocket,
    Transport::WebSocketBinary,
    Transport::SseMulti,
];

fn payloads(range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

/// The frames of `payloads` published with `ids`, in order.
fn messages(ids: &[String], payloads: &[String]) -> Vec<Frame> {
    assert_eq!(ids.len(), payloads.len());
    ids.iter()
        .zip(payloads)
        .map(|(id, p)| message(id, p))
        .collect()
}

/// Size of an event's stored record (version, flags, name length, name, payload): what the
/// log, and so `ChannelInfo::bytes`, counts.
fn record_len(event: &str, data: &str) -> u64 {
    (3 + event.len() + data.len()) as u64
}

#[tokio::test]
async fn published_events_get_consecutive_ids_of_one_epoch_and_info_describes_them() {
    let ns = channels(AWAKE);
    let empty = ChannelInfo {
        last_id: None,
        earliest_id: None,
        events: 0,
        bytes: 0,
        subscribers: 0,
    };
    assert_eq!(info(&ns, "room").await, empty);

    let results = publish(&ns, "room", vec![text("one"), text("two"), text("three")]).await;
    assert!(results.iter().all(|r| !r.duplicate), "{results:?}");
    let ids: Vec<String> = results.into_iter().map(|r| r.id).collect();
    let epoch = assert_consecutive(&ids, 1);

    let _watcher = subscribe(&ns, "room", Transport::Sse, Start::Live).await;
    assert_eq!(
        info(&ns, "room").await,
        ChannelInfo {
            last_id: Some(ids[2].clone()),
            earliest_id: Some(ids[0].clone()),
            events: 3,
            bytes: record_len("message", "one")
                + record_len("message", "two")
                + record_len("message", "three"),
            subscribers: 1,
        }
    );

    // The next request continues the same sequence in the same epoch.
    let next = publish_each(&ns, "room", &["four".to_string()]).await;
    assert_eq!(next, [format!("{epoch:x}-4")]);
    // Another channel has its own sequence.
    let other = publish_each(&ns, "other", &["x".to_string()]).await;
    assert_eq!(id(&other[0]).seq, 1);
}

#[tokio::test]
async fn resuming_after_an_id_replays_the_rest_then_goes_live_without_duplicates() {
    for transport in TRANSPORTS {
        let ns = channels(AWAKE);
        let first = payloads(1..=3);
        let ids = publish_each(&ns, "resume", &first).await;

        let mut sub = subscribe(&ns, "resume", transport, Start::After(id(&ids[0]))).await;
        assert_eq!(
            sub.drain(),
            messages(&ids[1..], &first[1..]),
            "{transport:?}"
        );

        let live = payloads(4..=5);
        let live_ids = publish_each(&ns, "resume", &live).await;
        assert_eq!(sub.drain(), messages(&live_ids, &live), "{transport:?}");

        // A client already at the newest id gets neither backlog nor gap.
        let mut caught_up =
            subscribe(&ns, "resume", transport, Start::After(id(&live_ids[1]))).await;
        assert_eq!(caught_up.drain(), []);
        let last = publish_each(&ns, "resume", &["m6".to_string()]).await;
        assert_eq!(caught_up.drain(), [message(&last[0], "m6")]);
        assert_eq!(sub.drain(), [message(&last[0], "m6")]);
        let mut all = ids.clone();
        all.extend(live_ids.iter().cloned());
        all.extend(last.iter().cloned());
        assert_consecutive(&all, 1);
    }
}

/// A publish enqueued right before or right after a subscribe: the event arrives exactly once,
/// either in the backlog or live, never both and never neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_racing_a_subscribe_is_delivered_exactly_once() {
    let ns = channels(AWAKE);
    let ids = publish_each(&ns, "race", &payloads(1..=2)).await;
    let cursor = Start::After(id(&ids[0]));

    let (before, mut rx_before) = Socket::new(Transport::Sse, ROOMY, Bytes::new());
    let (after, mut rx_after) = Socket::new(Transport::WebSocket, ROOMY, Bytes::new());
    // Requests are enqueued when `call` returns its future, so this is the handling order.
    let p3 = ns.call("race", ChannelRequest::Publish(vec![text("m3")]));
    let s1 = ns.call(
        "race",
        ChannelRequest::Subscribe {
            socket: before,
            start: cursor,
        },
    );
    let p4 = ns.call("race", ChannelRequest::Publish(vec![text("m4")]));
    let s2 = ns.call(
        "race",
        ChannelRequest::Subscribe {
            socket: after,
            start: cursor,
        },
    );
    let (p3, p4) = (p3.await.unwrap(), p4.await.unwrap());
    s1.await.unwrap();
    s2.await.unwrap();
    let published_id = |response| match response {
        ChannelResponse::Published(r) => r[0].id.clone(),
        other => panic!("{other:?}"),
    };
    let (id3, id4) = (published_id(p3), published_id(p4));
    let expected = vec![
        message(&ids[1], "m2"),
        message(&id3, "m3"),
        message(&id4, "m4"),
    ];
    for (transport, rx) in [
        (Transport::Sse, &mut rx_before),
        (Transport::WebSocket, &mut rx_after),
    ] {
        let mut frames = Vec::new();
        while let Some(outbound) = rx.try_recv() {
            frames.push(support::decode(transport, outbound));
        }
        assert_eq!(frames, expected, "{transport:?}");
    }
}

#[tokio::test]
async fn live_starts_with_new_events_and_oldest_reads_everything_retained() {
    let ns = channels(AWAKE);
    let old = payloads(1..=2);
    let old_ids = publish_each(&ns, "c", &old).await;

    let mut live = subscribe(&ns, "c", Transport::WebSocket, Start::Live).await;
    assert_eq!(live.drain(), []);
    let new = payloads(3..=3);
    let new_ids = publish_each(&ns, "c", &new).await;
    assert_eq!(live.drain(), messages(&new_ids, &new));

    let all_ids: Vec<String> = old_ids.iter().chain(&new_ids).cloned().collect();
    let all: Vec<String> = old.iter().chain(&new).cloned().collect();
    let page = history(&ns, "c", Start::Oldest, 100).await;
    assert_eq!(page_frames(&page), messages(&all_ids, &all));
    let page = history(&ns, "c", Start::Oldest, 2).await;
    assert_eq!(page_frames(&page), messages(&all_ids[..2], &all[..2]));
    let page = history(&ns, "c", Start::Live, 100).await;
    assert_eq!(page_frames(&page), []);
    let page = history(&ns, "c", Start::After(id(&all_ids[1])), 100).await;
    assert_eq!(page_frames(&page), messages(&all_ids[2..], &all[2..]));

    let mut oldest = subscribe(&ns, "c", Transport::Sse, Start::Oldest).await;
    assert_eq!(oldest.drain(), messages(&all_ids, &all));

    // History of a channel nobody published to.
    assert_eq!(
        page_frames(&history(&ns, "empty", Start::Oldest, 10).await),
        []
    );
}

#[tokio::test]
async fn a_cursor_older_than_the_buffer_gets_a_trimmed_gap_then_the_oldest_retained() {
    let settings = ChannelSettings {
        max_events: 5,
        ..ChannelSettings::default()
    };
    let ns = channels_on(Arc::new(MemoryStorage::new()), AWAKE, 1 << 20, settings);
    let sent = payloads(1..=20);
    let ids = publish_each(&ns, "t", &sent).await;
    assert_consecutive(&ids, 1);
    let described = info(&ns, "t").await;
    assert_eq!(
        (described.events, described.earliest_id, described.last_id),
        (5, Some(ids[15].clone()), Some(ids[19].clone()))
    );

    let mut expected = vec![gap("trimmed", Some(&ids[15]), Some(&ids[1]))];
    expected.extend(messages(&ids[15..], &sent[15..]));
    for transport in TRANSPORTS {
        let mut sub = subscribe(&ns, "t", transport, Start::After(id(&ids[1]))).await;
        assert_eq!(sub.drain(), expected, "{transport:?}");
    }
    let page = history(&ns, "t", Start::After(id(&ids[1])), 100).await;
    assert_eq!(page_frames(&page), expected);

    // The event right before the oldest retained: nothing was lost, so no gap.
    let mut exact = subscribe(&ns, "t", Transport::Sse, Start::After(id(&ids[14]))).await;
    assert_eq!(exact.drain(), messages(&ids[15..], &sent[15..]));

    // Live events follow the backlog.
    let more = publish_each(&ns, "t", &payloads(21..=21)).await;
    assert_eq!(exact.drain(), [message(&more[0], "m21")]);
}

#[tokio::test]
async fn a_cursor_from_a_deleted_channel_gets_an_epoch_changed_gap_then_the_new_events() {
    let ns = channels(AWAKE);
    let old_ids = publish_each(&ns, "d", &payloads(1..=3)).await;
    let old_epoch = assert_consecutive(&old_ids, 1);
    let mut watcher = subscribe(&ns, "d", Transport::WebSocket, Start::Live).await;

    delete(&ns, "d").await;
    assert_eq!(watcher.drain(), [gap("deleted", None, None)]);
    assert_eq!(
        info(&ns, "d").await,
        ChannelInfo {
            last_id: None,
            earliest_id: None,
            events: 0,
            bytes: 0,
            subscribers: 1,
        }
    );
    // Before anything new is published, the old cursor finds nothing, and says why.
    let page = history(&ns, "d", Start::After(id(&old_ids[1])), 10).await;
    assert_eq!(
        page_frames(&page),
        [gap("epoch_changed", None, Some(&old_ids[1]))]
    );

    let new = vec!["fresh1".to_string(), "fresh2".to_string()];
    let new_ids = publish_each(&ns, "d", &new).await;
    let new_epoch = assert_consecutive(&new_ids, 1);
    assert!(new_epoch > old_epoch, "{new_epoch:x} after {old_epoch:x}");
    assert_eq!(watcher.drain(), messages(&new_ids, &new));

    let mut expected = vec![gap("epoch_changed", Some(&new_ids[0]), Some(&old_ids[1]))];
    expected.extend(messages(&new_ids, &new));
    for transport in TRANSPORTS {
        let mut resumed = subscribe(&ns, "d", transport, Start::After(id(&old_ids[1]))).await;
        assert_eq!(resumed.drain(), expected, "{transport:?}");
    }
}

#[tokio::test]
async fn a_cursor_beyond_the_last_event_gets_an_unknown_id_gap_and_no_backlog() {
    let ns = channels(AWAKE);
    let ids = publish_each(&ns, "u", &payloads(1..=3)).await;
    let epoch = assert_consecutive(&ids, 1);
    for (transport, seq) in [(Transport::Sse, 4), (Transport::WebSocket, 1000)] {
        let beyond = format!("{epoch:x}-{seq}");
        let mut sub = subscribe(&ns, "u", transport, Start::After(id(&beyond))).await;
        assert_eq!(
            sub.drain(),
            [gap("unknown_id", None, Some(&beyond))],
            "{transport:?}"
        );
        let page = history(&ns, "u", Start::After(id(&beyond)), 10).await;
        assert_eq!(page_frames(&page), [gap("unknown_id", None, Some(&beyond))]);
        // It continues with new events.
        let next = publish_each(&ns, "u", &[format!("after {seq}")]).await;
        assert_eq!(sub.drain(), [message(&next[0], &format!("after {seq}"))]);
    }
}

#[tokio::test(start_paused = true)]
async fn a_repeated_idempotency_key_returns_the_first_id_and_stores_once() {
    let ns = channels(IDLE);
    let mut sub = subscribe(&ns, "i", Transport::Sse, Start::Live).await;
    let first = publish(&ns, "i", vec![keyed("charge 1", "k1")]).await;
    assert!(!first[0].duplicate);
    let epoch = assert_consecutive(&[first[0].id.clone()], 1);
    let retry = publish(&ns, "i", vec![keyed("charge 1 (retried)", "k1")]).await;
    assert_eq!(
        retry,
        [Published {
            id: first[0].id.clone(),
            duplicate: true
        }]
    );
    assert_eq!(info(&ns, "i").await.events, 1);
    assert_eq!(sub.drain(), [message(&first[0].id, "charge 1")]);

    // The key is in storage, not only in the activation's memory.
    until_hibernated(&ns, "i").await;
    let after_wake = publish(&ns, "i", vec![keyed("charge 1 (again)", "k1")]).await;
    assert_eq!(after_wake, retry);
    assert_eq!(ns.stats().wakes_total, 1);
    assert_eq!(sub.drain(), []);

    let other = publish(&ns, "i", vec![keyed("charge 2", "k2")]).await;
    assert_eq!(
        other,
        [Published {
            id: format!("{epoch:x}-2"),
            duplicate: false
        }]
    );
    assert_eq!(info(&ns, "i").await.events, 2);
}

#[tokio::test]
async fn a_key_repeated_inside_one_batch_is_stored_once() {
    let ns = channels(AWAKE);
    let mut sub = subscribe(&ns, "b", Transport::WebSocket, Start::Live).await;
    let results = publish(
        &ns,
        "b",
        vec![keyed("a", "same"), keyed("a", "same"), text("b")],
    )
    .await;
    let epoch = id(&results[0].id).epoch;
    let published = |seq: u64, duplicate| Published {
        id: format!("{epoch:x}-{seq}"),
        duplicate,
    };
    assert_eq!(
        results,
        [published(1, false), published(1, true), published(2, false)]
    );
    let expected = [message(&results[0].id, "a"), message(&results[2].id, "b")];
    assert_eq!(sub.drain(), expected);
    assert_eq!(info(&ns, "b").await.events, 2);
    assert_eq!(
        page_frames(&history(&ns, "b", Start::Oldest, 10).await),
        expected
    );

    // A batch made only of duplicates stores and sends nothing.
    let again = publish(&ns, "b", vec![keyed("a", "same")]).await;
    assert_eq!(again, [published(1, true)]);
    assert_eq!(sub.drain(), []);
    assert_eq!(info(&ns, "b").await.events, 2);
}

#[tokio::test(start_paused = true)]
async fn subscribers_stay_connected_across_hibernation_and_leaving_does_not_wake() {
    let ns = channels(IDLE);
    let mut subs = Vec::new();
    for transport in [Transport::Sse, Transport::WebSocket, Transport::Sse] {
        subs.push(subscribe(&ns, "h", transport, Start::Live).await);
    }
    assert_eq!(ns.parked_sockets("h"), None, "active objects park nothing");

    until_hibernated(&ns, "h").await;
    assert_eq!(ns.parked_sockets("h"), Some(3));
    let stats = ns.stats();
    assert_eq!(
        (stats.active, stats.hibernated, stats.wakes_total),
        (0, 1, 0)
    );

    let ids = publish_each(&ns, "h", &["while asleep".to_string()]).await;
    assert_eq!(ns.stats().wakes_total, 1);
    for sub in &mut subs {
        assert_eq!(
            sub.drain(),
            [message(&ids[0], "while asleep")],
            "{:?}",
            sub.transport
        );
    }

    until_hibernated(&ns, "h").await;
    assert_eq!(ns.parked_sockets("h"), Some(3));
    drop(subs.pop());
    assert_eq!(ns.parked_sockets("h"), Some(2));
    // A client leaving costs the hibernated object nothing: it stays asleep.
    tokio::time::sleep(IDLE * 10).await;
    assert_eq!(ns.state("h"), ObjectState::Hibernated);
    let stats = ns.stats();
    assert_eq!(
        (stats.active, stats.hibernated, stats.wakes_total),
        (0, 1, 1)
    );

    let next = publish_each(&ns, "h", &["after one left".to_string()]).await;
    assert_eq!(ns.stats().wakes_total, 2);
    for sub in &mut subs {
        assert_eq!(sub.drain(), [message(&next[0], "after one left")]);
    }
    assert_eq!(info(&ns, "h").await.subscribers, 2);
    assert_consecutive(&[ids[0].clone(), next[0].clone()], 1);
}

/// After a wake the channel rebuilds its in-memory tail from the log. With a 100-byte tail
/// only the newest event fits, so older replay must come from storage; with 1 MiB all fit.
#[tokio::test(start_paused = true)]
async fn a_woken_channel_replays_from_its_reloaded_tail_and_from_storage() {
    for memory_tail_bytes in [100, 1 << 20] {
        let ns = channels_on(
            Arc::new(MemoryStorage::new()),
            IDLE,
            memory_tail_bytes,
            ChannelSettings::default(),
        );
        let sent = payloads(1..=10);
        let ids = publish_each(&ns, "w", &sent).await;
        until_hibernated(&ns, "w").await;

        let mut sub = subscribe(&ns, "w", Transport::Sse, Start::After(id(&ids[4]))).await;
        assert_eq!(ns.stats().wakes_total, 1);
        assert_eq!(
            sub.drain(),
            messages(&ids[5..], &sent[5..]),
            "tail {memory_tail_bytes}"
        );
        let page = history(&ns, "w", Start::After(id(&ids[4])), 100).await;
        assert_eq!(page_frames(&page), messages(&ids[5..], &sent[5..]));
        let page = history(&ns, "w", Start::Oldest, 3).await;
        assert_eq!(page_frames(&page), messages(&ids[..3], &sent[..3]));
        // Resuming from the newest id needs nothing older than the tail.
        let page = history(&ns, "w", Start::After(id(&ids[8])), 100).await;
        assert_eq!(page_frames(&page), messages(&ids[9..], &sent[9..]));
        let described = info(&ns, "w").await;
        assert_eq!(
            (described.events, described.earliest_id, described.last_id),
            (10, Some(ids[0].clone()), Some(ids[9].clone()))
        );

        // Ids continue where they stopped.
        let more = publish_each(&ns, "w", &payloads(11..=11)).await;
        assert_eq!(sub.drain(), [message(&more[0], "m11")]);
        let all: Vec<String> = ids.iter().chain(&more).cloned().collect();
        assert_consecutive(&all, 1);
    }
}

#[tokio::test]
async fn a_restarted_channel_on_disk_resumes_from_a_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let open = || {
        let mut config = SegmentConfig::new(dir.path());
        config.durability = Durability::Always;
        Arc::new(SegmentStorage::open(config).unwrap())
    };
    for memory_tail_bytes in [100, 1 << 20] {
        let name = format!("restart-{memory_tail_bytes}");
        let sent = payloads(1..=10);
        let ids = {
            let storage = open();
            let ns = channels_on(
                storage.clone(),
                AWAKE,
                memory_tail_bytes,
                ChannelSettings::default(),
            );
            let ids = publish_each(&ns, &name, &sent).await;
            ns.shutdown().await;
            // A clean shutdown: the next run continues the seqs (after a crash it would
            // skip ahead; see tests/crash_ids.rs).
            storage.close().unwrap();
            ids
        };
        let ns = channels_on(open(), AWAKE, memory_tail_bytes, ChannelSettings::default());
        let mut sub = subscribe(&ns, &name, Transport::WebSocket, Start::After(id(&ids[4]))).await;
        assert_eq!(
            sub.drain(),
            messages(&ids[5..], &sent[5..]),
            "tail {memory_tail_bytes}"
        );
        let more = publish_each(&ns, &name, &payloads(11..=11)).await;
        assert_eq!(sub.drain(), [message(&more[0], "m11")]);
        let all: Vec<String> = ids.iter().chain(&more).cloned().collect();
        assert_consecutive(&all, 1);
        ns.shutdown().await;
    }
}

#[tokio::test]
async fn a_slow_subscriber_is_cut_off_with_1008_and_pruned() {
    let ns = channels(AWAKE);
    let mut slow = subscribe_bounded(&ns, "s", Transport::Sse, Start::Live, 4096).await;
    let mut fast = subscribe(&ns, "s", Transport::WebSocket, Start::Live).await;
    assert_eq!(info(&ns, "s").await.subscribers, 2);

    // 1 KiB payloads: an SSE frame is the payload plus about 45 bytes of fields, so three
    // fit in 4 KiB and the fourth does not.
    let sent: Vec<String> = (1..=20)
        .map(|i| format!("{i:04}{}", "x".repeat(1020)))
        .collect();
    assert!(sent.iter().all(|p| p.len() == 1024));
    let ids = publish_each(&ns, "s", &sent).await;

    assert_eq!(
        info(&ns, "s").await.subscribers,
        1,
        "the slow one is pruned"
    );
    assert_eq!(fast.drain(), messages(&ids, &sent));
    let mut expected = messages(&ids[..3], &sent[..3]);
    expected.push(Frame::Close { code: 1008 });
    assert_eq!(slow.drain(), expected);
    assert!(slow.rx.overflowed());
    // The channel let go of it, so the connection ends instead of idling forever.
    slow.assert_ended().await;
}

#[tokio::test(start_paused = true)]
async fn binary_payloads_travel_base64_and_decode_to_the_exact_bytes() {
    let ns = channels(IDLE);
    let mut sse = subscribe(&ns, "bin", Transport::Sse, Start::Live).await;
    let mut ws = subscribe(&ns, "bin", Transport::WebSocket, Start::Live).await;
    let binary = Bytes::from_static(&[0xff, 0x00, 0x80, b'\n', 0xfe, b'a']);
    // Valid UTF-8, but SSE cannot carry a carriage return.
    let carriage = Bytes::from_static(b"a\r\nb");
    let lines = Bytes::from_static("two\nlines é".as_bytes());
    let blobs = [binary.clone(), carriage.clone(), lines.clone()];
    let results = publish(
        &ns,
        "bin",
        blobs
            .iter()
            .map(|data| NewMessage {
                event: Some("blob".to_string()),
                data: data.clone(),
                idempotency_key: None,
            })
            .collect(),
    )
    .await;
    let ids: Vec<String> = results.into_iter().map(|r| r.id).collect();
    let expected: Vec<Frame> = ids
        .iter()
        .zip(&blobs)
        .map(|(id, data)| Frame::Event {
            id: id.clone(),
            event: "blob".to_string(),
            data: data.to_vec(),
        })
        .collect();

    // The raw wire form, not only what the decoder makes of it.
    let raw: Vec<Outbound> = std::iter::from_fn(|| sse.rx.try_recv()).collect();
    let text_of = |o: &Outbound| match o {
        Outbound::Text(b) => String::from_utf8(b.to_vec()).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        raw.iter().map(text_of).collect::<Vec<_>>(),
        [
            format!(
                "id: {}\nevent: base64:blob\ndata: {}\n\n",
                ids[0],
                BASE64.encode(&binary)
            ),
            format!(
                "id: {}\nevent: base64:blob\ndata: {}\n\n",
                ids[1],
                BASE64.encode(&carriage)
            ),
            format!("id: {}\nevent: blob\ndata: two\ndata: lines é\n\n", ids[2]),
        ]
    );
    let decoded: Vec<Frame> = raw
        .into_iter()
        .map(|o| support::decode(Transport::Sse, o))
        .collect();
    assert_eq!(decoded, expected);

    let raw: Vec<Outbound> = std::iter::from_fn(|| ws.rx.try_recv()).collect();
    let json: Vec<serde_json::Value> = raw
        .iter()
        .map(|o| serde_json::from_str(&text_of(o)).unwrap())
        .collect();
    assert_eq!(json[0]["data_base64"], BASE64.encode(&binary));
    assert_eq!(json[1]["data_base64"], BASE64.encode(&carriage));
    assert_eq!(json[2]["data"], "two\nlines é");
    assert!(json[..2].iter().all(|j| j.get("data").is_none()));
    assert!(json[2].get("data_base64").is_none());
    let decoded: Vec<Frame> = raw
        .into_iter()
        .map(|o| support::decode(Transport::WebSocket, o))
        .collect();
    assert_eq!(decoded, expected);

    // The same bytes come back after a round trip through the log.
    until_hibernated(&ns, "bin").await;
    for transport in TRANSPORTS {
        let mut replay = subscribe(&ns, "bin", transport, Start::Oldest).await;
        assert_eq!(replay.drain(), expected, "{transport:?}");
    }
    let page = history(&ns, "bin", Start::Oldest, 10).await;
    assert_eq!(page_frames(&page), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscribers_get_the_same_fifty_events_in_order() {
    const SUBSCRIBERS: usize = 1_000;
    let ns = channels(AWAKE);
    let mut subs = Vec::with_capacity(SUBSCRIBERS);
    let mut pending = Vec::with_capacity(SUBSCRIBERS);
    for i in 0..SUBSCRIBERS {
        let transport = TRANSPORTS[i % TRANSPORTS.len()];
        let (socket, rx) = Socket::new(transport, ROOMY, Bytes::new());
        subs.push(Subscriber { transport, rx });
        pending.push(ns.call(
            "crowd",
            ChannelRequest::Subscribe {
                socket,
                start: Start::Live,
            },
        ));
    }
    for reply in pending {
        reply.await.unwrap();
    }
    assert_eq!(info(&ns, "crowd").await.subscribers, SUBSCRIBERS);

    // Fifty requests enqueued back to back, then awaited: order comes from the channel.
    let sent = payloads(1..=50);
    let pending: Vec<_> = sent
        .iter()
        .map(|p| ns.call("crowd", ChannelRequest::Publish(vec![text(p)])))
        .collect();
    let mut ids = Vec::new();
    for reply in pending {
        match reply.await.unwrap() {
            ChannelResponse::Published(r) => ids.push(r[0].id.clone()),
            other => panic!("{other:?}"),
        }
    }
    assert_consecutive(&ids, 1);
    let expected = messages(&ids, &sent);
    for (i, sub) in subs.iter_mut().enumerate() {
        assert_eq!(
            sub.drain(),
            expected,
            "subscriber {i} ({:?})",
            sub.transport
        );
    }
}

/// Counts what the channel reports, as a server's metrics would.
#[derive(Debug, Default)]
struct Tally {
    published: std::sync::Mutex<Vec<(String, u64, u64)>>,
    gaps: std::sync::Mutex<Vec<&'static str>>,
}

impl dormouse_actors::channel::ChannelObserver for Tally {
    fn published(&self, channel: &str, events: u64, bytes: u64) {
        self.published
            .lock()
            .unwrap()
            .push((channel.to_string(), events, bytes));
    }

    fn gap_sent(&self, reason: &'static str) {
        self.gaps.lock().unwrap().push(reason);
    }
}

#[tokio::test]
async fn the_observer_hears_of_stored_events_and_gaps_but_not_of_duplicates() {
    let tally = Arc::new(Tally::default());
    let runtime = dormouse_runtime::Runtime::new(Arc::new(MemoryStorage::new()));
    let ns = runtime.namespace::<dormouse_actors::Channel>(
        "channel",
        dormouse_runtime::NamespaceConfig::with_idle_timeout(AWAKE),
        dormouse_actors::ChannelEnv {
            default: ChannelSettings::default(),
            memory_tail_bytes: 1 << 20,
            observer: Some(tally.clone()),
            ..Default::default()
        },
    );
    let mut live = subscribe(&ns, "o", Transport::Sse, Start::Live).await;
    let results = publish(&ns, "o", vec![keyed("abc", "k"), text("de")]).await;
    assert!(results.iter().all(|r| !r.duplicate));
    let again = publish(&ns, "o", vec![keyed("abc", "k")]).await;
    assert!(again[0].duplicate);
    assert_eq!(live.drain().len(), 2);
    assert_eq!(
        *tally.published.lock().unwrap(),
        [("o".to_string(), 2, 5)],
        "one report per publish that stored something"
    );

    let beyond = format!("{:x}-99", id(&results[0].id).epoch);
    let mut resumed = subscribe(&ns, "o", Transport::WebSocket, Start::After(id(&beyond))).await;
    assert_eq!(resumed.drain(), [gap("unknown_id", None, Some(&beyond))]);
    delete(&ns, "o").await;
    assert_eq!(
        *tally.gaps.lock().unwrap(),
        ["unknown_id", "deleted", "deleted"],
        "one per subscriber that was sent a gap"
    );
}

/// Many channels active at once share one tail budget: each keeps less in memory as more
/// are active, the total stays within the budget (plus each channel's newest event), a
/// hibernating channel gives its share back, and replay of what left memory comes from
/// storage, event by event.
#[tokio::test(start_paused = true)]
async fn active_channels_share_one_tail_budget_and_replay_the_rest_from_storage() {
    let budget = Arc::new(dormouse_actors::channel::TailBudget::new(8 * 1024));
    let runtime = dormouse_runtime::Runtime::new(Arc::new(MemoryStorage::new()));
    let ns = runtime.namespace::<dormouse_actors::Channel>(
        "channel",
        dormouse_runtime::NamespaceConfig::with_idle_timeout(AWAKE),
        dormouse_actors::ChannelEnv {
            memory_tail_bytes: 1 << 20,
            tails: Some(budget.clone()),
            ..Default::default()
        },
    );
    let sent = payloads(1..=40);
    let mut ids = Vec::new();
    for c in 0..50 {
        ids.push(publish_each(&ns, &format!("c{c}"), &sent).await);
        // Within the budget, give or take the newest event of each channel.
        assert!(
            budget.used() <= 8 * 1024 + (c + 1) * 200,
            "{}",
            budget.used()
        );
    }
    for c in [0, 17, 49] {
        let page = history(&ns, &format!("c{c}"), Start::Oldest, 100).await;
        assert_eq!(page_frames(&page), messages(&ids[c], &sent), "c{c}");
    }
    for c in 0..50 {
        until_hibernated(&ns, &format!("c{c}")).await;
    }
    assert_eq!(budget.used(), 0, "hibernated channels hold no tail");
}
