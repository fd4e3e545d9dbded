//! Node to node requests on a real NATS cluster: answered, refused with the handler's
//! reason, refused as stale by a restarted node, and failing at once for a node that is
//! gone.

use std::time::{Duration, Instant};

use bytes::Bytes;
use dormouse_cluster::rpc::{call, serve};
use dormouse_cluster::{NatsSettings, NodeId, RpcError, connect};
use dormouse_testkit::nats::NatsCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_their_node_and_every_failure_says_what_to_do() {
    let cluster = NatsCluster::start(3).await;
    let nats_a = connect(&NatsSettings::new(cluster.urls(), "a"))
        .await
        .unwrap();
    // B is reached through another server than A, as two nodes of a cluster are.
    let nats_b = connect(&NatsSettings::new(vec![cluster.url(2)], "b"))
        .await
        .unwrap();
    let b = NodeId::start("b");
    let server = serve(&nats_b, &b, |kind, body| async move {
        match kind.as_str() {
            "echo" => Ok(body),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                Ok(body)
            }
            other => Err(format!("no such request: {other}")),
        }
    })
    .await
    .unwrap();
    let timeout = Duration::from_secs(1);

    let answer = call(&nats_a, &b, "echo", Bytes::from_static(b"hi"), timeout)
        .await
        .unwrap();
    assert_eq!(answer, Bytes::from_static(b"hi"));

    // Many at once, each answered with its own body.
    let calls = (0..100).map(|i| {
        let (nats_a, b) = (&nats_a, &b);
        async move {
            let body = Bytes::from(format!("call {i}"));
            let answer = call(nats_a, b, "echo", body.clone(), Duration::from_secs(5)).await;
            assert_eq!(answer.unwrap(), body);
        }
    });
    futures::future::join_all(calls).await;

    let refused = call(&nats_a, &b, "nonsense", Bytes::new(), timeout).await;
    assert!(
        matches!(&refused, Err(RpcError::Refused { why, .. }) if why == "no such request: nonsense"),
        "{refused:?}"
    );
    let slow = call(&nats_a, &b, "slow", Bytes::new(), timeout).await;
    assert!(matches!(slow, Err(RpcError::TimedOut(_))), "{slow:?}");

    // A request for B's former run, after it restarted under the same name.
    let former = NodeId {
        name: "b".into(),
        incarnation: b.incarnation.wrapping_add(1),
    };
    let stale = call(&nats_a, &former, "echo", Bytes::new(), timeout).await;
    assert!(matches!(stale, Err(RpcError::Stale(_))), "{stale:?}");

    // B stops answering: a request fails at once, not after the timeout.
    drop(server);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let gone = call(&nats_a, &b, "echo", Bytes::new(), Duration::from_secs(5)).await;
    assert!(matches!(gone, Err(RpcError::NodeGone(_))), "{gone:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}
