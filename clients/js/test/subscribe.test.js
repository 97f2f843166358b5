// Subscribes: retried on a timeout or a retryable refusal, a late reply
// unsubscribed, a subscribe made offline resolved from the call.

import { test } from "node:test";
import assert from "node:assert/strict";
import { connect, VolnaClient, ErrorCode } from "../volna.js";
import { URL, Faults, T, token, uniqueChannel, eventually, within, collect, metric, errorMessage, noSubscriptions, assertNoDuplicates } from "./helpers.js";

const fast = { backoff: { initialMs: 20, maxMs: 200 } };

test("a subscribe refused with a retryable code is retried, not failed", async () => {
  const faults = new Faults();
  const ch = uniqueChannel();
  // The first Subscribe is answered by the "broker" with StorageUnavailable.
  let refused = 0;
  faults.onSend = (socket, m) => {
    const f = m.frames[0];
    if (m.stream === 0 && f?.type === T.Subscribe && refused === 0) {
      refused += 1;
      setTimeout(() => socket.inject(errorMessage(f.requestId, ErrorCode.StorageUnavailable, "a partition fails over")), 0);
      return "drop";
    }
  };
  const client = await connect(URL, { token: token("sub-a"), WebSocket: faults.WebSocket, ...fast });
  const sub = await within("subscribe", client.subscribe(ch, {}));
  assert.equal(refused, 1);
  assert.equal(faults.sentFrames(T.Subscribe).length, 2, "sent again after the refusal");
  const got = collect(sub);
  const publisher = await connect(URL, { token: token("sub-a-pub") });
  await publisher.publish(ch, "after the retry");
  await eventually("the message", () => got.length === 1);
  assert.deepEqual(got, [[1, "after the retry"]]);
  assertNoDuplicates(client, sub);
  client.close(); publisher.close();
});

test("a final refusal of a subscribe fails it at once", async () => {
  const client = await connect(URL, { token: token("sub-b", { subscribe: ["chat.allowed"] }), ...fast });
  await assert.rejects(client.subscribe(uniqueChannel(), {}), (e) => e.code === ErrorCode.Forbidden && e.kind === "refused");
  client.close();
});

test("a subscribe whose answer is late is retried, and the late reply is unsubscribed", async () => {
  const faults = new Faults();
  const ch = uniqueChannel();
  const client = await connect(URL, { token: token("sub-c"), WebSocket: faults.WebSocket, attemptTimeoutMs: 300, ...fast });
  const before = await noSubscriptions();
  // From the first Subscribe on, the broker's answers are held until the
  // client has given up on it and sent it again: its reply comes late.
  faults.onSend = (socket, m) => {
    if (m.stream === 0 && m.frames[0]?.type === T.Subscribe) {
      const subscribes = faults.sentFrames(T.Subscribe).length;
      if (subscribes === 1) faults.holding = true;
      if (subscribes === 2) setTimeout(() => faults.release(), 0);
    }
  };
  const sub = await within("subscribe", client.subscribe(ch, {}));
  const replies = faults.receivedFrames(T.Subscribed);
  assert.ok(replies.length >= 2, "the late reply and the retry's");
  const late = replies[0].subscription;
  await eventually("an Unsubscribe for the late reply's subscription",
    () => faults.sentFrames(T.Unsubscribe).some((f) => f.subscription === late));
  assert.notEqual(BigInt(sub.id), late);
  await eventually("the broker to hold one subscription of this client",
    async () => (await metric("volna_subscriptions")) === before + 1);
  const got = collect(sub);
  const publisher = await connect(URL, { token: token("sub-c-pub") });
  await publisher.publish(ch, "once");
  await eventually("the message", () => got.length === 1);
  assert.deepEqual(got, [[1, "once"]]);
  // The late reply's subscription delivered nothing to the application.
  assertNoDuplicates(client, sub);
  client.close(); publisher.close();
});

test("a late reply after the subscribe gave up is unsubscribed", async () => {
  const faults = new Faults();
  const client = await connect(URL, {
    token: token("sub-d"), WebSocket: faults.WebSocket, attemptTimeoutMs: 200, requestTimeoutMs: 300, ...fast,
  });
  const before = await noSubscriptions();
  faults.holding = true;
  await assert.rejects(client.subscribe(uniqueChannel(), {}), (e) => e.kind === "timeout");
  faults.release();
  const late = await eventually("the late reply", () => faults.receivedFrames(T.Subscribed)[0]);
  await eventually("an Unsubscribe for it", () => faults.sentFrames(T.Unsubscribe).some((f) => f.subscription === late.subscription));
  await eventually("the broker to hold none of this client's subscriptions",
    async () => (await metric("volna_subscriptions")) === before);
  client.close();
});

test("a subscribe made while offline resolves its start once connected, and times out offline", async () => {
  const faults = new Faults();
  faults.refuse = true; // the broker is out of reach
  const ch = uniqueChannel();
  const client = new VolnaClient(URL, { token: token("sub-e"), WebSocket: faults.WebSocket, requestTimeoutMs: 15000, ...fast });
  let resolved = false;
  const pending = client.subscribe(ch, {}).then((sub) => { resolved = true; return sub; });
  const publisher = await connect(URL, { token: token("sub-e-pub") });
  await publisher.publish(ch, "before the start");
  await eventually("a few refused attempts", () => faults.sockets.length >= 2);
  assert.equal(resolved, false, "subscribe() must not claim a start it has not got");
  faults.refuse = false;
  const sub = await within("subscribe", pending);
  assert.equal(sub.next, 2, "starts after what the broker had when it resolved the start");
  const got = collect(sub);
  await publisher.publish(ch, "after the start");
  await eventually("the message", () => got.length === 1);
  assert.deepEqual(got, [[2, "after the start"]]);
  assertNoDuplicates(client, sub);
  client.close();

  const offline = new Faults();
  offline.refuse = true;
  const stranded = new VolnaClient(URL, { token: token("sub-e2"), WebSocket: offline.WebSocket, requestTimeoutMs: 300, ...fast });
  await assert.rejects(stranded.subscribe(ch, {}), (e) => e.kind === "timeout");
  stranded.close();
  publisher.close();
});

test("a resume refused with a retryable code is retried; the subscription goes on", async () => {
  const faults = new Faults();
  const ch = uniqueChannel();
  const client = await connect(URL, { token: token("sub-f"), WebSocket: faults.WebSocket, ...fast });
  const sub = await client.subscribe(ch, {});
  const got = collect(sub);
  const ended = [];
  sub.addEventListener("ended", (e) => ended.push(e.detail));
  const publisher = await connect(URL, { token: token("sub-f-pub") });
  await publisher.publish(ch, "one");
  await eventually("one", () => got.length === 1);
  // The resume's first Subscribe is refused (retryable).
  let refused = 0;
  faults.onSend = (socket, m) => {
    const f = m.frames[0];
    if (m.stream === 0 && f?.type === T.Subscribe && refused === 0) {
      refused += 1;
      setTimeout(() => socket.inject(errorMessage(f.requestId, ErrorCode.ShuttingDown, "draining")), 0);
      return "drop";
    }
  };
  faults.last.cut();
  await publisher.publish(ch, "two");
  await eventually("two, after the resume", () => got.length === 2);
  assert.equal(refused, 1);
  // Resumed: a delivery in flight on the old connection may be dropped as
  // seen, but none reached the application twice.
  assert.deepEqual(got, [[1, "one"], [2, "two"]]);
  assert.deepEqual(ended, []);
  client.close(); publisher.close();
});
