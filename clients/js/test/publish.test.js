// Publishes: `after` keeps call order through a retryable refusal; a
// publish that timed out is never sent again and says whether it may have
// been stored.

import { test } from "node:test";
import assert from "node:assert/strict";
import { connect, VolnaClient, ErrorCode } from "../volna.js";
import { URL, Faults, T, token, uniqueChannel, eventually, within, collect, errorMessage, assertNoDuplicates } from "./helpers.js";

const fast = { backoff: { initialMs: 20, maxMs: 100 } };

test("a publish refused for now cannot be overtaken by the next one (after)", async () => {
  const faults = new Faults();
  const ch = uniqueChannel();
  const client = await connect(URL, { token: token("pub-a"), WebSocket: faults.WebSocket, ...fast });
  // The first send of "first" is refused by the "broker" (RateLimited):
  // nothing stored. "second", sent right behind it, must wait for it.
  let refused = 0;
  faults.onSend = (socket, m) => {
    const f = m.frames[0];
    if (m.stream === 0 && f?.type === T.Publish && f.payload === "first" && refused === 0) {
      refused += 1;
      setTimeout(() => socket.inject(errorMessage(f.requestId, ErrorCode.RateLimited, "slow down")), 0);
      return "drop";
    }
  };
  const [first, second] = await within("both publishes", Promise.all([client.publish(ch, "first"), client.publish(ch, "second")]));
  assert.equal(refused, 1);
  assert.deepEqual([first.offset, second.offset], [1, 2], "stored in call order");
  const publishes = faults.sentFrames(T.Publish);
  const firstSeqs = publishes.filter((f) => f.payload === "first").map((f) => f.sequence);
  const secondSent = publishes.filter((f) => f.payload === "second");
  assert.equal(secondSent[0].flag, 2, "the second names the first");
  assert.equal(secondSent[0].after, firstSeqs[0]);
  assert.ok(secondSent.every((f) => f.after === undefined || firstSeqs.includes(f.after)), "each send follows the first, or comes once it is stored");
  assert.ok(faults.receivedFrames(T.Error).some((f) => f.code === ErrorCode.OutOfOrder), "the broker held the second back");
  const reader = await connect(URL, { token: token("pub-a-read") });
  const sub = await reader.subscribe(ch, { from: 1 });
  const got = collect(sub);
  await eventually("both", () => got.length === 2);
  assert.deepEqual(got, [[1, "first"], [2, "second"]]);
  assertNoDuplicates(reader, sub);
  client.close(); reader.close();
});

test("a publish that timed out offline is never sent, and says it was not stored", async () => {
  const faults = new Faults();
  faults.refuse = true;
  const ch = uniqueChannel();
  const client = new VolnaClient(URL, { token: token("pub-b"), WebSocket: faults.WebSocket, requestTimeoutMs: 300, ...fast });
  await assert.rejects(client.publish(ch, "doomed"), (e) => e.kind === "timeout" && e.maybeStored === false);
  faults.refuse = false;
  const after = await within("a publish once connected", client.publish(ch, "kept"));
  assert.equal(after.offset, 1, "the doomed one was not stored before it");
  assert.deepEqual(faults.sentFrames(T.Publish).map((f) => f.payload), ["kept"]);
  client.close();
});

test("a publish whose retries ran out of time is not sent again by its retry timer", async () => {
  const faults = new Faults();
  const ch = uniqueChannel();
  const client = await connect(URL, {
    token: token("pub-c"), WebSocket: faults.WebSocket, requestTimeoutMs: 400, backoff: { initialMs: 150, maxMs: 150 },
  });
  faults.onSend = (socket, m) => {
    const f = m.frames[0];
    if (m.stream === 0 && f?.type === T.Publish && f.payload === "doomed") {
      setTimeout(() => socket.inject(errorMessage(f.requestId, ErrorCode.RateLimited, "slow down")), 0);
      return "drop";
    }
  };
  const error = await client.publish(ch, "doomed").then(() => null, (e) => e);
  assert.equal(error?.kind, "timeout");
  assert.equal(error.maybeStored, false);
  assert.equal(error.cause?.code, ErrorCode.RateLimited, "the last refusal is the cause");
  const sends = faults.sentFrames(T.Publish).length;
  // A retry timer left running would fire within one backoff step (150 ms).
  faults.onSend = null;
  await new Promise((r) => setTimeout(r, 400));
  assert.equal(faults.sentFrames(T.Publish).length, sends, "nothing sent after the failure was reported");
  client.close();
});

test("a publish sent on a connection that died unanswered says it may have been stored", async () => {
  const faults = new Faults();
  const ch = uniqueChannel();
  const client = await connect(URL, { token: token("pub-d"), WebSocket: faults.WebSocket, requestTimeoutMs: 1000, ...fast });
  // The answer never comes: the connection dies, and the broker stays
  // out of reach until the publish's deadline.
  faults.onReceive = () => "drop";
  faults.onSend = (socket, m) => {
    if (m.stream === 0 && m.frames[0]?.type === T.Publish) {
      faults.refuse = true;
      setTimeout(() => socket.cut(), 50);
    }
  };
  await assert.rejects(client.publish(ch, "in doubt"), (e) => e.kind === "timeout" && e.maybeStored === true);
  client.close();
});
