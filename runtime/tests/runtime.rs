//! The runtime's guarantees, observed through its public API.

mod support;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dormouse_runtime::storage::Bytes;
use dormouse_runtime::{
    Error, Namespace, NamespaceConfig, ObjectState, Outbound, Runtime, Socket, Transport,
};
use support::{GatedStorage, Probe, ProbeEnv, ProbeReq, open_sled, probes};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_name_hit_by_64_tasks_activates_once() {
    let (ns, env) = probes(Duration::from_secs(60));
    *env.activate_delay.lock().unwrap() = Some(Duration::from_millis(20));
    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let ns = ns.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                ns.call("cold", ProbeReq::Add(1)).await
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap().unwrap());
    }
    results.sort_unstable();
    assert_eq!(
        results,
        (1..=64).collect::<Vec<u64>>(),
        "each add seen once"
    );
    assert_eq!(env.activations.load(Ordering::SeqCst), 1);
    assert_eq!(ns.stats().activations_total, 1);
    assert_eq!(ns.stats().active, 1);
}

#[tokio::test(start_paused = true)]
async fn an_idle_object_hibernates_and_wakes_from_storage() {
    let (ns, env) = probes(Duration::from_millis(50));
    assert_eq!(ns.call("h", ProbeReq::Add(5)).await.unwrap(), 5);
    assert_eq!(ns.state("h"), ObjectState::Active);

    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(ns.call("h", ProbeReq::Get).await.unwrap(), 5);
    tokio::time::sleep(Duration::from_millis(30)).await;
    // 60 ms after the first call but only 30 ms after the last: still awake.
    assert_eq!(ns.state("h"), ObjectState::Active);

    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(ns.state("h"), ObjectState::Hibernated);
    let stats = ns.stats();
    assert_eq!(
        (stats.active, stats.hibernated, stats.hibernations_total),
        (0, 1, 1)
    );

    // The wake rebuilds the object from storage: the counter continues.
    assert_eq!(ns.call("h", ProbeReq::Add(1)).await.unwrap(), 6);
    let stats = ns.stats();
    assert_eq!(
        (stats.active, stats.hibernated, stats.wakes_total),
        (1, 0, 1)
    );
    assert_eq!(env.activations.load(Ordering::SeqCst), 2);
    assert_eq!(ns.state("never-used"), ObjectState::Dormant);
}

