// volna.js — the browser (and Node) client for the Volna broker, over WebSocket.
//
// A dependency-free ES module: `import { connect } from "/client/volna.js"`.
// It speaks the broker's binary protocol (proto/src/codec_impl.rs) over
// one WebSocket (proto/src/websocket.rs: every message is a u32 stream tag
// and that stream's bytes; stream 0 is the control stream, 1, 2, … the
// broker's delivery streams, each opened by a StreamHeader frame).
//
// What it guarantees the page (the same rules as the Rust client):
// - Every subscription delivers its channel's messages in offset order,
//   once. After a lost connection the client reconnects with backoff and
//   jitter and resumes each subscription from its next offset (a gap ends
//   the subscription with an error, a duplicate is dropped and counted).
// - `subscribe()` returns once the broker resolved the start position:
//   made while offline it waits for the connection (within the request
//   deadline), so `{}` means "what is published from the call on", never
//   "latest at some later reconnect". A subscribe that times out or is
//   refused with a retryable code is retried with backoff within its
//   deadline; a late `Subscribed` nobody waits for is unsubscribed.
// - Publishes carry the producer id, a sequence and `after` (the sequence
//   of the channel's previous publish in flight): a retried publish is
//   stored once, and one client's publishes to a channel are stored in
//   call order, also across retries and reconnects.
// - Refusals end, transient errors retry, by one table (`isRetryable`)
//   shared with the broker's `ErrorCode::is_retryable`. A connection the
//   broker refuses for good (a bad token, a limit, a newer connection of
//   the same device) closes the client: pending publishes reject with the
//   refusal, subscriptions end with it, the client's state is `closed`.
// - The producer id is the application's (`producerId`), or derived from
//   `device`, so it survives page reloads; on every session the broker
//   says where the producer's sequences stand (InitProducer, protocol 4).
//   Where the broker cannot say (older than protocol 4, a cluster node) a
//   derived id gives way to a random one (its sequences would collide with
//   those already stored) and an explicit one fails the connection.

const CONTROL = 0;
const PROTOCOL_VERSION = 4;
/** The newest protocol without InitProducer (brokers before version 4). */
const PROTOCOL_V3 = 3;
const SUBPROTOCOL = "volna.1";
const CLOSE_BASE = 4000;

const T = {
  Hello: 0x01, Publish: 0x02, Subscribe: 0x03, Unsubscribe: 0x04, Ping: 0x05, Refresh: 0x06,
  InitProducer: 0x0a,
  Welcome: 0x41, Published: 0x42, Subscribed: 0x43, Unsubscribed: 0x44, Pong: 0x45,
  Error: 0x46, Refreshed: 0x47, TokenExpiring: 0x48, SubscriptionEnded: 0x49,
  Stored: 0x4a, UnreadCounts: 0x4b, ReadMarker: 0x4c, ProducerReady: 0x4d,
  StreamHeader: 0x81, Deliver: 0x82, Truncated: 0x83, EpochChanged: 0x84,
};

/** The broker's error codes by name (proto/src/error.rs): `ErrorCode.Forbidden === 4`. */
export const ErrorCode = Object.freeze({
  BadRequest: 1, UnsupportedVersion: 2, Unauthorized: 3, Forbidden: 4,
  PayloadTooLarge: 5, FrameTooLarge: 6, UnknownFrame: 7, UnexpectedFrame: 8,
  NotSubscribed: 9, AlreadySubscribed: 10, TooManySubscriptions: 11,
  StorageUnavailable: 12, SequenceTooOld: 13, RateLimited: 14, ShuttingDown: 15,
  Internal: 16, TooManyConnections: 17, ServerOnly: 18, TooManyProducers: 19,
  ChannelDeleted: 20, OutOfOrder: 21, Unavailable: 22, DeviceRequired: 23,
  TooManyDevices: 24, Unsupported: 25,
});

/** The broker's error code names by number: `ErrorCodes[4] === "Forbidden"`. */
export const ErrorCodes = Object.freeze(Object.fromEntries(Object.entries(ErrorCode).map(([k, v]) => [v, k])));

/**
 * Why the broker closed a connection (proto/src/error.rs `CloseCode`; the
 * WebSocket close code is 4000 + this).
 */
export const CloseCode = Object.freeze({
  Normal: 0, GoingAway: 1, ProtocolError: 2, Unauthorized: 3, HelloTimeout: 4,
  Internal: 5, Kicked: 6, LimitExceeded: 7, ControlStalled: 8, Replaced: 9,
});

/**
 * The codes after which the same request may succeed if sent again: the
 * broker's `ErrorCode::is_retryable` (proto/src/error.rs), code for code.
 */
const RETRYABLE = new Set([
  ErrorCode.StorageUnavailable, ErrorCode.RateLimited, ErrorCode.ShuttingDown,
  ErrorCode.Internal, ErrorCode.OutOfOrder, ErrorCode.Unavailable,
]);

/** Whether a request refused with `code` may succeed if sent again later. */
export function isRetryable(code) { return RETRYABLE.has(code); }

/**
 * A request the broker refused, or one that failed on the client's side.
 * `kind` says which: "refused" (the broker's `code`), "timeout" (out of
 * time; `maybeStored` says whether a publish may have been stored all the
 * same), "disconnected", "closed" (by the application), "replaced" (a newer
 * connection of the same device took over), "token" (the tokenProvider kept
 * failing), "protocol" (bytes out of step). `code` is 0 when the broker sent
 * no code; `closeCode` is the broker's `CloseCode` when it closed the
 * connection.
 */
export class VolnaError extends Error {
  constructor(code, message, extra = {}) {
    const kind = extra.kind ?? "refused";
    const name = code ? (ErrorCodes[code] ?? `error code ${code}`) : (KIND_NAMES[kind] ?? kind);
    super(`${name}: ${message}`, extra.cause !== undefined ? { cause: extra.cause } : undefined);
    this.name = "VolnaError";
    this.code = code;
    this.codeName = code ? (ErrorCodes[code] ?? `Other(${code})`) : (KIND_NAMES[kind] ?? kind);
    this.kind = kind;
    this.brokerMessage = message;
    this.closeCode = extra.closeCode ?? null;
    this.maybeStored = extra.maybeStored ?? false;
  }
  /** Whether the same request may succeed later (`isRetryable(code)`). */
  get retryable() { return this.kind === "timeout" || this.kind === "disconnected" || isRetryable(this.code); }
}

