//! Lua scripts. Each touches the keys of one queue only (one hash tag), and every loop is bounded
//! by its caller's chunk size, so no script builds a huge reply or a huge `unpack`.

use redis::Script;
use std::sync::LazyLock;

/// Lua: the Redis server's clock in ms. Every due time of the queue is on this clock, so a
/// worker or producer whose own clock is off never makes a job run early or late.
const SERVER_NOW: &str = r#"
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"#;

/// Lua function that enqueues one prepared job; shared with scripts of other modules that
/// enqueue in the same step as their own change (the ledger's register, accept and finalize),
/// on the same slot.
/// Returns "" if enqueued, else the id of the job holding the unique key. `now` and `run_at`
/// must be on one clock: the queue's own ENQUEUE passes the server's `TIME`; other callers pass
/// `crate::queue::now_ms()` (the process' estimate of the server's clock).
pub(crate) const ENQUEUE_ONE: &str = r#"
local function enqueue_one(stream, delayed, unique, now, run_at, ukey, job_id, env)
  if ukey ~= '' and redis.call('HSETNX', unique, ukey, job_id) == 0 then
    return redis.call('HGET', unique, ukey)
  end
  if run_at > now then
    delay_job(stream, delayed, now, run_at, env)
  else
    redis.call('XADD', stream, '*', 'e', env)
  end
  return ''
end
"#;

