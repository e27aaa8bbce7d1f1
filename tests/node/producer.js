// A producer written in another language than the workers: publishes one job now and one
// after a delay, each with the W3C trace context of a span of its own, as the README's
// producer contract says (status hash first, then the entry). Prints what it sent as JSON.
"use strict";
const crypto = require("node:crypto");
const Redis = require("ioredis");

async function main() {
  const [redisUrl, streamPrefix, jobPrefix, queue, nowId, nowPayload, laterId, laterPayload, delayMs] =
    process.argv.slice(2);
  const traceId = crypto.randomBytes(16).toString("hex");
  const spans = {
    [nowId]: crypto.randomBytes(8).toString("hex"),
    [laterId]: crypto.randomBytes(8).toString("hex"),
  };
  const traceparent = (id) => `00-${traceId}-${spans[id]}-01`;
  const stream = `${streamPrefix}{${queue}}`;
  const queued = (id) => [`${jobPrefix}${id}`, "status", "queued", "queue", queue,
    "attempt", "1", "updated_at", new Date().toISOString()];
  const dueMs = Date.now() + Number(delayMs);
  const member = JSON.stringify(
    { id: laterId, payload: laterPayload, attempt: "1", traceparent: traceparent(laterId) });

  const redis = new Redis(redisUrl, { maxRetriesPerRequest: 1 });
  try {
    const replies = await redis
      .pipeline()
      .hset(...queued(nowId))
      .xadd(stream, "*", "id", nowId, "payload", nowPayload, "traceparent", traceparent(nowId))
      .hset(...queued(laterId))
      .zadd(`${stream}:delayed`, dueMs, member)
      .exec();
    const failed = replies.find(([err]) => err);
    if (failed) throw failed[0];
    process.stdout.write(JSON.stringify({ traceId, spans, entryId: replies[1][1], dueMs }) + "\n");
  } finally {
    redis.disconnect();
  }
}

main().catch((err) => {
  process.stderr.write(`producer: ${err.message}\n`);
  process.exit(1);
});
