//! Lua scripts. Each touches the keys of one queue only (one hash tag), and every loop is bounded
//! by its caller's chunk size, so no script builds a huge reply or a huge `unpack`.

use redis::Script;
use std::sync::LazyLock;

/// Lua function that enqueues one prepared job; shared with scripts of other modules that
/// enqueue in the same step as their own change (the ledger's REGISTER), on the same slot.
/// Returns "" if enqueued, else the id of the job holding the unique key.
pub(crate) const ENQUEUE_ONE: &str = r#"
local function enqueue_one(stream, delayed, unique, now, run_at, ukey, job_id, env)
  if ukey ~= '' and redis.call('HSETNX', unique, ukey, job_id) == 0 then
    return redis.call('HGET', unique, ukey)
  end
  if run_at > now then
    redis.call('ZADD', delayed, run_at, env)
  else
    redis.call('XADD', stream, '*', 'e', env)
  end
  return ''
end
"#;

/// Enqueue a chunk of jobs. KEYS: stream, delayed, unique.
/// ARGV: now_ms, then per job: run_at_ms, unique_key ("" = none), job_id, envelope.
/// Returns one string per job: "" if enqueued, else the id of the job holding the unique key.
pub static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{ENQUEUE_ONE}{}",
        r#"
local now = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV, 4 do
  out[#out + 1] = enqueue_one(KEYS[1], KEYS[2], KEYS[3], now,
    tonumber(ARGV[i]), ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
end
return out
"#
    ))
});

/// Move due delayed jobs into the stream, at most ARGV[2] per call. KEYS: delayed, stream.
/// ARGV: now_ms, limit. Returns how many were moved.
pub static PROMOTE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, env in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'e', env)
end
if #due > 0 then
  -- One removal for the whole chunk (the limit bounds the unpack).
  redis.call('ZREM', KEYS[1], unpack(due))
end
return #due
"#,
    )
});

/// Settle a batch of finished deliveries. KEYS: stream, delayed, dead, unique.
/// ARGV: group, now_ms, dead_max_len, then 5 values per op: kind, entry_id, a, b, c.
///   kind "a" (done):  a = unique key or "", b = job id (the key is released only by the
///                     call that acknowledges the entry)
///   kind "r" (retry): a = run_at_ms, b = new envelope
///   kind "d" (dead):  a = reason, b = envelope, c = worker
/// A retry or death is written only if this call acknowledged the entry, so a job delivered
/// twice is never retried or buried twice. Settled entries are deleted from the stream.
pub static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local group, now, dead_max = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local done = {}
local settled = 0
for i = 4, #ARGV, 5 do
  local kind, id, a, b, c = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  if kind == 'a' and a == '' then
    done[#done + 1] = id
  elseif kind == 'a' then
    -- Release the unique key only if this call acknowledged the entry: a stale run finishing
    -- after its job was claimed and re-queued elsewhere must not free the live copy's key.
    if redis.call('XACK', KEYS[1], group, id) == 1 then
      settled = settled + 1
      if redis.call('HGET', KEYS[4], a) == b then
        redis.call('HDEL', KEYS[4], a)
      end
    end
    redis.call('XDEL', KEYS[1], id)
  else
    if redis.call('XACK', KEYS[1], group, id) == 1 then
      settled = settled + 1
      if kind == 'r' then
        if tonumber(a) > now then
          redis.call('ZADD', KEYS[2], a, b)
        else
          redis.call('XADD', KEYS[1], '*', 'e', b)
        end
      else
        redis.call('XADD', KEYS[3], 'MAXLEN', '~', dead_max, '*',
          'e', b, 'reason', a, 'worker', c, 'at', ARGV[2])
      end
    end
    redis.call('XDEL', KEYS[1], id)
  end
end
if #done > 0 then
  settled = settled + redis.call('XACK', KEYS[1], group, unpack(done))
  redis.call('XDEL', KEYS[1], unpack(done))
end
return settled
"#,
    )
});

/// Claim orphaned entries and report their delivery counts. KEYS: stream.
/// ARGV: group, consumer, min_idle_ms, cursor, count.
/// Returns {next_cursor, {id, fields, delivery_count}...}.
pub static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local out = {r[1]}
for _, e in ipairs(r[2]) do
  if e[2] then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    local count = 1
    if p[1] then count = p[1][4] end
    out[#out + 1] = {e[1], e[2], count}
  end
end
return out
"#,
    )
});