/// Lua function that adds a job to the delayed set and, when it is due before every job
/// there, wakes one sleeping worker with a marker (`w` = the due time) on the queue's wake
/// stream: workers sleep until the earliest due time they know of, and this one they could
/// not know. Under load new delays are rarely the earliest, so markers are rare; a lone
/// delayed job costs one. The wake stream's key is the delayed set's with `wake` for
/// `delayed` ([`crate::queue::QueueKeys::wake`]): the same hash tag, so the same slot. Markers
/// are hints: the stream keeps the last few.
///
/// The earliest due time is read once per script call and kept in a Lua local (`earliest`,
/// fresh on every call), so a group commit or a bulk enqueue of many delayed jobs pays one
/// `ZRANGE`, not one per job.
///
/// A script run for a worker whose own promoter follows the due times it is given (a ledger
/// step that acknowledges, in the same step, one of that worker's jobs from the same queue;
/// see `queue::Delivery::follow_due`) sets `follow_self` to `{delayed = <its queue's delayed
/// set>, owner = <whose job>}`: a job it delays to before every other one in that set then
/// writes no marker; `{owner, due time}` is noted in `self_followed` instead, for the script
/// to return, and the worker's promoter wakes for it. Like a lost marker, that worker
/// freezing or dying before then costs the job lateness (the promoter's periodic pass finds
/// it), never the job.
///
/// A script may hold its delayed jobs back and add them at its end, one `ZADD` per set (and
/// per 512 jobs): it sets `hold_for` (any value: whose jobs they are) while it queues them and
/// calls `add_held(failed)` before it returns, which calls `failed(owner, error)` for each job
/// a `ZADD` could not add. Only for jobs whose loss the owner's reply can report: nothing
/// else the script did is undone. The wake marker, written at once, is seen only when the
/// script ends, like the jobs.
pub(crate) const DELAY_JOB: &str = r#"
local earliest = {}
local follow_self = nil
local self_followed = {}
local hold_for = nil
local held = {}
local function add_held(failed)
  for delayed, h in pairs(held) do
    for i = 1, #h.jobs, 1024 do
      local last = math.min(i + 1023, #h.jobs)
      local added = redis.pcall('ZADD', delayed, unpack(h.jobs, i, last))
      if type(added) == 'table' and added.err then
        for k = (i + 1) / 2, last / 2 do failed(h.owners[k], added.err) end
      end
    end
  end
  held = {}
end
local function wake_marker(delayed, run_at)
  local wake = string.sub(delayed, 1, -8) .. 'wake'
  redis.call('XADD', wake, 'MAXLEN', '~', 64, '*', 'w', run_at)
end
local function delay_job(stream, delayed, now, run_at, env)
  local first = earliest[delayed]
  if first == nil then
    local head = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
    first = head[2] and tonumber(head[2]) or false
  end
  if hold_for ~= nil then
    local h = held[delayed]
    if h == nil then
      h = {jobs = {}, owners = {}}
      held[delayed] = h
    end
    h.jobs[#h.jobs + 1] = run_at
    h.jobs[#h.jobs + 1] = env
    h.owners[#h.owners + 1] = hold_for
  else
    redis.call('ZADD', delayed, run_at, env)
  end
  if first == false or run_at < first then
    if follow_self ~= nil and follow_self.delayed == delayed then
      self_followed[#self_followed + 1] = follow_self.owner
      self_followed[#self_followed + 1] = run_at
    else
      wake_marker(delayed, run_at)
    end
    first = run_at
  end
  earliest[delayed] = first
end
"#;

/// Enqueue a chunk of jobs. KEYS: stream, delayed, unique.
/// ARGV: per job: delay_ms (0 = now), unique_key ("" = none), job_id, envelope. A delayed job is
/// due at the server's `TIME` plus its delay, whatever the producer's clock says.
/// Returns one string per job: "" if enqueued, else the id of the job holding the unique key.
pub static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{SERVER_NOW}{DELAY_JOB}{ENQUEUE_ONE}{}",
        r#"
local now = server_now()
local out = {}
for i = 1, #ARGV, 4 do
  local delay = tonumber(ARGV[i])
  local run_at = 0
  if delay > 0 then run_at = now + delay end
  out[#out + 1] = enqueue_one(KEYS[1], KEYS[2], KEYS[3], now,
    run_at, ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
end
return out
"#
    ))
});

/// Move delayed jobs due by the server's clock (`TIME`) into the stream, at most ARGV[1] per
/// call. KEYS: delayed, stream, promoter lease. ARGV: limit, consumer ('' takes no lease),
/// lease ms, '1' to learn the next due time without the lease (a worker following a due
/// time: from a marker, or from its own ledger step). The
/// caller holds (or takes, when free) the promoter lease of this queue: the one worker that
/// wakes on time for the next due job, so many workers do not all wake at once. Another
/// worker's pass, while the lease is held and no marker woke it, moves nothing: it only takes
/// the lease over once the holder stops renewing it. Returns
/// {moved, the next due time (-1: none, not asked, or a full chunk: call again), 1 if the
/// caller holds the lease, how late the earliest job moved is (ms past its due time, by the
/// server's clock; -1 when none moved)}.
///
/// The lease's value is `<consumer>|<expiry, server ms>`, so the holder renews it only once an
/// eighth of it is gone: a promoter that wakes on time for each due job does not write on
/// every pass, and one that passes at least every half lease (the periodic pass) keeps
/// three eighths of it in hand against a stalled pass (half of it when every pass renewed).
///
/// The set's first [`PROMOTE_PEEK`] entries are read with their scores in one call: an
/// idle pass, or one that finds a few jobs due, learns both what is due and the next due
/// time from it; only when all of them are due does it read on by score.
pub static PROMOTE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{SERVER_NOW}local PEEK = {PROMOTE_PEEK}\n{}",
        r#"
local limit = tonumber(ARGV[1])
local lease = tonumber(ARGV[3])
local now = nil
local mine = 0
if ARGV[2] ~= '' then
  local holder = redis.call('GET', KEYS[3])
  local me = ARGV[2] .. '|'
  local held_until = nil
  if holder and string.sub(holder, 1, #me) == me then
    held_until = tonumber(string.sub(holder, #me + 1))
  end
  if holder == false or held_until ~= nil then
    now = server_now()
    if held_until == nil or held_until - now < lease * 7 / 8 then
      redis.call('SET', KEYS[3], me .. (now + lease), 'PX', lease)
    end
    mine = 1
  elseif ARGV[4] ~= '1' then
    -- A live promoter moves due jobs on time: this pass only watches for its lease to lapse.
    return {0, -1, 0, -1}
  end
end
now = now or server_now()
local peek = math.min(PEEK, limit)
local head = redis.call('ZRANGE', KEYS[1], 0, peek - 1, 'WITHSCORES')
local due = {}
local next_due = -1
for i = 1, #head, 2 do
  local at = tonumber(head[i + 1])
  if at > now then
    next_due = at
    break
  end
  due[#due + 1] = head[i]
end
local read_on = #due == peek and peek < limit
if read_on then
  -- Every job peeked at is due (and still in the set): the rest by score, after them.
  local more = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', peek, limit - peek)
  for _, env in ipairs(more) do due[#due + 1] = env end
end
for _, env in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'e', env)
end
if #due > 0 then
  -- One removal for the whole chunk (the limit bounds the unpack).
  redis.call('ZREM', KEYS[1], unpack(due))
end
if read_on and #due < limit then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if first[2] then next_due = tonumber(first[2]) end
end
-- The set is ordered by due time, so its head is the most overdue of the jobs moved.
local late = -1
if #due > 0 then late = now - tonumber(head[2]) end
return {#due, next_due, mine, late}
"#
    ))
});

/// Gives up the promoter lease at a graceful stop, if the caller holds it (its value is
/// `<consumer>|<expiry ms>`), so the next worker's periodic pass takes it over at once
/// instead of after the lease's rest. KEYS: the lease. ARGV: consumer. Returns 1 if released.
pub static RELEASE_PROMOTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local holder = redis.call('GET', KEYS[1])
local me = ARGV[1] .. '|'
if holder and string.sub(holder, 1, #me) == me then
  return redis.call('DEL', KEYS[1])
end
return 0
"#,
    )
});

/// How many entries at the head of the delayed set a promotion pass reads at once, with
/// their scores (see [`PROMOTE`]).
const PROMOTE_PEEK: usize = 8;

/// Lua function: the set of `ids` still pending for `consumer` in `group` (a table id ->
/// true). With several ids, one `XPENDING` over their range, filtered to the consumer, answers
/// for all of them (a worker holds at most a few hundred entries). Shared with the ledger's
/// script, which acknowledges a job in the step that writes its last effect.
pub(crate) const OWNED_ENTRIES: &str = r#"
local function entry_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms or '0'), tonumber(seq or '0')
end
local function owned_entries(stream, group, consumer, ids)
  local mine = {}
  if #ids == 0 then return mine end
  if #ids == 1 then
    local p = redis.call('XPENDING', stream, group, ids[1], ids[1], 1)
    if p[1] ~= nil and p[1][2] == consumer then mine[ids[1]] = true end
    return mine
  end
  -- The range's ends; each id is parsed once (a pattern match per comparison cost a batch
  -- of 25 acknowledgements ~33 us of the server's time on a quiet Redis 7.0, this ~9 us).
  local low, high = ids[1], ids[1]
  local low_ms, low_seq = entry_parts(low)
  local high_ms, high_seq = low_ms, low_seq
  for i = 2, #ids do
    local ms, seq = entry_parts(ids[i])
    if ms < low_ms or (ms == low_ms and seq < low_seq) then
      low, low_ms, low_seq = ids[i], ms, seq
    end
    if ms > high_ms or (ms == high_ms and seq > high_seq) then
      high, high_ms, high_seq = ids[i], ms, seq
    end
  end
  for _, p in ipairs(redis.call('XPENDING', stream, group, low, high, 100000, consumer)) do
    mine[p[1]] = true
  end
  return mine
end
"#;

/// Settle a batch of finished deliveries. KEYS: stream, delayed, dead, unique.
/// ARGV: group, consumer, dead_max_len, then 5 values per op: kind, entry_id, a, b, c.
///   kind "a" (done):  a = unique key or "", b = job id
///   kind "r" (retry): a = delay_ms (due at the server's `TIME` plus it; 0 = now), b = new
///                     envelope
///   kind "d" (dead):  a = reason, b = envelope, c = worker
/// An op is applied only if its entry is still pending **and owned by `consumer`**: a worker that
/// stalled past the orphan timeout and lost the entry to another worker must not acknowledge or
/// delete it (XACK ignores the consumer), or the new owner's retry or death would be dropped and
/// the job lost. Such a stale op is dropped untouched (the owner settles the entry). A retry or
/// death is written, and a unique key released, only by the call that acknowledged the entry.
/// Settled entries are deleted from the stream.
/// Returns {settled, {stale entry ids...}}.
pub static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{SERVER_NOW}{DELAY_JOB}{OWNED_ENTRIES}{}",
        r#"
local group, consumer, dead_max = ARGV[1], ARGV[2], ARGV[3]
-- The clock is read only by a batch that writes a retry or a death: most hold only dones.
local now = nil
local function clock()
  if not now then now = server_now() end
  return now
end
local ids = {}
for i = 5, #ARGV, 5 do ids[#ids + 1] = ARGV[i] end
local mine = owned_entries(KEYS[1], group, consumer, ids)
local seen = {}
local function owned(id)
  -- An id twice in one batch: only its first op may apply.
  if seen[id] then return false end
  seen[id] = true
  return mine[id] == true
end
local done = {}
local stale = {}
local settled = 0
-- The dead stream is kept to `dead_max` entries, the oldest dropped first; a dropped job's
-- unique key is released, as deleting it from the dead list does (else it would be held,
-- and refuse its key's enqueues, for ever).
-- At most 100 entries per burial, so a stream far over its cap (the cap lowered) shrinks
-- back over several burials instead of blocking Redis in one; a cap of 0 means none.
local function trim_dead()
  if tonumber(dead_max) <= 0 then return end
  local over = redis.call('XLEN', KEYS[3]) - tonumber(dead_max)
  if over <= 0 then return end
  local dropped = {}
  for _, entry in ipairs(redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', math.min(over, 100))) do
    local fields = entry[2]
    for j = 1, #fields - 1, 2 do
      if fields[j] == 'e' then
        local ok, job = pcall(cjson.decode, fields[j + 1])
        if ok and type(job) == 'table' and type(job.u) == 'string' and job.u ~= ''
          and redis.call('HGET', KEYS[4], job.u) == job.id then
          redis.call('HDEL', KEYS[4], job.u)
        end
      end
    end
    dropped[#dropped + 1] = entry[1]
  end
  if #dropped > 0 then redis.call('XDEL', KEYS[3], unpack(dropped)) end
end
for i = 4, #ARGV, 5 do
  local kind, id, a, b, c = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  if not owned(id) then
    stale[#stale + 1] = id
  elseif kind == 'a' and a == '' then
    done[#done + 1] = id
  elseif kind == 'a' then
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
        local delay = tonumber(a)
        if delay > 0 then
          delay_job(KEYS[1], KEYS[2], clock(), clock() + delay, b)
        else
          redis.call('XADD', KEYS[1], '*', 'e', b)
        end
      else
        redis.call('XADD', KEYS[3], '*', 'e', b, 'reason', a, 'worker', c, 'at', clock())
        trim_dead()
      end
    end
    redis.call('XDEL', KEYS[1], id)
  end
end
if #done > 0 then
  settled = settled + redis.call('XACK', KEYS[1], group, unpack(done))
  redis.call('XDEL', KEYS[1], unpack(done))
end
return {settled, stale}
"#
    ))
});

/// Take back the delivery an orphan scan counted for entries its worker still runs. KEYS:
/// stream. ARGV: group, consumer, then per entry its id and the count the scan reported.
/// Only an entry still held by `consumer` with that count is touched (`XCLAIM … JUSTID` with
/// the count less one); one another worker took meanwhile, or settled, is left alone.
pub static UNCOUNT_OWN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local restored = 0
for i = 3, #ARGV - 1, 2 do
  local id, counted = ARGV[i], tonumber(ARGV[i + 1])
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if counted > 1 and p[1] and p[1][2] == ARGV[2] and tonumber(p[1][4]) == counted then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'RETRYCOUNT', counted - 1, 'JUSTID')
    restored = restored + 1
  end
end
return restored
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

/// Give fetched but never started entries back to the queue (worker shutdown). Only entries
/// still owned by `consumer` are given back: one taken over meanwhile (this worker stalled past
/// the orphan timeout) belongs to its new owner, and re-adding it would run it twice and drop the
/// owner's settlement. The re-added entry starts with one delivery: the deliveries before the
/// one given back (holders that died with it) are added to its envelope's attempts (`a`), so
/// the crashes it caused still count. KEYS: stream. ARGV: group, consumer, entry ids...
/// Returns how many were re-added.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    local e = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
    if #e == 1 and redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
      local fields = e[1][2]
      local crashed = tonumber(p[1][4]) - 1
      -- Only an envelope Rust wrote (`{"id":…`): its first field is its id (a JSON string,
      -- whose quotes are escaped), then `a`, so the first `,"a":` is that field. Others (a
      -- script's cjson, in any key order) keep their text, and lose the count.
      if crashed > 0 and fields[1] == 'e' and string.sub(fields[2], 1, 7) == '{"id":"' then
        local from, to, a = string.find(fields[2], ',"a":(%d+)')
        if from then
          fields[2] = string.sub(fields[2], 1, from - 1) .. ',"a":' .. (tonumber(a) + crashed)
            .. string.sub(fields[2], to + 1)
        end
      end
      redis.call('XADD', KEYS[1], '*', unpack(fields))
      redis.call('XDEL', KEYS[1], ARGV[i])
      n = n + 1
    end
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

/// Delete the group's consumers idle longer than `stale_ms`, other than `me`: on the job
/// stream only those with nothing pending, on the wake stream any (its markers are only
/// hints). Checked and deleted in one step, so a consumer that wakes (a frozen worker, a
/// paused queue's) and reads entries meanwhile is never deleted with its pending entries,
/// which no read or claim would ever find again. A stream without the group has nothing to
/// delete. KEYS: stream, wake. ARGV: group, me, stale_ms. Returns the number deleted.
pub static REMOVE_STALE_CONSUMERS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local group, me, stale = ARGV[1], ARGV[2], tonumber(ARGV[3])
local removed = 0
for i, stream in ipairs(KEYS) do
  local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', stream, group)
  if ok then
    for _, fields in ipairs(consumers) do
      local c = {}
      for j = 1, #fields, 2 do c[fields[j]] = fields[j + 1] end
      local idle_enough = tonumber(c['idle']) > stale
      local free = i == 2 or tonumber(c['pending']) == 0
      if c['name'] ~= me and idle_enough and free then
        redis.call('XGROUP', 'DELCONSUMER', stream, group, c['name'])
        removed = removed + 1
      end
    end
  end
end
return removed
"#,
    )
});

