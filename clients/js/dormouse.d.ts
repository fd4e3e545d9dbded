// Types for dormouse.js.

/** An error the server answered with. */
export class DormouseError extends Error {
  /** The HTTP status (0 for an error a WebSocket answered). */
  status: number;
  /** `error.code`, such as `forbidden` or `token_expired` (docs/API.md). */
  code: string;
  /** `error.message`: what was wrong, for a person. */
  serverMessage: string;
  /** `error.channel`: on a stream of several channels, the one refused (the others go on). */
  channel?: string;
  /** True when trying again later can succeed (the server is busy or restarting). */
  readonly transient: boolean;
}

/** A message of a channel. Text payloads come as `data`, any other bytes as `bytes`. */
export interface Message {
  channel: string;
  /** Its id: where a client resumes after it. */
  id: string;
  /** Its event type (`message` unless the publisher named one). */
  event: string;
  data?: string;
  bytes?: Uint8Array;
}

/** A history page's message, with the time the server stored it. */
export interface StoredMessage extends Message {
  timestampMs: number;
}

/** The server could not resume from a cursor: what was lost, and from where it goes on. */
export interface Gap {
  type: "gap";
  channel: string;
  reason: "trimmed" | "epoch_changed" | "unknown_id" | "deleted";
  message: string;
  earliest_id?: string;
  requested_id?: string;
}

/** A member who joined or left a channel with presence. */
export interface PresenceEvent {
  type: "join" | "leave";
  channel: string;
  subject: string;
  info?: unknown;
}

export interface PresencePage {
  channel: string;
  members: { subject: string; info: unknown | null; connections: number }[];
  subjects: number;
  connections: number;
  next_after: string | null;
}

export interface HistoryPage {
  channel: string;
  direction: "forward" | "backward";
  events: StoredMessage[];
  gap: Gap | null;
  next_after?: string | null;
  next_before?: string | null;
}

export type Unlisten = () => void;

export class Subscription {
  readonly channel: string;
  /** The id of the last message delivered: where a reconnect resumes. */
  lastEventId: string | null;
  /** False once unsubscribed, or refused by the server. */
  active: boolean;
  on(type: "message", listener: (message: Message) => void): Unlisten;
  on(type: "gap", listener: (gap: Gap) => void): Unlisten;
  on(type: "join" | "leave", listener: (event: PresenceEvent) => void): Unlisten;
  /** The server follows the channel for this client (again, after each reconnect). */
  on(type: "subscribed", listener: (value: { channel: string }) => void): Unlisten;
  /** The server refused the subscription (a credential that does not grant it, say); it ends. */
  on(type: "error", listener: (error: DormouseError) => void): Unlisten;
  unsubscribe(): void;
}

export type TokenSource = string | (() => string | Promise<string>);

export interface Options {
  /** `http(s)://host:port` of the server. */
  url: string;
  /** A credential, or a function asked for one at connect, before it expires and after a refusal. */
  token?: TokenSource;
  /** One WebSocket for every channel (default), or one event stream. */
  transport?: "websocket" | "sse";
  /** Reconnect waits: full jitter between half the first and a cap doubling to `maxMs`. */
  backoff?: { initialMs?: number; maxMs?: number };
  /** How long before a token expires to ask for a new one (default 30 000 ms). */
  refreshBeforeMs?: number;
  /** The WebSocket class to use (default: the global one). */
  WebSocket?: typeof WebSocket;
  /** The fetch to use (default: the global one). */
  fetch?: typeof fetch;
}

export type State = "connecting" | "connected" | "disconnected" | "closed";

export class Dormouse {
  constructor(options: Options);
  readonly url: string;
  readonly state: State;
  subscribe(channel: string, options?: { lastEventId?: string; rewind?: number }): Subscription;
  publish(
    channel: string,
    data: string | Uint8Array | ArrayBuffer | Blob,
    options?: { event?: string; idempotencyKey?: string; retries?: number },
  ): Promise<{ channel: string; id: string; duplicate: boolean }>;
  presence(channel: string, options?: { after?: string; limit?: number }): Promise<PresencePage>;
  history(
    channel: string,
    options?: {
      after?: string;
      before?: string;
      direction?: "forward" | "backward";
      since?: number | string;
      until?: number | string;
      limit?: number;
    },
  ): Promise<HistoryPage>;
  /** A WebSocket to a user object, kept open (its protocol is the object's own). */
  object(namespace: string, name: string, options?: { path?: string; query?: Record<string, string> }): ObjectSocket;
  close(): void;
  on(type: "state", listener: (state: State) => void): Unlisten;
  on(type: "connected", listener: (connectionId: string) => void): Unlisten;
  /** Something went wrong; the client keeps trying unless it was closed. */
  on(type: "error", listener: (error: Error) => void): Unlisten;
  /** A backend closed the connection for good: the client is closed, as after `close()`. */
  on(type: "closed", listener: (value: { code: number; reason: string }) => void): Unlisten;
  /** A message a backend sent to this connection alone. */
  on(type: "direct", listener: (message: Omit<Message, "channel" | "id">) => void): Unlisten;
}

/** A WebSocket to a user object, reconnected with backoff until closed for good. */
export class ObjectSocket {
  readonly open: boolean;
  /** Sends a string, bytes, or a value as JSON; queued while the socket is down. */
  send(data: string | Uint8Array | ArrayBuffer | unknown): void;
  close(): void;
  on(type: "open", listener: () => void): Unlisten;
  on(type: "message", listener: (data: string | Uint8Array) => void): Unlisten;
  /** It dropped (it reconnects unless `closed` follows). */
  on(type: "close", listener: (value: { code: number; reason: string }) => void): Unlisten;
  on(type: "closed", listener: (value: { code: number; reason: string }) => void): Unlisten;
}

/** Seconds since the epoch at which a JWT expires, or null. */
export function tokenExpiry(token: string | null | undefined): number | null;
