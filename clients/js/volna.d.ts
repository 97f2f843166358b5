// Types of volna.js, the browser client for the Volna broker.

/** Error codes by number, as the broker sends them. */
export declare const ErrorCodes: Readonly<Record<number, string>>;

/** A request the broker refused, or a connection that failed. */
export declare class VolnaError extends Error {
  /** The protocol's error code (see `ErrorCodes`). */
  readonly code: number;
  /** The code's name, e.g. "Forbidden". */
  readonly codeName: string;
  /** The broker's own words. */
  readonly brokerMessage: string;
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

export interface SubscriptionEventMap {
  message: MessageEvent<VolnaMessage>;
  truncated: CustomEvent<Truncated>;
  epochchanged: CustomEvent<EpochChanged>;
  /** The subscription is over: unsubscribed, refused, or ended by the broker. */
  ended: CustomEvent<VolnaError>;
}

export declare class Subscription extends EventTarget {
  readonly channel: string;
  /** The next offset this subscription delivers (known once subscribed). */
  readonly next: number | null;
  readonly epoch: bigint | null;
  readonly ended: boolean;
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

export interface ConnectOptions {
  /** The connection token (a JWT in production). */
  token?: string;
  /** Called for every connection and when the token is about to expire. */
  tokenProvider?: () => Promise<string>;
  /** A name for the broker's logs. */
  client?: string;
  /** This device's id, for server-side cursors. */
  device?: string;
  backoff?: { initialMs: number; maxMs: number };
  requestTimeoutMs?: number;
  pingIntervalMs?: number;
}

export interface Welcome {
  session: number;
  protocol: number;
  maxFrame: number;
  maxPayload: number;
  maxSubscriptions: number;
}

export interface ClientEventMap {
  connected: CustomEvent<Welcome>;
  disconnected: CustomEvent<{ code: number | null; reason: string }>;
  readmarker: CustomEvent<{ channel: string; offset: number }>;
}

/** A connection that repairs itself and resumes its subscriptions. */
export declare class VolnaClient extends EventTarget {
  readonly url: string;
  readonly connected: boolean;
  readonly welcome: Welcome | null;
  readonly producerId: bigint;
  publish(channel: string, payload: string | Uint8Array): Promise<Published>;
  subscribe(channel: string, position?: Position): Promise<Subscription>;
  close(): void;
  addEventListener<K extends keyof ClientEventMap>(
    type: K,
    listener: (event: ClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
}

/** Connects to `url` (`wss://host:port/ws`); resolves once welcomed. */
export declare function connect(url: string, options?: ConnectOptions): Promise<VolnaClient>;