#[cfg(test)]
mod tests {
    use super::*;
    use local_redis::LocalRedis;
    use redis::AsyncCommands;
    use redis::aio::MultiplexedConnection;

    const STREAM: &str = "{t:q}:stream";
    const DELAYED: &str = "{t:q}:delayed";
    const DEAD: &str = "{t:q}:dead";
    const UNIQUE: &str = "{t:q}:unique";

    /// Settles `ops` in one call as `consumer`: (settled, stale entry ids).
    async fn settle_batch(
        conn: &mut MultiplexedConnection,
        consumer: &str,
        ops: &[[&str; 5]],
    ) -> (i64, Vec<String>) {
        let mut invocation = SETTLE.prepare_invoke();
        invocation
            .key(STREAM)
            .key(DELAYED)
            .key(DEAD)
            .key(UNIQUE)
            .arg("g")
            .arg(consumer)
            .arg(100);
        for value in ops.iter().flatten() {
            invocation.arg(*value);
        }
        invocation.invoke_async(conn).await.unwrap()
    }

    /// Settles one op as `consumer`.
    async fn settle(
        conn: &mut MultiplexedConnection,
        consumer: &str,
        op: [&str; 5],
    ) -> (i64, Vec<String>) {
        settle_batch(conn, consumer, &[op]).await
    }

