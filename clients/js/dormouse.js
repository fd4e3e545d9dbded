// Dormouse client for browsers and Node: follow channels over one WebSocket (or one event
// stream), resume after every interruption from the last id seen, surface gaps, presence
// and errors to the app, and publish with idempotency keys so a retried publish is stored
// once. No dependencies: it needs only `fetch`, `WebSocket` (Node 22+, or Node 20 with
// --experimental-websocket, or one passed in) and `TextDecoder`.
//
// The wire protocol is Dormouse's docs/API.md; this file is the only place a JavaScript app
// needs to know it.

const DEFAULT_BACKOFF = { initialMs: 500, maxMs: 30_000 };
/** A backend's close (the server never sends these on its own): reconnecting would undo it. */
const isFinalClose = (code) => code === 1000 || (code >= 3000 && code <= 3999) || (code >= 4100 && code <= 4999);

/** Error codes a WebSocket answers that waiting can fix (docs/API.md's error table). */
const TRANSIENT_CODES = new Set(["channel_full", "overloaded", "rate_limited", "unavailable", "storage_unavailable", "network"]);

/** A tiny event emitter: `on` returns a function that removes the listener. */
class Emitter {
  #listeners = new Map();

  on(type, listener) {
    if (!this.#listeners.has(type)) this.#listeners.set(type, new Set());
    this.#listeners.get(type).add(listener);
    return () => this.#listeners.get(type)?.delete(listener);
  }

  emit(type, value) {
    for (const listener of this.#listeners.get(type) ?? []) {
      try {
        listener(value);
      } catch (e) {
        // A listener's bug must not stop delivery to the others, nor the connection.
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }
}

/** An error the server answered with: its HTTP status, `error.code` and `error.message`. */
export class DormouseError extends Error {
  constructor(status, code, message) {
    super(`${status} ${code}: ${message}`);
    this.name = "DormouseError";
    this.status = status;
    this.code = code;
    this.serverMessage = message;
  }

  /** True when trying again later can succeed (the server is busy or restarting). */
  get transient() {
    if (this.status === 0) return TRANSIENT_CODES.has(this.code);
    return this.status === 429 || this.status >= 500;
  }
}

async function errorOf(response) {
  const text = await response.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    if (body?.error?.code) {
      const error = new DormouseError(response.status, body.error.code, body.error.message ?? "");
      // On a stream of several channels, the one refused.
      if (typeof body.error.channel === "string") error.channel = body.error.channel;
      return error;
    }
  } catch {
    // Not JSON: a proxy's page, say.
  }
  return new DormouseError(response.status, "http_error", text.slice(0, 200) || response.statusText);
}

function base64ToBytes(text) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

function bytesToBase64(bytes) {
  let raw = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    raw += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(raw);
}

/** Seconds since the epoch at which a JWT expires, or null (not a JWT, or no `exp`). */
export function tokenExpiry(token) {
  const part = typeof token === "string" ? token.split(".")[1] : undefined;
  if (!part) return null;
  try {
    const json = atob(part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "="));
    const exp = JSON.parse(json).exp;
    return typeof exp === "number" ? exp : null;
  } catch {
    return null;
  }
}

/** A message as the app receives it, from either transport. */
function message(channel, id, event, data, dataBase64) {
  const msg = { channel, id, event };
  if (dataBase64 !== undefined) {
    msg.bytes = base64ToBytes(dataBase64);
  } else {
    msg.data = data;
  }
  return msg;
}

/** Incremental Server-Sent Events parser (WHATWG rules: fields joined, data lines by \n). */
class SseParser {
  #buffer = "";
  #event = { id: undefined, event: "", data: [] };