const KIND_NAMES = {
  timeout: "Timeout", disconnected: "Disconnected", closed: "Closed", replaced: "Replaced",
  token: "TokenUnavailable", protocol: "ProtocolError", refused: "Refused",
};

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

// ---- encoding -------------------------------------------------------------

class Writer {
  constructor() { this.bytes = new Uint8Array(256); this.view = new DataView(this.bytes.buffer); this.len = 0; }
  room(n) {
    if (this.len + n <= this.bytes.length) return;
    const grown = new Uint8Array(Math.max(this.bytes.length * 2, this.len + n));
    grown.set(this.bytes.subarray(0, this.len));
    this.bytes = grown; this.view = new DataView(grown.buffer);
  }
  u8(v) { this.room(1); this.view.setUint8(this.len, v); this.len += 1; }
  u16(v) { this.room(2); this.view.setUint16(this.len, v); this.len += 2; }
  u32(v) { this.room(4); this.view.setUint32(this.len, v); this.len += 4; }
  u64(v) { this.room(8); this.view.setBigUint64(this.len, BigInt(v)); this.len += 8; }
  raw(b) { this.room(b.length); this.bytes.set(b, this.len); this.len += b.length; }
  str(s) { const b = utf8.encode(s); if (b.length > 0xffff) throw new RangeError("string too long"); this.u16(b.length); this.raw(b); }
  channel(name) { const b = channelBytes(name); this.u8(b.length); this.raw(b); }
  payload(b) { this.u32(b.length); this.raw(b); }
}

function channelBytes(name) {
  const b = typeof name === "string" ? utf8.encode(name) : new Uint8Array(0);
  if (b.length < 1 || b.length > 255) throw new VolnaError(ErrorCode.BadRequest, `invalid channel name ${JSON.stringify(name)}`);
  return b;
}

/** One frame, its u32 length prefix included, tagged for `stream`. */
function message(stream, type, body) {
  const w = new Writer();
  w.u32(stream); w.u32(0); w.u8(type);
  body(w);
  w.view.setUint32(4, w.len - 8);
  return w.bytes.slice(0, w.len);
}

/** Asks the broker to stop sending `stream` (an empty message for it). */
function stopMessage(stream) {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, stream);
  return b;
}

// ---- decoding -------------------------------------------------------------

class Reader {
  constructor(bytes) { this.b = bytes; this.v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength); this.at = 0; }
  need(n) { if (this.at + n > this.b.length) throw protocolError("truncated frame"); }
  u8() { this.need(1); return this.v.getUint8(this.at++); }
  u16() { this.need(2); const x = this.v.getUint16(this.at); this.at += 2; return x; }
  u32() { this.need(4); const x = this.v.getUint32(this.at); this.at += 4; return x; }
  big() { this.need(8); const x = this.v.getBigUint64(this.at); this.at += 8; return x; }
  num() { return Number(this.big()); }
  bytes(n) { this.need(n); const x = this.b.subarray(this.at, this.at + n); this.at += n; return x; }
  str() { return fromUtf8.decode(this.bytes(this.u16())); }
  channel() { return fromUtf8.decode(this.bytes(this.u8())); }
}

function protocolError(message) { return new VolnaError(ErrorCode.BadRequest, message, { kind: "protocol" }); }

function decodeFrame(type, r) {
  switch (type) {
    case T.Welcome: return { type, session: r.num(), protocol: r.u16(), maxFrame: r.u32(), maxPayload: r.u32(), maxSubscriptions: r.u32() };
    case T.Published: return { type, requestId: r.num(), offset: r.num(), epoch: r.big(), duplicate: r.u8() === 1 };
    case T.Subscribed: return { type, requestId: r.num(), subscription: r.num(), epoch: r.big(), start: r.num() };
    case T.Unsubscribed: case T.Pong: case T.Stored: return { type, requestId: r.num() };
    case T.ProducerReady: return { type, requestId: r.num(), lastSequence: r.big() };
    case T.Error: return { type, requestId: r.num(), code: r.u16(), message: r.str() };
    case T.Refreshed: return { type, requestId: r.num(), expiresAt: r.num() };
    case T.TokenExpiring: return { type, expiresAt: r.num() };
    case T.SubscriptionEnded: return { type, subscription: r.num(), code: r.u16(), message: r.str() };
    case T.ReadMarker: return { type, channel: r.channel(), offset: r.num() };
    case T.UnreadCounts: {
      const requestId = r.num(); const n = r.u16(); const counts = [];
      for (let i = 0; i < n; i++) counts.push({ channel: r.channel(), head: r.num(), read: r.num(), unread: r.num() });
      return { type, requestId, counts };
    }
    case T.StreamHeader: return { type, subscription: r.num() };
    case T.Deliver: {
      const channel = r.channel(); const epoch = r.big(); const first = r.num(); const n = r.u32();
      const messages = [];
      for (let i = 0; i < n; i++) {
        const timestamp = r.num(); const payload = r.bytes(r.u32()).slice();
        messages.push(new VolnaMessage(channel, first + i, timestamp, payload));
      }
      return { type, channel, epoch, first, messages };
    }
    case T.Truncated: return { type, channel: r.channel(), requested: r.num(), firstAvailable: r.num() };
    case T.EpochChanged: return { type, channel: r.channel(), previous: r.big(), current: r.big(), start: r.num() };
    default: throw protocolError(`unknown frame type 0x${type.toString(16)}`);
  }
}

