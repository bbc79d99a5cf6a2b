//! The ledger's Lua scripts. Each is one atomic compare-and-set on one order's hash (plus, for
//! a final transition, one append to the outcome stream in the same slot). Leases use the
//! Redis server's clock (`TIME`), so workers' clocks never decide who may create.

use redis::Script;
use std::sync::LazyLock;

/// Shared by every script: which phases never change again.
pub(crate) const PRELUDE: &str = r#"
local FINAL = {succeeded=true, failed=true, rejected=true, refunded=true, conflict=true, expired=true, partial=true}
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

/// KEYS: order, batch set, and the partition's queue stream, delayed set and unique hash.
/// ARGV: mchOrderNo, kind, fingerprint, amount, currency, request, batchId, initial phase, then
/// the order's first job (now_ms, run_at_ms, unique key, job id, envelope; envelope "" for
/// none), queued in the same step, so an order can never be registered without its job.
/// Returns {"created", phase, fingerprint} or {"exists", phase, fingerprint}.
pub static REGISTER: LazyLock<Script> = LazyLock::new(|| {
    script(&format!(
        "{}{}",
        crate::queue::ENQUEUE_ONE,
        r#"
local existing = redis.call('HMGET', KEYS[1], 'phase', 'fingerprint')
if existing[1] then
  return {'exists', existing[1], existing[2] or ''}
end
local now = now_ms()
redis.call('HSET', KEYS[1], 'mchOrderNo', ARGV[1], 'kind', ARGV[2], 'fingerprint', ARGV[3],
  'amount', ARGV[4], 'currency', ARGV[5], 'request', ARGV[6], 'batchId', ARGV[7],
  'phase', ARGV[8], 'attempts', 0, 'createdAt', now, 'updatedAt', now)
if ARGV[7] ~= '' then
  redis.call('SADD', KEYS[2], ARGV[1])
end
if ARGV[13] ~= '' then
  enqueue_one(KEYS[3], KEYS[4], KEYS[5], tonumber(ARGV[9]), tonumber(ARGV[10]), ARGV[11], ARGV[12], ARGV[13])
end
return {'created', ARGV[8], ARGV[3]}
"#
    ))
});

/// Takes the `submitting` lease. KEYS: order, queue pause flag. ARGV: lease token, lease ms.
/// Returns {"go", previous phase, attempts, field, value, …} (the order's hash after the
/// change, so the create needs no second round trip to read it) | {"busy", ms left} |
/// {"paused"} | {"accepted"} | {"final", phase} | {"missing"}. A `submitting` order whose lease
/// ran out was left by a worker that died mid-call: it comes back as previous phase "unknown".
pub static BEGIN_SUBMIT: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local h = redis.call('HMGET', KEYS[1], 'phase', 'leaseUntil', 'attempts')
local phase = h[1]
if not phase then return {'missing'} end
if FINAL[phase] then return {'final', phase} end
if phase == 'accepted' then return {'accepted'} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'paused'} end
local now = now_ms()
local previous = phase
if phase == 'submitting' then
  local lease_until = tonumber(h[2] or '0')
  if lease_until > now then return {'busy', tostring(lease_until - now)} end
  previous = 'unknown'
end
local attempts = tonumber(h[3] or '0') + 1
redis.call('HSET', KEYS[1], 'phase', 'submitting', 'leaseOwner', ARGV[1],
  'leaseUntil', now + tonumber(ARGV[2]), 'attempts', attempts, 'updatedAt', now)
local reply = {'go', previous, tostring(attempts)}
for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do reply[#reply + 1] = v end
return reply
"#,
    )
});

/// The gateway accepted the create (or a query found the order in a non-final state).
/// KEYS: order, systemic-guard set (an accepted create proves the key works: reset it).
/// ARGV: payOrderId. Returns 1 if recorded, 0 if the order is already final.
pub static ACCEPT: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local phase = redis.call('HGET', KEYS[1], 'phase')
if not phase or FINAL[phase] then return 0 end
redis.call('HSET', KEYS[1], 'phase', 'accepted', 'updatedAt', now_ms())
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'payOrderId', ARGV[1]) end
redis.call('HDEL', KEYS[1], 'leaseOwner', 'leaseUntil')
redis.call('DEL', KEYS[2])
return 1
"#,
    )
});

/// Gives the lease back after a failed call. KEYS: order. ARGV: lease token, next phase
/// ("queued" or "unknown"), code, msg. Only the lease holder may do this.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local h = redis.call('HMGET', KEYS[1], 'phase', 'leaseOwner')
if h[1] ~= 'submitting' or h[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'phase', ARGV[2], 'lastCode', ARGV[3], 'lastMsg', ARGV[4], 'updatedAt', now_ms())
if ARGV[2] == 'unknown' then
  -- Some create may have reached the gateway: never fail this order on a lookup alone.
  redis.call('HSET', KEYS[1], 'ambiguous', '1')
end
redis.call('HDEL', KEYS[1], 'leaseOwner', 'leaseUntil')
return 1
"#,
    )
});

/// The one terminal transition. KEYS: order, outcome stream, stuck set. ARGV: phase, gatewayState,
/// payOrderId, fee, code, msg, at (RFC 3339), stream max length (0 = unbounded), lease token
/// ("" when the gateway itself reported the final state; otherwise the caller must still hold
/// the submit lease). Returns 1 when this call finalised the order (and appended its one
/// outcome), 0 when it was already final, -1 when the order does not exist, 2 when the caller
/// no longer holds the lease (another run owns the order now).
pub static FINALIZE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local h = redis.call('HMGET', KEYS[1], 'phase', 'kind', 'mchOrderNo', 'amount', 'currency',
  'attempts', 'batchId', 'payOrderId', 'leaseOwner')
if not h[1] then return -1 end
if FINAL[h[1]] then return 0 end
if ARGV[9] ~= '' and (h[1] ~= 'submitting' or h[9] ~= ARGV[9]) then return 2 end
local pay_order_id = ARGV[3]
if pay_order_id == '' then pay_order_id = h[8] or '' end
local now = now_ms()
redis.call('HSET', KEYS[1], 'phase', ARGV[1], 'gatewayState', ARGV[2], 'payOrderId', pay_order_id,
  'fee', ARGV[4], 'lastCode', ARGV[5], 'lastMsg', ARGV[6], 'finishedAt', now, 'updatedAt', now)
redis.call('HDEL', KEYS[1], 'leaseOwner', 'leaseUntil', 'stuck')
redis.call('SREM', KEYS[3], h[3] or '')
local fields = {'kind', h[2] or '', 'mchOrderNo', h[3] or '', 'status', ARGV[1],
  'gatewayState', ARGV[2], 'payOrderId', pay_order_id, 'amount', h[4] or '', 'currency', h[5] or '',
  'fee', ARGV[4], 'code', ARGV[5], 'msg', ARGV[6], 'attempts', h[6] or '0', 'batchId', h[7] or '',
  'at', ARGV[7]}
if tonumber(ARGV[8]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', unpack(fields))
else
  redis.call('XADD', KEYS[2], '*', unpack(fields))
end
return 1
"#,
    )
});

/// Flags a non-final order as stuck past the polling deadline. KEYS: order, stuck set.
pub static MARK_STUCK: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local phase = redis.call('HGET', KEYS[1], 'phase')
if not phase or FINAL[phase] then return 0 end
redis.call('HSET', KEYS[1], 'stuck', '1')
redis.call('SADD', KEYS[2], redis.call('HGET', KEYS[1], 'mchOrderNo') or '')
return 1
"#,
    )
});
