//! The ledger's one Lua script. It applies a batch of independent operations (one per
//! caller, see `batcher`), each an atomic change of one order's hash; a whole batch is one
//! `EVALSHA`, and the server clock and the pause flag are read at most once per batch.
//!
//! An order's milestones are write-once fields, set with `HSETNX` so that the first writer
//! wins without a read: `req` (the registration), `accepted` (the gateway holds the order)
//! and `final` (how it ended; its one outcome is appended in the same step). The working
//! fields (`phase` = queued | submitting | unknown, the lease, `attempts`, the last error) only
//! matter while neither milestone after `req` is set: `final` outranks `accepted`, which
//! outranks `phase`.
//!
//! Besides: `ambiguous` (some create may have landed: set once, never cleared),
//! `numberExists` (the gateway answered a create that its number exists, 5003011: set once,
//! never cleared; such an order is never failed on absence), the absence streak
//! `absentSince`/`absentLookups` (the gateway's "no such order" since the last create that
//! may have landed), and, for a final order the gateway later contradicts, one
//! write-once `corr:<status>` per new status plus the latest `status`.
//!
//! Leases and absence streaks use the Redis server's clock (`TIME`), so workers' clocks never
//! decide who may create or when an order may fail; a lease on a free order may start instead
//! from an upper bound of that clock its job's delivery brings (`queue::clock::AddedAfter`:
//! the server's own stream id, plus local monotonic time since a read that found no job),
//! which makes it longer by the time the job took to come after that read was sent (one or
//! two fetch blocks, 500 ms each by default; a bound more than 2 s above the process' estimate
//! of the clock is refused), and, while that estimate holds, never shorter. The other timestamps come from the
//! caller's estimate of the server's clock (`queue::now_ms`).

use redis::Script;
use std::sync::LazyLock;

/// Shared keys, before the three keys each operation brings (its order hash, an auxiliary
/// key: the batch set for a registration, the batch's progress counts for a finalisation of
/// a batch row, otherwise the order hash again; and the order's event history list).
pub(crate) const SHARED_KEYS: usize = 12;

/// KEYS: paused flag, guard set, outcome stream, stuck set, the queue's stream, delayed set
/// and unique hash, the webhook queue's stream, delayed set and unique hash, the order time
/// index, the batch index; then per operation its order key, auxiliary key and history key.
/// ARGV: now_ms (caller's clock), then per operation: kind, argument count, arguments, then
/// the events that happened to its order before it: their count, then (when there are any)
/// the expiry of a list begun for them while the order is in flight (ms, 0 = none) and each
/// one's JSON.
/// An acceptance or a finalisation keeps its events inside the milestone it writes (an
/// `events` array in its JSON); other operations, and those whose milestone was not written,
/// append them to the order's history list. Last per operation, the job delivery its caller
/// finishes with it: '' for none, or its entry id, group, consumer and the replies
/// (comma-separated) on which the caller's job is done, and '1' when the delivery's worker
/// follows the due time of a job the operation delays in the queue before every other one
/// ('0': a marker as usual); the delivery, an entry of the queue's stream (`KEYS[5]`), is
/// then acknowledged and deleted in the same step, if still pending for that consumer (see
/// `queue::Delivery::ack_in`; a finalisation's delivery alone for its consumer in the batch
/// is acknowledged if pending at all: the order's final state leaves no run of it anything
/// to do).
/// Returns {one reply per operation in order, {positions of operations whose delivery was
/// acknowledged}, {positions of those whose delivery another consumer holds now}, the error
/// that kept some deliveries from being acknowledged ('' for none: they are left to the
/// settler), {position, due time, ...} of operations whose worker is to follow that due
/// time: no marker was written for it (see `queue::DELAY_JOB`; an operation that failed
/// gets its marker after all)}.
pub static BATCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{}{}{}local MAX_EVENTS = {}\n{}",
        crate::queue::DELAY_JOB,
        crate::queue::ENQUEUE_ONE,
        crate::queue::OWNED_ENTRIES,
        super::history::MAX_EVENTS,
        r#"
local now = tonumber(ARGV[1])
local server_now = nil
local function lease_clock()
  if not server_now then
    local t = redis.call('TIME')
    server_now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return server_now