/** The frames a stream's bytes hold so far; the rest waits for more. */
class StreamBuffer {
  constructor(maxFrame) { this.buf = new Uint8Array(0); this.maxFrame = maxFrame; }
  push(bytes) {
    if (this.buf.length === 0) { this.buf = bytes; } else {
      const joined = new Uint8Array(this.buf.length + bytes.length);
      joined.set(this.buf); joined.set(bytes, this.buf.length); this.buf = joined;
    }
    const frames = [];
    let at = 0;
    const view = new DataView(this.buf.buffer, this.buf.byteOffset, this.buf.byteLength);
    while (this.buf.length - at >= 4) {
      const len = view.getUint32(at);
      if (len === 0 || len + 4 > this.maxFrame) throw protocolError(`frame of ${len + 4} bytes`);
      if (this.buf.length - at - 4 < len) break;
      const type = this.buf[at + 4];
      const r = new Reader(this.buf.subarray(at + 5, at + 4 + len));
      const frame = decodeFrame(type, r);
      if (r.at !== r.b.length) throw protocolError("trailing bytes in a frame");
      frame.size = 4 + len;
      frames.push(frame);
      at += 4 + len;
    }
    this.buf = this.buf.subarray(at);
    return frames;
  }
}

// ---- the client ------------------------------------------------------------

/** One message of a channel. */
export class VolnaMessage {
  constructor(channel, offset, timestamp, payload) {
    this.channel = channel; this.offset = offset; this.timestamp = timestamp; this.payload = payload;
  }
  /** The payload as UTF-8 text. */
  text() { return fromUtf8.decode(this.payload); }
}

/**
 * A subscription: `message`, `truncated`, `epochchanged`, `duplicate` and
 * `ended` events.
 */
export class Subscription extends EventTarget {
  constructor(client, channel, position) {
    super();
    this.client = client;
    this.channel = channel;
    this.position = position;
    /** The next offset this subscription delivers (known once subscribed). */
    this.next = null;
    this.epoch = null;
    /** The broker's id of it on the current connection (null while resuming). */
    this.id = null;
    this.ended = false;
    /** Why it ended (null: it did not, or the application unsubscribed). */
    this.error = null;
    /** Deliveries dropped as already seen (the broker sent them twice). */
    this.duplicatesDropped = 0;
    this._establishing = false;
    /** Deliveries kept until the page had a turn to add its listeners. */
    this._held = null;
  }
  /** Stops the subscription; the broker is told, also while it resumes. */
  async unsubscribe() {
    if (this.ended) return;
    this.ended = true;
    this.client._subs.delete(this);
    await this.client._release(this);
  }
  _resumePosition() {
    if (this.next !== null) return { from: this.next, epoch: this.epoch };
    return this.position;
  }
  _deliver(frame) {
    if (this.ended) return;
    if (this._held) { this._held.push(frame); return; }
    switch (frame.type) {
      case T.Deliver: {
        if (this.next !== null && frame.first > this.next) {
          this._end(new VolnaError(ErrorCode.Internal, `gap in ${this.channel}: expected offset ${this.next}, got ${frame.first}`, { kind: "protocol" }));
          return;
        }
        this.epoch = frame.epoch;
        let dropped = 0;
        for (const m of frame.messages) {
          if (this.ended) return;
          if (this.next !== null && m.offset < this.next) { dropped += 1; continue; } // already delivered
          this.next = m.offset + 1;
          this.dispatchEvent(new MessageEvent("message", { data: m }));
        }
        if (dropped > 0) {
          this.duplicatesDropped += dropped;
          this.client.stats.duplicatesDropped += dropped;
          this.dispatchEvent(new CustomEvent("duplicate", {
            detail: { channel: this.channel, first: frame.first, count: dropped, next: this.next },
          }));
        }
        break;
      }
      case T.Truncated:
        this.next = frame.firstAvailable;
        this.dispatchEvent(new CustomEvent("truncated", { detail: frame }));
        break;
      case T.EpochChanged:
        this.next = frame.start; this.epoch = frame.current;
        this.dispatchEvent(new CustomEvent("epochchanged", { detail: frame }));
        break;
      default:
        break;
    }
  }
  /** Ends it with `error`; `brokerEnded`: the broker ended it already. */
  _end(error, brokerEnded = false) {
    if (this.ended) return;
    this.ended = true;
    this.error = error;
    this.client._subs.delete(this);
    if (brokerEnded) this.client._forget(this); else this.client._release(this);
    this.dispatchEvent(new CustomEvent("ended", { detail: error }));
  }
}

/**
 * Connects to `url` (`wss://host:port/ws`) and resolves once the broker
 * welcomed the client; rejects with the refusal when the broker refuses it
 * for good, or with the last error after `connectAttempts` failed tries.
 */
export async function connect(url, options = {}) {
  const client = new VolnaClient(url, options);
  try {
    await client._firstConnection();
  } catch (e) {
    client.close();
    throw e;
  }
  return client;
}

const DEFAULTS = {
  token: "", client: "volna.js/0.2", device: "",
  backoff: { initialMs: 100, maxMs: 5000 },
  requestTimeoutMs: 30000, attemptTimeoutMs: 10000, connectTimeoutMs: 10000,
  pingIntervalMs: 10000, tokenTimeoutMs: 10000, maxTokenFailures: 3,
  maxBufferedBytes: 8 << 20, connectAttempts: 3,
};

/**
 * A connection that repairs itself. Its `state` is `connecting`,
 * `connected`, `disconnected` or `closed`; each change is an event of that
 * name. Constructing one starts connecting (`connect()` also waits).
 */
