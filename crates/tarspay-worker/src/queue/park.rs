//! A paused queue's consumer group is *parked*: its last delivered id is set past every id a
//! stream can hold, so no read of new entries (`XREADGROUP … >`) delivers anything until the
//! resume sets it back. A delivery therefore proves the queue was not paused when the read
//! ran, and a fetch loop needs no read of the flag for it (see `fetch`).
//!
//! The flag (`QueueKeys::paused`) stays what every other reader goes by (the ledger's lease
//! step when its fetch loop's reading is not fresh, stats, the console). Pause and resume
//! write the flag and the group in one script. Where the group was is kept in
//! `QueueKeys::parked` (`<id> <entries read>`), so the resume restores it exactly: the entries
//! added meanwhile are then delivered in order, none skipped, and `XINFO`'s lag is right
//! again. A flag written by hand, or by a version before this one, is followed up by every
//! fetch loop's flag check (`CHECK`: before each orphan scan, and while paused): it parks a
//! flagged queue and unparks one whose flag is gone.

use std::sync::LazyLock;

use redis::Script;

use crate::queue::QueueKeys;

/// The id a parked group has delivered up to: the greatest a stream entry can have.
pub(crate) const PARKED_ID: &str = "18446744073709551615-18446744073709551615";

/// Lua functions `park(parked, stream, group)` and `unpark(parked, saved, stream, group)`
/// (`saved`: the parked key's value, or false). A stream or group that does not exist has
/// nothing to park (a group created later is parked by `ENSURE_GROUP`). Parking a parked group
/// keeps the first position; unparking moves only a group still parked, so a group created
/// again meanwhile is not sent back. A parked group whose position is lost (the key deleted or
/// evicted) or unreadable is put back after its greatest pending entry, or at the stream's
/// start when none is pending: acknowledged entries are deleted, so every entry left in the
/// stream up to the group's true position is pending, and none is skipped (an entry left by
/// a failed delete would be delivered again: jobs are idempotent).
pub(crate) const PARKING: &str = r#"
local PARKED = '18446744073709551615-18446744073709551615'
local function group_state(stream, group)
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
  if not ok then return nil end
  for _, flat in ipairs(groups) do
    local g = {}
    for i = 1, #flat, 2 do g[flat[i]] = flat[i + 1] end
    if g['name'] == group then return g end
  end
  return nil
end
local function park(parked, stream, group)
  local g = group_state(stream, group)
  if g == nil or g['last-delivered-id'] == PARKED then return end
  local read = g['entries-read']
  if type(read) == 'number' then read = string.format('%d', read) else read = '' end
  -- The position first: a failed move leaves the group where it was, and the next check
  -- parks it (a check parks a flagged queue's group whatever this key says).
  redis.call('SET', parked, g['last-delivered-id'] .. ' ' .. read)
  redis.call('XGROUP', 'SETID', stream, group, PARKED)
end
local function unpark(parked, saved, stream, group)
  local g = group_state(stream, group)
  if g ~= nil and g['last-delivered-id'] == PARKED then
    local id, read = nil, ''
    if saved then id, read = string.match(saved, '^(%d+%-%d+) (%d*)$') end
    if id == nil then
      local pending = redis.call('XPENDING', stream, group)
      id, read = '0-0', ''
      if tonumber(pending[1]) > 0 then id = pending[3] end
    end
    if read ~= '' then
      redis.call('XGROUP', 'SETID', stream, group, id, 'ENTRIESREAD', read)
    else
      redis.call('XGROUP', 'SETID', stream, group, id)
    end
  end
  if saved then redis.call('DEL', parked) end
end
"#;

/// KEYS: paused flag, parked position, stream. ARGV: group. Parks the group, then sets the
/// flag (a failed park leaves no flag: the pause is refused).
pub(crate) static PAUSE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{PARKING}{}",
        r#"
park(KEYS[2], KEYS[3], ARGV[1])
redis.call('SET', KEYS[1], '1')
return 1
"#
    ))
});

/// KEYS and ARGV as [`PAUSE`]. Unparks the group, then clears the flag (a failed unpark
/// leaves the queue paused).
pub(crate) static RESUME: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{PARKING}{}",
        r#"
unpark(KEYS[2], redis.call('GET', KEYS[2]), KEYS[3], ARGV[1])
redis.call('DEL', KEYS[1])
return 1
"#
    ))
});

/// KEYS and ARGV as [`PAUSE`]. Reads the flag (1 paused, 0 not) and brings the group in line
/// with it, whatever wrote it: a flagged queue's group is parked (written by hand, by an
/// older version, or a park that failed half way), and an unflagged queue's parked group put
/// back (the flag deleted by hand). `MGET` and `XINFO` when both agree.
pub(crate) static CHECK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{PARKING}{}",
        r#"
