//! The counter keeps its value across hibernation and across a restart of its process.

use std::sync::Arc;
use std::time::Duration;

use dormouse_runtime::{Namespace, NamespaceConfig, ObjectState, Runtime};
use dormouse_storage::{SegmentConfig, SegmentStorage};
use example_counter::{Counter, CounterRequest};

#[tokio::test]
async fn counts_across_hibernation_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let runtime = Runtime::new(Arc::new(
            SegmentStorage::open(SegmentConfig::new(dir.path())).unwrap(),
        ));
        let counters: Namespace<Counter> = runtime.namespace(
            "counter",
            NamespaceConfig::with_idle_timeout(Duration::from_millis(20)),
            (),
        );
        let a = counters.get("a");
        assert_eq!(a.call(CounterRequest::Add(2)).await.unwrap(), 2);
        assert_eq!(a.call(CounterRequest::Add(-5)).await.unwrap(), -3);
        while counters.state("a") != ObjectState::Hibernated {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(a.call(CounterRequest::Get).await.unwrap(), -3);
        assert_eq!(counters.call("b", CounterRequest::Get).await.unwrap(), 0);
        assert_eq!(
            a.call(CounterRequest::Add(i64::MAX)).await.unwrap(),
            i64::MAX - 3
        );
        let err = a.call(CounterRequest::Add(10)).await.unwrap_err();
        assert!(err.to_string().contains("counter would overflow"), "{err}");
        // The failed request changed nothing.
        assert_eq!(a.call(CounterRequest::Get).await.unwrap(), i64::MAX - 3);
        counters.shutdown().await;
    }
    let runtime = Runtime::new(Arc::new(
        SegmentStorage::open(SegmentConfig::new(dir.path())).unwrap(),
    ));
    let counters: Namespace<Counter> = runtime.namespace("counter", NamespaceConfig::default(), ());
    assert_eq!(
        counters.call("a", CounterRequest::Get).await.unwrap(),
        i64::MAX - 3
    );
}