/// 100,000 messages from 40 concurrent senders to 300 names with a 1 ms idle timeout, so
/// activations hibernate and wake constantly while messages race them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_off_under_constant_hibernation_loses_and_duplicates_nothing() {
    const SENDERS: u32 = 40;
    const PER_SENDER: u64 = 2_500;
    const NAMES: u64 = 300;
    let (ns, env) = probes(Duration::from_millis(1));
    let senders: Vec<_> = (0..SENDERS)
        .map(|sender| {
            let ns = ns.clone();
            tokio::spawn(async move {
                let mut seq = 0u64;
                while seq < PER_SENDER {
                    // A window of requests enqueued back to back, then awaited together:
                    // ordering must come from the runtime, not from the sender waiting.
                    let mut window = Vec::new();
                    for _ in 0..50 {
                        seq += 1;
                        let name = format!("n{}", (seq * 7 + sender as u64 * 13) % NAMES);
                        window.push(ns.call(&name, ProbeReq::Seq { sender, seq }));
                    }
                    for reply in futures::future::join_all(window).await {
                        reply.expect("every message answered");
                    }
                    // Let activations idle out between windows.
                    if seq.is_multiple_of(500) {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            })
        })
        .collect();
    for sender in senders {
        sender.await.unwrap();
    }
    assert_eq!(env.violations.load(Ordering::SeqCst), 0);
    let handled = env.handled.lock().unwrap().len() as u64;
    assert_eq!(handled, SENDERS as u64 * PER_SENDER);
    let stats = ns.stats();
    assert_eq!(stats.requests_total, SENDERS as u64 * PER_SENDER);
    assert!(
        stats.hibernations_total > 100,
        "the test must actually race hibernation: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_and_effects_wait_for_durability() {
    let storage = Arc::new(GatedStorage::new());
    let runtime = Runtime::new(storage.clone());
    let env = Arc::new(ProbeEnv::default());
    let ns: Namespace<Probe> = runtime.namespace("probe", NamespaceConfig::default(), env.clone());
    let log = Arc::new(Mutex::new(Vec::new()));

    let write = ns.call("g", ProbeReq::AddWithEffect(1, log.clone()));
    // A read behind the write may have observed its state: it must not overtake it.
    let read = ns.call("g", ProbeReq::Get);
    let (write, read) = (tokio::spawn(write), tokio::spawn(read));
    while storage.syncs_requested.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!write.is_finished(), "reply released before its commit");
    assert!(
        !read.is_finished(),
        "a later reply overtook a pending commit"
    );
    assert!(
        log.lock().unwrap().is_empty(),
        "effect ran before its commit"
    );

    storage.release(1);
    assert_eq!(write.await.unwrap().unwrap(), 1);
    assert_eq!(read.await.unwrap().unwrap(), 1);
    assert_eq!(*log.lock().unwrap(), vec!["effect 1".to_string()]);
}

#[tokio::test]
async fn a_failing_or_panicking_handler_fails_only_its_request() {
    let (ns, env) = probes(Duration::from_secs(60));
    assert_eq!(ns.call("f", ProbeReq::Add(10)).await.unwrap(), 10);
    assert_eq!(ns.call("other", ProbeReq::Add(1)).await.unwrap(), 1);

    let err = ns.call("f", ProbeReq::WriteThenFail(5)).await.unwrap_err();
    assert!(matches!(err, Error::Handler { .. }), "{err:?}");
    assert!(
        err.to_string().contains("refusing after writing 5"),
        "{err}"
    );
    // Its write was discarded and the instance rebuilt from storage.
    assert_eq!(ns.call("f", ProbeReq::Get).await.unwrap(), 10);
    assert_eq!(env.activations.load(Ordering::SeqCst), 3);

    let err = ns.call("f", ProbeReq::Panic).await.unwrap_err();
    assert!(matches!(err, Error::Panicked { .. }), "{err:?}");
    assert!(err.to_string().contains("probe asked to panic"), "{err}");
    assert_eq!(ns.call("f", ProbeReq::Add(1)).await.unwrap(), 11);
    // The neighbour never noticed.
    assert_eq!(ns.call("other", ProbeReq::Get).await.unwrap(), 1);
    assert_eq!(ns.stats().failures_total, 2);
}

#[tokio::test]
async fn state_survives_a_restart_on_sled() {
    let dir = tempfile::tempdir().unwrap();
    let open = || open_sled(dir.path());
    {
        let runtime = Runtime::new(open());
        let ns: Namespace<Probe> =
            runtime.namespace("probe", NamespaceConfig::default(), Arc::default());
        assert_eq!(ns.call("s", ProbeReq::Add(41)).await.unwrap(), 41);
        ns.shutdown().await;
        assert!(matches!(
            ns.call("s", ProbeReq::Get).await,
            Err(Error::Unavailable(_))
        ));
    }
    let runtime = Runtime::new(open());
    let ns: Namespace<Probe> =
        runtime.namespace("probe", NamespaceConfig::default(), Arc::default());
    assert_eq!(ns.call("s", ProbeReq::Add(1)).await.unwrap(), 42);
}

#[tokio::test(start_paused = true)]
async fn sockets_are_parked_across_hibernation_and_a_broadcast_wakes_the_object() {
    let (ns, env) = probes(Duration::from_millis(50));
    let (a, mut rx_a) = Socket::new(Transport::Sse, 1024, Bytes::new());
    let (b, mut rx_b) = Socket::new(Transport::WebSocket, 1024, Bytes::new());
    assert_eq!(ns.call("room", ProbeReq::Accept(a)).await.unwrap(), 1);
    assert_eq!(ns.call("room", ProbeReq::Accept(b)).await.unwrap(), 2);
    assert_eq!(
        ns.parked_sockets("room"),
        None,
        "an active object parks nothing"
    );

    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(ns.state("room"), ObjectState::Hibernated);
    assert_eq!(ns.parked_sockets("room"), Some(2));
    let stats = ns.stats();
    assert_eq!(
        (stats.active, stats.hibernated, stats.wakes_total),
        (0, 1, 0)
    );

    assert_eq!(
        ns.call("room", ProbeReq::Broadcast("hello".to_string()))
            .await
            .unwrap(),
        2
    );
    let hello = Outbound::Text(Bytes::from_static(b"hello"));
    assert_eq!(rx_a.try_recv(), Some(hello.clone()));
    assert_eq!(rx_b.try_recv(), Some(hello));
    assert_eq!((rx_a.try_recv(), rx_b.try_recv()), (None, None));

    assert_eq!(ns.state("room"), ObjectState::Active);
    assert_eq!(ns.parked_sockets("room"), None, "handed back on wake");
    let stats = ns.stats();
    assert_eq!(
        (stats.active, stats.hibernated, stats.wakes_total),
        (1, 0, 1)
    );
    assert_eq!(env.activations.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn an_object_can_hibernate_early_or_stay_awake() {
    let (ns, _env) = probes(Duration::from_millis(50));
    ns.call("early", ProbeReq::Add(1)).await.unwrap();
    ns.call("early", ProbeReq::HibernateNow).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(
        ns.state("early"),
        ObjectState::Hibernated,
        "did not wait for the idle timeout"
    );

    ns.call("late", ProbeReq::StayAwake(Duration::from_millis(500)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        ns.state("late"),
        ObjectState::Active,
        "stayed past the idle timeout"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ns.state("late"), ObjectState::Hibernated);
    assert_eq!(ns.call("late", ProbeReq::Get).await.unwrap(), 0);
    assert_eq!(ns.call("early", ProbeReq::Get).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_does_not_hibernate_while_its_writes_are_not_durable() {
    let storage = Arc::new(GatedStorage::new());
    let runtime = Runtime::new(storage.clone());
    let ns: Namespace<Probe> = runtime.namespace(
        "probe",
        NamespaceConfig::with_idle_timeout(Duration::from_millis(10)),
        Arc::default(),
    );
    let write = tokio::spawn(ns.call("w", ProbeReq::Add(1)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Idle for 20 idle timeouts, but its commit is pending: a successor could otherwise
    // answer from state that is not durable yet.
    assert_eq!(ns.state("w"), ObjectState::Active);
    assert!(!write.is_finished());
    storage.release(1);
    assert_eq!(write.await.unwrap().unwrap(), 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while ns.state("w") != ObjectState::Hibernated {
        assert!(std::time::Instant::now() < deadline, "never hibernated");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `max_active` bounds the activations in memory: past it, the least recently used idle
/// ones hibernate early (keeping their state), and one asked to stay awake is left alone.
/// Objects that decline to hibernate early (asked to stay awake) are the least recently
/// used, so a sweep would pick them first every time: the ones that can go must still go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_active_objects_that_stay_awake_do_not_shield_the_others() {
    const MAX: usize = 20;
    const AWAKE: usize = 30;
    let env = Arc::new(ProbeEnv::default());
    let runtime = Runtime::new(Arc::new(dormouse_runtime::storage::MemoryStorage::new()));
    let ns: Namespace<Probe> = runtime.namespace(
        "probe",
        NamespaceConfig::with_idle_timeout(Duration::from_secs(600)).with_max_active(MAX),
        env.clone(),
    );
    for i in 0..AWAKE {
        ns.call(
            &format!("awake{i}"),
            ProbeReq::StayAwake(Duration::from_secs(600)),
        )
        .await
        .unwrap();
    }
    for i in 0..200u64 {
        ns.call(&format!("o{i}"), ProbeReq::Add(i)).await.unwrap();
        // Paced a little, so declines come back between activations as they would.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let hibernated = (0..200)
        .filter(|i| ns.state(&format!("o{i}")) == ObjectState::Hibernated)
        .count();
    assert!(
        hibernated >= 150,
        "only {hibernated} of 200 idle objects hibernated; {} active with max_active {MAX}",
        ns.stats().active
    );
    for i in 0..AWAKE {
        assert_eq!(ns.state(&format!("awake{i}")), ObjectState::Active);
    }
    // Each object that stays awake is asked once, not by every sweep again.
    let declined = ns.stats().evictions_declined_total;
    assert!(
        declined <= AWAKE as u64,
        "{declined} declines from {AWAKE} objects that stay awake"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_active_the_least_recently_used_hibernate_early() {
    const MAX: usize = 20;
    let env = Arc::new(ProbeEnv::default());
    let runtime = Runtime::new(Arc::new(dormouse_runtime::storage::MemoryStorage::new()));
    let ns: Namespace<Probe> = runtime.namespace(
        "probe",
        NamespaceConfig::with_idle_timeout(Duration::from_secs(600)).with_max_active(MAX),
        env.clone(),
    );
    ns.call("awake", ProbeReq::StayAwake(Duration::from_secs(600)))
        .await
        .unwrap();
    for i in 0..200u64 {
        assert_eq!(
            ns.call(&format!("o{i}"), ProbeReq::Add(i)).await.unwrap(),
            i
        );
        // The newest stay: each call leaves its object the most recently used.
        assert_eq!(ns.state(&format!("o{i}")), ObjectState::Active);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ns.stats().active as usize > MAX {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} active with max_active {MAX}",
            ns.stats().active
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(ns.state("o199"), ObjectState::Active, "the last used stays");
    assert_eq!(ns.state("o0"), ObjectState::Hibernated);
    assert_eq!(
        ns.state("awake"),
        ObjectState::Active,
        "asked to stay awake"
    );
    assert!(ns.stats().hibernations_total >= 180);
    // Hibernated early, not lost: each wakes with its state.
    for i in [0u64, 57, 123] {
        assert_eq!(ns.call(&format!("o{i}"), ProbeReq::Get).await.unwrap(), i);
    }
}