end
local paused = nil
local function is_paused()
  if paused == nil then paused = redis.call('EXISTS', KEYS[1]) == 1 end
  return paused
end
local guard_cleared = false
-- Orders whose acceptance marked `pollQueued`, by operation: unmarked if its poll job's held
-- `ZADD` fails.
local poll_queued_in = {}
-- Registrations' time index entries (score, member, ...), added in one ZADD at the end.
local indexed = {}
local index_owners = {}
-- The batches registered to: batch id -> {first = earliest registration (ms), operations}.
local batches_seen = {}
-- The operation running now (its place in the reply).
local current = 0
-- The history lines noted before the current operation, when it is an acceptance or a
-- finalisation: the milestone it writes keeps them (no list, no command of their own). Left
-- set when the milestone was not written (already there, or undone): they go to the list.
local carried = nil
-- The milestone's JSON with the carried lines (the last MAX_EVENTS) in it, and whether they
-- are.
local function with_carried(json)
  if carried == nil or #json < 3 or string.sub(json, -1) ~= '}' then return json, false end
  local from = math.max(1, #carried - MAX_EVENTS + 1)
  local lines = table.concat(carried, ',', from, #carried)
  return string.sub(json, 1, -2) .. ',"events":[' .. lines .. ']}', true
end

local function enqueue(a, at)
  if a[at + 3] ~= '' then
    enqueue_one(KEYS[5], KEYS[6], KEYS[7], now, tonumber(a[at]), a[at + 1], a[at + 2], a[at + 3])
  end
end

-- req_json, batchId, mchOrderNo, accepted_json ('' unless registered as accepted),
-- then the first job: run_at_ms, unique key, job id, envelope ('' for none); then how long
-- the batch's membership is kept after this registration, ms (0 = forever); then the
-- registration time (ms), its score in the order and batch indexes.
local function register(order, batch, a)
  if redis.call('HSETNX', order, 'req', a[1]) == 0 then
    local h = redis.call('HMGET', order, 'req', 'phase', 'accepted', 'final')
    return {'exists', h[1] or '', h[2] or '', h[3] or '', h[4] or ''}
  end
  -- Everything after the write-once claim is undone if a later write fails (e.g. OOM), so
  -- an order is never registered without its job.
  local ok, err = pcall(function()
    if a[4] ~= '' then redis.call('HSET', order, 'accepted', a[4]) end
    if a[2] ~= '' then
      if redis.call('SADD', batch, a[3]) == 0 then
        -- Already a row of this batch: an earlier record of it finished (and was counted in
        -- the batch's progress) and expired; this one is not counted again.
        redis.call('HSET', order, 'batchRerun', '1')
      end
      if tonumber(a[9]) > 0 then redis.call('PEXPIRE', batch, a[9]) end
    end
    enqueue(a, 5)
  end)
  if not ok then
    redis.call('DEL', order)
    if a[2] ~= '' then redis.call('SREM', batch, a[3]) end
    error(err)
  end
  -- The time and batch indexes (the console's) are added to once for the whole batch, at
  -- its end.
  indexed[#indexed + 1] = a[10]
  indexed[#indexed + 1] = a[3]
  index_owners[#index_owners + 1] = current
  if a[2] ~= '' then
    local rows = batches_seen[a[2]]
    if rows == nil then
      rows = {first = a[10]}
      batches_seen[a[2]] = rows
    end
    if tonumber(a[10]) < tonumber(rows.first) then rows.first = a[10] end
    rows[#rows + 1] = current
  end
  return {'created'}
end

-- lease token, lease ms, '1' when the caller's fetch loop found the queue not paused just
-- now, by the flag or by the job's delivery (it is not read again), then an upper bound of
-- the server's clock when the batch was sent ('' for none; see `queue::clock::AddedAfter`):
-- a lease taken on a free order starts there, without `TIME` (it then lasts a little longer
-- than asked, never shorter than its holder counts on). One held by another run is judged
-- on `TIME`. {'go', previous, attempts, field, value, ...} | {'busy', ms} | {'paused'} |
-- {'accepted', accepted_json, '1' when an adoption queued the poll job of an acceptance
-- left in hand (`pollQueued`) else ''} | {'final', final_json} | {'missing'}
local function begin_submit(order, a)
  local flat = redis.call('HGETALL', order)
  if #flat == 0 then return {'missing'} end
  local h = {}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  if h.final then return {'final', h.final} end
  if h.accepted then return {'accepted', h.accepted, h.pollQueued or ''} end
  -- A flag this batch already read set counts, whatever the caller's reading said.
  if (a[3] ~= '1' or paused) and is_paused() then return {'paused'} end
  local previous = h.phase or 'queued'
  local clock
  if previous == 'submitting' or server_now or (a[4] or '') == '' then
    clock = lease_clock()
  else
    clock = tonumber(a[4])
  end
  if previous == 'submitting' then
    local lease_until = tonumber(h.leaseUntil or '0')
    if lease_until > clock then return {'busy', tostring(lease_until - clock)} end
    -- The holder died mid-call: its create may have reached the gateway, so the order may
    -- never be failed on a lookup alone from now on.
    previous = 'unknown'
    h.ambiguous = '1'
    -- Its create may have landed after any absence seen so far: the streak starts over.
    redis.call('HDEL', order, 'absentSince', 'absentLookups')
    h.absentSince = nil
    h.absentLookups = nil
  end
  h.phase = 'submitting'
  h.leaseOwner = a[1]
  h.leaseUntil = tostring(clock + tonumber(a[2]))
  h.attempts = tostring(tonumber(h.attempts or '0') + 1)
  h.updatedAt = tostring(now)
  redis.call('HSET', order, 'phase', h.phase, 'leaseOwner', h.leaseOwner,
    'leaseUntil', h.leaseUntil, 'attempts', h.attempts, 'updatedAt', h.updatedAt,
    'ambiguous', h.ambiguous or '')
  local reply = {'go', previous, h.attempts}
  for k, v in pairs(h) do
    reply[#reply + 1] = k
    reply[#reply + 1] = v
  end
  return reply
end

-- accepted_json, then the poll job (as in register; none for an acceptance that leaves the
-- first poll to the create job), then '1' for such an acceptance, then '1' when its caller
-- cleared the guard's count when the gateway accepted (written later, the acceptance leaves
-- the refusals counted since then alone). 1 when recorded (and the
-- poll job queued), 0 when already accepted. An acceptance left in hand is written without a
-- lease check (no read): its run may have lost the lease to one that took the order's create
-- job over. Should that run find the order accepted in hand (below), it does not end the job
-- as done: with a poll job (an adoption) it queues it, once; in hand itself, it polls too.
-- Either way the order is polled even if the first run dies.
local function accept(order, a)
  if not guard_cleared and a[7] ~= '1' then
    -- An accepted create proves the merchant's key works: the guard's count starts over.
    redis.call('DEL', KEYS[2])
    guard_cleared = true
  end
  local value, embedded = with_carried(a[1])
  if redis.call('HSETNX', order, 'accepted', value) == 0 then
    if a[5] == '' and a[6] ~= '1' then return 0 end
    local held = redis.call('HMGET', order, 'accepted', 'pollQueued')
    local ok, was = pcall(cjson.decode, held[1])
    if held[2] or not ok or type(was) ~= 'table' or not was.pollInHand then return 0 end
    if a[6] == '1' then return 1 end
    -- `pollQueued`: a create job that finds the order later is told it is not the poll job.
    -- Written after the job (an error raised by it leaves nothing), and taken back if the
    -- job's held `ZADD` fails at the end.
    enqueue(a, 2)
    redis.call('HSET', order, 'pollQueued', '1')
    poll_queued_in[current] = order
    return 1
  end
  if embedded then carried = nil end
  enqueue(a, 2)
  return 1
end

-- final_json, lease token ('' when the gateway reported the state), mchOrderNo, stuck flag
-- ('1' when the caller saw the order stuck), outcome stream max length (0 = unbounded),
-- mode ('g' = a state the gateway reported, which may correct an earlier final status),
-- settle window ms (leased decisions on an ambiguous order), the new status, the webhook
-- delivery job's envelope ('' when the caller's settings have no webhooks), the retention ms
-- (0 = keep forever: a final order's record expires that long after it became final), the
-- order's amount for its batch's counters ('<minor units>:<currency>', '' for none), then
-- the outcome's fields, starting with 'event', 'final', 'previousStatus', ''.
-- 1 finalised (one outcome appended) | 0 nothing to change | 2 the caller no longer holds
-- the lease | 3 a correction appended | 4 refused: the order may exist and its absence is
-- not proven over the settle window.
-- The delivery job learns its outcome's id here (cjson keeps the envelope's 13-digit ms
-- timestamp exact: it prints 14 significant digits).
local function queue_webhook(envelope, outcome_id)
  local job = cjson.decode(envelope)
  job.p.outcome = outcome_id
  enqueue_one(KEYS[8], KEYS[9], KEYS[10], now, 0, '', job.id, cjson.encode(job))
end
-- The outcome and its webhook delivery, both or neither: {err = ...} when either failed.
local function append_outcome(fields, max_len, webhook)
  local added
  if tonumber(max_len) > 0 then
    added = redis.pcall('XADD', KEYS[3], 'MAXLEN', '~', max_len, '*', unpack(fields))
  else
    added = redis.pcall('XADD', KEYS[3], '*', unpack(fields))
  end
  if type(added) == 'table' and added.err then return added end
  if webhook ~= '' then
    local ok, err = pcall(queue_webhook, webhook, added)
    if not ok then
      redis.call('XDEL', KEYS[3], added)
      if type(err) == 'table' and err.err then return err end
      return {err = tostring(err)}
    end
  end
  return added
end
-- A batch row's status counted (by = '' to add it, '-' to take it back) with its amount; an
-- amount sum that would overflow is left and flagged (see ledger::progress).
local function count_row(progress, status, by, money)
  redis.call('HINCRBY', progress, status, by .. '1')
  local minor, currency = string.match(money, '^(%d+):(.+)$')
  if minor then
    local added = redis.pcall('HINCRBY', progress, 'amt:' .. status .. ':' .. currency, by .. minor)
    if type(added) == 'table' and added.err then redis.call('HSET', progress, 'amt:overflow', '1') end
  end
end
local function finalize(order, a, progress)
  if a[2] ~= '' then
    local h = redis.call('HMGET', order, 'phase', 'leaseOwner', 'final', 'accepted',
      'ambiguous', 'absentSince', 'absentLookups', 'leaseUntil', 'numberExists')
    if h[3] then return 0 end
    if h[1] ~= 'submitting' or h[2] ~= a[2] or h[4] then return 2 end
    if h[5] == '1' then
      -- Some create may exist: only the gateway's repeated "no such order" over the settle
      -- window lets us fail it, and only while the lease holds. A run that stalled past its
      -- lease (frozen, say) brings evidence as old as the stall, judged on today's clock.
      local clock = lease_clock()
      if tonumber(h[8] or '0') <= clock then return 2 end
      -- The gateway said the number exists: its "no such order" since is lag, however long.
      if h[9] == '1' then return 4 end
      local since = tonumber(h[6] or '')
      if not since or tonumber(h[7] or '0') < 2 or clock - since < tonumber(a[7]) then
        return 4
      end
    end
  end
  local fields = {}
  for i = 12, #a do fields[#fields + 1] = a[i] end
  local value, embedded = with_carried(a[1])
  -- A state decided without a lease (the gateway's, or an adoption's) may come from a
  -- reader that saw the record before it expired (it was final, and its retention ran out
  -- while the reader stalled): the record is not brought back as a bare final with a second
  -- outcome. The retention's expiry is set first, and only on a record without one (`NX`:
  -- an order in flight has none; a final one keeps the expiry it got when it became final),
  -- so its answer says the record is in flight; otherwise one `EXISTS` tells a final record
  -- from a gone one.
  local expire_first = false
  if a[2] == '' and tonumber(a[10]) > 0 then
    expire_first = redis.call('PEXPIRE', order, a[10], 'NX') == 1
    if not expire_first and redis.call('EXISTS', order) == 0 then return 0 end
  end
  if redis.call('HSETNX', order, 'final', value) == 0 then
    if a[6] ~= 'g' then return 0 end
    -- Already final: a verified gateway state that says otherwise is news, once per state.
    local h = redis.call('HMGET', order, 'final', 'status')
    local recorded = cjson.decode(h[1]).status
    if a[8] == recorded or redis.call('HEXISTS', order, 'corr:' .. a[8]) == 1 then
      return 0
    end
    fields[2] = 'correction'
    fields[4] = h[2] or recorded
    local added = append_outcome(fields, a[5], a[9])
    if type(added) == 'table' and added.err then return {'!error', added.err} end
    local kept = cjson.decode(a[1])
    kept.event = 'correction'
    kept.previousStatus = fields[4]
    redis.call('HSET', order, 'corr:' .. a[8], cjson.encode(kept), 'status', a[8])
    if progress ~= order and redis.call('EXISTS', progress) == 1
      and redis.call('HEXISTS', order, 'batchRerun') == 0 then
      -- The batch's counts follow the gateway: the row moves to its new status.
      count_row(progress, fields[4], '-', a[11])
      count_row(progress, a[8], '', a[11])
    end
    return 3
  end
  -- The milestone holds the lines now, whatever fails below (unless the claim is undone).
  local lines = carried
  if embedded then carried = nil end
  local added = append_outcome(fields, a[5], a[9])
  if type(added) == 'table' and added.err then
    -- No final order without its outcome (and its webhook): undo the claim, and the expiry
    -- set for it (an order in flight never expires).
    redis.call('HDEL', order, 'final')
    if expire_first then redis.call('PERSIST', order) end
    carried = lines
    return {'!error', added.err}
  end
  if a[4] == '1' then redis.call('SREM', KEYS[4], a[3]) end
  -- Bounded memory: the record goes after the retention (its corrections keep this TTL). A
  -- history list begun while the order was in flight has no expiry: the lifeline's index
  -- trim removes it (see ledger::history). A re-submission after that registers anew and is
  -- settled by the gateway's duplicate answer.
  if tonumber(a[10]) > 0 and not expire_first then redis.call('PEXPIRE', order, a[10]) end
  if progress ~= order and redis.call('HEXISTS', order, 'batchRerun') == 0 then
    -- A batch row, counted once: its batch's finals by status and amount (console pages).
    count_row(progress, a[8], '', a[11])
    if tonumber(a[10]) > 0 then redis.call('PEXPIRE', progress, 2 * tonumber(a[10])) end
  end
  return 1
end

-- lease token, next phase (queued | unknown), code, msg, '1' when this run's create may
-- have created the order, '1' when nothing was sent (the attempt is taken back, and an
-- earlier create's error kept), '1' when the gateway answered that the order's number
-- exists (marked for good: see finalize). Only the lease holder may do this.
local function release(order, a)
  local h = redis.call('HMGET', order, 'phase', 'leaseOwner', 'lastMsg')
  if h[1] ~= 'submitting' or h[2] ~= a[1] then return 0 end
  local fields = {'phase', a[2], 'updatedAt', now}
  -- Why nothing was sent replaces no create's error: that error is what a failed outcome
  -- reports (an order with none yet shows why it waits).
  if a[6] ~= '1' or not h[3] or h[3] == '' then
    fields[#fields + 1] = 'lastCode'
    fields[#fields + 1] = a[3]
    fields[#fields + 1] = 'lastMsg'
    fields[#fields + 1] = a[4]
  end
  if a[5] == '1' then
    -- Some create may have reached the gateway: never fail this order on a lookup alone,
    -- and any absence seen before this create proves nothing now.
    fields[#fields + 1] = 'ambiguous'
    fields[#fields + 1] = '1'
    redis.call('HDEL', order, 'absentSince', 'absentLookups')
  end
  if a[7] == '1' then
    fields[#fields + 1] = 'numberExists'
    fields[#fields + 1] = '1'
  end
  if a[6] == '1' then
    -- Nothing was sent (the merchant's rate limit, a 429): not an attempt.
    local attempts = tonumber(redis.call('HGET', order, 'attempts') or '0')
    if attempts > 0 then
      fields[#fields + 1] = 'attempts'
      fields[#fields + 1] = tostring(attempts - 1)
    end
  end
  redis.call('HSET', order, unpack(fields))
  return 1
end

-- lease token. The gateway said it has no such order: extend the absence streak.
-- {since_ms, lookups, server_now_ms} | {} when the caller no longer holds the lease: another
-- run holds it, or it ran out (a lookup answered before a stall past the lease would be
-- counted at the stall's end, stretching the streak over time the gateway was not asked).
local function note_absent(order, a)
  local h = redis.call('HMGET', order, 'phase', 'leaseOwner', 'absentSince', 'leaseUntil')
  if h[1] ~= 'submitting' or h[2] ~= a[1] then return {} end
  local clock = lease_clock()
  if tonumber(h[4] or '0') <= clock then return {} end
  local since = h[3]
  if not since then
    since = tostring(clock)
    redis.call('HSET', order, 'absentSince', since)
  end
  local lookups = redis.call('HINCRBY', order, 'absentLookups', 1)
  return {since, tostring(lookups), tostring(clock)}
end

-- mchOrderNo. 1 when flagged.
local function mark_stuck(order, a)
  local h = redis.call('HMGET', order, 'req', 'final')
  if not h[1] or h[2] then return 0 end
  redis.call('HSET', order, 'stuck', '1')
  redis.call('SADD', KEYS[4], a[1])
  return 1
end

-- The events noted before an operation were written with it: nothing else to do.
local function events_only(order, a) return 1 end

local ops = {R = register, B = begin_submit, A = accept, F = finalize, X = release, S = mark_stuck,
  N = note_absent, E = events_only}

-- Appends history lines to an order's list: capped at MAX_EVENTS (the oldest go). A list
-- started for a record that is gone is dropped; one started for a final record gets its
-- expiry; one started while the order is in flight gets `list_ttl` (ms, 0 = none), and goes
-- earlier with its time index entry (the lifeline's trim, `TRIM_INDEX`).
local function note_events(order, events, lines, list_ttl)
  for _, line in ipairs(lines) do
    local n = redis.call('RPUSH', events, line)
    if n == 1 then
      local ttl = redis.call('PTTL', order)
      if ttl == -2 then
        redis.call('DEL', events)
        return
      elseif ttl > 0 then
        redis.call('PEXPIRE', events, ttl)
      elseif list_ttl > 0 then
        redis.call('PEXPIRE', events, list_ttl)
      end
    elseif n > MAX_EVENTS then
      redis.call('LTRIM', events, -MAX_EVENTS, -1)
    end
  end
end

-- One operation's error (a key of the wrong type, an unknown kind) is its caller's answer,
-- {'!error', message} (as data: an error reply nested in the batch's array would fail the
-- whole reply client-side); the other operations of the batch go on.
local function guarded(kind, order, aux, a)
  local run = ops[kind]
  if not run then return {'!error', 'unknown ledger operation ' .. tostring(kind)} end
  local ok, reply
  if kind == 'R' then
    ok, reply = pcall(run, order, aux, a)
  elseif kind == 'F' then
    ok, reply = pcall(run, order, a, aux)
  else
    ok, reply = pcall(run, order, a)
  end
  if ok then return reply end
  if type(reply) == 'table' and reply.err then return {'!error', reply.err} end
  return {'!error', tostring(reply)}
end
local out = {}
-- Job deliveries to acknowledge with their operations (at the end, after the held jobs).
local acks = {}
local function run_ops()
  local at = 2
  local op = 0
  while at <= #ARGV do
    local kind, n = ARGV[at], tonumber(ARGV[at + 1])
    local a = {}
    for i = 1, n do a[i] = ARGV[at + 1 + i] end
    at = at + 2 + n
    local order, aux, events = KEYS[13 + op * 3], KEYS[14 + op * 3], KEYS[15 + op * 3]
    -- The events noted for the order. They happened before the operation's change; keeping
    -- the history never fails the operation.
    local noted = tonumber(ARGV[at])
    local lines, list_ttl = nil, 0
    if noted > 0 then
      list_ttl = tonumber(ARGV[at + 1])
      lines = {}
      for i = 1, noted do lines[i] = ARGV[at + 1 + i] end
      at = at + 1
    end
    at = at + 1 + noted
    -- The job delivery this operation's caller finishes with it, if any: acknowledged at
    -- the end when the operation answers one of `replies`. Its worker follows the due time
    -- of a job the operation delays in its queue itself (no wake marker).
    if ARGV[at] ~= '' then
      acks[#acks + 1] = {owner = op + 1, entry = ARGV[at], group = ARGV[at + 1],
        consumer = ARGV[at + 2], replies = ',' .. ARGV[at + 3] .. ',', final = kind == 'F'}
      if ARGV[at + 4] == '1' then follow_self = {delayed = KEYS[6], owner = op + 1} end
      at = at + 5
    else
      at = at + 1
    end
    if lines and kind ~= 'A' and kind ~= 'F' then
      pcall(note_events, order, events, lines, list_ttl)
      lines = nil
    end
    carried = lines
    -- An acceptance's poll job is added with the batch's others, in one ZADD at the end.
    current = op + 1
    if kind == 'A' then hold_for = current end
    out[#out + 1] = guarded(kind, order, aux, a)
    hold_for = nil
    follow_self = nil
    if carried then pcall(note_events, order, events, carried, list_ttl) end
    carried = nil
    op = op + 1
  end
end
-- Whatever happens to the loop, what its operations held back is written: an acceptance
-- written without its poll job would be one the lifeline has to find.
local ran, failure = pcall(run_ops)
-- An acceptance whose poll job could not be added answers with the error, as when it was
-- added in its own step (the acceptance stays: the lifeline finds the order).
add_held(function(owner, err)
  out[owner] = {'!error', err}
  if poll_queued_in[owner] then redis.pcall('HDEL', poll_queued_in[owner], 'pollQueued') end
end)
-- The indexes are for people: a registration never fails for them; its reply says so. A
-- call holds at most the batcher's 128 operations: one ZADD each.
local function add_index(key, entries, owners)
  if #owners == 0 then return end
  local added = redis.pcall('ZADD', key, unpack(entries))
  if type(added) == 'table' and added.err then
    for _, owner in ipairs(owners) do out[owner] = {'created', 'unindexed'} end
  end
end
add_index(KEYS[11], indexed, index_owners)
local batch_entries, batch_owners = {'NX'}, {}
for id, rows in pairs(batches_seen) do
  batch_entries[#batch_entries + 1] = rows.first
  batch_entries[#batch_entries + 1] = id
  for _, owner in ipairs(rows) do batch_owners[#batch_owners + 1] = owner end
end
add_index(KEYS[12], batch_entries, batch_owners)
-- A worker told of nothing cannot follow: an operation that failed (its job may be queued
-- all the same), or a script that fails now, leaves the usual marker instead.
local followed = {}
for i = 1, #self_followed, 2 do
  local owner, due = self_followed[i], self_followed[i + 1]
  local reply = out[owner]
  if not ran or (type(reply) == 'table' and reply[1] == '!error') then
    pcall(wake_marker, KEYS[6], due)
  else
    followed[#followed + 1] = owner
    followed[#followed + 1] = due
  end
end
if not ran then error(failure) end
-- A job whose last step is one of these operations is acknowledged in the same atomic
-- change (and deleted from the stream, as the settle script does), when its operation
-- answered as its caller asked (so the caller's job is done) and only while the entry is
-- still pending for the caller's consumer: one taken over by another worker is left to it
-- and reported stale (a finalisation alone for its consumer excepted: see below).
-- Acknowledged and stale operations are named in the reply.
local acked, stale = {}, {}
local ack_error = ''
if #acks > 0 then
  local holders = {}
  for _, ack in ipairs(acks) do
    local reply = out[ack.owner]
    if type(reply) == 'number' and string.find(ack.replies, ',' .. reply .. ',', 1, true) then
      local at = ack.group .. '\0' .. ack.consumer
      local held = holders[at]
      if held == nil then
        held = {group = ack.group, consumer = ack.consumer, acks = {}}
        holders[at] = held
        holders[#holders + 1] = held
      end
      held.acks[#held.acks + 1] = ack
    end
  end
  -- One consumer's acknowledgements at a time: a failure (a group gone with a restarted
  -- server's data) leaves that consumer's jobs to their settlements, as for any other job;
  -- the operations' effects stand either way.
  for _, held in ipairs(holders) do
    local ok, err = pcall(function()
      local ids = {}
      for i, ack in ipairs(held.acks) do ids[i] = ack.entry end
      -- A lone job ended by its order's final state (just written or already there):
      -- nothing is left for any run of it, so it is acknowledged whoever holds it now, and
      -- the acknowledgement's count says whether it was still pending (no ownership read).
      -- A run that took it over finds it gone when it settles (stale, dropped).
      local lone = #ids == 1 and held.acks[1].final
      local mine
      if lone then
        mine = {[ids[1]] = true}
      else
        mine = owned_entries(KEYS[5], held.group, held.consumer, ids)
      end
      local done, done_by, left_by = {}, {}, {}
      for _, ack in ipairs(held.acks) do
        if mine[ack.entry] then
          done[#done + 1] = ack.entry
          done_by[#done_by + 1] = ack.owner
          mine[ack.entry] = nil
        else
          left_by[#left_by + 1] = ack.owner
        end
      end
      for _, owner in ipairs(left_by) do stale[#stale + 1] = owner end
      if #done > 0 then
        local pending = redis.call('XACK', KEYS[5], held.group, unpack(done))
        if lone and pending == 0 then
          stale[#stale + 1] = done_by[1]
          return
        end
        -- Acknowledged: done, whatever the delete does (an entry left in the stream is
        -- only a stray entry, never delivered again, unless a paused queue's parked
        -- position is lost and recovered before it: `queue::park`).
        for _, owner in ipairs(done_by) do acked[#acked + 1] = owner end
        local deleted = redis.pcall('XDEL', KEYS[5], unpack(done))
        if type(deleted) == 'table' and deleted.err then error(deleted.err) end
      end
    end)
    if not ok then
      if type(err) == 'table' and err.err then err = err.err end
      ack_error = tostring(err)
    end
  end
end
return {out, acked, stale, ack_error, followed}
"#
    ))
});

/// KEYS: the order time index. ARGV: the bound (exclusive, ms), the history lists' key prefix
/// (`LedgerKeys::events` of ""), the most entries to remove. Removes up to that many index
/// entries registered before the bound and, with each, the order's history list (a list
/// begun while the order was in flight has no expiry of its own; a re-registration moves
/// the entry, so a list still in use goes with its current registration). One script, so a
/// registration meanwhile cannot lose its entry. Returns the entries removed.
pub static TRIM_INDEX: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
if #ids == 0 then return 0 end
local lists = {}
for i, id in ipairs(ids) do lists[i] = ARGV[2] .. id end
redis.call('DEL', unpack(lists))
redis.call('ZREM', KEYS[1], unpack(ids))
return #ids
"#,
    )
});

/// KEYS: the outcome stream. ARGV: retention ms. Trims the entries older than the retention
/// that every consumer group has read and acknowledged: the bound is the oldest of "now −
/// retention", each group's oldest pending entry and each group's next unread entry. One
/// script, so a group created meanwhile cannot lose entries. Returns the entries removed.
/// Readers without a group (`outcomes --follow`, plain `XREAD`) are protected only by the
/// retention.
pub static TRIM_OUTCOMES: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local bound = {now - tonumber(ARGV[1]), 0}
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return {tonumber(ms), tonumber(seq)}
end
local function older(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end
for _, flat in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local g = {}
  for i = 1, #flat, 2 do g[flat[i]] = flat[i + 1] end
  local keep
  if tonumber(g['pending']) > 0 then
    keep = parse(redis.call('XPENDING', KEYS[1], g['name'])[2])
  else
    local last = parse(g['last-delivered-id'])
    keep = {last[1], last[2] + 1}
  end
  if older(keep, bound) then bound = keep end
end
if bound[1] <= 0 then return 0 end
return redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d-%d', bound[1], bound[2]))
"#,
    )
});