    async fn setup() -> (LocalRedis, MultiplexedConnection) {
        let redis = LocalRedis::start(local_redis::Durability::Off).expect("redis-server on PATH");
        let client = redis::Client::open(redis.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        create_group(&mut conn, STREAM).await;
        (redis, conn)
    }

    /// Group `g` on `stream`, created with the stream.
    async fn create_group(conn: &mut MultiplexedConnection, stream: &str) {
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg("g")
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await
            .unwrap();
    }

    async fn read(conn: &mut MultiplexedConnection, consumer: &str) -> String {
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

    /// What a live worker's orphan recovery does once the holder stalled past the timeout.
    async fn autoclaim(conn: &mut MultiplexedConnection, consumer: &str) {
        let _: redis::Value = redis::cmd("XAUTOCLAIM")
            .arg(STREAM)
            .arg("g")
            .arg(consumer)
            .arg(0)
            .arg("0-0")
            .query_async(conn)
            .await
            .unwrap();
    }

    /// The consumer holding `id` in the group's pending list, if it is pending.
    async fn owner(conn: &mut MultiplexedConnection, id: &str) -> Option<String> {
        let reply: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(STREAM)
            .arg("g")
            .arg(id)
            .arg(id)
            .arg(1)
            .query_async(conn)
            .await
            .unwrap();
        reply.into_iter().next().map(|(_, consumer, _, _)| consumer)
    }

    async fn entry_exists(conn: &mut MultiplexedConnection, id: &str) -> bool {
        let found: Vec<redis::Value> = conn.xrange(STREAM, id, id).await.unwrap();
        found.len() == 1
    }

    /// Queues `envelope`; its first holder dies with it, the next one claims it (its second
    /// delivery) and gives it back unstarted. Returns the envelope as re-added.
    async fn given_back_after_a_crash(conn: &mut MultiplexedConnection, envelope: &str) -> String {
        let _: String = conn.xadd(STREAM, "*", &[("e", envelope)]).await.unwrap();
        let entry = read(conn, "dead-worker").await;
        autoclaim(conn, "b").await;
        let given_back: i64 = RELEASE
            .key(STREAM)
            .arg("g")
            .arg("b")
            .arg(&entry)
            .invoke_async(conn)
            .await
            .unwrap();
        assert_eq!(given_back, 1);
        let entries: redis::streams::StreamRangeReply = conn.xrange_all(STREAM).await.unwrap();
        assert_eq!(entries.ids.len(), 1);
        entries.ids[0].get("e").unwrap()
    }

    #[tokio::test]
    async fn an_entry_given_back_keeps_the_crashes_it_caused_in_its_attempts() {
        let (_redis, mut conn) = setup().await;
        let envelope = r#"{"id":"J-\",\"a\":9","a":2,"t":1,"p":{"a":5}}"#;
        assert_eq!(
            given_back_after_a_crash(&mut conn, envelope).await,
            r#"{"id":"J-\",\"a\":9","a":3,"t":1,"p":{"a":5}}"#,
            "one crash added to the envelope's own attempts, nothing else touched"
        );
    }

    #[tokio::test]
    async fn an_envelope_a_script_wrote_is_given_back_as_it_was() {
        // cjson writes keys in any order: the payload's own `a` must not be taken for the
        // envelope's.
        let (_redis, mut conn) = setup().await;
        let envelope = r#"{"p":{"x":1,"a":5},"a":0,"id":"W-1"}"#;
        assert_eq!(
            given_back_after_a_crash(&mut conn, envelope).await,
            envelope
        );
    }

    /// A run that lost its entry (claimed by another worker, retried as a new entry) and
    /// finishes late must not free the unique key the live copy still holds.
    #[tokio::test]
    async fn a_stale_done_never_frees_the_live_copys_unique_key() {
        let (_redis, mut conn) = setup().await;
        let _: () = conn.hset(UNIQUE, "K", "J").await.unwrap();
        let _: String = conn.xadd(STREAM, "*", &[("e", "v1")]).await.unwrap();
        let first = read(&mut conn, "stale").await;

        // Another worker takes the entry over and retries it now, as a new entry.
        autoclaim(&mut conn, "live").await;
        assert_eq!(
            settle(&mut conn, "live", ["r", &first, "0", "v2", ""]).await,
            (1, vec![])
        );
        let second = read(&mut conn, "live").await;
        assert_ne!(first, second);

        // The stale run reports done for the entry it once held: nothing is acknowledged,
        // and the key stays with the live copy.
        assert_eq!(
            settle(&mut conn, "stale", ["a", &first, "K", "J", ""]).await,
            (0, vec![first.clone()])
        );
        let holder: Option<String> = conn.hget(UNIQUE, "K").await.unwrap();
        assert_eq!(holder.as_deref(), Some("J"));

        // The live copy's own done releases it.
        assert_eq!(
            settle(&mut conn, "live", ["a", &second, "K", "J", ""]).await,
            (1, vec![])
        );
        let holder: Option<String> = conn.hget(UNIQUE, "K").await.unwrap();
        assert_eq!(holder, None);
        let left: u64 = conn.xlen(STREAM).await.unwrap();
        assert_eq!(left, 0);
    }

    /// The gray failure: A holds E and freezes past the orphan timeout, B takes E over and runs
    /// it, A wakes and reports done. A's done must not acknowledge or delete E (XACK ignores the
    /// consumer), or B's retry would find nothing to acknowledge and the job would be lost.
    #[tokio::test]
    async fn a_stale_done_after_a_takeover_leaves_the_entry_to_its_new_owner_who_retries_it() {
        let (_redis, mut conn) = setup().await;
        let _: () = conn.hset(UNIQUE, "K", "J").await.unwrap();
        let _: String = conn.xadd(STREAM, "*", &[("e", "v1")]).await.unwrap();
        let entry = read(&mut conn, "a").await;
        autoclaim(&mut conn, "b").await;
        assert_eq!(owner(&mut conn, &entry).await.as_deref(), Some("b"));

        // A's done (with its unique key) is dropped: the entry stays, still B's, key held.
        assert_eq!(
            settle(&mut conn, "a", ["a", &entry, "K", "J", ""]).await,
            (0, vec![entry.clone()])
        );
        assert!(entry_exists(&mut conn, &entry).await, "A's done deleted E");
        assert_eq!(owner(&mut conn, &entry).await.as_deref(), Some("b"));
        let holder: Option<String> = conn.hget(UNIQUE, "K").await.unwrap();
        assert_eq!(holder.as_deref(), Some("J"));
        // So are A's retry and death for it: no second copy of the job appears.
        assert_eq!(
            settle(&mut conn, "a", ["r", &entry, "0", "dup", ""]).await,
            (0, vec![entry.clone()])
        );
        assert_eq!(
            settle(&mut conn, "a", ["d", &entry, "why", "dup", "a"]).await,
            (0, vec![entry.clone()])
        );
        let len: u64 = conn.xlen(STREAM).await.unwrap();
        assert_eq!(len, 1);
        let dead: u64 = conn.xlen(DEAD).await.unwrap();
        assert_eq!(dead, 0);

        // B's retry is kept: E is acknowledged and deleted, the retry is queued ...
        assert_eq!(
            settle(&mut conn, "b", ["r", &entry, "0", "v2", ""]).await,
            (1, vec![])
        );
        assert!(!entry_exists(&mut conn, &entry).await);
        // ... and runs: the next fetch delivers the retried job.
        let retried = read(&mut conn, "b").await;
        let fields: Vec<(String, Vec<(String, String)>)> =
            conn.xrange(STREAM, &retried, &retried).await.unwrap();
        assert_eq!(fields[0].1, vec![("e".to_owned(), "v2".to_owned())]);

        // A delayed retry after a takeover is kept the same way.
        let _: String = conn.xadd(STREAM, "*", &[("e", "w1")]).await.unwrap();
        let later = read(&mut conn, "a").await;
        autoclaim(&mut conn, "b").await;
        assert_eq!(
            settle(&mut conn, "a", ["a", &later, "", "J2", ""]).await,
            (0, vec![later.clone()])
        );
        assert_eq!(
            settle(&mut conn, "b", ["r", &later, "60000", "w2", ""]).await,
            (1, vec![])
        );
        let delayed: Vec<String> = conn.zrange(DELAYED, 0, -1).await.unwrap();
        assert_eq!(delayed, vec!["w2".to_owned()]);
    }

    /// The same takeover, where the new owner gives the job up: it reaches the dead stream.
    #[tokio::test]
    async fn a_stale_done_after_a_takeover_does_not_stop_the_new_owner_burying_the_job() {
        let (_redis, mut conn) = setup().await;
        let _: String = conn.xadd(STREAM, "*", &[("e", "v1")]).await.unwrap();
        let entry = read(&mut conn, "a").await;
        autoclaim(&mut conn, "b").await;
        assert_eq!(
            settle(&mut conn, "a", ["a", &entry, "", "J", ""]).await,
            (0, vec![entry.clone()])
        );
        assert!(entry_exists(&mut conn, &entry).await, "A's done deleted E");
        assert_eq!(
            settle(&mut conn, "b", ["d", &entry, "gave up", "v2", "b"]).await,
            (1, vec![])
        );
        let dead: Vec<(String, Vec<(String, String)>)> = conn.xrange(DEAD, "-", "+").await.unwrap();
        assert_eq!(dead.len(), 1);
        let fields: std::collections::HashMap<_, _> = dead[0].1.iter().cloned().collect();
        assert_eq!(fields["e"], "v2");
        assert_eq!(fields["reason"], "gave up");
        assert_eq!(fields["worker"], "b");
        let len: u64 = conn.xlen(STREAM).await.unwrap();
        assert_eq!(len, 0);
    }

    /// Two ops for one entry in one batch: only the first applies.
    #[tokio::test]
    async fn one_entry_settled_twice_in_a_batch_is_applied_once() {
        let (_redis, mut conn) = setup().await;
        let _: String = conn.xadd(STREAM, "*", &[("e", "v1")]).await.unwrap();
        let entry = read(&mut conn, "a").await;
        let reply = settle_batch(
            &mut conn,
            "a",
            &[
                ["r", &entry, "0", "v2", ""],
                ["d", &entry, "why", "v3", "a"],
            ],
        )
        .await;
        assert_eq!(reply, (1, vec![entry]));
        let len: u64 = conn.xlen(STREAM).await.unwrap();
        assert_eq!(len, 1, "the retry");
        let dead: u64 = conn.xlen(DEAD).await.unwrap();
        assert_eq!(dead, 0);
    }

    /// A batch of several ops answers ownership with one ranged XPENDING: ops on entries
    /// this consumer owns apply, an entry taken over in the middle of the range is left to
    /// its new owner, and an entry already acknowledged is dropped.
    #[tokio::test]
    async fn a_batch_settles_exactly_the_entries_its_consumer_owns() {
        let (_redis, mut conn) = setup().await;
        let mut ids = Vec::new();
        for value in ["v1", "v2", "v3", "v4"] {
            let _: String = conn.xadd(STREAM, "*", &[("e", value)]).await.unwrap();
            ids.push(read(&mut conn, "a").await);
        }
        // The second entry is taken over by b; the fourth was already settled by a.
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(STREAM)
            .arg("g")
            .arg("b")
            .arg(0)
            .arg(&ids[1])
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            settle(&mut conn, "a", ["a", &ids[3], "", "j4", ""]).await.0,
            1
        );
        // Out of id order on purpose: the range is computed, not assumed.
        let (settled, mut stale) = settle_batch(
            &mut conn,
            "a",
            &[
                ["r", ids[2].as_str(), "60000", "v3-retry", ""],
                ["a", ids[0].as_str(), "", "j1", ""],
                ["a", ids[1].as_str(), "", "j2", ""],
                ["a", ids[3].as_str(), "", "j4", ""],
            ],
        )
        .await;
        stale.sort();
        let mut expected = vec![ids[1].clone(), ids[3].clone()];
        expected.sort();
        assert_eq!((settled, stale), (2, expected));
        assert!(!entry_exists(&mut conn, &ids[0]).await);
        assert!(!entry_exists(&mut conn, &ids[2]).await);
        assert!(entry_exists(&mut conn, &ids[1]).await, "left to b");
        assert_eq!(owner(&mut conn, &ids[1]).await.as_deref(), Some("b"));
        let delayed: u64 = conn.zcard(DELAYED).await.unwrap();
        assert_eq!(delayed, 1, "a's retry of its own entry");
    }

    #[tokio::test]
    async fn the_ownership_range_orders_entry_ids_as_numbers() {
        let (_redis, mut conn) = setup().await;
        // As text, 10-1 < 9-1 and 9-10 < 9-2: a range from text order would be empty or cut.
        let ids = ["9-1", "9-2", "9-10", "10-1"];
        for id in ids {
            let _: String = conn.xadd(STREAM, id, &[("e", id)]).await.unwrap();
            assert_eq!(read(&mut conn, "a").await, id);
        }
        let ops: Vec<[&str; 5]> = ["9-10", "10-1", "9-2", "9-1"]
            .iter()
            .map(|id| ["a", *id, "", "j", ""])
            .collect();
        let (settled, stale) = settle_batch(&mut conn, "a", &ops).await;
        assert_eq!((settled, stale), (4, Vec::<String>::new()));
        for id in ids {
            assert!(!entry_exists(&mut conn, id).await, "{id} settled");
        }
    }

    /// A stalled worker shutting down must not give back an entry another worker took over.
    #[tokio::test]
    async fn release_gives_back_only_entries_still_owned() {
        let (_redis, mut conn) = setup().await;
        let _: String = conn.xadd(STREAM, "*", &[("e", "v1")]).await.unwrap();
        let _: String = conn.xadd(STREAM, "*", &[("e", "v2")]).await.unwrap();
        let taken = read(&mut conn, "a").await;
        autoclaim(&mut conn, "b").await;
        let kept = read(&mut conn, "a").await;

        let released: i64 = RELEASE
            .key(STREAM)
            .arg("g")
            .arg("a")
            .arg(&taken)
            .arg(&kept)
            .invoke_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(released, 1);
        assert!(entry_exists(&mut conn, &taken).await);
        assert_eq!(owner(&mut conn, &taken).await.as_deref(), Some("b"));
        assert!(!entry_exists(&mut conn, &kept).await);
        assert_eq!(owner(&mut conn, &kept).await, None);
        // The given-back job is waiting for any worker.
        let again = read(&mut conn, "c").await;
        let fields: Vec<(String, Vec<(String, String)>)> =
            conn.xrange(STREAM, &again, &again).await.unwrap();
        assert_eq!(fields[0].1, vec![("e".to_owned(), "v2".to_owned())]);
    }

    /// Jobs held back by a script are added one `ZADD` per set and per 512 jobs at its end;
    /// a set that cannot take them reports every job's owner, and only those.
    #[tokio::test]
    async fn a_failed_add_names_each_owner_of_the_jobs_it_could_not_add() {
        let (_redis, mut conn) = setup().await;
        let script = redis::Script::new(&format!(
            "{}{}",
            DELAY_JOB,
            r#"
hold_for = 1
for i = 1, 5 do delay_job('s', KEYS[1], 0, 1000 + i, 'a' .. i) end
hold_for = 2
for i = 1, 400 do delay_job('s', KEYS[2], 0, 1000 + i, 'b' .. i) end
hold_for = 3
for i = 1, 300 do delay_job('s', KEYS[2], 0, 1000 + i, 'c' .. i) end
hold_for = nil
-- Nothing was added yet; now the second set cannot take them.
if redis.call('EXISTS', KEYS[1], KEYS[2]) ~= 0 then return {-1} end
redis.call('SET', KEYS[2], 'not a sorted set')
local failed = {0, 0, 0}
add_held(function(owner, err) failed[owner] = failed[owner] + 1 end)
return failed
"#
        ));
        let failed: Vec<i64> = script
            .key(DELAYED)
            .key("{t:q}:otherdelayed")
            .invoke_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(failed, [0, 400, 300]);
        let added: u64 = conn.zcard(DELAYED).await.unwrap();
        assert_eq!(added, 5);
    }

    async fn server_ms(conn: &mut MultiplexedConnection) -> i64 {
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(conn).await.unwrap();
        secs * 1000 + micros / 1000
    }

    #[tokio::test]
    async fn a_promotion_reports_how_late_its_most_overdue_job_was() {
        let (_redis, mut conn) = setup().await;
        let now = server_ms(&mut conn).await;
        // Overdue by 1.5 s and 0.2 s, and one due in an hour; added out of order.
        let _: i64 = conn
            .zadd_multiple(
                DELAYED,
                &[
                    (now - 200, "b"),
                    (now + 3_600_000, "later"),
                    (now - 1_500, "a"),
                ],
            )
            .await
            .unwrap();
        let promote = |conn: &mut MultiplexedConnection| {
            let mut conn = conn.clone();
            async move {
                let reply: (i64, i64, i64, i64) = PROMOTE
                    .key(DELAYED)
                    .key(STREAM)
                    .key("{t:q}:promoter")
                    .arg(100)
                    .arg("c")
                    .arg(2_000)
                    .arg("0")
                    .invoke_async(&mut conn)
                    .await
                    .unwrap();
                reply
            }
        };
        let (moved, next_due, mine, late) = promote(&mut conn).await;
        assert_eq!((moved, next_due, mine), (2, now + 3_600_000, 1));
        // The server's clock has moved on since `now`, by far less than the hour's guard.
        assert!(
            (1_500..3_600_000).contains(&late),
            "the most overdue job was 1.5 s late, not {late} ms"
        );
        let (moved, _, _, late) = promote(&mut conn).await;
        assert_eq!((moved, late), (0, -1), "nothing moved, no lateness");
    }

    #[tokio::test]
    async fn a_stopping_promoter_hands_back_only_its_own_lease() {
        let (_redis, mut conn) = setup().await;
        let lease = "{t:q}:promoter";
        let release = |conn: &mut MultiplexedConnection, consumer: &'static str| {
            let mut conn = conn.clone();
            async move {
                let released: i64 = RELEASE_PROMOTER
                    .key(lease)
                    .arg(consumer)
                    .invoke_async(&mut conn)
                    .await
                    .unwrap();
                released
            }
        };
        let _: () = conn.set(lease, "worker-2|99").await.unwrap();
        // A consumer whose name is a prefix of the holder's is not the holder.
        assert_eq!(release(&mut conn, "worker").await, 0);
        assert_eq!(release(&mut conn, "worker-").await, 0);
        let held: Option<String> = conn.get(lease).await.unwrap();
        assert_eq!(held.as_deref(), Some("worker-2|99"));
        assert_eq!(release(&mut conn, "worker-2").await, 1);
        let held: Option<String> = conn.get(lease).await.unwrap();
        assert_eq!(held, None);
        assert_eq!(
            release(&mut conn, "worker-2").await,
            0,
            "nothing left to hand back"
        );
    }

