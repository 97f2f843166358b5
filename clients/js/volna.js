// volna.js — the browser client for the Volna broker, over WebSocket.
//
// A dependency-free ES module: `import { connect } from "/client/volna.js"`.
// It speaks the broker's binary protocol (proto/src/codec_impl.rs) over
// one WebSocket (proto/src/websocket.rs: every message is a u32 stream tag
// and that stream's bytes; stream 0 is the control stream, 1, 2, … the
// broker's delivery streams, each opened by a StreamHeader frame).
//
// What it guarantees the page: every subscription delivers its channel's
// messages in offset order, once; after a lost connection it reconnects
// with backoff and jitter and resumes each subscription from its next
// offset (a gap is impossible, a duplicate is dropped); publishes carry a
// producer id and sequence, so one retried across a reconnect is stored
// once. `Truncated` and `EpochChanged` reach the page as events.

const CONTROL = 0;
const PROTOCOL_VERSION = 3;
const SUBPROTOCOL = "volna.1";
const CLOSE_BASE = 4000;

const T = {
  Hello: 0x01, Publish: 0x02, Subscribe: 0x03, Unsubscribe: 0x04, Ping: 0x05, Refresh: 0x06,
  Welcome: 0x41, Published: 0x42, Subscribed: 0x43, Unsubscribed: 0x44, Pong: 0x45,
  Error: 0x46, Refreshed: 0x47, TokenExpiring: 0x48, SubscriptionEnded: 0x49,
  Stored: 0x4a, UnreadCounts: 0x4b, ReadMarker: 0x4c,
  StreamHeader: 0x81, Deliver: 0x82, Truncated: 0x83, EpochChanged: 0x84,
};

/** Error codes by number (proto/src/error.rs). */
export const ErrorCodes = Object.freeze({
  1: "BadRequest", 2: "UnsupportedVersion", 3: "Unauthorized", 4: "Forbidden",
  5: "PayloadTooLarge", 6: "FrameTooLarge", 7: "UnknownFrame", 8: "UnexpectedFrame",
  9: "NotSubscribed", 10: "AlreadySubscribed", 11: "TooManySubscriptions",
  12: "StorageUnavailable", 13: "SequenceTooOld", 14: "RateLimited", 15: "ShuttingDown",
  16: "Internal", 17: "TooManyConnections", 18: "ServerOnly", 19: "TooManyProducers",
  20: "ChannelDeleted", 21: "OutOfOrder", 22: "Unavailable", 23: "DeviceRequired",
  24: "TooManyDevices", 25: "Unsupported",
});

/** Codes after which the same request may succeed on a later try. */
const RETRYABLE = new Set([12, 14, 15, 16, 22]);

/** A request the broker refused, or a connection that failed. */
export class VolnaError extends Error {
  constructor(code, message) {
    super(`${ErrorCodes[code] ?? `error code ${code}`}: ${message}`);
    this.name = "VolnaError";
    this.code = code;
    this.codeName = ErrorCodes[code] ?? `Other(${code})`;
    this.brokerMessage = message;
  }
}

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
  channel(name) {
    const b = utf8.encode(name);
    if (b.length < 1 || b.length > 255) throw new VolnaError(1, `invalid channel name ${JSON.stringify(name)}`);
    this.u8(b.length); this.raw(b);
  }
  payload(b) { this.u32(b.length); this.raw(b); }
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
  need(n) { if (this.at + n > this.b.length) throw new VolnaError(1, "truncated frame"); }
  u8() { this.need(1); return this.v.getUint8(this.at++); }
  u16() { this.need(2); const x = this.v.getUint16(this.at); this.at += 2; return x; }
  u32() { this.need(4); const x = this.v.getUint32(this.at); this.at += 4; return x; }
  big() { this.need(8); const x = this.v.getBigUint64(this.at); this.at += 8; return x; }
  num() { return Number(this.big()); }
  bytes(n) { this.need(n); const x = this.b.subarray(this.at, this.at + n); this.at += n; return x; }
  str() { return fromUtf8.decode(this.bytes(this.u16())); }
  channel() { return fromUtf8.decode(this.bytes(this.u8())); }
}