  /** Feeds text; returns the complete events. A `retry:` field comes back as {retry}. */
  feed(text) {
    this.#buffer += text;
    const out = [];
    let start = 0;
    for (;;) {
      const nl = this.#buffer.indexOf("\n", start);
      if (nl < 0) break;
      let line = this.#buffer.slice(start, nl);
      start = nl + 1;
      if (line.endsWith("\r")) line = line.slice(0, -1);
      if (line === "") {
        const e = this.#event;
        if (e.data.length > 0 || e.event) {
          out.push({ id: e.id, event: e.event || "message", data: e.data.join("\n") });
        }
        this.#event = { id: undefined, event: "", data: [] };
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") this.#event.data.push(value);
      else if (field === "event") this.#event.event = value;
      else if (field === "id") this.#event.id = value;
      else if (field === "retry" && /^\d+$/.test(value)) out.push({ retry: Number(value) });
    }
    this.#buffer = this.#buffer.slice(start);
    return out;
  }
}

/**
 * One channel the client follows. Emits `message`, `gap`, `join`, `leave`, `subscribed`
 * (each time the server confirms it, after a reconnect too) and `error` (the server refused
 * it: the subscription ends).
 */
export class Subscription extends Emitter {
  constructor(client, channel, options) {
    super();
    this.client = client;
    this.channel = channel;
    /** The id of the last message delivered: where a reconnect resumes. */
    this.lastEventId = options.lastEventId ?? null;
    this.rewind = options.rewind ?? null;
    this.active = true;
  }

  /** Stops following the channel. */
  unsubscribe() {
    if (!this.active) return;
    this.active = false;
    this.client._unsubscribe(this);
  }

  _deliver(msg) {
    if (!this.active) return;
    if (msg.id) this.lastEventId = msg.id;
    // Once anything arrived, a reconnect resumes from the cursor, never rewinds again.
    this.rewind = null;
    this.emit("message", msg);
  }
}

/**
 * A connection to a Dormouse server that follows channels and stays connected.
 *
 * Options: `url` (http(s)://host:port), `token` (a string, or a function returning one or a
 * promise of one, asked again before it expires and after the server refuses it),
 * `transport` ("websocket", the default, or "sse"), `backoff` ({initialMs, maxMs}),
 * `refreshBeforeMs` (how long before a token expires to ask for a new one, 30 s), and
 * `WebSocket` / `fetch` to use instead of the global ones.
 *
 * Emits `state` ("connecting", "connected", "disconnected", "closed"), `connected` (with the
 * server's connection id), `error` (what went wrong; the client keeps trying unless it is
 * closed) and `closed` (a backend closed the connection for good: {code, reason}).
 */
export class Dormouse extends Emitter {
  #subs = new Map();
  #socket = null;
  #sse = null;
  #state = "disconnected";
  #failures = 0;
  #timer = null;
  #refreshTimer = null;
  #token = null;
  #refs = 0;
  #pending = new Map();
  #openedFor = null;
  #closed = false;
  #retryHintMs = null;
  /** Each connection attempt's number: handlers and awaits of an older one do nothing. */
  #generation = 0;
  #objects = new Set();

  constructor(options) {
    super();
    if (!options?.url) throw new TypeError("Dormouse: options.url is required");
    this.url = options.url.replace(/\/+$/, "");
    this.transport = options.transport ?? "websocket";
    if (!["websocket", "sse"].includes(this.transport)) {
      throw new TypeError(`Dormouse: transport must be "websocket" or "sse", not ${this.transport}`);
    }
    this.tokenSource = options.token ?? null;
    this.backoff = { ...DEFAULT_BACKOFF, ...(options.backoff ?? {}) };
    this.refreshBeforeMs = options.refreshBeforeMs ?? 30_000;
    /** An event stream silent this long (three keep-alives) is started again. */
    this.idleTimeoutMs = options.idleTimeoutMs ?? 45_000;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    if (this.transport === "websocket" && typeof this.WebSocket !== "function") {
      throw new TypeError("Dormouse: no WebSocket here; pass options.WebSocket or use transport: \"sse\"");
    }
  }

  /** "connecting", "connected", "disconnected" or "closed". */
  get state() {
    return this.#state;
  }

