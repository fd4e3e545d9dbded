//! Ids a crashed run may have shown to clients are never handed out again.

mod support;

use std::sync::Arc;
use std::time::Duration;

use dormouse_actors::channel::{ChannelSettings, EventId, Start};
use dormouse_runtime::Transport;
use dormouse_storage::{Durability, SegmentConfig, SegmentStorage};
use support::{channels_on, message, publish_each, subscribe};

/// Channels on `storage` with the settings every test here uses.
fn channels(storage: Arc<SegmentStorage>) -> dormouse_runtime::Namespace<dormouse_actors::Channel> {
    channels_on(
        storage,
        Duration::from_secs(60),
        1 << 20,
        ChannelSettings::default(),
    )
}

fn open(dir: &std::path::Path) -> Arc<SegmentStorage> {
    let mut config = SegmentConfig::new(dir);
    config.durability = Durability::Never;
    Arc::new(SegmentStorage::open(config).unwrap())
}

#[tokio::test]
async fn after_a_crash_new_events_get_ids_past_anything_the_lost_run_could_have_shown() {
    let dir = tempfile::tempdir().unwrap();
    let payloads: Vec<String> = (1..=3).map(|i| format!("m{i}")).collect();
    let ids = {
        let storage = open(dir.path());
        let ns = channels(storage);
        let ids = publish_each(&ns, "c", &payloads).await;
        ns.shutdown().await;
        // Dropped without `close()`: the next run sees a crash.
        ids
    };
    let epoch = ids[0].parse::<EventId>().unwrap().epoch;
    // A client that saw two more events the crash lost (seq 4 and 5) holds this cursor.
    let lost = EventId { epoch, seq: 5 }.to_string();

    let storage = open(dir.path());
    assert!(dormouse_storage::Storage::boot(&*storage).unclean);
    let ns = channels(storage.clone());
    let mut saw_lost = subscribe(
        &ns,
        "c",
        Transport::Sse,
        Start::After(lost.parse().unwrap()),
    )
    .await;
    let mut saw_last = subscribe(
        &ns,
        "c",
        Transport::WebSocket,
        Start::After(ids[2].parse().unwrap()),
    )
    .await;
    // Neither is told about a gap: nothing either of them could still get is missing.
    assert_eq!(saw_lost.drain(), vec![]);
    assert_eq!(saw_last.drain(), vec![]);

    let new = publish_each(&ns, "c", &["after".to_string()]).await;
    let new_id: EventId = new[0].parse().unwrap();
    assert_eq!(new_id.epoch, epoch);
    assert!(new_id.seq > 5, "id {new_id} reuses a possibly lost seq");
    assert_eq!(saw_lost.drain(), vec![message(&new[0], "after")]);
    assert_eq!(saw_last.drain(), vec![message(&new[0], "after")]);

    // Resuming across the hole later is seamless too, and the jump happens once per run.
    let mut late = subscribe(
        &ns,
        "c",
        Transport::Sse,
        Start::After(ids[1].parse().unwrap()),
    )
    .await;
    assert_eq!(
        late.drain(),
        vec![message(&ids[2], "m3"), message(&new[0], "after")]
    );
    ns.shutdown().await;
    let ns = channels(storage);
    let next = publish_each(&ns, "c", &["next".to_string()]).await;
    assert_eq!(next[0].parse::<EventId>().unwrap().seq, new_id.seq + 1);
}

/// The in-memory tail is rebuilt from a log with holes (one per crash) without repeating an
/// event: found by the crash harness, where a resuming subscriber got one event many times.
#[tokio::test]
async fn a_log_with_crash_holes_reloads_its_tail_without_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let mut all: Vec<(String, String)> = Vec::new();
    // Three runs, each ended by a crash: the log holds three bands of seqs with holes of
    // 2^32 between them.
    for run in 0..3 {
        let storage = open(dir.path());
        let ns = channels(storage);
        let payloads: Vec<String> = (0..100).map(|i| format!("r{run}-{i}")).collect();
        let ids = publish_each(&ns, "holes", &payloads).await;
        all.extend(ids.into_iter().zip(payloads));
        ns.shutdown().await;
    }
    let storage = open(dir.path());
    let ns = channels(storage);
    // Resume from points inside each band and across each hole: exactly the rest, once.
    for from in [0usize, 50, 99, 100, 150, 199, 200, 250, 298] {
        let mut sub = subscribe(
            &ns,
            "holes",
            Transport::Sse,
            Start::After(all[from].0.parse().unwrap()),
        )
        .await;
        let expected: Vec<_> = all[from + 1..]
            .iter()
            .map(|(id, data)| message(id, data))
            .collect();
        assert_eq!(sub.drain(), expected, "resuming after #{from}");
    }
    ns.shutdown().await;
}
