//! The [`Object`] trait a user implements: the Durable Object class of this runtime.

use std::future::Future;

use crate::{Context, HttpRequest, HttpResponse, Inbound, Socket};

/// A user-defined object type, the equivalent of a Durable Object class.
///
/// The runtime creates an instance per name on first use ([`Object::activate`], which rebuilds
/// it from storage), feeds it requests one at a time ([`Object::handle`]), and drops it when
/// it has been idle for the namespace's `idle_timeout`. Anything that must survive that, or a
/// crash, goes through the [`Context`]'s storage; plain fields are a cache.
///
/// A handler's storage writes commit together when it returns `Ok`, and its reply (and any
/// effects registered with [`Context::after_commit`]) are released only once those writes are
/// durable. A handler that returns `Err` or panics has its writes discarded and its instance
/// dropped, so the next request rebuilds it from storage: a bug in one object can never leave
/// a half-updated instance serving requests, and never takes down the process.
///
/// # Example
/// ```
/// use dormouse_runtime::{Context, Object};
///
/// /// Remembers the last greeting; a minimal object.
/// struct Greeter {
///     last: Option<String>,
/// }
///
/// impl Object for Greeter {
///     type Env = ();
///     type Request = String;
///     type Response = Option<String>;
///
///     async fn activate(ctx: &mut Context<'_>, _env: &()) -> anyhow::Result<Self> {
///         let last = ctx.get(b"last")?.map(|b| String::from_utf8_lossy(&b).into_owned());
///         Ok(Greeter { last })
///     }
///
///     /// Stores the new greeting and answers the previous one.
///     async fn handle(&mut self, ctx: &mut Context<'_>, hello: String) -> anyhow::Result<Option<String>> {
///         ctx.put(b"last".to_vec(), hello.clone().into_bytes());
///         Ok(self.last.replace(hello))
///     }
/// }
/// # let _ = std::marker::PhantomData::<Greeter>;
/// ```
pub trait Object: Sized + Send + 'static {
    /// What every instance of the type shares (configuration, handles to other services),
    /// the equivalent of a Durable Object's `env`.
    type Env: Send + Sync + 'static;
    /// A typed request; the runtime never inspects it.
    type Request: Send + 'static;
    /// What a request answers.
    type Response: Send + 'static;

    /// Builds the instance from its storage. Called once per activation, before the first
    /// request after a cold start or a hibernation.
    fn activate(
        ctx: &mut Context<'_>,
        env: &Self::Env,
    ) -> impl Future<Output = anyhow::Result<Self>> + Send;

    /// Handles one request. Requests to one object never overlap.
    fn handle(
        &mut self,
        ctx: &mut Context<'_>,
        request: Self::Request,
    ) -> impl Future<Output = anyhow::Result<Self::Response>> + Send;

    /// Handles an HTTP request routed to this object (`/v1/objects/{namespace}/{name}/...`
    /// when its namespace is mounted on the gateway). The default answers 404.
    fn fetch(
        &mut self,
        ctx: &mut Context<'_>,
        request: HttpRequest,
    ) -> impl Future<Output = anyhow::Result<HttpResponse>> + Send {
        let _ = (ctx, request);
        async {
            Ok(http::Response::builder()
                .status(http::StatusCode::NOT_FOUND)
                .header("content-type", "application/json")
                .body(bytes::Bytes::from_static(
                    br#"{"error":{"code":"not_found","message":"this object does not handle HTTP requests"}}"#,
                ))?)
        }
    }

    /// A WebSocket client connected (the upgrade request is in `request`). Keep it with
    /// [`Context::accept_socket`]; a socket not accepted is closed. Accepted sockets stay
    /// connected across hibernation, and their messages wake the object. The default refuses.
    fn websocket(
        &mut self,
        ctx: &mut Context<'_>,
        socket: Socket,
        request: http::request::Parts,
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        let _ = (ctx, socket, request);
        async { Ok(()) }
    }

    /// A client sent a message on an accepted socket (its attachment is as the object left
    /// it, even across hibernation).
    fn socket_message(
        &mut self,
        ctx: &mut Context<'_>,
        socket: &Socket,
        message: Inbound,
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        let _ = (ctx, socket, message);
        async { Ok(()) }
    }

    /// A client's socket closed; the socket has already left [`Context::sockets`].
    fn socket_close(
        &mut self,
        ctx: &mut Context<'_>,
        socket: &Socket,
    ) -> impl Future<Output = anyhow::Result<()>> + Send {
        let _ = (ctx, socket);
        async { Ok(()) }
    }

    /// Runs when the alarm set with [`Context::set_alarm`] is due, waking the object if it
    /// hibernated, in turn with its requests. On `Ok` the alarm is cleared (unless the handler
    /// set a new one); on `Err` (or a panic) it is retried with exponential backoff (2 s, 4 s,
    /// ...) up to 6 attempts. At least once: a crash during the handler fires it again.
    fn alarm(&mut self, ctx: &mut Context<'_>) -> impl Future<Output = anyhow::Result<()>> + Send {
        let _ = ctx;
        async { Ok(()) }
    }
}