  /**
   * Follows `channel`. Options: `lastEventId` (resume after this id) or `rewind` (start
   * with the newest N). Returns the subscription; listen to its events.
   */
  subscribe(channel, options = {}) {
    if (this.#closed) throw new Error("Dormouse: the client is closed");
    if (this.#subs.has(channel)) return this.#subs.get(channel);
    const sub = new Subscription(this, channel, options);
    this.#subs.set(channel, sub);
    if (this.transport === "sse") {
      // An event stream names its channels in its URL: open it again with this one.
      this.#restart();
    } else if (this.#state === "connected" && this.#socket) {
      this.#sendSubscribe(sub);
    } else if (this.#state === "disconnected") {
      this.#connect();
    }
    return sub;
  }

  /**
   * Publishes `data` (a string or bytes) to `channel`; resolves to {id, duplicate} once the
   * server stored it. Options: `event` (its type), `idempotencyKey` (one is made when not
   * given), `retries` (attempts after a failure that may not have reached the server, 3).
   * Retries reuse the key, so a message is stored once however often it is sent.
   */
  async publish(channel, data, options = {}) {
    const key = options.idempotencyKey ?? randomKey();
    const retries = options.retries ?? 3;
    const path = `/v1/channels/${encodeURIComponent(channel)}/messages`;
    const query = options.event ? `?event=${encodeURIComponent(options.event)}` : "";
    let failures = 0;
    for (;;) {
      let response;
      try {
        response = await this.#http(`${path}${query}`, {
          method: "POST",
          headers: { "Idempotency-Key": key, "Content-Type": "application/octet-stream" },
          body: data,
        });
      } catch (e) {
        if (failures++ >= retries || this.#closed) throw e;
        await sleep(this.#delay(failures));
        continue;
      }
      if (response.ok) return response.json();
      const error = await errorOf(response);
      if (!error.transient || failures++ >= retries || this.#closed) throw error;
      await sleep(this.#delay(failures));
    }
  }

  /** Who follows `channel` (it must keep presence): one page, see docs/API.md. */
  async presence(channel, { after, limit } = {}) {
    const query = new URLSearchParams();
    if (after !== undefined) query.set("after", after);
    if (limit !== undefined) query.set("limit", String(limit));
    return this.#json(`/v1/channels/${encodeURIComponent(channel)}/presence?${query}`);
  }

  /**
   * A page of `channel`'s stored messages. Options as the route takes them: `after`,
   * `before`, `direction` ("forward" or "backward"), `since`, `until`, `limit`.
   */
  async history(channel, options = {}) {
    const query = new URLSearchParams();
    for (const [k, v] of Object.entries(options)) if (v !== undefined) query.set(k, String(v));
    const page = await this.#json(`/v1/channels/${encodeURIComponent(channel)}/messages?${query}`);
    page.events = page.events.map((e) => ({ ...message(channel, e.id, e.event, e.data, e.data_base64), timestampMs: e.timestamp_ms }));
    return page;
  }

  /**
   * A WebSocket to a user object (`/v1/objects/{namespace}/{name}{path}`), which speaks the
   * object's own protocol: reconnected with backoff when it drops (unless a backend or the
   * app closed it for good), with what the app sends while it is down queued until it is
   * back. Options: `path` (default `/ws`), `query` (an object of query parameters).
   */
  object(namespace, name, options = {}) {
    const socket = new ObjectSocket(this, namespace, name, options);
    this.#objects.add(socket);
    socket.on("closed", () => this.#objects.delete(socket));
    return socket;
  }

  /** What an {@link ObjectSocket} needs of its client. */
  _objectSocketParts() {
    return { url: this.url, WebSocket: this.WebSocket, token: () => this.#currentToken(), delay: (n) => this.#delay(n) };
  }

  /** Disconnects for good. */
  close() {
    this.#closed = true;
    clearTimeout(this.#timer);
    clearTimeout(this.#refreshTimer);
    this.#teardown();
    for (const socket of [...this.#objects]) socket.close();
    this.#setState("closed");
    for (const [, pending] of this.#pending) pending.reject(new Error("Dormouse: the client is closed"));
    this.#pending.clear();
  }

  // ---- internals ------------------------------------------------------------------------

  async #json(path) {
    const response = await this.#http(path, { method: "GET" });
    if (!response.ok) throw await errorOf(response);
    return response.json();
  }

  async #http(path, init) {
    const send = async (fresh) => {
      const token = await this.#currentToken(fresh);
      const headers = { ...(init.headers ?? {}) };
      if (token) headers.Authorization = `Bearer ${token}`;
      return this.fetch(`${this.url}${path}`, { ...init, headers });
    };
    const response = await send(false);
    // A token the server no longer takes (expired early, a clock that runs behind): a
    // token function is asked for a fresh one, once.
    if (response.status === 401 && typeof this.tokenSource === "function") {
      await response.body?.cancel();
      return send(true);
    }
    return response;
  }

  /** A backend ended the connection for good: the client is done, as after `close()`. */
  #endedByBackend(code, reason) {
    this.#teardown();
    this.#closed = true;
    clearTimeout(this.#timer);
    this.#setState("closed");
    this.emit("closed", { code, reason });
  }

  /** The token to use now: the cached one unless it is missing or about to expire. */
  async #currentToken(fresh = false) {
    if (this.tokenSource === null) return null;
    if (typeof this.tokenSource === "string") return this.tokenSource;
    const exp = tokenExpiry(this.#token);
    const soon = exp !== null && exp * 1000 - Date.now() < this.refreshBeforeMs;
    if (fresh || this.#token === null || soon) this.#token = await this.tokenSource();
    return this.#token;
  }

  #setState(state) {
    if (this.#state === state) return;
    this.#state = state;
    this.emit("state", state);
  }

  #delay(failures) {
    const base = Math.max(this.#retryHintMs ?? 0, this.backoff.initialMs);
    const cap = Math.min(this.backoff.maxMs, base * 2 ** Math.min(failures, 10));
    // Full jitter: clients cut off together do not come back together.
    return Math.max(base / 2, Math.random() * cap);
  }

  /** Opens the connection again, once for every change made in the same turn. */
  #restart() {
    if (this.#restartQueued) return;
    this.#restartQueued = true;
    queueMicrotask(() => {
      this.#restartQueued = false;
      if (this.#closed) return;
      this.#teardown();
      clearTimeout(this.#timer);
      if (this.#subs.size === 0) {
        this.#setState("disconnected");
        return;
      }
      this.#connect();
    });
  }

  #restartQueued = false;
  /** The subscriptions of the event stream, in its URL's order. */
  #streamChannels = [];

  #scheduleReconnect(reason) {
    if (this.#closed) return;
    this.#teardown();
    this.#setState("disconnected");
    if (this.#subs.size === 0) return;
    this.#failures++;
    const wait = this.#delay(this.#failures);
    if (reason) this.emit("error", reason);
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => this.#connect(), wait);
  }

  #teardown() {
    // Whatever the current attempt still has in flight is now stale.
    this.#generation++;
    clearTimeout(this.#refreshTimer);
    for (const [, pending] of this.#pending) pending.reject(new Error("Dormouse: the connection ended"));
    this.#pending.clear();
    if (this.#socket) {
      const socket = this.#socket;
      this.#socket = null;
      socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
      try {
        socket.close(1000);
      } catch {
        // Already closing.
      }
    }
    if (this.#sse) {
      this.#sse.abort();
      this.#sse = null;
    }
  }

  async #connect() {
    if (this.#closed || this.#subs.size === 0) return;
    // One connection at a time: a pending retry or an older connection goes.
    clearTimeout(this.#timer);
    this.#teardown();
    const generation = this.#generation;
    this.#setState("connecting");
    let token;
    try {
      token = await this.#currentToken(this.#failures > 0 && typeof this.tokenSource === "function");
    } catch (e) {
      if (generation === this.#generation) this.#scheduleReconnect(e);
      return;
    }
    // Closed, superseded, or nothing left to follow while the token came.
    if (this.#closed || generation !== this.#generation) return;
    if (this.#subs.size === 0) {
      this.#setState("disconnected");
      return;
    }
    try {
      if (this.transport === "sse") await this.#connectSse(token, generation);
      else this.#connectWebSocket(token);
    } catch (e) {
      if (generation === this.#generation) this.#scheduleReconnect(e);
    }
  }

  #connectWebSocket(token) {
    const [first] = this.#subs.values();
    this.#openedFor = first.channel;
    const query = new URLSearchParams();
    if (first.lastEventId) query.set("last_event_id", first.lastEventId);
    else if (first.rewind) query.set("rewind", String(first.rewind));
    const path = `/v1/channels/${encodeURIComponent(first.channel)}/ws?${query}`;
    if (token) query.set("access_token", token);
    const base = this.url.replace(/^http/, "ws");
    const socket = new this.WebSocket(`${base}/v1/channels/${encodeURIComponent(first.channel)}/ws?${query}`);
    this.#socket = socket;
    let opened = false;
    socket.onopen = () => {
      opened = true;
    };
    socket.onmessage = (event) => {
      if (this.#socket === socket) this.#onSocketMessage(event.data);
    };
    // Some WebSocket implementations (Node's) report a refused handshake with an error and
    // no close: whichever comes first ends this connection.
    const lost = (code, reason) => {
      if (this.#socket !== socket) return;
      if (isFinalClose(code)) {
        this.#endedByBackend(code, reason);
        return;
      }
      if (!opened) {
        this.#socket = null;
        // The handshake was refused: a WebSocket cannot read why, so ask over HTTP.
        this.#explainRefusal(path).then((error) => {
          if (this.#closed || this.#socket !== null) return;
          // Nothing to retry for a channel the credential does not grant: drop it.
          if (error && (error.status === 403 || error.status === 400)) this.#fail(first, error);
          this.#scheduleReconnect(error ?? new Error("the WebSocket handshake failed"));
        });
        return;
      }
      this.#scheduleReconnect(new Error(`connection closed (${code}${reason ? `: ${reason}` : ""})`));
    };
    socket.onclose = (event) => lost(event.code, event.reason);
    socket.onerror = () => lost(1006, "");
  }

  /**
   * Why the handshake to `path` was refused: the same URL as a plain GET (the credential
   * in a header) answers what is wrong with it, or `websocket_upgrade_required` when
   * nothing is (then the refusal was passing: full, shedding load, or the network).
   */
  async #explainRefusal(path) {
    try {
      const response = await this.#http(path, { method: "GET" });
      if (response.ok) {
        await response.body?.cancel();
        return null;
      }
      const error = await errorOf(response);
      return error.code === "websocket_upgrade_required" ? null : error;
    } catch {
      return null;
    }
  }

  /** Where a channel without a cursor starts on a stream beside channels with one. */
  async #positionOf(sub) {
    const channel = encodeURIComponent(sub.channel);
    if (sub.rewind) {
      // The N newest (N is at most the server's page size), then the one before them,
      // after which the stream starts; none before them: from the oldest ("" in a cursor).
      const newest = await this.#http(`/v1/channels/${channel}/messages?direction=backward&limit=${sub.rewind}`, { method: "GET" });
      if (newest.ok) {
        const { events } = await newest.json();
        if (events.length < sub.rewind) return "";
        const oldest = events[events.length - 1].id;
        const before = await this.#http(`/v1/channels/${channel}/messages?direction=backward&limit=1&before=${encodeURIComponent(oldest)}`, { method: "GET" });
        if (before.ok) return (await before.json()).events[0]?.id ?? "";
        await before.body?.cancel();
      } else {
        await newest.body?.cancel();
      }
    }
    const response = await this.#http(`/v1/channels/${channel}`, { method: "GET" });
    if (!response.ok) {
      await response.body?.cancel();
      return null;
    }
    return (await response.json()).last_id ?? null;
  }

  #fail(sub, error) {
    sub.active = false;
    this.#subs.delete(sub.channel);
    sub.emit("error", error);
  }

  #onSocketMessage(text) {
    if (typeof text !== "string") return;
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    switch (frame.type) {
      case "connected":
        this.#failures = 0;
        this.#setState("connected");
        this.emit("connected", frame.connection_id);
        this.#scheduleRefresh();
        // The channel in the URL is followed; the others are asked for, each from its cursor.
        // Where a channel starts, the server says: a subscription that has seen no message
        // resumes from there, so a drop before its first message loses nothing.
        {
          const own = this.#subs.get(this.#openedFor);
          if (own && !own.lastEventId && frame.starts_after) own.lastEventId = frame.starts_after;
          own?.emit("subscribed", { channel: this.#openedFor });
        }
        for (const sub of this.#subs.values()) {
          if (sub.channel !== this.#openedFor) this.#sendSubscribe(sub);
        }
        break;
      case "message": {
        const sub = this.#subs.get(frame.channel);
        sub?._deliver(message(frame.channel, frame.id, frame.event, frame.data, frame.data_base64));
        break;
      }
      case "gap":
      case "join":
      case "leave":
        this.#subs.get(frame.channel)?.emit(frame.type, frame);
        break;
      case "direct":
        this.emit("direct", message(null, null, frame.event, frame.data, frame.data_base64));
        break;
      default:
        if (frame.ref !== undefined && this.#pending.has(frame.ref)) {
          const pending = this.#pending.get(frame.ref);
          this.#pending.delete(frame.ref);
          if (frame.type === "error") pending.reject(new DormouseError(0, frame.code, frame.message));
          else pending.resolve(frame);
        }
    }
  }

  #request(body) {
    const ref = ++this.#refs;
    return new Promise((resolve, reject) => {
      this.#pending.set(ref, { resolve, reject });
      try {
        this.#socket.send(JSON.stringify({ ...body, ref }));
      } catch (e) {
        this.#pending.delete(ref);
        reject(e);
      }
    });
  }

  #sendSubscribe(sub) {
    const body = { type: "subscribe", channel: sub.channel };
    if (sub.lastEventId) body.last_event_id = sub.lastEventId;
    else if (sub.rewind) body.rewind = sub.rewind;
    this.#request(body).then(
      (answer) => {
        if (!sub.lastEventId && answer.starts_after) sub.lastEventId = answer.starts_after;
        sub.emit("subscribed", { channel: sub.channel });
      },
      (error) => {
        if (this.#subs.get(sub.channel) !== sub) return;
        if (error.code === "already_subscribed") sub.emit("subscribed", { channel: sub.channel });
        else if (error instanceof DormouseError && !error.transient) this.#fail(sub, error);
        // A connection that ended (or a full channel) is asked again on the next one.
        else if (error instanceof DormouseError) this.#scheduleReconnect(error);
      },
    );
  }

  _unsubscribe(sub) {
    if (this.#subs.get(sub.channel) !== sub) return;
    this.#subs.delete(sub.channel);
    if (this.transport === "sse") {
      this.#restart();
      return;
    }
    if (this.#subs.size === 0) {
      this.#teardown();
      this.#setState("disconnected");
      return;
    }
    // The channel a WebSocket was opened for stays until it closes; its events are
    // dropped here, and the next connection is opened for another channel.
    if (this.#state === "connected" && sub.channel !== this.#openedFor) {
      this.#request({ type: "unsubscribe", channel: sub.channel }).catch(() => {});
    }
  }

  /** Asks for a fresh token before this one expires and hands it to the live connection. */
  #scheduleRefresh() {
    clearTimeout(this.#refreshTimer);
    if (typeof this.tokenSource !== "function") return;
    const exp = tokenExpiry(this.#token);
    if (exp === null) return;
    const lifetime = exp * 1000 - Date.now();
    // setTimeout fires at once past 2^31-1 ms; a token that far off is looked at again
    // then. A clock ahead of the server's (a lifetime already spent) waits a little, not 0.
    const wait = Math.min(2 ** 31 - 1, Math.max(1000, lifetime - Math.min(this.refreshBeforeMs, lifetime / 2)));
    const generation = this.#generation;
    this.#refreshTimer = setTimeout(async () => {
      try {
        const token = await this.#currentToken(true);
        // The connection it was for ended meanwhile: the next one takes the new token.
        if (generation !== this.#generation) return;
        if (this.transport === "websocket" && this.#socket && this.#state === "connected") {
          await this.#request({ type: "auth", token });
          this.#scheduleRefresh();
        } else {
          // An event stream cannot take a new credential: open it again with this one.
          this.#restart();
        }
      } catch (e) {
        this.emit("error", e);
      }
    }, wait);
  }

  async #connectSse(token, generation) {
    const controller = new AbortController();
    this.#sse = controller;
    const current = () => this.#sse === controller && generation === this.#generation;
    const channels = [...this.#subs.values()];
    this.#streamChannels = channels;
    const query = new URLSearchParams();
    for (const sub of channels) query.append("channel", sub.channel);
    const headers = { Accept: "text/event-stream" };
    if (token) headers.Authorization = `Bearer ${token}`;
    // In a cursor, an empty position means "everything retained": a channel joining a
    // stream whose others have positions starts instead after the channel's newest event.
    // One asking to `rewind` N starts before its N newest events: the id of the one before
    // them, read from its history (a stream's one `rewind` only applies when no channel
    // has a position, and to all of them). Without the `history` capability it starts
    // after its newest instead.
    const rewinds = new Set(channels.filter((c) => !c.lastEventId).map((c) => c.rewind ?? null));
    if (channels.some((c) => c.lastEventId) || rewinds.size > 1) {
      for (const sub of channels.filter((c) => !c.lastEventId)) {
        try {
          sub.lastEventId = await this.#positionOf(sub);
        } catch {
          // Unreachable: the stream's own request says so next.
        }
      }
      if (!current()) return;
    }
    const cursor = this.#streamCursor(channels);
    if (cursor) headers["Last-Event-ID"] = cursor;
    const rewind = channels.find((s) => !s.lastEventId && s.rewind)?.rewind;
    if (rewind) query.set("rewind", String(rewind));
    // Silence past three keep-alives (the server sends one every 15 s) means the network
    // went away without a word (a laptop asleep, a NAT that forgot): start again.
    let heard = Date.now();
    const watchdog = setInterval(() => {
      if (!current()) clearInterval(watchdog);
      else if (Date.now() - heard > this.idleTimeoutMs) controller.abort();
    }, Math.min(5000, this.idleTimeoutMs));
    try {
      let response;
      try {
        response = await this.fetch(`${this.url}/v1/events?${query}`, { headers, signal: controller.signal });
      } catch (e) {
        if (current()) this.#scheduleReconnect(e);
        else controller.abort();
        return;
      }
      if (!current()) {
        controller.abort();
        return;
      }
      if (!response.ok) {
        const error = await errorOf(response);
        if (!current()) return;
        if (error.status === 403 || error.status === 400) {
          // The server names the channel it refused when it can: only that one fails, and
          // the stream comes back for the others.
          const named = channels.find((sub) => sub.channel === error.channel);
          for (const sub of named ? [named] : channels) this.#fail(sub, error);
        }
        this.#scheduleReconnect(error);
        return;
      }
      this.#failures = 0;
      this.#setState("connected");
      this.#scheduleRefresh();
      for (const sub of channels) sub.emit("subscribed", { channel: sub.channel });
      const parser = new SseParser();
      const decoder = new TextDecoder();
      const reader = response.body.getReader();
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          heard = Date.now();
          for (const event of parser.feed(decoder.decode(value, { stream: true }))) {
            if (event.retry !== undefined) {
              this.#retryHintMs = event.retry;
              continue;
            }
            if (current()) this.#onSseEvent(event);
          }
        }
      } catch (e) {
        if (current()) this.#scheduleReconnect(e);
        return;
      }
      if (current()) this.#scheduleReconnect(new Error("the server ended the event stream"));
    } finally {
      clearInterval(watchdog);
    }
  }

  /**
   * What to send as Last-Event-ID: every channel's position in the URL's order, comma
   * separated, empty for a channel with none yet (docs/API.md, `/v1/events`). Built from
   * each subscription's own cursor, so a stream opened again with one more channel resumes
   * the others exactly.
   */
  #streamCursor(channels) {
    if (!channels.some((s) => s.lastEventId)) return null;
    return channels.map((s) => s.lastEventId ?? "").join(",");
  }

  #onSseEvent(event) {
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      data = null;
    }
    // No message is named `dormouse.*` (the server refuses such names); anything else
    // without an id is a message a backend sent to this connection alone.
    if (!event.id && !event.event.startsWith("dormouse.")) {
      // A message a backend sent to this connection alone (no id, not a control).
      const bytes = event.event.startsWith("base64:");
      const name = bytes ? event.event.slice("base64:".length) : event.event;
      this.emit("direct", message(null, null, name, bytes ? undefined : event.data, bytes ? event.data : undefined));
      return;
    }
    if (event.event.startsWith("dormouse.")) {
      const kind = event.event.slice("dormouse.".length);
      if (kind === "connected") {
        // Its id is where the stream starts, every channel's position: a channel with no
        // cursor of its own takes it, so losing the stream before its first message
        // loses nothing.
        const positions = event.id ? event.id.split(",") : [];
        if (positions.length === this.#streamChannels.length) {
          this.#streamChannels.forEach((sub, i) => {
            if (!sub.lastEventId && positions[i]) sub.lastEventId = positions[i];
          });
        }
        this.emit("connected", data?.connection_id);
      }
      else if (kind === "gap" || kind === "join" || kind === "leave") this.#subs.get(data?.channel)?.emit(kind, data);
      else if (kind === "close") this.#endedByBackend(data?.code, data?.reason);
      // "reconnect": the stream ends next, and the client comes back with its cursor.
      return;
    }
    if (data && typeof data === "object" && data.type === "message") {
      this.#subs.get(data.channel)?._deliver(message(data.channel, data.id, data.event, data.data, data.data_base64));
    }
  }
}

/**
 * A WebSocket to a user object, kept open. Emits `open`, `message` (a string, or a
 * Uint8Array for a binary frame), `close` ({code, reason}, each time it drops) and
 * `closed` (for good: the app called `close()`, or a backend closed it with a code of
 * 3000–3999 or 4100–4999).
 */
export class ObjectSocket extends Emitter {
  #parts;
  #path;
  #socket = null;
  #queue = [];
  #failures = 0;
  #timer = null;
  #closed = false;

  constructor(client, namespace, name, options) {
    super();
    this.#parts = client._objectSocketParts();
    const query = new URLSearchParams(options.query ?? {});
    this.#path = `/v1/objects/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}${options.path ?? "/ws"}`;
    this.query = query;
    this.#open();
  }

  /** True while the socket is open. */
  get open() {
    return this.#socket?.readyState === 1;
  }

  /** Sends a string, bytes, or a value as JSON; queued while the socket is down. */
  send(data) {
    const frame = typeof data === "string" || data instanceof Uint8Array || data instanceof ArrayBuffer ? data : JSON.stringify(data);
    if (this.open) this.#socket.send(frame);
    else this.#queue.push(frame);
  }

  /** Closes for good. */
  close() {
    this.#closed = true;
    clearTimeout(this.#timer);
    if (this.#socket) {
      this.#socket.onclose = this.#socket.onerror = null;
      this.#socket.close(1000);
    }
    this.emit("closed", { code: 1000, reason: "closed by the app" });
  }

  async #open() {
    let token = null;
    try {
      token = await this.#parts.token();
    } catch (e) {
      this.emit("close", { code: 1006, reason: String(e) });
      this.#retry();
      return;
    }
    if (this.#closed) return;
    const query = new URLSearchParams(this.query);
    if (token) query.set("access_token", token);
    const base = this.#parts.url.replace(/^http/, "ws");
    const socket = new this.#parts.WebSocket(`${base}${this.#path}?${query}`);
    socket.binaryType = "arraybuffer";
    this.#socket = socket;
    let done = false;
    socket.onopen = () => {
      this.#failures = 0;
      this.emit("open");
      for (const frame of this.#queue.splice(0)) socket.send(frame);
    };
    socket.onmessage = (e) => this.emit("message", typeof e.data === "string" ? e.data : new Uint8Array(e.data));
    const lost = (code, reason) => {
      if (done || this.#socket !== socket) return;
      done = true;
      this.emit("close", { code, reason });
      if (isFinalClose(code)) {
        this.#closed = true;
        this.emit("closed", { code, reason });
        return;
      }
      this.#retry();
    };
    socket.onclose = (e) => lost(e.code, e.reason);
    socket.onerror = () => lost(1006, "");
  }

  #retry() {
    if (this.#closed) return;
    this.#failures++;
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => this.#open(), this.#parts.delay(this.#failures));
  }
}

function randomKey() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export { bytesToBase64 as _bytesToBase64, SseParser as _SseParser };
