//! The admin dashboard: routes and credentials over HTTP, then the page itself driven in
//! headless Chromium over the DevTools protocol: a token is pasted, messages are published
//! while the page is open, and its figures, busiest-channel list, latency chart, channel
//! inspector and test-publish form are checked to follow.
//!
//! Needs Chromium (`apt-get install -y chromium`); the test fails, rather than skipping, when
//! it is missing. `DORMOUSE_CHROMIUM` may name another binary.

use dormouse_testkit as support;

use dormouse_gateway::ApiKeySettings;
use serde_json::{Value, json};
use support::browser::Browser;
use support::{SseClient, TestServer, WsClient, error_of};

const OPERATOR: &str = "operator-key-0123456789";
const PUBLISHER: &str = "publisher-key-0123456789";

fn key(name: &str, key: &str, admin: bool) -> ApiKeySettings {
    let all = vec!["*".to_string()];
    ApiKeySettings {
        publish: all.clone(),
        subscribe: if admin { all.clone() } else { Vec::new() },
        history: if admin { all } else { Vec::new() },
        admin,
        ..ApiKeySettings::new(name, key)
    }
}

async fn start_admin_server() -> TestServer {
    TestServer::start_with(|s| {
        s.admin.enabled = true;
        s.auth.api_keys = vec![
            key("operator", OPERATOR, true),
            key("publisher", PUBLISHER, false),
        ];
    })
    .await
}

#[tokio::test]
async fn the_page_is_served_only_when_enabled_and_its_figures_need_the_admin_capability() {
    let off = TestServer::start().await;
    for path in ["/admin", "/admin/api/stats"] {
        let res = off.client.get(off.url(path)).send().await.unwrap();
        assert_eq!(error_of(res).await.1, "not_found", "{path}");
    }
    off.stop().await;

    let server = start_admin_server().await;
    let page = server
        .client
        .get(server.url("/admin"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(html.contains("<canvas id=\"latency\""));
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "self-contained: nothing loaded from elsewhere"
    );

    let stats = |key: Option<&'static str>| {
        let mut req = server.client.get(server.url("/admin/api/stats"));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        req.send()
    };
    let (status, code, _) = error_of(stats(None).await.unwrap()).await;
    assert_eq!((status, code.as_str()), (401, "missing_credential"));
    let (status, code, _) = error_of(stats(Some(PUBLISHER)).await.unwrap()).await;
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    let res = stats(Some(OPERATOR)).await.unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["auth"], true);
    assert_eq!(body["figures"]["published_total"], 0);
    assert_eq!(body["namespaces"][0]["namespace"], "channel");
    server.stop().await;
}