export class VolnaClient extends EventTarget {
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = { ...DEFAULTS, ...options, backoff: { ...DEFAULTS.backoff, ...(options.backoff ?? {}) } };
    /** Set once the first session started (`producerId` or derived from `device`). */
    this.producerId = explicitProducerId(this.options) ?? randomProducerId();
    /** Where the producer id came from: "application", "device" or "random". */
    this._producerSource = explicitProducerId(this.options) !== null ? "application" : "random";
    /** Counters: `duplicatesDropped` (deliveries already seen), `reconnects`. */
    this.stats = { duplicatesDropped: 0, reconnects: 0 };
    /** `connecting`, `connected`, `disconnected` or `closed`. */
    this.state = "connecting";
    this.welcome = null;
    /** Why the client closed (null while it is not, or closed by the application). */
    this.error = null;
    this._nextSequence = 1n;
    this._protocol = PROTOCOL_VERSION;
    this._subs = new Set();
    this._queues = new Map(); // channel -> publishes in flight, in call order
    this._nextRequest = 1;
    this._link = null; // the connection being opened or in use
    this._live = null; // the connection in use, once welcomed
    this._closed = false;
    this._attempt = 0;
    this._liveWaiters = new Set();
    this._sleeps = new Set();
    this._firstWaiter = null;
    this._WebSocket = this.options.WebSocket ?? globalThis.WebSocket;
    queueMicrotask(() => this._supervise());
  }

  /** Whether a session is established right now. */
  get connected() { return this._live !== null; }

  /**
   * Publishes `payload` (a string or bytes); resolves to {offset, epoch,
   * duplicate}. Retried across reconnects and retryable refusals until
   * `requestTimeoutMs`. `options.sequence` sends it under that producer
   * sequence (an outbox re-sent after a reload: stored once).
   */
  publish(channel, payload, options = {}) {
    try { channelBytes(channel); } catch (e) { return Promise.reject(e); }
    if (this._closed) return Promise.reject(this._closedError());
    const bytes = typeof payload === "string" ? utf8.encode(payload) : payload;
    if (this.welcome && bytes.length > this.welcome.maxPayload) {
      return Promise.reject(new VolnaError(ErrorCode.PayloadTooLarge, `payload of ${bytes.length} bytes exceeds ${this.welcome.maxPayload}`));
    }
    let fixed = null;
    if (options.sequence !== undefined && options.sequence !== null) {
      fixed = BigInt(options.sequence);
      if (fixed < 1n) return Promise.reject(new VolnaError(ErrorCode.BadRequest, "a sequence starts at 1"));
      if (fixed >= this._nextSequence) this._nextSequence = fixed + 1n;
    }
    return new Promise((resolve, reject) => {
      const entry = {
        channel, bytes, resolve, reject, sequence: fixed, fixed: fixed !== null,
        sentOn: null, requestId: null, retryTimer: null, attempt: 0,
        maybeStored: false, lastRefusal: null, done: false,
      };
      let queue = this._queues.get(channel);
      if (!queue) { queue = []; this._queues.set(channel, queue); }
      queue.push(entry);
      entry.timer = setTimeout(() => {
        const maybeStored = entry.maybeStored || entry.sentOn !== null;
        this._finishPublish(entry, new VolnaError(0, `publish to ${channel} timed out after ${this.options.requestTimeoutMs} ms`
          + (maybeStored ? " (it may have been stored)" : " (it was not stored)"), { kind: "timeout", maybeStored, cause: entry.lastRefusal ?? undefined }));
      }, this.options.requestTimeoutMs);
      this._pump(channel);
    });
  }

  /**
   * Subscribes to `channel` from `position`: `{}` (new messages only),
   * `{from: offset, epoch?}`, or `{last: n}`. Resolves once the broker
   * resolved the start (waiting for a connection within
   * `requestTimeoutMs`). Listen for `message` events on the result.
   */
  async subscribe(channel, position = {}) {
    channelBytes(channel);
    if (this._closed) throw this._closedError();
    const sub = new Subscription(this, channel, position);
    await this._establish(sub, Date.now() + this.options.requestTimeoutMs);
    return sub;
  }

  /** Closes the client for good, also a connection still being opened. */
  close() {
    if (this._closed) return;
    this._fail(new VolnaError(0, "the client was closed", { kind: "closed", closeCode: CloseCode.Normal }), 1000, "closed by the application");
  }

  // -- the connection ------------------------------------------------------

  async _supervise() {
    let unauthorized = 0;
    let tokenFailures = 0;
    let failures = 0;
    while (!this._closed) {
      this._setState("connecting", { attempt: this._attempt });
      let link;
      try {
        link = await this._open();
      } catch (e) {
        if (this._closed) return;
        failures += 1;
        let final = null;
        let pauseMs = null;
        if (e.kind === "token") {
          tokenFailures += 1;
          this.dispatchEvent(new CustomEvent("tokenerror", { detail: { error: e.cause ?? e, failures: tokenFailures } }));
          if (tokenFailures >= this.options.maxTokenFailures) {
            final = new VolnaError(0, `the tokenProvider failed ${tokenFailures} times in a row: ${e.cause?.message ?? e.message}`, { kind: "token", cause: e.cause ?? e });
          }
        } else if (e.kind === "replaced") {
          final = e;
        } else if (e.kind === "refused" && e.code === ErrorCode.Unauthorized) {
          // A fresh token from the provider gets one more try.
          unauthorized += 1;
          if (!this.options.tokenProvider || unauthorized > 1) final = e;
          else pauseMs = 0;
        } else if (e.kind === "refused" && e.code === ErrorCode.UnsupportedVersion && this._protocol > PROTOCOL_V3) {
          this._protocol = PROTOCOL_V3; // an older broker: no InitProducer
          pauseMs = 0;
        } else if (e.kind === "refused" && !isRetryable(e.code)) {
          final = e;
        }
        if (e.kind !== "token") tokenFailures = 0;
        if (e.kind !== "refused" || e.code !== ErrorCode.Unauthorized) unauthorized = 0;
        if (final) { this._fail(final); return; }
        if (this._firstWaiter && failures >= this.options.connectAttempts) {
          const waiter = this._firstWaiter; this._firstWaiter = null; waiter.reject(e);
          return; // connect() closes the client
        }
        await this._sleep(pauseMs ?? this._delay());
        continue;
      }
      failures = 0; unauthorized = 0; tokenFailures = 0; this._attempt = 0;
      const lost = await link.lost;
      if (this._closed) return;
      if (lost.error) { this._fail(lost.error); return; }
      this.stats.reconnects += 1;
      await this._sleep(this._delay());
    }
  }

  _firstConnection() {
    if (this._live) return Promise.resolve();
    if (this._closed) return Promise.reject(this._closedError());
    return new Promise((resolve, reject) => { this._firstWaiter = { resolve, reject }; });
  }

  _setState(state, detail = {}) {
    this.state = state;
    this.dispatchEvent(new CustomEvent(state, { detail }));
  }

  _delay() {
    const { initialMs, maxMs } = this.options.backoff;
    return backoff(initialMs, maxMs, this._attempt++);
  }

  /** Sleeps `ms`, or less when the client closes. */
  _sleep(ms) {
    return new Promise((resolve) => {
      const entry = { resolve, timer: setTimeout(() => { this._sleeps.delete(entry); resolve(); }, ms) };
      this._sleeps.add(entry);
    });
  }

  async _token() {
    const { tokenProvider, tokenTimeoutMs } = this.options;
    if (!tokenProvider) return this.options.token;
    try {
      const token = await withTimeout(Promise.resolve().then(() => tokenProvider()), tokenTimeoutMs,
        () => new Error(`the tokenProvider gave no token within ${tokenTimeoutMs} ms`));
      if (typeof token !== "string") throw new TypeError("the tokenProvider gave no string");
      return token;
    } catch (cause) {
      throw new VolnaError(0, `the tokenProvider failed: ${cause?.message ?? cause}`, { kind: "token", cause });
    }
  }

  /** Opens one connection: resolves with it once the session is ready. */
  _open() {
    return new Promise((resolve, reject) => {
      let ws;
      try { ws = new this._WebSocket(this.url, [SUBPROTOCOL]); } catch (e) {
        reject(new VolnaError(0, `cannot open ${this.url}: ${e.message}`, { kind: "disconnected", cause: e }));
        return;
      }
      ws.binaryType = "arraybuffer";
      let markLost;
      const link = {
        ws, streams: new Map(), control: new StreamBuffer(1 << 30), welcomed: false, ready: false,
        pending: new Map(), abandoned: new Set(), staleChannels: new Set(), deadSubs: new Set(),
        routes: new Map(), earlyBytes: 0, pingTimer: null, pongDue: false, gone: false,
        lost: new Promise((r) => { markLost = r; }),
      };
      this._link = link;
      let settled = false;
      const fail = (error) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        try { ws.close(1000, "connection attempt failed"); } catch { /* already closing */ }
        link.gone = true;
        reject(error);
      };
      const timer = setTimeout(() => fail(new VolnaError(0, `no session within ${this.options.connectTimeoutMs} ms`, { kind: "timeout" })), this.options.connectTimeoutMs);
      link.failOpen = fail;
      ws.onopen = async () => {
        if (this._closed || settled) { ws.close(1000, "closed by the application"); return; }
        let token;
        try { token = await this._token(); } catch (e) { fail(e); return; }
        if (this._closed || settled) { ws.close(1000, "closed by the application"); return; }
        try {
          ws.send(message(CONTROL, T.Hello, (w) => {
            w.u16(this._protocol); w.str(token); w.str(this.options.client);
            if (this._protocol >= 3) w.str(this.options.device ?? "");
          }));
        } catch (e) { fail(new VolnaError(0, e.message, { kind: "disconnected", cause: e })); }
      };
      ws.onmessage = (event) => {
        if (link.gone) return;
        try {
          this._onMessage(link, new Uint8Array(event.data), () => {
            settled = true; clearTimeout(timer); resolve(link);
          }, fail);
        } catch (e) {
          // Bytes out of step: this connection is over; a new one resumes.
          try { ws.close(CLOSE_BASE + CloseCode.ProtocolError, String(e.message).slice(0, 100)); } catch { /* closing */ }
          this._linkGone(link, { code: CloseCode.ProtocolError, reason: e.message });
          fail(e);
        }
      };
      ws.onerror = () => {}; // the close event follows
      ws.onclose = (event) => {
        clearInterval(link.pingTimer);
        const code = event.code >= CLOSE_BASE && event.code < 5000 ? event.code - CLOSE_BASE : null;
        const replaced = code === CloseCode.Replaced
          ? new VolnaError(0, `closed by the broker: ${event.reason || "replaced by a newer connection of the same device"}`, { kind: "replaced", closeCode: code })
          : null;
        if (!settled) {
          fail(replaced ?? link.refused ?? (code === CloseCode.Unauthorized
            ? new VolnaError(ErrorCode.Unauthorized, event.reason || "unauthorized", { closeCode: code })
            : new VolnaError(0, `connection closed (${event.code}) ${event.reason}`, { kind: "disconnected", closeCode: code })));
        }
        this._linkGone(link, { code, reason: event.reason, error: replaced });
        markLost({ code, reason: event.reason, error: replaced });
      };
      link.markLost = markLost;
    });
  }

  _onMessage(link, bytes, ready, fail) {
    if (bytes.length < 4) throw protocolError("message without a stream tag");
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const stream = view.getUint32(0);
    const body = bytes.subarray(4);
    if (stream === CONTROL) {
      for (const frame of link.control.push(body)) this._onControl(link, frame, ready, fail);
      return;
    }
    let s = link.streams.get(stream);
    if (body.length === 0) { link.streams.delete(stream); return; } // the stream's end
    if (!s) {
      s = { buffer: new StreamBuffer(this.welcome?.maxFrame ?? 1 << 30), subscription: null, early: [], earlyBytes: 0, overflowed: false };
      link.streams.set(stream, s);
    }
    if (s.overflowed) return;
    for (const frame of s.buffer.push(body)) {
      if (frame.type === T.StreamHeader) { s.subscription = frame.subscription; continue; }
      if (link.deadSubs.has(s.subscription)) continue; // unsubscribed: its end follows
      const sub = link.routes.get(s.subscription);
      if (sub) { sub._deliver(frame); continue; }
      // Before its Subscribed reply: kept, within a byte budget.
      if (link.earlyBytes + frame.size > this.options.maxBufferedBytes) {
        // Too much: stop the stream; the subscription, once its reply
        // comes, subscribes again from its start (nothing is lost).
        s.overflowed = true;
        link.earlyBytes -= s.earlyBytes;
        s.early = []; s.earlyBytes = 0;
        link.ws.send(stopMessage(stream));
        return;
      }
      s.early.push(frame); s.earlyBytes += frame.size; link.earlyBytes += frame.size;
    }
  }

  _onControl(link, frame, ready, fail) {
    if (!link.welcomed) {
      if (frame.type === T.Welcome) {
        link.welcomed = true;
        this.welcome = frame;
        link.pingTimer = setInterval(() => this._ping(link), this.options.pingIntervalMs);
        this._initProducer(link).then(() => {
          if (link.gone || this._closed) return;
          link.ready = true;
          this._live = link;
          ready();
          this._setState("connected", frame);
          if (this._firstWaiter) { const w = this._firstWaiter; this._firstWaiter = null; w.resolve(); }
          for (const w of [...this._liveWaiters]) w.resolve(link);
          this._resume(link);
        }, (e) => {
          try { link.ws.close(CLOSE_BASE + CloseCode.Normal, "producer not ready"); } catch { /* closing */ }
          fail(e);
        });
      } else if (frame.type === T.Error) {
        link.refused = new VolnaError(frame.code, frame.message);
      }
      return;
    }
    switch (frame.type) {
      case T.TokenExpiring:
        if (this.options.tokenProvider) {
          this._token()
            .then((token) => this._request(link, T.Refresh, (w) => w.str(token), this.options.attemptTimeoutMs))
            .catch((error) => this.dispatchEvent(new CustomEvent("tokenerror", { detail: { error, failures: 1 } })));
        }
        return;
      case T.SubscriptionEnded: {
        const sub = link.routes.get(frame.subscription);
        if (sub) sub._end(new VolnaError(frame.code, frame.message), true);
        return;
      }
      case T.ReadMarker:
        this.dispatchEvent(new CustomEvent("readmarker", { detail: frame }));
        return;
      default: {
        const waiter = link.pending.get(frame.requestId);
        if (!waiter) {
          // A reply nobody waits for any more (its request timed out): a
          // subscription it opened is closed again.
          if (link.abandoned.delete(frame.requestId) && frame.type === T.Subscribed) {
            this._unsubscribeId(link, frame.subscription);
          }
          return;
        }
        link.pending.delete(frame.requestId);
        clearTimeout(waiter.timer);
        if (frame.type === T.Error) waiter.reject(new VolnaError(frame.code, frame.message));
        else waiter.resolve(frame);
      }
    }
  }

  /**
   * Asks the broker where this producer's sequences stand (protocol 4). On
   * the first session a device's producer id is derived first; a broker
   * that cannot say gets a random id instead (the device's sequences would
   * collide with those it stored), or a refusal for an explicit id.
   */
  async _initProducer(link) {
    const first = !this._producerReady;
    if (first && this._producerSource === "random" && this.options.device) {
      const derived = await deviceProducerId(this.options.device);
      if (derived !== null) { this.producerId = derived; this._producerSource = "device"; }
    }
    if (this._producerSource === "random") { this._producerReady = true; return; }
    let reply = null;
    let refusal = null;
    if (this.welcome.protocol < 4) {
      refusal = new VolnaError(ErrorCode.UnknownFrame, "the broker speaks a protocol before InitProducer");
    } else {
      try {
        reply = await this._request(link, T.InitProducer, (w) => w.u64(this.producerId), this.options.attemptTimeoutMs);
      } catch (e) {
        if (e.kind !== "refused" || (e.code !== ErrorCode.UnknownFrame && e.code !== ErrorCode.Unsupported)) throw e;
        refusal = e;
      }
    }
    if (refusal !== null) {
      // Later sessions go on with the client's own counter: it is above
      // everything this client sent.
      if (!first) return;
      if (this._producerSource === "application") throw refusal;
      this.producerId = randomProducerId();
      this._producerSource = "random";
      this._producerReady = true;
      return;
    }
    if (reply.type !== T.ProducerReady) throw protocolError("unexpected reply to InitProducer");
    if (reply.lastSequence + 1n > this._nextSequence) this._nextSequence = reply.lastSequence + 1n;
    this._producerReady = true;
  }

  /** A request on `link`; rejects on a refusal, a lost link or after `timeoutMs`. */
  _request(link, type, body, timeoutMs) {
    if (link.gone) return Promise.reject(disconnected());
    const requestId = this._nextRequest++;
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject, type, timer: null };
      if (timeoutMs !== undefined && timeoutMs !== Infinity) {
        waiter.timer = setTimeout(() => {
          if (link.pending.get(requestId) !== waiter) return;
          link.pending.delete(requestId);
          link.abandoned.add(requestId);
          reject(new VolnaError(0, `no answer within ${Math.round(timeoutMs)} ms`, { kind: "timeout" }));
        }, Math.max(0, timeoutMs));
      }
      link.pending.set(requestId, waiter);
      try {
        link.ws.send(message(CONTROL, type, (w) => { w.u64(requestId); body(w); }));
      } catch (e) {
        link.pending.delete(requestId); clearTimeout(waiter.timer);
        reject(e instanceof VolnaError ? e : disconnected());
      }
    });
  }

  /** The session in use, waiting for one until `deadline` (ms since the epoch). */
  _waitLive(deadline) {
    if (this._closed) return Promise.reject(this._closedError());
    if (this._live) return Promise.resolve(this._live);
    return new Promise((resolve, reject) => {
      const waiter = {
        resolve: (link) => { done(); resolve(link); },
        reject: (e) => { done(); reject(e); },
        timer: deadline === Infinity ? null : setTimeout(() => waiter.reject(null), Math.max(0, deadline - Date.now())),
      };
      const done = () => { clearTimeout(waiter.timer); this._liveWaiters.delete(waiter); };
      this._liveWaiters.add(waiter);
    });
  }

  _ping(link) {
    if (link.gone) return;
    if (link.pongDue) {
      try { link.ws.close(CLOSE_BASE + CloseCode.Normal, "no answer to ping"); } catch { /* closing */ }
      this._linkGone(link, { code: null, reason: "no answer to ping" });
      link.markLost({ code: null, reason: "no answer to ping" });
      return;
    }
    link.pongDue = true;
    this._request(link, T.Ping, () => {}).then(() => { link.pongDue = false; }, () => {});
  }

  /** `link` is over: requests fail, publishes and subscriptions wait for the next. */
  _linkGone(link, { code, reason }) {
    if (link.gone && link.cleaned) return;
    link.gone = true;
    link.cleaned = true;
    clearInterval(link.pingTimer);
    const wasLive = this._live === link;
    if (wasLive) this._live = null;
    if (this._link === link) this._link = null;
    for (const waiter of link.pending.values()) { clearTimeout(waiter.timer); waiter.reject(disconnected()); }
    link.pending.clear();
    for (const sub of link.routes.values()) sub.id = null;
    link.routes.clear();
    for (const queue of this._queues.values()) {
      for (const entry of queue) {
        if (entry.sentOn === link) { entry.sentOn = null; entry.maybeStored = true; entry.requestId = null; }
      }
    }
    if (wasLive && !this._closed) this._setState("disconnected", { code, reason });
  }

  /** Ends the client for good with `error`. */
  _fail(error, wsCode = CLOSE_BASE + CloseCode.Normal, wsReason = "closed") {
    if (this._closed) return;
    this._closed = true;
    this.error = error.kind === "closed" ? null : error;
    const link = this._link ?? this._live;
    if (link) {
      try { link.ws.close(wsCode, wsReason); } catch { /* closing */ }
      link.failOpen?.(error);
      this._linkGone(link, { code: null, reason: wsReason });
      link.markLost?.({ code: null, reason: wsReason });
    }
    for (const s of this._sleeps) { clearTimeout(s.timer); s.resolve(); }
    this._sleeps.clear();
    for (const w of [...this._liveWaiters]) w.reject(error);
    if (this._firstWaiter) { const w = this._firstWaiter; this._firstWaiter = null; w.reject(error); }
    for (const queue of [...this._queues.values()]) for (const entry of [...queue]) this._finishPublish(entry, error);
    for (const sub of [...this._subs]) sub._end(error, true);
    this.state = "closed";
    this.dispatchEvent(new CustomEvent("closed", {
      detail: { code: error.code, closeCode: error.closeCode, reason: error.brokerMessage ?? error.message, error },
    }));
  }

  _closedError() {
    return this.error ?? new VolnaError(0, "the client was closed", { kind: "closed", closeCode: CloseCode.Normal });
  }

  // -- subscriptions ---------------------------------------------------------

  /**
   * Subscribes `sub` on the session in use, and again on each one after,
   * until `deadline` (Infinity: a resume, retried until it ends). Throws a
   * final refusal, or a timeout once out of time.
   */
  async _establish(sub, deadline) {
    sub._establishing = true;
    let attempt = 0;
    let last = null;
    try {
      for (;;) {
        if (sub.ended) return;
        let link;
        try { link = await this._waitLive(deadline); } catch (e) {
          throw e ?? timeoutError(`subscribe to ${sub.channel}`, last);
        }
        if (sub.ended) return;
        const position = sub._resumePosition();
        const wait = Math.min(this.options.attemptTimeoutMs, deadline - Date.now());
        let reply;
        try {
          reply = await this._request(link, T.Subscribe, (w) => {
            w.channel(sub.channel);
            if (position.from !== undefined) {
              w.u8(1); w.u64(position.from);
              if (position.epoch !== undefined && position.epoch !== null) { w.u8(1); w.u64(position.epoch); } else w.u8(0);
            } else if (position.last !== undefined) {
              w.u8(2); w.u64(position.last);
            } else w.u8(0);
          }, wait);
        } catch (e) {
          if (e.kind === "disconnected") continue; // on the next session
          if (e.kind === "timeout") link.staleChannels.add(sub.channel);
          // AlreadySubscribed after a timed-out attempt on this session: the
          // late reply's subscription is on its way out.
          const stale = e.code === ErrorCode.AlreadySubscribed && link.staleChannels.has(sub.channel);
          if (!(e.kind === "timeout" || isRetryable(e.code) || stale)) throw e;
          last = e;
          const pause = backoff(this.options.backoff.initialMs, this.options.backoff.maxMs, attempt++);
          if (Date.now() + pause >= deadline) throw timeoutError(`subscribe to ${sub.channel}`, last);
          this.dispatchEvent(new CustomEvent("retry", { detail: { request: "subscribe", channel: sub.channel, error: e } }));
          await this._sleep(pause);
          if (this._closed) throw this._closedError();
          continue;
        }
        if (sub.ended || link.gone) {
          // Unsubscribed meanwhile (or this session is gone already).
          if (!link.gone) this._unsubscribeId(link, reply.subscription);
          if (sub.ended) return;
          continue;
        }
        const overflowed = [...link.streams.values()].some((s) => s.subscription === reply.subscription && s.overflowed);
        if (sub.next === null) sub.next = reply.start;
        if (sub.epoch === null) sub.epoch = reply.epoch;
        if (overflowed) {
          // Its first deliveries exceeded the buffer and were dropped: again
          // from the start the broker resolved.
          this._unsubscribeId(link, reply.subscription);
          continue;
        }
        sub.id = reply.subscription;
        link.routes.set(sub.id, sub);
        this._subs.add(sub);
        // Deliveries (those that came before the reply routed them first)
        // wait for the next task: the caller of subscribe() adds its
        // listeners when the call resolves, before that.
        const held = sub._held ?? [];
        sub._held = held;
        for (const s of link.streams.values()) {
          if (s.subscription === sub.id && s.early.length) {
            link.earlyBytes -= s.earlyBytes; s.earlyBytes = 0;
            held.push(...s.early.splice(0));
          }
        }
        setTimeout(() => {
          if (sub._held !== held) return;
          sub._held = null;
          for (const frame of held) sub._deliver(frame);
        }, 0);
        return;
      }
    } finally {
      sub._establishing = false;
    }
  }

  _resume(link) {
    for (const sub of this._subs) {
      if (sub._establishing || sub.ended) continue;
      sub.id = null;
      this._establish(sub, Infinity).catch((e) => sub._end(e));
    }
    for (const channel of this._queues.keys()) this._pump(channel);
    return link;
  }

  /** Tells the broker `sub` is over (on the session in use). */
  async _release(sub) {
    const link = this._live;
    const id = sub.id;
    sub.id = null;
    if (id === null || !link) return;
    link.routes.delete(id);
    await this._unsubscribeId(link, id);
  }

  /** Forgets `sub` without telling the broker (it ended it). */
  _forget(sub) {
    if (sub.id !== null && this._live) this._live.routes.delete(sub.id);
    sub.id = null;
  }

  _unsubscribeId(link, id) {
    link.deadSubs.add(id);
    for (const [n, s] of link.streams) {
      if (s.subscription === id) { link.earlyBytes -= s.earlyBytes; s.early = []; s.earlyBytes = 0; }
      void n;
    }
    return this._request(link, T.Unsubscribe, (w) => w.u64(id), this.options.attemptTimeoutMs).catch(() => {});
  }

  // -- publishes -------------------------------------------------------------

  /**
   * Sends what may go of `channel`'s publishes on the session in use, in
   * call order: each names the one just ahead (`after`); one waiting to be
   * retried holds back those behind it.
   */
  _pump(channel) {
    const link = this._live;
    const queue = this._queues.get(channel);
    if (!link || !queue) return;
    let ahead = null;
    for (const entry of queue) {
      if (entry.sentOn !== link) {
        if (entry.retryTimer !== null) break;
        this._sendPublish(link, entry, ahead);
      }
      ahead = entry;
    }
  }

  _sendPublish(link, entry, ahead) {
    if (entry.sequence === null) entry.sequence = this._nextSequence++;
    const after = ahead ? ahead.sequence : null;
    entry.sentOn = link;
    const sent = this._request(link, T.Publish, (w) => {
      w.channel(entry.channel);
      w.u8(after === null ? 1 : 2); w.u64(this.producerId); w.u64(entry.sequence);
      if (after !== null) w.u64(after);
      w.payload(entry.bytes);
    });
    entry.requestId = this._nextRequest - 1;
    sent.then((f) => {
      this._finishPublish(entry, null, { offset: f.offset, epoch: f.epoch, duplicate: f.duplicate });
    }, (e) => {
      if (entry.done || entry.sentOn !== link) return;
      if (e.kind === "disconnected") return; // sent again on the next session
      if (!isRetryable(e.code)) { this._finishPublish(entry, e); return; }
      // Refused for now: nothing was stored (unless the broker cannot
      // tell); those behind it wait for it to be sent again.
      entry.maybeStored ||= e.code === ErrorCode.Unavailable;
      if (!entry.maybeStored && !entry.fixed) entry.sequence = null;
      entry.sentOn = null;
      entry.lastRefusal = e;
      const pause = backoff(this.options.backoff.initialMs, this.options.backoff.maxMs, entry.attempt++);
      entry.retryTimer = setTimeout(() => { entry.retryTimer = null; this._pump(entry.channel); }, pause);
    });
  }

  _finishPublish(entry, error, result) {
    if (entry.done) return;
    entry.done = true;
    clearTimeout(entry.timer);
    clearTimeout(entry.retryTimer);
    entry.retryTimer = null;
    const queue = this._queues.get(entry.channel);
    const at = queue ? queue.indexOf(entry) : -1;
    if (at >= 0) queue.splice(at, 1);
    if (queue && queue.length === 0) this._queues.delete(entry.channel);
    if (entry.sentOn && entry.requestId !== null) {
      const waiter = entry.sentOn.pending.get(entry.requestId);
      if (waiter) { clearTimeout(waiter.timer); entry.sentOn.pending.delete(entry.requestId); entry.sentOn.abandoned.add(entry.requestId); }
    }
    if (error) entry.reject(error); else entry.resolve(result);
    if (queue && queue.length > 0 && !this._closed) this._pump(entry.channel);
  }
}

