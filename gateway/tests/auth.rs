//! Authentication and authorization over the wire: JWTs (HS256 and EdDSA), API keys,
//! capabilities per channel pattern, token expiry on live SSE and WebSocket connections,
//! refresh over WebSocket, and CORS.

use dormouse_testkit as support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use dormouse_gateway::{ApiKeySettings, Settings};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::{SseClient, TestServer, WsClient, error_of};

const SECRET: &str = "test-secret-that-is-long-enough-for-hs256!";
const PUBLISHER_KEY: &str = "publisher-key-0123456789";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token for `sub` valid for `ttl_secs` (negative: already expired) with `grants`.
fn token(sub: &str, ttl_secs: i64, grants: Value) -> String {
    support::jwt(SECRET, ttl_secs, json!({"sub": sub, "dormouse": grants}))
}

fn secured(s: &mut Settings) {
    s.auth.jwt_secret = SECRET.to_string();
    s.auth.api_keys = vec![ApiKeySettings {
        publish: vec!["*".to_string()],
        history: vec!["*".to_string()],
        ..ApiKeySettings::new("backend", PUBLISHER_KEY)
    }];
}

async fn status_and_code(res: reqwest::Response) -> (u16, String) {
    let (status, code, _) = error_of(res).await;
    (status, code)
}

