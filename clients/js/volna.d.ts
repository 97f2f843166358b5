// Types of volna.js, the browser (and Node) client for the Volna broker.

/** The broker's error codes by name (proto/src/error.rs): `ErrorCode.Forbidden === 4`. */
export declare const ErrorCode: Readonly<{
  BadRequest: 1; UnsupportedVersion: 2; Unauthorized: 3; Forbidden: 4;
  PayloadTooLarge: 5; FrameTooLarge: 6; UnknownFrame: 7; UnexpectedFrame: 8;
  NotSubscribed: 9; AlreadySubscribed: 10; TooManySubscriptions: 11;
  StorageUnavailable: 12; SequenceTooOld: 13; RateLimited: 14; ShuttingDown: 15;
  Internal: 16; TooManyConnections: 17; ServerOnly: 18; TooManyProducers: 19;
  ChannelDeleted: 20; OutOfOrder: 21; Unavailable: 22; DeviceRequired: 23;
  TooManyDevices: 24; Unsupported: 25;
}>;

/** Error code names by number: `ErrorCodes[4] === "Forbidden"`. */
export declare const ErrorCodes: Readonly<Record<number, string>>;

/** Why the broker closed a connection (the WebSocket close code is 4000 + this). */
export declare const CloseCode: Readonly<{
  Normal: 0; GoingAway: 1; ProtocolError: 2; Unauthorized: 3; HelloTimeout: 4;
  Internal: 5; Kicked: 6; LimitExceeded: 7; ControlStalled: 8;
  /** A newer connection of the same device took over: final, no reconnect. */
  Replaced: 9;
}>;

/**
 * Whether a request refused with `code` may succeed if sent again later:
 * the broker's `ErrorCode::is_retryable` (12, 14, 15, 16, 21, 22).
 */
export declare function isRetryable(code: number): boolean;

/**
 * The producer id volna.js derives from a device id (first 8 bytes of
 * SHA-256("volna-producer:" + device), big-endian; the Rust client derives
 * the same); `null` without `crypto.subtle` (not a secure context).
 */
export declare function deviceProducerId(device: string): Promise<bigint | null>;

/** What went wrong: a refusal by the broker, or a failure on the client's side. */
export type ErrorKind =
  | "refused" // the broker's `code`
  | "timeout" // out of time (`maybeStored` for publishes)
  | "disconnected" // the connection went
  | "closed" // closed by the application
  | "replaced" // a newer connection of the same device took over
  | "token" // the tokenProvider kept failing
  | "protocol"; // bytes out of step, a gap

/** A request the broker refused, or one that failed. */
export declare class VolnaError extends Error {
  /** The broker's error code (see `ErrorCode`); 0 when it sent none. */
  readonly code: number;
  /** The code's name, e.g. "Forbidden" (or "Timeout", "Closed", … when `code` is 0). */
  readonly codeName: string;
  readonly kind: ErrorKind;
  /** The broker's own words (or the client's). */
  readonly brokerMessage: string;
  /** The broker's `CloseCode` when it closed the connection. */
  readonly closeCode: number | null;
  /**
   * For a publish that failed: whether it may have been stored all the same
   * (it was sent on a connection that then died or gave no answer). Send it
   * again with the same `sequence` and it is stored once.
   */
  readonly maybeStored: boolean;
  /** Whether the same request may succeed later. */
  readonly retryable: boolean;
}

/** One message of a channel. */
export declare class VolnaMessage {
  readonly channel: string;
  /** Its position in the channel: 1, 2, 3, … */
  readonly offset: number;
  /** When the broker stored it, in milliseconds since the Unix epoch. */
  readonly timestamp: number;
  readonly payload: Uint8Array;
  /** The payload as UTF-8 text. */
  text(): string;
}

/** Where a subscription starts. */
export type Position =
  | Record<string, never>
  | { from: number; epoch?: bigint | null }
  | { last: number };

export interface Truncated {
  channel: string;
  requested: number;
  /** Delivery goes on from here. */
  firstAvailable: number;
}

export interface EpochChanged {
  channel: string;
  previous: bigint;
  current: bigint;
  /** Delivery goes on from here, in the new log. */
  start: number;
}

export interface Duplicate {
  channel: string;
  /** The first offset of the delivery that held them. */
  first: number;
  /** How many of its messages were dropped as already delivered. */
  count: number;
  /** The next offset the subscription delivers. */
  next: number | null;
}

export interface SubscriptionEventMap {
  message: MessageEvent<VolnaMessage>;
  truncated: CustomEvent<Truncated>;
  epochchanged: CustomEvent<EpochChanged>;
  /** The broker sent messages already delivered: dropped, counted. */
  duplicate: CustomEvent<Duplicate>;
  /** The subscription is over: refused, ended by the broker, a gap, the client closed. */
  ended: CustomEvent<VolnaError>;
}

/**
 * A subscription. Its deliveries start in the task after `subscribe()`
 * resolved: add listeners right away.
 */