/// Reset the idle time of entries this worker holds, so a live but busy worker is never taken
/// for dead. Only entries still owned by this consumer are touched (one taken over meanwhile is
/// left to its new owner). `XCLAIM … JUSTID` does not count a delivery.
/// KEYS: stream. ARGV: group, consumer, entry ids... Returns how many were renewed.
pub static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then args[#args + 1] = ARGV[i] end
end
if #args == 5 then return 0 end
args[#args + 1] = 'JUSTID'
redis.call(unpack(args))
return #args - 6
"#,
    )
});

/// Give fetched but never started entries back to the queue (worker shutdown).
/// KEYS: stream. ARGV: group, entry ids... Returns how many were re-added.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = 0
for i = 2, #ARGV do
  local e = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  if #e == 1 and redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    redis.call('XADD', KEYS[1], '*', unpack(e[1][2]))
    redis.call('XDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
"#,
    )
});

/// Move one dead job back to the stream, once. KEYS: dead, stream. ARGV: dead_id, envelope.
pub static REQUEUE_DEAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('XDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('XADD', KEYS[2], '*', 'e', ARGV[2])
  return 1
end
return 0
"#,
    )
});

/// Delete one dead job and release its unique key. KEYS: dead, unique.
/// ARGV: dead_id, unique_key ("" = none), job_id.
pub static DELETE_DEAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('XDEL', KEYS[1], ARGV[1]) == 1 then
  if ARGV[2] ~= '' and redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[3] then
    redis.call('HDEL', KEYS[2], ARGV[2])
  end
  return 1
end
return 0
"#,
    )
});

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local_redis::LocalRedis;
    use redis::AsyncCommands;

    const STREAM: &str = "{t:q}:stream";
    const DELAYED: &str = "{t:q}:delayed";
    const DEAD: &str = "{t:q}:dead";
    const UNIQUE: &str = "{t:q}:unique";

    async fn settle(conn: &mut redis::aio::MultiplexedConnection, op: [&str; 5]) -> i64 {
        let mut invocation = SETTLE.prepare_invoke();
        invocation
            .key(STREAM)
            .key(DELAYED)
            .key(DEAD)
            .key(UNIQUE)
            .arg("g")
            .arg(crate::queue::now_ms())
            .arg(100);
        for value in op {
            invocation.arg(value);
        }
        invocation.invoke_async(conn).await.unwrap()
    }

    async fn read(conn: &mut redis::aio::MultiplexedConnection, consumer: &str) -> String {
        let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg(consumer)
            .arg("COUNT")
            .arg(1)
            .arg("STREAMS")
            .arg(STREAM)
            .arg(">")
            .query_async(conn)
            .await
            .unwrap();
        reply.keys[0].ids[0].id.clone()
    }

    /// A run that lost its entry (claimed by another worker, retried as a new entry) and
    /// finishes late must not free the unique key the live copy still holds.
    #[tokio::test]
    async fn a_stale_done_never_frees_the_live_copys_unique_key() {
        let redis = LocalRedis::start(false).expect("redis-server on PATH");
        let client = redis::Client::open(redis.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(STREAM)
            .arg("g")
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await
            .unwrap();
        let _: () = conn.hset(UNIQUE, "K", "J").await.unwrap();
        let _: String = conn.xadd(STREAM, "*", &[("e", "v1")]).await.unwrap();
        let first = read(&mut conn, "stale").await;

        // Another worker takes the entry over and retries it now, as a new entry.
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(STREAM)
            .arg("g")
            .arg("live")
            .arg(0)
            .arg(&first)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(settle(&mut conn, ["r", &first, "0", "v2", ""]).await, 1);
        let second = read(&mut conn, "live").await;
        assert_ne!(first, second);

        // The stale run reports done for the entry it once held: nothing is acknowledged,
        // and the key stays with the live copy.
        assert_eq!(settle(&mut conn, ["a", &first, "K", "J", ""]).await, 0);
        let holder: Option<String> = conn.hget(UNIQUE, "K").await.unwrap();
        assert_eq!(holder.as_deref(), Some("J"));

        // The live copy's own done releases it.
        assert_eq!(settle(&mut conn, ["a", &second, "K", "J", ""]).await, 1);
        let holder: Option<String> = conn.hget(UNIQUE, "K").await.unwrap();
        assert_eq!(holder, None);
        let left: u64 = conn.xlen(STREAM).await.unwrap();
        assert_eq!(left, 0);
    }
}