local v = redis.call('MGET', KEYS[1], KEYS[2])
if v[1] then
  -- The reading stands even if the park fails (out of memory, say): the queue is paused.
  pcall(park, KEYS[2], KEYS[3], ARGV[1])
  return 1
end
unpark(KEYS[2], v[2], KEYS[3], ARGV[1])
return 0
"#
    ))
});

/// KEYS as [`PAUSE`]; ARGV: group. Creates the group (from the stream's start) if missing:
/// a group created here drops any parked position left from the stream's earlier life. Either
/// way the group is parked if the queue is paused (a queue paused by an older version, or
/// before the group existed). 1 when created, 0 when it was there.
pub(crate) static ENSURE_GROUP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{PARKING}{}",
        r#"
local ok, err = pcall(redis.call, 'XGROUP', 'CREATE', KEYS[3], ARGV[1], '0', 'MKSTREAM')
local created = 1
if not ok then
  local text = type(err) == 'table' and err.err or tostring(err)
  -- Raised as it came (its code kept: OOM, READONLY, ...).
  if not string.find(text, 'BUSYGROUP', 1, true) then error(err) end
  created = 0
else
  redis.call('DEL', KEYS[2])
end
if redis.call('EXISTS', KEYS[1]) == 1 then park(KEYS[2], KEYS[3], ARGV[1]) end
return created
"#
    ))
});

/// A call of one of this module's scripts for the queue with `keys`.
pub(crate) fn invocation<'s>(script: &'s Script, keys: &QueueKeys) -> redis::ScriptInvocation<'s> {
    let mut call = script.prepare_invoke();
    call.key(&keys.paused)
        .key(&keys.parked)
        .key(&keys.stream)
        .arg(&keys.group);
    call
}