#[tokio::test]
async fn everything_is_denied_unless_granted() {
    let server = TestServer::start_with(secured).await;
    let c = &server.client;

    // Probes stay open.
    assert_eq!(
        c.get(server.url("/healthz")).send().await.unwrap().status(),
        200
    );

    // No credential: 401 with a challenge, for every kind of route.
    for (method, path) in [
        ("POST", "/v1/channels/chat:1/messages"),
        ("GET", "/v1/channels/chat:1/messages"),
        ("GET", "/v1/channels/chat:1/events"),
        ("GET", "/v1/channels/chat:1"),
        ("GET", "/v1/channels"),
        ("DELETE", "/v1/channels/chat:1"),
        ("POST", "/v1/publish"),
        ("GET", "/sub?channel=chat:1"),
        ("POST", "/channel/chat:1/messages"),
    ] {
        let res = c
            .request(method.parse().unwrap(), server.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(
            res.headers()["www-authenticate"],
            "Bearer realm=\"dormouse\"",
            "{method} {path}"
        );
        let (status, code, message) = error_of(res).await;
        assert_eq!(
            (status, code.as_str()),
            (401, "missing_credential"),
            "{method} {path}"
        );
        assert!(message.contains("Authorization: Bearer"), "{message}");
    }

    // Bad credentials, each with its own code.
    let publish = |auth: String| {
        c.post(server.url("/v1/channels/chat:1/messages"))
            .header("authorization", auth)
            .body("hi")
            .send()
    };
    let cases = [
        ("Bearer not-a-key-at-all".to_string(), "bad_credential"),
        ("Basic dXNlcjpwYXNz".to_string(), "bad_credential"),
        ("Bearer a.b.c".to_string(), "bad_token"),
        (
            format!("Bearer {}", token("u", -120, json!({"publish": ["*"]}))),
            "token_expired",
        ),
    ];
    for (auth, expected) in cases {
        let (status, code) = status_and_code(publish(auth.clone()).await.unwrap()).await;
        assert_eq!((status, code.as_str()), (401, expected), "{auth}");
    }
    // Signed with another secret.
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "mallory", "exp": now() + 60, "dormouse": {"publish": ["*"]}}),
        &EncodingKey::from_secret(b"some-other-secret-of-sufficient-length!!"),
    )
    .unwrap();
    let (status, code, message) =
        error_of(publish(format!("Bearer {forged}")).await.unwrap()).await;
    assert_eq!((status, code.as_str()), (401, "bad_token"));
    assert!(message.contains("signature"), "{message}");
    // Not valid yet.
    let early = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"exp": now() + 600, "nbf": now() + 300, "dormouse": {"publish": ["*"]}}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let (status, code) = status_and_code(publish(format!("Bearer {early}")).await.unwrap()).await;
    assert_eq!((status, code.as_str()), (401, "token_not_yet_valid"));

    // A token granting chat:* publish only.
    let alice = token("alice", 600, json!({"publish": ["chat:*"]}));
    let bearer = format!("Bearer {alice}");
    let res = publish(bearer.clone()).await.unwrap();
    assert_eq!(res.status(), 201);
    let res = c
        .post(server.url("/v1/channels/news/messages"))
        .header("authorization", &bearer)
        .body("x")
        .send()
        .await
        .unwrap();
    let (status, code, message) = error_of(res).await;
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    assert!(
        message.contains("alice") && message.contains("publish") && message.contains("news"),
        "{message}"
    );
    for path in [
        "/v1/channels/chat:1/messages",
        "/v1/channels/chat:1/events",
        "/v1/channels/chat:1",
        "/v1/channels",
    ] {
        let res = c
            .get(server.url(path))
            .header("authorization", &bearer)
            .send()
            .await
            .unwrap();
        assert_eq!(
            status_and_code(res).await,
            (403, "forbidden".to_string()),
            "{path}"
        );
    }

    // The API key, by either header, may publish anywhere and read history, not subscribe.
    let res = c
        .post(server.url("/v1/channels/news/messages"))
        .header("x-api-key", PUBLISHER_KEY)
        .body("breaking")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let res = c
        .get(server.url("/v1/channels/news/messages"))
        .bearer_auth(PUBLISHER_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let history: Value = res.json().await.unwrap();
    assert_eq!(history["events"][0]["data"], "breaking", "{history}");
    let res = c
        .get(server.url("/v1/channels/news/events"))
        .bearer_auth(PUBLISHER_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);

    // Batch publish: each item is checked on its own.
    let res = c
        .post(server.url("/v1/publish"))
        .bearer_auth(&alice)
        .json(&json!([
            {"channel": "chat:2", "data": "ok"},
            {"channel": "secret", "data": "no"},
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    let results = body["results"].as_array().expect("results");
    assert!(results[0]["id"].is_string(), "{body}");
    assert_eq!(results[1]["error"]["code"], "forbidden", "{body}");

    // Unknown routes are still 404, credential or not.
    let res = c.get(server.url("/v2/nothing")).send().await.unwrap();
    assert_eq!(res.status(), 404);

    // A query token works on GET (EventSource cannot set headers), never on POST.
    let reader = token("bob", 600, json!({"subscribe": ["chat:*"]}));
    let mut sse = SseClient::connect(
        &server,
        &format!("/v1/channels/chat:1/events?access_token={reader}"),
        None,
    )
    .await;
    let id = publish_with_key(&server, "chat:1", "live").await;
    let event = sse.next().await.expect("event");
    assert_eq!(
        (event.id.as_deref(), event.data.as_str()),
        (Some(id.as_str()), "live")
    );
    let res = c
        .post(server.url(&format!(
            "/v1/channels/chat:1/messages?access_token={alice}"
        )))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    server.stop().await;
}

/// Publishes with the publisher's API key and returns the id, asserting 201.
async fn publish_with_key(server: &TestServer, channel: &str, data: &str) -> String {
    let res = server
        .client
        .post(server.url(&format!("/v1/channels/{channel}/messages")))
        .bearer_auth(PUBLISHER_KEY)
        .body(data.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    body["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn live_connections_end_when_their_token_expires_unless_refreshed() {
    let server = TestServer::start_with(secured).await;
    let grants = json!({"subscribe": ["room"]});

    // SSE: a short-lived token; the stream says why it ends, then ends.
    let short = token("sse-user", 2, grants.clone());
    let mut sse = SseClient::connect(
        &server,
        &format!("/v1/channels/room/events?access_token={short}"),
        None,
    )
    .await;
    let id = publish_with_key(&server, "room", "before expiry").await;
    assert_eq!(sse.next().await.unwrap().id.as_deref(), Some(id.as_str()));
    let control = sse.expect_control("reconnect").await;
    assert_eq!(control["reason"], "token_expired", "{control}");
    assert!(sse.next().await.is_none(), "the stream ends after the hint");

    // WebSocket: one client refreshes, one does not.
    let stale = token("ws-stale", 2, grants.clone());
    let fresh_soon = token("ws-fresh", 2, grants.clone());
    let mut stale_ws = WsClient::connect(
        &server,
        &format!("/v1/channels/room/ws?access_token={stale}"),
    )
    .await;
    let mut fresh_ws = WsClient::connect(
        &server,
        &format!("/v1/channels/room/ws?access_token={fresh_soon}"),
    )
    .await;
    // A refresh that does not grant this channel is refused and changes nothing.
    fresh_ws
        .send_json(json!({"type": "auth", "token": token("ws-fresh", 600, json!({"subscribe": ["other"]})), "ref": 1}))
        .await;
    let refused = fresh_ws.next().await.unwrap();
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{refused}"
    );
    let long = token("ws-fresh", 600, grants.clone());
    fresh_ws
        .send_json(json!({"type": "auth", "token": long, "ref": 2}))
        .await;
    let ok = fresh_ws.next().await.unwrap();
    assert_eq!(ok["type"], "auth_ok", "{ok}");
    assert_eq!(ok["ref"], 2);
    assert!(ok["expires_at"].as_u64().unwrap() >= now() + 500, "{ok}");

    let closed = stale_ws.next().await.unwrap();
    assert_eq!(closed["type"], "close", "{closed}");
    assert_eq!(closed["code"], 4001, "{closed}");
    assert_eq!(closed["reason"], "token expired");

    // The refreshed one outlives its first token and still receives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let id = publish_with_key(&server, "room", "after expiry").await;
    let message = fresh_ws.next().await.unwrap();
    assert_eq!(
        (message["type"].as_str(), message["id"].as_str()),
        (Some("message"), Some(id.as_str())),
        "{message}"
    );

    // Publishing over the socket needs the publish capability.
    fresh_ws
        .send_json(json!({"type": "publish", "data": "from the client", "ref": 3}))
        .await;
    let denied = fresh_ws.next().await.unwrap();
    assert_eq!(
        (denied["code"].as_str(), denied["ref"].as_i64()),
        (Some("forbidden"), Some(3)),
        "{denied}"
    );

    server.stop().await;
}

/// An Ed25519 key pair: the PKCS#8 private key for signing, and the public key as the PEM
/// file a server is configured with.
fn ed25519_pair() -> (Vec<u8>, String) {
    use ring::signature::KeyPair as _;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    // SubjectPublicKeyInfo for Ed25519: a fixed 12-byte prefix, then the 32-byte key.
    let mut spki = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    spki.extend_from_slice(pair.public_key().as_ref());
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(&spki)
    );
    (pkcs8.as_ref().to_vec(), pem)
}

#[tokio::test]
async fn eddsa_tokens_from_a_public_key_file_and_no_algorithm_confusion() {
    let (private, public_pem) = ed25519_pair();
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("issuer.pem");
    std::fs::write(&key_file, &public_pem).unwrap();
    let server = TestServer::start_with(|s| s.auth.jwt_public_key_file = key_file.clone()).await;

    let claims = json!({"sub": "svc", "exp": now() + 600, "dormouse": {"publish": ["*"]}});
    let ed = jsonwebtoken::encode(
        &Header::new(Algorithm::EdDSA),
        &claims,
        &EncodingKey::from_ed_der(&private),
    )
    .unwrap();
    let res = server
        .client
        .post(server.url("/v1/channels/jobs/messages"))
        .bearer_auth(&ed)
        .body("done")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);

    // HS256 is not configured: a token signed with the public key as an HMAC secret (the
    // classic algorithm-confusion forgery) is refused.
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(public_pem.as_bytes()),
    )
    .unwrap();
    let res = server
        .client
        .post(server.url("/v1/channels/jobs/messages"))
        .bearer_auth(&confused)
        .body("forged")
        .send()
        .await
        .unwrap();
    let (status, code, message) = error_of(res).await;
    assert_eq!((status, code.as_str()), (401, "bad_token"));
    assert!(message.contains("HS256"), "{message}");
    server.stop().await;
}

#[tokio::test]
async fn bad_auth_settings_fail_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = support::settings(dir.path());
    s.auth.jwt_secret = "short".to_string();
    let err = format!("{:#}", dormouse_gateway::Dormouse::open(s).unwrap_err());
    assert!(
        err.contains("auth.jwt_secret") && err.contains("32 bytes"),
        "{err}"
    );

    let mut s = support::settings(dir.path());
    s.auth.jwt_public_key_file = dir.path().join("missing.pem");
    let err = format!("{:#}", dormouse_gateway::Dormouse::open(s).unwrap_err());
    assert!(err.contains("auth.jwt_public_key_file"), "{err}");

    let mut s = support::settings(dir.path());
    s.cors.allowed_origins = vec!["bad\norigin".to_string()];
    let err = format!("{:#}", dormouse_gateway::Dormouse::open(s).unwrap_err());
    assert!(err.contains("cors.allowed_origins"), "{err}");
}