    #[tokio::test]
    async fn stale_consumers_go_unless_they_hold_jobs_and_wake_consumers_go_with_their_markers() {
        let (_redis, mut conn) = setup().await;
        let wake = "{t:q}:wake";
        create_group(&mut conn, wake).await;
        for stream in [STREAM, wake] {
            let _: String = conn.xadd(stream, "*", &[("e", "x")]).await.unwrap();
        }
        let read = |stream: &'static str, consumer: &'static str, count: usize| {
            let mut conn = conn.clone();
            async move {
                let opts = redis::streams::StreamReadOptions::default()
                    .group("g", consumer)
                    .count(count);
                let _: redis::Value = conn.xread_options(&[stream], &[">"], &opts).await.unwrap();
            }
        };
        let create = |stream: &'static str, consumer: &'static str| {
            let mut conn = conn.clone();
            async move {
                let _: i64 = redis::cmd("XGROUP")
                    .arg("CREATECONSUMER")
                    .arg(stream)
                    .arg("g")
                    .arg(consumer)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
        };
        read(STREAM, "busy", 1).await; // holds the job
        create(STREAM, "gone").await;
        create(STREAM, "me").await;
        read(wake, "gone", 1).await; // holds a marker
        tokio::time::sleep(std::time::Duration::from_millis(120)).await;
        create(STREAM, "fresh").await;
        let remove = |stream: &'static str, wake: &'static str| {
            let mut conn = conn.clone();
            async move {
                let removed: i64 = REMOVE_STALE_CONSUMERS
                    .key(stream)
                    .key(wake)
                    .arg("g")
                    .arg("me")
                    .arg(100)
                    .invoke_async(&mut conn)
                    .await
                    .unwrap();
                removed
            }
        };
        assert_eq!(remove(STREAM, wake).await, 2);
        let names = |stream: &'static str| {
            let mut conn = conn.clone();
            async move {
                let reply: redis::streams::StreamInfoConsumersReply =
                    conn.xinfo_consumers(stream, "g").await.unwrap();
                let mut names: Vec<String> = reply.consumers.into_iter().map(|c| c.name).collect();
                names.sort();
                names
            }
        };
        assert_eq!(names(STREAM).await, ["busy", "fresh", "me"]);
        assert!(names(wake).await.is_empty(), "its marker went with it");
        // A stream without the group has nothing to remove.
        assert_eq!(remove("{t:q}:none", "{t:q}:none2").await, 0);
    }
}