/// Where a parked group stood before its pause (the `parked` key's value): its last
/// delivered id; `None` for a value of another form.
pub(crate) fn parked_position(saved: &str) -> Option<&str> {
    let id = saved.split(' ').next()?;
    let (ms, seq) = id.split_once('-')?;
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    (digits(ms) && digits(seq)).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use local_redis::LocalRedis;
    use redis::aio::MultiplexedConnection;
    use redis::streams::{StreamInfoGroupsReply, StreamReadOptions, StreamReadReply};
    use redis::{AsyncCommands, RedisResult};

    async fn server() -> (LocalRedis, MultiplexedConnection, QueueKeys) {
        let redis = LocalRedis::start(local_redis::Durability::Off).expect("redis-server on PATH");
        let client = redis::Client::open(redis.url()).unwrap();
        let conn = client.get_multiplexed_async_connection().await.unwrap();
        (redis, conn, QueueKeys::new("t", "q").unwrap())
    }

    async fn run(script: &Script, keys: &QueueKeys, conn: &mut MultiplexedConnection) -> i64 {
        invocation(script, keys).invoke_async(conn).await.unwrap()
    }

    /// The group's last delivered id, entries read and lag.
    async fn group(
        keys: &QueueKeys,
        conn: &mut MultiplexedConnection,
    ) -> (String, Option<i64>, Option<i64>) {
        let reply: redis::Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&keys.stream)
            .query_async(conn)
            .await
            .unwrap();
        let parsed: StreamInfoGroupsReply = redis::from_redis_value(reply.clone()).unwrap();
        let redis::Value::Array(groups) = reply else {
            panic!("{reply:?}")
        };
        let redis::Value::Array(fields) = &groups[0] else {
            panic!("{groups:?}")
        };
        let number = |name: &str| {
            let at = fields
                .iter()
                .position(|v| matches!(v, redis::Value::BulkString(b) if b == name.as_bytes()))?;
            match &fields[at + 1] {
                redis::Value::Int(n) => Some(*n),
                _ => None,
            }
        };
        (
            parsed.groups[0].last_delivered_id.clone(),
            number("entries-read"),
            number("lag"),
        )
    }

    /// Ids a read of new entries delivers (up to 10).
    async fn read_new(keys: &QueueKeys, conn: &mut MultiplexedConnection) -> Vec<String> {
        read_up_to(keys, conn, 10).await
    }

    /// Ids a read of up to `count` new entries delivers.
    async fn read_up_to(
        keys: &QueueKeys,
        conn: &mut MultiplexedConnection,
        count: usize,
    ) -> Vec<String> {
        let opts = StreamReadOptions::default()
            .group(&keys.group, "c")
            .count(count);
        let reply: RedisResult<Option<StreamReadReply>> =
            conn.xread_options(&[&keys.stream], &[">"], &opts).await;
        reply
            .unwrap()
            .map(|r| {
                r.keys
                    .into_iter()
                    .flat_map(|k| k.ids)
                    .map(|e| e.id)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A server whose queue's group has delivered one entry (its id).
    async fn one_delivered() -> (LocalRedis, MultiplexedConnection, QueueKeys, String) {
        let (redis, mut conn, keys) = server().await;
        run(&ENSURE_GROUP, &keys, &mut conn).await;
        let first = add(&keys, &mut conn).await;
        assert_eq!(
            read_new(&keys, &mut conn).await,
            std::slice::from_ref(&first)
        );
        (redis, conn, keys, first)
    }

    async fn add(keys: &QueueKeys, conn: &mut MultiplexedConnection) -> String {
        conn.xadd(&keys.stream, "*", &[("e", "job")]).await.unwrap()
    }

    #[tokio::test]
    async fn a_pause_parks_the_group_and_the_resume_brings_it_back_where_it_stood() {
        let (_redis, mut conn, keys) = server().await;
        assert_eq!(run(&ENSURE_GROUP, &keys, &mut conn).await, 1);
        let first = add(&keys, &mut conn).await;
        let second = add(&keys, &mut conn).await;
        read_up_to(&keys, &mut conn, 1).await;
        assert_eq!(
            group(&keys, &mut conn).await,
            (first.clone(), Some(1), Some(1))
        );

        run(&PAUSE, &keys, &mut conn).await;
        assert_eq!(group(&keys, &mut conn).await.0, PARKED_ID);
        let saved: String = conn.get(&keys.parked).await.unwrap();
        assert_eq!(saved, format!("{first} 1"));
        let third = add(&keys, &mut conn).await;
        assert!(
            read_new(&keys, &mut conn).await.is_empty(),
            "a paused queue delivers nothing"
        );
        // A second pause keeps the first position.
        run(&PAUSE, &keys, &mut conn).await;
        let again: String = conn.get(&keys.parked).await.unwrap();
        assert_eq!(again, saved);
        assert_eq!(run(&CHECK, &keys, &mut conn).await, 1);

        run(&RESUME, &keys, &mut conn).await;
        assert_eq!(group(&keys, &mut conn).await, (first, Some(1), Some(2)));
        assert_eq!(read_new(&keys, &mut conn).await, [second, third]);
        let left: (bool, bool) = redis::pipe()
            .exists(&keys.paused)
            .exists(&keys.parked)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(left, (false, false));
        assert_eq!(run(&CHECK, &keys, &mut conn).await, 0);
    }

    #[tokio::test]
    async fn a_check_brings_the_group_in_line_with_a_flag_written_by_hand() {
        let (_redis, mut conn, keys, first) = one_delivered().await;
        assert_eq!(run(&CHECK, &keys, &mut conn).await, 0);
        assert_eq!(group(&keys, &mut conn).await.0, first, "nothing to change");

        let () = conn.set(&keys.paused, "1").await.unwrap();
        let second = add(&keys, &mut conn).await;
        assert_eq!(run(&CHECK, &keys, &mut conn).await, 1);
        assert_eq!(group(&keys, &mut conn).await.0, PARKED_ID);
        assert!(read_new(&keys, &mut conn).await.is_empty());

        let () = conn.del(&keys.paused).await.unwrap();
        assert_eq!(run(&CHECK, &keys, &mut conn).await, 0);
        assert_eq!(group(&keys, &mut conn).await.0, first);
        assert_eq!(read_new(&keys, &mut conn).await, [second]);
        // A resume of a flag written by hand (nothing parked) only clears it.
        let () = conn.set(&keys.paused, "1").await.unwrap();
        run(&RESUME, &keys, &mut conn).await;
        assert!(!conn.exists::<_, bool>(&keys.paused).await.unwrap());
    }

    async fn ack_and_delete(keys: &QueueKeys, conn: &mut MultiplexedConnection, id: &str) {
        let _: i64 = conn.xack(&keys.stream, &keys.group, &[id]).await.unwrap();
        let _: i64 = conn.xdel(&keys.stream, &[id]).await.unwrap();
    }

    #[tokio::test]
    async fn a_parked_group_whose_position_is_lost_goes_back_after_its_greatest_pending_entry() {
        let (_redis, mut conn, keys) = server().await;
        run(&ENSURE_GROUP, &keys, &mut conn).await;
        let first = add(&keys, &mut conn).await;
        let second = add(&keys, &mut conn).await;
        let third = add(&keys, &mut conn).await;
        read_up_to(&keys, &mut conn, 2).await;
        ack_and_delete(&keys, &mut conn, &first).await;
        for lost in [None, Some("not a position")] {
            run(&PAUSE, &keys, &mut conn).await;
            match lost {
                None => conn.del::<_, ()>(&keys.parked).await.unwrap(),
                Some(value) => conn.set::<_, _, ()>(&keys.parked, value).await.unwrap(),
            }
            run(&RESUME, &keys, &mut conn).await;
            assert_eq!(group(&keys, &mut conn).await.0, second, "{lost:?}");
            assert!(!conn.exists::<_, bool>(&keys.parked).await.unwrap());
        }
        let fourth = add(&keys, &mut conn).await;
        assert_eq!(
            read_new(&keys, &mut conn).await,
            [third.clone(), fourth.clone()]
        );
        // Nothing pending: back to the stream's start, and what is left there is delivered.
        for id in [&second, &third, &fourth] {
            ack_and_delete(&keys, &mut conn, id).await;
        }
        let fifth = add(&keys, &mut conn).await;
        run(&PAUSE, &keys, &mut conn).await;
        conn.del::<_, ()>(&keys.parked).await.unwrap();
        // The flag deleted by hand with it: the next check puts the group back.
        conn.del::<_, ()>(&keys.paused).await.unwrap();
        assert_eq!(run(&CHECK, &keys, &mut conn).await, 0);
        assert_eq!(group(&keys, &mut conn).await.0, "0-0");
        assert_eq!(read_new(&keys, &mut conn).await, [fifth]);
    }

    #[tokio::test]
    async fn a_check_parks_a_flagged_queues_group_whatever_its_parked_key_says() {
        let (_redis, mut conn, keys, first) = one_delivered().await;
        // A position left from a park that failed half way, or from the stream's earlier life.
        let () = conn.set(&keys.parked, "1-1 1").await.unwrap();
        let () = conn.set(&keys.paused, "1").await.unwrap();
        assert_eq!(run(&CHECK, &keys, &mut conn).await, 1);
        assert_eq!(group(&keys, &mut conn).await.0, PARKED_ID);
        let saved: String = conn.get(&keys.parked).await.unwrap();
        assert_eq!(saved, format!("{first} 1"));
        // A queue paused before the group existed, or by an older version: parked when a
        // worker makes sure of the group.
        run(&RESUME, &keys, &mut conn).await;
        let () = conn.set(&keys.paused, "1").await.unwrap();
        assert_eq!(run(&ENSURE_GROUP, &keys, &mut conn).await, 0);
        assert_eq!(group(&keys, &mut conn).await.0, PARKED_ID);
        // A resume of a queue whose stream is gone clears both keys.
        let () = conn.del(&keys.stream).await.unwrap();
        run(&RESUME, &keys, &mut conn).await;
        let left: (bool, bool) = redis::pipe()
            .exists(&keys.paused)
            .exists(&keys.parked)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(left, (false, false));
    }

    #[test]
    fn a_parked_position_is_an_entry_id_or_nothing() {
        assert_eq!(parked_position("17-0 3"), Some("17-0"));
        assert_eq!(parked_position("17-0 "), Some("17-0"));
        assert_eq!(parked_position("not a position"), None);
        assert_eq!(parked_position("17- 3"), None);
        assert_eq!(parked_position(""), None);
    }

    #[tokio::test]
    async fn a_group_created_while_the_queue_is_paused_is_parked_at_once() {
        let (_redis, mut conn, keys) = server().await;
        // Paused before any worker made the group: nothing to park yet.
        run(&PAUSE, &keys, &mut conn).await;
        assert!(!conn.exists::<_, bool>(&keys.parked).await.unwrap());
        assert_eq!(run(&ENSURE_GROUP, &keys, &mut conn).await, 1);
        assert_eq!(group(&keys, &mut conn).await.0, PARKED_ID);
        assert_eq!(
            run(&ENSURE_GROUP, &keys, &mut conn).await,
            0,
            "there already"
        );
        let first = add(&keys, &mut conn).await;
        assert!(read_new(&keys, &mut conn).await.is_empty());

        // The stream lost (its position with it) while parked: the group made again starts
        // from the stream's start, parked, and the stale position is not restored.
        let () = conn.del(&keys.stream).await.unwrap();
        let second = add(&keys, &mut conn).await;
        assert_eq!(run(&ENSURE_GROUP, &keys, &mut conn).await, 1);
        assert_eq!(group(&keys, &mut conn).await.0, PARKED_ID);
        run(&RESUME, &keys, &mut conn).await;
        assert_eq!(read_new(&keys, &mut conn).await, [second]);
        assert_ne!(first, "");
    }
}
