//! Every route's path, named once. The router declares the routes with these constants, the
//! auth middleware decides what each route needs by them, and the connection layer
//! recognises SSE subscriptions by them: renaming a route here renames it everywhere, so it
//! cannot silently lose its authorisation rule or the SSE fast path.

/// `GET`: list channels (admin).
pub(crate) const CHANNELS: &str = "/v1/channels";
/// `GET`: describe a channel; `DELETE`: delete it (admin).
pub(crate) const CHANNEL: &str = "/v1/channels/{channel}";
/// `POST`: publish one message; `GET`: read history.
pub(crate) const CHANNEL_MESSAGES: &str = "/v1/channels/{channel}/messages";
/// `GET`: subscribe over SSE.
pub(crate) const CHANNEL_EVENTS: &str = "/v1/channels/{channel}/events";
/// `GET ?channel=a&channel=b`: one event stream of several channels.
pub(crate) const EVENTS: &str = "/v1/events";
/// `GET`: subscribe (and publish) over WebSocket.
pub(crate) const CHANNEL_WS: &str = "/v1/channels/{channel}/ws";
/// `GET`: who follows the channel, by subject (subscribe), where it keeps presence.
pub(crate) const CHANNEL_PRESENCE: &str = "/v1/channels/{channel}/presence";
/// `GET`: the channel's connections on every node (connections).
pub(crate) const CHANNEL_CONNECTIONS: &str = "/v1/channels/{channel}/connections";
/// `GET`: one connection (connections).
pub(crate) const CONNECTION: &str = "/v1/connections/{id}";
/// `POST`: a message to one connection (connections).
pub(crate) const CONNECTION_MESSAGES: &str = "/v1/connections/{id}/messages";
/// `POST`: close one connection (connections).
pub(crate) const CONNECTION_CLOSE: &str = "/v1/connections/{id}/close";
/// `GET`: a subject's connections on every node (connections).
pub(crate) const SUBJECT_CONNECTIONS: &str = "/v1/subjects/{subject}/connections";
/// `POST`: a message to every connection of a subject (connections).
pub(crate) const SUBJECT_MESSAGES: &str = "/v1/subjects/{subject}/messages";
/// `POST`: close every connection of a subject (connections).
pub(crate) const SUBJECT_CLOSE: &str = "/v1/subjects/{subject}/close";
/// `GET`: a hook's own WebSocket (docs/HOOKS.md); open when the hook takes `connect`.
pub(crate) const HOOK_WS: &str = "/v1/hooks/{name}/ws";
/// `POST`: many messages to one or many channels.
pub(crate) const PUBLISH: &str = "/v1/publish";
/// `GET`: Prometheus text.
pub(crate) const METRICS: &str = "/metrics";
/// Any method: a user object's own routes.
pub(crate) const OBJECT: &str = "/v1/objects/{namespace}/{name}";
/// Any method: a user object's own routes, below its name.
pub(crate) const OBJECT_REST: &str = "/v1/objects/{namespace}/{name}/{*rest}";
/// `POST`: publish, as Redis-backed SSE proxies take it.
pub(crate) const COMPAT_PUBLISH: &str = "/channel/{channel}/messages";
/// `GET ?channel=`: subscribe over SSE, as Redis-backed SSE proxies take it.
pub(crate) const COMPAT_SUBSCRIBE: &str = "/sub";
/// `GET`: the admin page's figures (admin).
pub(crate) const ADMIN_STATS: &str = "/admin/api/stats";
/// `GET`: the admin page (static, open).
pub(crate) const ADMIN_PAGE: &str = "/admin";
/// `GET`: liveness (open).
pub(crate) const HEALTHZ: &str = "/healthz";
/// `GET`: readiness (open).
pub(crate) const READYZ: &str = "/readyz";

/// The `GET` routes that answer with an event stream, which the connection layer serves
/// outside hyper on HTTP/1.x (`conn/sniff.rs`, `conn/raw_sse.rs`).
pub(crate) const SSE_SUBSCRIPTIONS: [&str; 3] = [CHANNEL_EVENTS, COMPAT_SUBSCRIBE, EVENTS];