/// The page's live figures, as the data attributes the script keeps next to the text.
const FIGURES: &str = r#"(() => {
  const v = (id) => document.getElementById(id).dataset.value;
  const n = (id) => v(id) === "" || v(id) === undefined ? null : Number(v(id));
  return {
    status: document.getElementById("status").dataset.state,
    published: n("published-total"), delivered: n("delivered-total"),
    rate_in: n("rate-in"), sse: n("conn-sse"), ws: n("conn-ws"),
    subscribers: n("subscribers"), storage: n("storage"),
    busiest: [...document.querySelectorAll('#busiest tr')].map((r) => [...r.cells].map((c) => c.innerText)),
    objects: [...document.querySelectorAll('#objects tr')].map((r) => [...r.cells].map((c) => c.innerText)),
    points: Number(document.getElementById("latency").dataset.points),
  };
})()"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_messages_published_while_it_is_open() {
    let server = start_admin_server().await;
    let browser = Browser::launch().await;
    let mut page = browser.open(&server.url("/admin")).await;

    // Auth is on: the page asks for a token, and takes the pasted one.
    page.until("the token prompt", FIGURES, |f| f["status"] == "auth")
        .await;
    page.eval(&format!(
        r#"document.getElementById("token").value = "{OPERATOR}";
           document.getElementById("token-form").requestSubmit(); true"#
    ))
    .await;
    let before = page
        .until("the first figures", FIGURES, |f| {
            f["status"] == "ok" && f["published"].is_number()
        })
        .await;
    assert_eq!(before["published"], 0, "{before}");
    assert_eq!(before["sse"], 0, "{before}");
    assert_eq!(
        page.eval(r#"sessionStorage.getItem("dormouse.admin.token")"#)
            .await,
        OPERATOR,
        "kept for this tab only"
    );

    // Two subscribers and six messages, while the page watches.
    let token = format!("access_token={OPERATOR}");
    let mut sse = SseClient::connect(
        &server,
        &format!("/v1/channels/dash-hot/events?{token}"),
        None,
    )
    .await;
    let mut ws = WsClient::connect(&server, &format!("/v1/channels/dash-hot/ws?{token}")).await;
    let publish = |channel: &'static str, data: String| {
        let request = server
            .client
            .post(server.url(&format!("/v1/channels/{channel}/messages")))
            .bearer_auth(OPERATOR)
            .body(data);
        async move {
            let res = request.send().await.unwrap();
            assert_eq!(res.status(), 201);
        }
    };
    for i in 0..5 {
        publish("dash-hot", format!("m{i}")).await;
    }
    publish("dash-cold", "only one".to_string()).await;
    for i in 0..5 {
        assert_eq!(sse.next().await.unwrap().data, format!("m{i}"));
        assert_eq!(ws.next().await.unwrap()["data"], format!("m{i}"));
    }

    let after = page
        .until("the published messages", FIGURES, |f| {
            f["published"] == 6
                && f["delivered"].as_u64() >= Some(10)
                && f["points"].as_u64() > Some(0)
                && f["storage"].as_u64() > Some(0)
        })
        .await;
    assert_eq!(after["sse"], 1, "{after}");
    assert_eq!(after["ws"], 1, "{after}");
    assert_eq!(after["subscribers"], 2, "{after}");
    let busiest = after["busiest"].as_array().unwrap();
    assert_eq!(busiest[0][0], "dash-hot", "{after}");
    assert_eq!(busiest[0][2], "5", "{after}");
    assert_eq!(busiest[1][0], "dash-cold", "{after}");
    assert_eq!(after["objects"][0][0], "channel", "{after}");
    assert_eq!(after["objects"][0][1], "2", "two active channels: {after}");

    // The inspector, opened from the busiest list, shows the channel's recent events.
    page.eval(r#"document.querySelector('#busiest button').click(); true"#)
        .await;
    let inspector = r#"(() => ({
      subscribers: document.querySelector('#channel-info dd[data-field="subscribers"]')?.innerText,
      state: document.querySelector('#channel-info dd[data-field="state"]')?.innerText,
      events: [...document.querySelectorAll('#channel-events tr')].map((r) => r.cells[3]?.innerText),
    }))()"#;
    let inspected = page
        .until("the inspected channel", inspector, |v| {
            v["events"].as_array().is_some_and(|e| e.len() == 5)
        })
        .await;
    assert_eq!(inspected["subscribers"], "2", "{inspected}");
    assert_eq!(inspected["state"], "active", "{inspected}");
    assert_eq!(
        inspected["events"],
        json!(["m4", "m3", "m2", "m1", "m0"]),
        "newest first"
    );

    // The test-publish form goes through the real publish route: subscribers get it.
    page.eval(
        r#"document.getElementById("publish-event").value = "note";
           document.getElementById("publish-data").value = "from the page";
           document.getElementById("publish-form").requestSubmit(); true"#,
    )
    .await;
    let sent = sse.next().await.unwrap();
    assert_eq!(
        (sent.event.as_str(), sent.data.as_str()),
        ("note", "from the page")
    );
    let result = page
        .until(
            "the publish result",
            r#"document.getElementById("publish-result").dataset.state || "" "#,
            |s| s == "ok",
        )
        .await;
    assert_eq!(result, "ok");
    page.until("the seventh message", FIGURES, |f| f["published"] == 7)
        .await;

    drop(page);
    browser.close().await;
    drop((sse, ws));
    server.stop().await;
}