// ---- helpers -----------------------------------------------------------------

function disconnected() { return new VolnaError(0, "the connection was lost", { kind: "disconnected" }); }

function timeoutError(what, last) {
  return new VolnaError(0, `${what} timed out${last ? ` (last: ${last.message})` : ""}`, { kind: "timeout", cause: last ?? undefined });
}

/** Exponential backoff with jitter: half the step plus up to half again. */
function backoff(initialMs, maxMs, attempt) {
  const exp = Math.min(maxMs, initialMs * 2 ** Math.min(attempt, 16));
  return exp / 2 + Math.random() * exp / 2;
}

function withTimeout(promise, ms, error) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => { timer = setTimeout(() => reject(error()), ms); }),
  ]).finally(() => clearTimeout(timer));
}

/** The application's producer id, if it gave one (a u64). */
function explicitProducerId(options) {
  if (options.producerId === undefined || options.producerId === null) return null;
  const id = BigInt(options.producerId);
  if (id < 0n || id >= 1n << 64n) throw new RangeError("producerId is a u64");
  return id;
}

function randomProducerId() {
  const words = new Uint32Array(2);
  crypto.getRandomValues(words);
  return (BigInt(words[0]) << 32n) | BigInt(words[1]);
}

/**
 * The producer id derived from a device id: the first 8 bytes of
 * SHA-256("volna-producer:" + device), big-endian — what the Rust client
 * derives too (`volna_client::device_producer_id`). `null` where the page
 * has no `crypto.subtle` (not a secure context): the client then uses a
 * random producer id.
 */
export async function deviceProducerId(device) {
  if (!globalThis.crypto?.subtle) return null;
  const digest = await crypto.subtle.digest("SHA-256", utf8.encode(`volna-producer:${device}`));
  return new DataView(digest).getBigUint64(0);
}

