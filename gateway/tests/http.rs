//! The HTTP surface, driven over the wire with a real client.

use dormouse_testkit as support;

use serde_json::Value;
use support::TestServer;

#[tokio::test]
async fn health_and_readiness_answer_json() {
    let server = TestServer::start().await;
    let body = server.get_json("/healthz", 200).await;
    assert_eq!(body["status"], "ok");

    let body = server.get_json("/readyz", 200).await;
    assert_eq!(body["status"], "ready");
    assert_eq!(body["durability"], "always");
    assert!(body["storage_bytes"].as_u64().unwrap() > 0);
    server.stop().await;
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_get_json_errors() {
    let server = TestServer::start().await;
    let res = server.client.get(server.url("/nope")).send().await.unwrap();
    assert_eq!(res.status(), 404);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    assert_eq!(body["error"]["message"], "no route for GET /nope");

    let res = server
        .client
        .post(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
    assert_eq!(body["error"]["message"], "POST is not allowed on /healthz");
    server.stop().await;
}
