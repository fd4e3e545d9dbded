// A real `dormouse` server for the tests: the binary named by DORMOUSE_BIN, on a free
// loopback port, with a fresh data dir; it can be stopped and started again on the same
// port and data, as a restart is.

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer, connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const SECRET = "js-client-test-secret-long-enough-for-hs256";

function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

export class Server {
  constructor(env = {}) {
    const binary = process.env.DORMOUSE_BIN;
    if (!binary) {
      throw new Error("DORMOUSE_BIN must name the dormouse binary (cargo build -p dormouse; target/debug/dormouse)");
    }
    this.binary = binary;
    this.env = env;
    this.dir = mkdtempSync(join(tmpdir(), "dormouse-js-"));
    this.child = null;
    this.log = "";
  }

  static async start(env) {
    const server = new Server(env);
    server.port = await freePort();
    server.url = `http://127.0.0.1:${server.port}`;
    await server.run();
    return server;
  }

  async run() {
    const env = { PATH: process.env.PATH, RUST_LOG: "info", NO_COLOR: "1" };
    Object.assign(env, {
      DORMOUSE_LISTEN: `127.0.0.1:${this.port}`,
      DORMOUSE_DATA_DIR: this.dir,
      DORMOUSE_SSE_RETRY: "200ms",
      ...this.env,
    });
    this.child = spawn(this.binary, [], { env, stdio: ["ignore", "pipe", "pipe"] });
    this.child.stdout.on("data", (d) => (this.log += d));
    this.child.stderr.on("data", (d) => (this.log += d));
    const deadline = Date.now() + 20_000;
    for (;;) {
      if (this.child.exitCode !== null) throw new Error(`dormouse exited:\n${this.log}`);
      try {
        const response = await fetch(`${this.url}/healthz`);
        if (response.ok) return;
      } catch {
        // Not listening yet.
      }
      if (Date.now() > deadline) throw new Error(`dormouse did not start:\n${this.log}`);
      await new Promise((r) => setTimeout(r, 25));
    }
  }

  /** Stops the process (SIGTERM, a graceful stop; SIGKILL, a crash) and waits for it. */
  async stop(signal = "SIGTERM") {
    if (!this.child || this.child.exitCode !== null) return;
    const exited = new Promise((resolve) => this.child.once("exit", resolve));
    this.child.kill(signal);
    await exited;
  }

  async restart() {
    await this.stop();
    await this.run();
  }

  async close() {
    await this.stop("SIGKILL");
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** Publishes as a backend would, with `token` if given; the stored id. */
  async publish(channel, data, token) {
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const response = await fetch(`${this.url}/v1/channels/${channel}/messages`, { method: "POST", body: data, headers });
    if (response.status !== 201) throw new Error(`publish: ${response.status} ${await response.text()}`);
    return (await response.json()).id;
  }
}

/** An HS256 token for `sub`, valid for `ttlSeconds`, with `grants` (and `info`). */
export function token(sub, ttlSeconds, grants, info) {
  const b64 = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const claims = { sub, exp: Math.floor(Date.now() / 1000) + ttlSeconds, dormouse: grants };
  if (info !== undefined) claims.info = info;
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  const signature = createHmac("sha256", SECRET).update(head).digest("base64url");
  return `${head}.${signature}`;
}

/**
 * A TCP relay in front of the server whose connections the test can cut, as a network
 * drop does (no close frame, no goodbye).
 */
export class Cutter {
  static async start(target) {
    const cutter = new Cutter();
    cutter.sockets = new Set();
    cutter.server = createServer((client) => {
      const upstream = connect(target, "127.0.0.1");
      cutter.sockets.add(client).add(upstream);
      client.pipe(upstream).pipe(client);
      const drop = () => {
        client.destroy();
        upstream.destroy();
      };
      client.on("error", drop).on("close", drop);
      upstream.on("error", drop).on("close", drop);
    });
    await new Promise((resolve) => cutter.server.listen(0, "127.0.0.1", resolve));
    cutter.url = `http://127.0.0.1:${cutter.server.address().port}`;
    return cutter;
  }

  /** Cuts every connection through the relay; how many there were. */
  cut() {
    const n = this.sockets.size / 2;
    for (const socket of this.sockets) socket.destroy();
    this.sockets.clear();
    return n;
  }

  close() {
    this.cut();
    this.server.close();
  }
}

/** Resolves with the next `type` event of `emitter` (within `ms`). */
export function next(emitter, type, ms = 10_000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${type} event within ${ms} ms`));
    }, ms);
    const off = emitter.on(type, (value) => {
      clearTimeout(timer);
      off();
      resolve(value);
    });
  });
}

/** Collects `type` events of `emitter` until `count` arrived (within `ms`). */
export function collect(emitter, type, count, ms = 10_000) {
  const got = [];
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`${got.length} of ${count} ${type} events within ${ms} ms: ${JSON.stringify(got)}`));
    }, ms);
    const off = emitter.on(type, (value) => {
      got.push(value);
      if (got.length === count) {
        clearTimeout(timer);
        off();
        resolve(got);
      }
    });
  });
}