function decodeFrame(type, r) {
  switch (type) {
    case T.Welcome: return { type, session: r.num(), protocol: r.u16(), maxFrame: r.u32(), maxPayload: r.u32(), maxSubscriptions: r.u32() };
    case T.Published: return { type, requestId: r.num(), offset: r.num(), epoch: r.big(), duplicate: r.u8() === 1 };
    case T.Subscribed: return { type, requestId: r.num(), subscription: r.num(), epoch: r.big(), start: r.num() };
    case T.Unsubscribed: case T.Pong: case T.Stored: return { type, requestId: r.num() };
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
    default: throw new VolnaError(7, `unknown frame type 0x${type.toString(16)}`);
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
      if (len === 0 || len + 4 > this.maxFrame) throw new VolnaError(6, `frame of ${len + 4} bytes`);
      if (this.buf.length - at - 4 < len) break;
      const type = this.buf[at + 4];
      const r = new Reader(this.buf.subarray(at + 5, at + 4 + len));
      const frame = decodeFrame(type, r);
      if (r.at !== r.b.length) throw new VolnaError(1, "trailing bytes in a frame");
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

/** A subscription: `message`, `truncated`, `epochchanged` and `ended` events. */
export class Subscription extends EventTarget {
  constructor(client, channel, position) {
    super();
    this.client = client;
    this.channel = channel;
    this.position = position;
    /** The next offset this subscription delivers (known once subscribed). */
    this.next = null;
    this.epoch = null;
    this.id = null;
    this.ended = false;
  }
  /** Stops the subscription. */
  async unsubscribe() {
    if (this.ended) return;
    this.ended = true;
    this.client._subs.delete(this);
    const id = this.id;
    if (id !== null && this.client._live) {
      this.client._routes.delete(id);
      await this.client._request(T.Unsubscribe, (w) => w.u64(id)).catch(() => {});
    }
  }
  _resumePosition() {
    if (this.next !== null) return { from: this.next, epoch: this.epoch };
    return this.position;
  }
  _deliver(frame) {
    switch (frame.type) {
      case T.Deliver: {
        if (this.next !== null && frame.first > this.next) {
          this._end(new VolnaError(16, `gap: expected ${this.next}, got ${frame.first}`));
          return;
        }
        this.epoch = frame.epoch;
        for (const m of frame.messages) {
          if (this.next !== null && m.offset < this.next) continue; // a replay after a resume
          this.next = m.offset + 1;
          this.dispatchEvent(new MessageEvent("message", { data: m }));
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
  _end(error) {
    if (this.ended) return;
    this.ended = true;
    this.client._subs.delete(this);
    if (this.id !== null) this.client._routes.delete(this.id);
    this.dispatchEvent(new CustomEvent("ended", { detail: error }));
  }
}

/**
 * Connects to `url` (`wss://host:port/ws`) and resolves once the broker
 * welcomed the client. Options: `token` (or `tokenProvider`, an async
 * function called for every connection and on `TokenExpiring`), `client`
 * (a name for the broker's logs), `device`, `backoff` ({initialMs, maxMs}),
 * `requestTimeoutMs`, `pingIntervalMs`.
 */
export async function connect(url, options = {}) {
  const client = new VolnaClient(url, options);
  await client._connectFirst();
  return client;
}

/** A connection that repairs itself: `connected` / `disconnected` events. */
export class VolnaClient extends EventTarget {
  constructor(url, options) {
    super();
    this.url = url;
    this.options = {
      token: "", client: "volna.js/0.1", device: "",
      backoff: { initialMs: 100, maxMs: 5000 }, requestTimeoutMs: 30000, pingIntervalMs: 10000,
      ...options,
    };
    this.producerId = randomU64();
    this._sequence = 1n;
    this._subs = new Set();
    this._routes = new Map(); // subscription id -> Subscription
    this._pending = new Map(); // request id -> {resolve, reject, resend?}
    this._publishes = []; // in flight, in order: resent after a reconnect
    this._nextRequest = 1;
    this._live = null;
    this._closed = false;
    this._attempt = 0;
    this.welcome = null;
  }

  /** Publishes `payload` (a string or bytes); resolves to {offset, epoch, duplicate}. */
  publish(channel, payload) {
    const bytes = typeof payload === "string" ? utf8.encode(payload) : payload;
    if (this.welcome && bytes.length > this.welcome.maxPayload) {
      return Promise.reject(new VolnaError(5, `payload of ${bytes.length} bytes exceeds ${this.welcome.maxPayload}`));
    }
    const sequence = this._sequence++;
    return new Promise((resolve, reject) => {
      const entry = { channel, bytes, sequence, resolve, reject, requestId: null };
      this._publishes.push(entry);
      this._sendPublish(entry);
      entry.timer = setTimeout(() => this._finishPublish(entry, new VolnaError(16, "publish timed out")), this.options.requestTimeoutMs);
    });
  }

  /**
   * Subscribes to `channel` from `position`: `{}` (new messages only),
   * `{from: offset, epoch?}`, or `{last: n}`. Listen for `message` events
   * on the result (their `data` is a VolnaMessage).
   */
  async subscribe(channel, position = {}) {
    const sub = new Subscription(this, channel, position);
    this._subs.add(sub);
    if (this._live) await this._subscribe(sub);
    return sub;
  }

  /** Closes the connection for good. */
  close() {
    this._closed = true;
    clearTimeout(this._retryTimer);
    if (this._live) this._live.ws.close(1000, "closed by the page");
    this._failAll(new VolnaError(15, "the client was closed"));
  }

  /** Whether a session is established right now. */
  get connected() { return this._live !== null; }

  // -- internals --

  async _connectFirst() {
    for (;;) {
      try { await this._open(); return; } catch (e) {
        if (e instanceof VolnaError && !RETRYABLE.has(e.code)) throw e;
        if (this._attempt >= 3) throw e;
        await sleep(this._delay());
      }
    }
  }

  _delay() {
    const { initialMs, maxMs } = this.options.backoff;
    const exp = Math.min(maxMs, initialMs * 2 ** Math.min(this._attempt++, 16));
    return exp / 2 + Math.random() * exp / 2;
  }

  async _token() {
    return this.options.tokenProvider ? await this.options.tokenProvider() : this.options.token;
  }

  _open() {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url, [SUBPROTOCOL]);
      ws.binaryType = "arraybuffer";
      const link = { ws, streams: new Map(), control: new StreamBuffer(1 << 30), welcomed: false, pingTimer: null, pongDue: null };
      ws.onopen = async () => {
        try {
          const token = await this._token();
          ws.send(message(CONTROL, T.Hello, (w) => {
            w.u16(PROTOCOL_VERSION); w.str(token); w.str(this.options.client); w.str(this.options.device ?? "");
          }));
        } catch (e) { ws.close(); reject(e); }
      };
      ws.onmessage = (event) => {
        try { this._onMessage(link, new Uint8Array(event.data), resolve, reject); } catch (e) {
          // Bytes out of step: this connection is over; a new one resumes.
          ws.close(4000 + 2, String(e.message).slice(0, 100));
        }
      };
      ws.onclose = (event) => {
        clearInterval(link.pingTimer);
        const code = event.code >= CLOSE_BASE && event.code < 5000 ? event.code - CLOSE_BASE : null;
        if (!link.welcomed) {
          reject(link.refused ?? new VolnaError(code === 3 ? 3 : 15, `connection closed (${event.code}) ${event.reason}`));
          return;
        }
        if (this._live === link) this._lost(code, event.reason);
      };
    });
  }

  _onMessage(link, bytes, resolve, reject) {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    if (bytes.length < 4) throw new VolnaError(1, "message without a stream tag");
    const stream = view.getUint32(0);
    const body = bytes.subarray(4);
    if (stream === CONTROL) {
      for (const frame of link.control.push(body)) this._onControl(link, frame, resolve, reject);
      return;
    }
    let s = link.streams.get(stream);
    if (body.length === 0) { link.streams.delete(stream); return; } // the stream's end
    if (!s) { s = { buffer: new StreamBuffer(this.welcome?.maxFrame ?? 1 << 30), subscription: null, early: [] }; link.streams.set(stream, s); }
    for (const frame of s.buffer.push(body)) {
      if (frame.type === T.StreamHeader) { s.subscription = frame.subscription; continue; }
      const sub = this._routes.get(s.subscription);
      if (sub) sub._deliver(frame);
      else if (s.early.length < 10000) s.early.push(frame); // before its Subscribed reply
      else { link.ws.send(stopMessage(stream)); link.streams.delete(stream); } // nobody claims it
    }
  }

  _onControl(link, frame, resolve, reject) {
    if (!link.welcomed) {
      if (frame.type === T.Welcome) {
        link.welcomed = true;
        this.welcome = frame;
        this._live = link;
        this._attempt = 0;
        link.pingTimer = setInterval(() => this._ping(link), this.options.pingIntervalMs);
        this._resume(link);
        this.dispatchEvent(new CustomEvent("connected", { detail: frame }));
        resolve();
      } else if (frame.type === T.Error) {
        link.refused = new VolnaError(frame.code, frame.message);
      }
      return;
    }
    switch (frame.type) {
      case T.TokenExpiring:
        if (this.options.tokenProvider) {
          this._token().then((token) => this._request(T.Refresh, (w) => w.str(token))).catch(() => {});
        }
        return;
      case T.SubscriptionEnded: {
        const sub = this._routes.get(frame.subscription);
        if (sub) sub._end(new VolnaError(frame.code, frame.message));
        return;
      }
      case T.ReadMarker:
        this.dispatchEvent(new CustomEvent("readmarker", { detail: frame }));
        return;
      default: {
        const waiter = this._pending.get(frame.requestId);
        if (!waiter) return;
        this._pending.delete(frame.requestId);
        if (frame.type === T.Error) waiter.reject(new VolnaError(frame.code, frame.message));
        else waiter.resolve(frame);
      }
    }
  }

  _request(type, body) {
    const link = this._live;
    if (!link) return Promise.reject(new VolnaError(15, "not connected"));
    const requestId = this._nextRequest++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(requestId);
        reject(new VolnaError(16, "request timed out"));
      }, this.options.requestTimeoutMs);
      this._pending.set(requestId, {
        resolve: (f) => { clearTimeout(timer); resolve(f); },
        reject: (e) => { clearTimeout(timer); reject(e); },
      });
      link.ws.send(message(CONTROL, type, (w) => { w.u64(requestId); body(w); }));
    });
  }

  _sendPublish(entry) {
    if (!this._live) return; // sent when the connection is back
    const requestId = this._nextRequest++;
    entry.requestId = requestId;
    this._pending.set(requestId, {
      resolve: (f) => this._finishPublish(entry, null, { offset: f.offset, epoch: f.epoch, duplicate: f.duplicate }),
      reject: (e) => {
        if (RETRYABLE.has(e.code) && e.code !== 16) setTimeout(() => this._sendPublish(entry), this._delay());
        else this._finishPublish(entry, e);
      },
    });
    this._live.ws.send(message(CONTROL, T.Publish, (w) => {
      w.u64(requestId); w.channel(entry.channel);
      w.u8(1); w.u64(this.producerId); w.u64(entry.sequence);
      w.payload(entry.bytes);
    }));
  }

  _finishPublish(entry, error, result) {
    const at = this._publishes.indexOf(entry);
    if (at < 0) return;
    this._publishes.splice(at, 1);
    clearTimeout(entry.timer);
    if (entry.requestId !== null) this._pending.delete(entry.requestId);
    if (error) entry.reject(error); else entry.resolve(result);
  }

  async _subscribe(sub) {
    const position = sub._resumePosition();
    let reply;
    try {
      reply = await this._request(T.Subscribe, (w) => {
        w.channel(sub.channel);
        if (position.from !== undefined) {
          w.u8(1); w.u64(position.from);
          if (position.epoch !== undefined && position.epoch !== null) { w.u8(1); w.u64(position.epoch); } else w.u8(0);
        } else if (position.last !== undefined) {
          w.u8(2); w.u64(position.last);
        } else w.u8(0);
      });
    } catch (e) {
      if (e.code === 15 || e.code === 16) return; // the connection went: resumed on the next
      sub._end(e);
      throw e;
    }
    if (sub.ended) return;
    sub.id = reply.subscription;
    if (sub.next === null) sub.next = reply.start;
    if (sub.epoch === null) sub.epoch = reply.epoch;
    this._routes.set(sub.id, sub);
    // Frames that came before the reply routed them.
    for (const s of this._live?.streams.values() ?? []) {
      if (s.subscription === sub.id && s.early.length) {
        for (const frame of s.early.splice(0)) sub._deliver(frame);
      }
    }
  }

  _resume(link) {
    this._routes.clear();
    for (const sub of this._subs) { sub.id = null; this._subscribe(sub).catch(() => {}); }
    for (const entry of this._publishes) { this._sendPublish(entry); }
    return link;
  }

  _ping(link) {
    if (link.pongDue !== null) { link.ws.close(4000 + 2, "no answer to ping"); return; }
    link.pongDue = true;
    this._request(T.Ping, () => {}).then(() => { link.pongDue = null; }, () => {});
  }

  _lost(code, reason) {
    this._live = null;
    this._routes.clear();
    for (const [id, waiter] of this._pending) {
      // Publishes are resent on the next connection; other requests fail.
      if (!this._publishes.some((p) => p.requestId === id)) waiter.reject(new VolnaError(15, "connection lost"));
    }
    this._pending.clear();
    for (const entry of this._publishes) entry.requestId = null;
    this.dispatchEvent(new CustomEvent("disconnected", { detail: { code, reason } }));
    if (this._closed) return;
    const retry = async () => {
      if (this._closed) return;
      try { await this._open(); } catch (e) {
        if (e instanceof VolnaError && e.code === 3 && !this.options.tokenProvider) {
          this._failAll(e);
          return;
        }
        this._retryTimer = setTimeout(retry, this._delay());
      }
    };
    this._retryTimer = setTimeout(retry, this._delay());
  }

  _failAll(error) {
    for (const entry of [...this._publishes]) this._finishPublish(entry, error);
    for (const sub of [...this._subs]) sub._end(error);
  }
}

function sleep(ms) { return new Promise((r) => setTimeout(r, ms)); }

function randomU64() {
  const words = new Uint32Array(2);
  crypto.getRandomValues(words);
  return (BigInt(words[0]) << 32n) | BigInt(words[1]);
}
