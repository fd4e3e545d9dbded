// The client against a real server: every test starts the `dormouse` binary (DORMOUSE_BIN)
// and talks to it only through the library, as an app does.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Dormouse, DormouseError, tokenExpiry } from "../dormouse.js";
import { Cutter, SECRET, Server, collect, next, token } from "./server.mjs";

const FAST = { initialMs: 50, maxMs: 400 };
const texts = (messages) => messages.map((m) => m.data);

for (const transport of ["websocket", "sse"]) {
  describe(`over ${transport}`, () => {
    let server;
    before(async () => {
      server = await Server.start({ DORMOUSE_CHANNELS_MAX_EVENTS: "5" });
    });
    after(async () => {
      await server.close();
    });

    test("follows several channels on one connection and publishes each message once", async () => {
      const client = new Dormouse({ url: server.url, transport, backoff: FAST });
      const a = client.subscribe(`${transport}-a`);
      const b = client.subscribe(`${transport}-b`);
      await Promise.all([next(a, "subscribed"), next(b, "subscribed")]);
      const gotA = collect(a, "message", 2);
      const gotB = collect(b, "message", 1);
      const first = await client.publish(`${transport}-a`, "one", { idempotencyKey: "k1" });
      const again = await client.publish(`${transport}-a`, "one", { idempotencyKey: "k1" });
      assert.deepEqual(again, { channel: `${transport}-a`, id: first.id, duplicate: true });
      await client.publish(`${transport}-b`, new Uint8Array([0, 1, 255]), { event: "blob" });
      await client.publish(`${transport}-a`, "two");
      assert.deepEqual(texts(await gotA), ["one", "two"]);
      const [blob] = await gotB;
      assert.equal(blob.event, "blob");
      assert.deepEqual([...blob.bytes], [0, 1, 255]);
      assert.equal(a.lastEventId, (await client.history(`${transport}-a`, { direction: "backward", limit: 1 })).events[0].id);
      client.close();
    });

    test("resumes from its last id across a server restart, missing nothing", async () => {
      const channel = `${transport}-restart`;
      const client = new Dormouse({ url: server.url, transport, backoff: FAST });
      const sub = client.subscribe(channel);
      await next(sub, "subscribed");
      const before = collect(sub, "message", 1);
      await server.publish(channel, "before");
      await before;
      const rest = collect(sub, "message", 2, 20_000);
      await server.restart();
      // Published while the client is still away: it comes from the replay buffer.
      await server.publish(channel, "while away");
      await server.publish(channel, "after");
      assert.deepEqual(texts(await rest), ["while away", "after"]);
      client.close();
    });

    test("a channel added with rewind beside a resumed one starts with its newest N", async () => {
      const [x, y] = [`${transport}-rw-x`, `${transport}-rw-y`];
      for (const n of [1, 2, 3, 4]) await server.publish(y, `y${n}`);
      const client = new Dormouse({ url: server.url, transport, backoff: FAST });
      const subX = client.subscribe(x);
      await next(subX, "subscribed");
      const gotX = collect(subX, "message", 1);
      await server.publish(x, "x1");
      await gotX;
      const subY = client.subscribe(y, { rewind: 2 });
      const gotY = collect(subY, "message", 3);
      await next(subY, "subscribed");
      await server.publish(y, "y5");
      assert.deepEqual(texts(await gotY), ["y3", "y4", "y5"]);
      client.close();
    });

    test("a malformed cursor ends the subscription with the server's reason, not retries", async () => {
      const client = new Dormouse({ url: server.url, transport, backoff: FAST });
      const sub = client.subscribe(`${transport}-bad-cursor`, { lastEventId: "not-an-id" });
      const error = await next(sub, "error");
      assert.ok(error instanceof DormouseError, String(error));
      assert.deepEqual([error.status, error.code], [400, "bad_event_id"]);
      client.close();
    });

    test("resumes after the network drops mid-stream", async () => {
      const cutter = await Cutter.start(server.port);
      const channel = `${transport}-cut`;
      const client = new Dormouse({ url: cutter.url, transport, backoff: FAST });
      const sub = client.subscribe(channel);
      await next(sub, "subscribed");
      const first = collect(sub, "message", 1);
      await server.publish(channel, "one");
      await first;
      const rest = collect(sub, "message", 2, 20_000);
      assert.ok(cutter.cut() >= 1, "the client's connection went through the relay");
      await server.publish(channel, "two");
      await server.publish(channel, "three");
      assert.deepEqual(texts(await rest), ["two", "three"]);
      client.close();
      cutter.close();
    });

    test("a subscription that saw nothing yet misses nothing published while it was away", async () => {
      const channel = `${transport}-quiet`;
      await server.publish(channel, "old");
      const client = new Dormouse({ url: server.url, transport, backoff: FAST });
      const sub = client.subscribe(channel);
      await next(sub, "subscribed");
      const got = collect(sub, "message", 1, 20_000);
      await server.restart();
      await server.publish(channel, "while away");
      // Exactly that one: not the old one, not nothing.
      assert.deepEqual(texts(await got), ["while away"]);
      await new Promise((r) => setTimeout(r, 300));
      client.close();
    });

    test("a channel added beside resumed ones starts at its newest, not its oldest", async () => {
      const [a, b] = [`${transport}-resumed`, `${transport}-added`];
      const kept = await server.publish(a, "a0");
      await server.publish(b, "history of b");
      const client = new Dormouse({ url: server.url, transport, backoff: FAST });
      const subA = client.subscribe(a, { lastEventId: kept });
      const subB = client.subscribe(b);
      await Promise.all([next(subA, "subscribed"), next(subB, "subscribed")]);
      const gotB = collect(subB, "message", 1);
      await server.publish(b, "new in b");
      assert.deepEqual(texts(await gotB), ["new in b"]);
      client.close();
    });

    test("a cursor older than the buffer says so with a gap, then replays what is kept", async () => {
      const channel = `${transport}-gap`;
      const old = await server.publish(channel, "0");
      for (let i = 1; i <= 7; i++) await server.publish(channel, String(i));
      const client = new Dormouse({ url: server.url, transport, backoff: FAST });
      const sub = client.subscribe(channel, { lastEventId: old });
      const gap = next(sub, "gap");
      const kept = collect(sub, "message", 5);
      assert.equal((await gap).reason, "trimmed");
      assert.deepEqual(texts(await kept), ["3", "4", "5", "6", "7"]);
      client.close();
    });
  });
}

