//! Alarms: fired on time, waking hibernated objects, surviving restarts, retried on failure.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use dormouse_runtime::{Namespace, NamespaceConfig, ObjectState, Runtime};
use support::{Probe, ProbeEnv, ProbeReq, open_sled, probes};

/// Polls `done` until it holds, failing after `limit`.
async fn eventually(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_alarm_wakes_a_hibernated_object_and_is_cleared_after_it_runs() {
    let (ns, env) = probes(Duration::from_millis(20));
    ns.call("a", ProbeReq::SetAlarmIn(Duration::from_millis(300)))
        .await
        .unwrap();
    assert_eq!(ns.call("a", ProbeReq::HasAlarm).await.unwrap(), 1);
    eventually(Duration::from_secs(5), "hibernation", || {
        ns.state("a") == ObjectState::Hibernated
    })
    .await;
    assert_eq!(env.alarm_calls.load(Ordering::SeqCst), 0, "fired early");

    eventually(Duration::from_secs(5), "the alarm", || {
        env.alarm_calls.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(ns.stats().wakes_total, 1, "the alarm woke it");
    assert_eq!(ns.call("a", ProbeReq::HasAlarm).await.unwrap(), 0);
    // Fired once, not again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.alarm_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_deleted_or_replaced_alarm_does_not_fire_at_its_old_time() {
    let (ns, env) = probes(Duration::from_secs(60));
    ns.call("d", ProbeReq::SetAlarmIn(Duration::from_millis(100)))
        .await
        .unwrap();
    ns.call("d", ProbeReq::DeleteAlarm).await.unwrap();
    ns.call("r", ProbeReq::SetAlarmIn(Duration::from_millis(100)))
        .await
        .unwrap();
    ns.call("r", ProbeReq::SetAlarmIn(Duration::from_secs(3600)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(env.alarm_calls.load(Ordering::SeqCst), 0);
    assert_eq!(ns.call("r", ProbeReq::HasAlarm).await.unwrap(), 1);
}

#[tokio::test]
async fn a_failing_alarm_is_retried_with_backoff() {
    let (ns, env) = probes(Duration::from_secs(60));
    env.failing_alarms.store(1, Ordering::SeqCst);
    let set = Instant::now();
    ns.call("f", ProbeReq::SetAlarmIn(Duration::from_millis(50)))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the retry", || {
        env.alarm_calls.load(Ordering::SeqCst) == 2
    })
    .await;
    // The first retry waits 2 s.
    assert!(
        set.elapsed() >= Duration::from_secs(2),
        "{:?}",
        set.elapsed()
    );
    eventually(Duration::from_secs(5), "the alarm to be cleared", || {
        env.failing_alarms.load(Ordering::SeqCst) == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(ns.call("f", ProbeReq::HasAlarm).await.unwrap(), 0);
    assert_eq!(ns.stats().failures_total, 1);
}

#[tokio::test]
async fn alarms_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let open = || open_sled(dir.path());
    {
        let runtime = Runtime::new(open());
        let ns: Namespace<Probe> =
            runtime.namespace("probe", NamespaceConfig::default(), Arc::default());
        ns.call("s", ProbeReq::SetAlarmIn(Duration::from_millis(400)))
            .await
            .unwrap();
        ns.shutdown().await;
    }
    let env = Arc::new(ProbeEnv::default());
    let runtime = Runtime::new(open());
    let _ns: Namespace<Probe> = runtime.namespace("probe", NamespaceConfig::default(), env.clone());
    eventually(Duration::from_secs(5), "the alarm after restart", || {
        env.alarm_calls.load(Ordering::SeqCst) == 1
    })
    .await;
}