#[tokio::test]
async fn cors_is_off_by_default_and_follows_the_allowed_origins() {
    let server = TestServer::start().await;
    let res = server
        .client
        .get(server.url("/v1/channels/a/messages"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
    server.stop().await;

    let server = TestServer::start_with(|s| {
        s.cors.allowed_origins = vec!["https://app.example.com".to_string()];
    })
    .await;
    let preflight = |origin: &'static str| {
        server
            .client
            .request(
                reqwest::Method::OPTIONS,
                server.url("/v1/channels/a/messages"),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };
    let res = preflight("https://app.example.com").await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let allowed = res.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("last-event-id"),
        "{allowed}"
    );
    let res = preflight("https://evil.example.com").await.unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
    server.stop().await;
}

#[tokio::test]
async fn a_configured_issuer_and_audience_are_required_claims() {
    let server = TestServer::start_with(|s| {
        secured(s);
        s.auth.issuer = "https://issuer.test".to_string();
        s.auth.audience = "dormouse".to_string();
    })
    .await;
    let sign = |claims: Value| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let grants = json!({"publish": ["*"]});
    let exp = now() + 60;
    let cases = [
        (
            json!({"exp": exp, "iss": "https://issuer.test", "aud": "dormouse", "dormouse": grants}),
            201,
        ),
        (
            json!({"exp": exp, "aud": "dormouse", "dormouse": grants}),
            401,
        ),
        (
            json!({"exp": exp, "iss": "https://issuer.test", "dormouse": grants}),
            401,
        ),
        (
            json!({"exp": exp, "iss": "https://other.test", "aud": "dormouse", "dormouse": grants}),
            401,
        ),
        (
            json!({"exp": exp, "iss": "https://issuer.test", "aud": "other", "dormouse": grants}),
            401,
        ),
    ];
    for (claims, expected) in cases {
        let res = server
            .client
            .post(server.url("/v1/channels/jobs/messages"))
            .bearer_auth(sign(claims.clone()))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), expected, "{claims}");
        if expected == 401 {
            let (_, code, _) = error_of(res).await;
            assert_eq!(code, "bad_token", "{claims}");
        }
    }
    server.stop().await;
}