describe("with credentials and presence", () => {
  let server;
  before(async () => {
    server = await Server.start({ DORMOUSE_AUTH_JWT_SECRET: SECRET, DORMOUSE_CHANNELS_PRESENCE: "true" });
  });
  after(async () => {
    await server.close();
  });
  const grants = { subscribe: ["room*"], publish: ["room*"], history: ["room*"] };

  test("a token is refreshed before it expires and the connection stays", async () => {
    let asked = 0;
    const client = new Dormouse({
      url: server.url,
      token: () => {
        asked++;
        return token("alice", 3, grants);
      },
      refreshBeforeMs: 1500,
      backoff: FAST,
    });
    const sub = client.subscribe("room-refresh");
    await next(sub, "subscribed");
    let reconnects = 0;
    client.on("state", (s) => {
      if (s === "connecting") reconnects++;
    });
    // Past the first token's expiry: still the same connection, still receiving.
    await new Promise((r) => setTimeout(r, 4000));
    const got = next(sub, "message");
    await client.publish("room-refresh", "still here");
    assert.equal((await got).data, "still here");
    assert.ok(asked >= 2, `a fresh token was asked for (${asked})`);
    assert.equal(reconnects, 0);
    client.close();
  });

  test("on one event stream, a refused channel fails alone and the others go on", async () => {
    const client = new Dormouse({ url: server.url, token: token("mia", 60, { subscribe: ["room-open"], publish: ["room-open"] }), transport: "sse", backoff: FAST });
    const open = client.subscribe("room-open");
    const closed = client.subscribe("room-closed");
    const error = await next(closed, "error");
    assert.deepEqual([error.status, error.code, error.channel], [403, "forbidden", "room-closed"]);
    const got = next(open, "message");
    await next(open, "subscribed");
    await client.publish("room-open", "still followed");
    assert.equal((await got).data, "still followed");
    client.close();
  });

  test("a credential that does not grant the channel ends the subscription with the server's reason", async () => {
    const client = new Dormouse({ url: server.url, token: token("mallory", 60, { subscribe: ["other"] }), backoff: FAST });
    const sub = client.subscribe("room-secret");
    const error = await next(sub, "error");
    assert.ok(error instanceof DormouseError);
    assert.equal(error.status, 403);
    assert.equal(error.code, "forbidden");
    client.close();
    await assert.rejects(
      new Dormouse({ url: server.url, token: token("mallory", 60, {}) }).publish("room-1", "x"),
      (e) => e.status === 403 && e.code === "forbidden",
    );
  });

  test("a token the server refuses is replaced once, and a backend's close ends the client", async () => {
    let asked = 0;
    const client = new Dormouse({
      url: server.url,
      // First a token signed with another secret (401 bad_token), then a good one.
      token: () => {
        const good = token("carl", 60, grants);
        return ++asked === 1 ? good.replace(/[^.]+$/, "A".repeat(43)) : good;
      },
      backoff: FAST,
    });
    const sent = await client.publish("room-401", "once");
    assert.equal(typeof sent.id, "string");
    assert.equal(asked, 2);

    // A backend's close ends the client on both transports, with a code it picked or the
    // default (1000, an empty body).
    for (const [transport, body, expected] of [
      ["websocket", { code: 4100, reason: "kicked" }, { code: 4100, reason: "kicked" }],
      ["sse", { code: 4100, reason: "kicked" }, { code: 4100, reason: "kicked" }],
      ["websocket", null, { code: 1000, reason: "closed by the server" }],
      ["sse", null, { code: 1000, reason: "closed by the server" }],
    ]) {
      const watched = new Dormouse({ url: server.url, token: token("dana", 60, grants), transport, backoff: FAST });
      const connected = next(watched, "connected");
      watched.subscribe(`room-kick-${transport}`);
      const connectionId = await connected;
      const closed = next(watched, "closed");
      const backend = token("backend", 60, { connections: true });
      const res = await fetch(`${server.url}/v1/connections/${connectionId}/close`, {
        method: "POST",
        headers: { Authorization: `Bearer ${backend}` },
        body: body === null ? undefined : JSON.stringify(body),
      });
      assert.equal(res.status, 200);
      assert.deepEqual(await closed, expected);
      assert.equal(watched.state, "closed", transport);
      assert.throws(() => watched.subscribe("room-again"));
    }
    client.close();
  });

  test("presence: joins, leaves and the member list", async () => {
    const alice = new Dormouse({ url: server.url, token: token("alice", 60, grants, { name: "Alice" }), backoff: FAST });
    const bob = new Dormouse({ url: server.url, token: token("bob", 60, grants), transport: "sse", backoff: FAST });
    const seen = alice.subscribe("room-presence");
    assert.equal((await next(seen, "join")).subject, "alice");
    const joined = next(seen, "join");
    bob.subscribe("room-presence");
    assert.deepEqual(await joined, { type: "join", channel: "room-presence", subject: "bob" });
    const page = await alice.presence("room-presence");
    assert.deepEqual(
      page.members.map((m) => [m.subject, m.info, m.connections]),
      [["alice", { name: "Alice" }, 1], ["bob", null, 1]],
    );
    const left = next(seen, "leave");
    bob.close();
    assert.equal((await left).subject, "bob");
    alice.close();
  });
});