export declare class Subscription extends EventTarget {
  readonly channel: string;
  /** The next offset this subscription delivers (known once subscribed). */
  readonly next: number | null;
  readonly epoch: bigint | null;
  /** The broker's id of it on the current connection (null while it resumes). */
  readonly id: number | null;
  readonly ended: boolean;
  /** Why it ended (null while it runs, or after `unsubscribe()`). */
  readonly error: VolnaError | null;
  /** Deliveries dropped as already seen. */
  readonly duplicatesDropped: number;
  /** Stops it; the broker is told, also while it resumes. */
  unsubscribe(): Promise<void>;
  addEventListener<K extends keyof SubscriptionEventMap>(
    type: K,
    listener: (event: SubscriptionEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
}

export interface Published {
  offset: number;
  epoch: bigint;
  /** A retry of a publish the broker had already stored. */
  duplicate: boolean;
}

export interface PublishOptions {
  /**
   * The producer sequence to send it under (an outbox re-sent after a
   * reload keeps its sequences: stored once). The client's counter goes on
   * after the highest used.
   */
  sequence?: bigint | number | string;
}

export interface ConnectOptions {
  /** The connection token (a JWT in production). */
  token?: string;
  /** Called for every connection and when the token is about to expire. */
  tokenProvider?: () => Promise<string> | string;
  /** How long the tokenProvider may take (default 10 s). */
  tokenTimeoutMs?: number;
  /** Failures of the tokenProvider in a row before the client closes (default 3). */
  maxTokenFailures?: number;
  /** A name for the broker's logs. */
  client?: string;
  /** This device's id (server-side cursors; the producer id derives from it). */
  device?: string;
  /**
   * The producer id (a u64) of this client's publishes, the same across
   * page reloads; by default derived from `device`, else random.
   */
  producerId?: bigint | string | number;
  /** Reconnect and retry timing: exponential with jitter. */
  backoff?: { initialMs: number; maxMs: number };
  /** How long a publish or a subscribe may take, reconnects and retries included (default 30 s). */
  requestTimeoutMs?: number;
  /** How long one request waits for its answer before it is sent again (default 10 s). */
  attemptTimeoutMs?: number;
  /** How long one connection attempt may take (default 10 s). */
  connectTimeoutMs?: number;
  pingIntervalMs?: number;
  /** Bytes of deliveries kept while their subscription's reply is awaited (default 8 MiB). */
  maxBufferedBytes?: number;
  /** Failed attempts before `connect()` gives up (default 3); the client itself retries until closed. */
  connectAttempts?: number;
  /** The WebSocket class (default: the global one; e.g. the `ws` package in older Node). */
  WebSocket?: typeof WebSocket;
}

export interface Welcome {
  session: number;
  protocol: number;
  maxFrame: number;
  maxPayload: number;
  maxSubscriptions: number;
}

export type ClientState = "connecting" | "connected" | "disconnected" | "closed";

export interface Closed {
  /** The broker's error code of the refusal (0: none, e.g. closed by the application). */
  code: number;
  /** The broker's `CloseCode` when it closed the connection (9: replaced). */
  closeCode: number | null;
  reason: string;
  error: VolnaError;
}

export interface ClientEventMap {
  connecting: CustomEvent<{ attempt: number }>;
  connected: CustomEvent<Welcome>;
  disconnected: CustomEvent<{ code: number | null; reason: string }>;
  /** For good: closed by the application or refused by the broker. */
  closed: CustomEvent<Closed>;
  /** The tokenProvider failed (threw, gave no string, or took too long). */
  tokenerror: CustomEvent<{ error: unknown; failures: number }>;
  /** A request is sent again after a timeout or a retryable refusal. */
  retry: CustomEvent<{ request: string; channel: string; error: VolnaError }>;
  readmarker: CustomEvent<{ channel: string; offset: number }>;
}

/**
 * A connection that repairs itself and resumes its subscriptions.
 * Constructing one starts connecting.
 */
export declare class VolnaClient extends EventTarget {
  constructor(url: string, options?: ConnectOptions);
  readonly url: string;
  readonly state: ClientState;
  readonly connected: boolean;
  readonly welcome: Welcome | null;
  /** Why the client closed (null while open, or closed by the application). */
  readonly error: VolnaError | null;
  /**
   * The producer id publishes carry: the application's `producerId`, else
   * the device's (from the first session on), else random — random too
   * where the broker cannot say where the device's producer stands.
   */
  readonly producerId: bigint;
  readonly stats: { duplicatesDropped: number; reconnects: number };
  /** Resolves once stored; retried until `requestTimeoutMs`. */
  publish(channel: string, payload: string | Uint8Array, options?: PublishOptions): Promise<Published>;
  /** Resolves once the broker resolved the start (waiting for a connection within `requestTimeoutMs`). */
  subscribe(channel: string, position?: Position): Promise<Subscription>;
  /** Closes for good, also a connection being opened. */
  close(): void;
  addEventListener<K extends keyof ClientEventMap>(
    type: K,
    listener: (event: ClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
}

/**
 * Connects to `url` (`wss://host:port/ws`); resolves once welcomed. Rejects
 * with the refusal when the broker refuses for good, or with the last error
 * after `connectAttempts` failed attempts.
 */
export declare function connect(url: string, options?: ConnectOptions): Promise<VolnaClient>;