test("tokenExpiry reads a JWT's exp and nothing else", () => {
  assert.equal(tokenExpiry(token("x", 100, {})), Math.floor(Date.now() / 1000) + 100);
  assert.equal(tokenExpiry("not a token"), null);
  assert.equal(tokenExpiry(null), null);
});

describe("the connection's life", () => {
  let server;
  before(async () => {
    server = await Server.start({});
  });
  after(async () => {
    await server.close();
  });

  test("a subscription dropped before the connection opens leaves nothing behind", async () => {
    const client = new Dormouse({ url: server.url, backoff: FAST });
    const states = [];
    client.on("state", (s) => states.push(s));
    client.subscribe("life-gone").unsubscribe();
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(client.state, "disconnected", JSON.stringify(states));
    client.close();
  });

  test("subscribing while a reconnect waits opens one connection, not two", async () => {
    const client = new Dormouse({ url: server.url, backoff: { initialMs: 300, maxMs: 300 } });
    const first = client.subscribe("life-one");
    await next(first, "subscribed");
    await server.stop();
    await next(client, "error");
    // Disconnected, a retry pending: another subscribe now must not open a second socket.
    client.subscribe("life-two");
    await server.run();
    await next(first, "subscribed", 15_000);
    await new Promise((r) => setTimeout(r, 800));
    const info = await (await fetch(`${server.url}/v1/channels/life-one`)).json();
    assert.equal(info.subscribers, 1, JSON.stringify(info));
    client.close();
  });

  test("a message cannot pose as a control event", async () => {
    const client = new Dormouse({ url: server.url, backoff: FAST });
    await assert.rejects(client.publish("life-x", "bye", { event: "dormouse.close" }), (e) => e.code === "bad_event_name");
    client.close();
  });
});
