//! Reading stream entries, in one place for the queue, the ledger's outcome stream and the
//! auditor. An entry is the `redis` crate's [`StreamId`] (id and fields), parsed by the crate
//! from `XRANGE` replies; this module adds reading a field as text, the `XREADGROUP` reply
//! (the crate's `StreamReadReply` deep-copies every reply before parsing it, a cost paid per
//! job on the fetch path) and the one reply the crate does not know (the CLAIM script's, which
//! carries delivery counts).

use redis::Value;
use redis::streams::StreamId;
use std::collections::HashMap;

use crate::queue::QueueError;

/// Text of a bulk, simple or verbatim string, or an integer (bytes that are not UTF-8 are
/// replaced, not refused: a stored job that does not decode is reported, never dropped).
pub(crate) fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The field `name` of an entry's fields as text, if present.
pub(crate) fn field(fields: &HashMap<String, Value>, name: &str) -> Option<String> {
    text(fields.get(name)?)
}

/// Takes the field `name` out of an entry's fields as text, without copying valid UTF-8.
pub(crate) fn take_field(fields: &mut HashMap<String, Value>, name: &str) -> Option<String> {
    match fields.remove(name)? {
        Value::BulkString(bytes) => Some(
            String::from_utf8(bytes)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        ),
        other => text(&other),
    }
}

/// The entries of an `XREADGROUP` reply, every stream's in order (`nil` when the read timed
/// out): `[[stream, [[id, [field, value, …]], …]], …]`, or a map of streams under RESP3.
pub(crate) fn parse_read(reply: Value) -> Result<Vec<StreamId>, QueueError> {
    type Rows = Option<Vec<(String, Vec<(String, HashMap<String, Value>)>)>>;
    let rows: Rows = redis::from_redis_value(reply)
        .map_err(|e| QueueError::Protocol(format!("stream read reply: {e}")))?;
    Ok(rows
        .into_iter()
        .flatten()
        .flat_map(|(_stream, entries)| entries)
        .map(|(id, map)| StreamId {
            id,
            map,
            milliseconds_elapsed_from_delivery: None,
            delivered_count: None,
        })
        .collect())
}

/// The time part of a stream entry id (`<ms>-<seq>`).
pub(crate) fn entry_id_ms(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

/// The CLAIM script's reply: `[next cursor, [id, fields, deliveries], …]`.
pub(crate) fn parse_claimed(reply: &Value) -> Result<(Vec<StreamId>, String), QueueError> {
    let bad = || QueueError::Protocol(format!("claim reply: {reply:?}"));
    let Value::Array(items) = reply else {
        return Err(bad());
    };
    let next = items.first().and_then(text).ok_or_else(bad)?;
    let claimed = items
        .iter()
        .skip(1)
        .map(|item| {
            let (id, map, deliveries): (String, HashMap<String, Value>, Option<usize>) =
                redis::from_redis_value_ref(item).map_err(|_| bad())?;
            Ok(StreamId {
                id,
                map,
                milliseconds_elapsed_from_delivery: None,
                delivered_count: deliveries,
            })
        })
        .collect::<Result<_, QueueError>>()?;
    Ok((claimed, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn claimed_entries_keep_fields_and_delivery_counts() {
        let reply = Value::Array(vec![
            bulk("0-0"),
            Value::Array(vec![
                bulk("5-1"),
                Value::Array(vec![bulk("e"), bulk("{}")]),
                Value::Int(3),
            ]),
        ]);
        let (entries, next) = parse_claimed(&reply).unwrap();
        assert_eq!(next, "0-0");
        assert_eq!(entries[0].id, "5-1");
        assert_eq!(field(&entries[0].map, "e").as_deref(), Some("{}"));
        assert_eq!(entries[0].delivered_count, Some(3));
        assert_eq!(entry_id_ms(&entries[0].id), Some(5));
    }

    #[test]
    fn a_malformed_claim_reply_is_a_protocol_error() {
        for reply in [
            Value::Int(1),
            Value::Array(vec![bulk("0-0"), Value::Int(7)]),
        ] {
            assert!(matches!(
                parse_claimed(&reply),
                Err(QueueError::Protocol(_))
            ));
        }
    }

    #[test]
    fn read_replies_keep_every_streams_entries_in_order() {
        let entry = |id: &str, job: &str| {
            Value::Array(vec![bulk(id), Value::Array(vec![bulk("e"), bulk(job)])])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk("s1"),
                Value::Array(vec![entry("1-0", "a"), entry("2-0", "b")]),
            ]),
            Value::Array(vec![bulk("s2"), Value::Array(vec![entry("3-0", "c")])]),
        ]);
        let mut entries = parse_read(reply).unwrap();
        let ids: Vec<_> = entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["1-0", "2-0", "3-0"]);
        assert_eq!(take_field(&mut entries[1].map, "e").as_deref(), Some("b"));
        assert!(entries[1].map.is_empty());
        assert!(parse_read(Value::Nil).unwrap().is_empty());
        assert!(matches!(
            parse_read(Value::Int(3)),
            Err(QueueError::Protocol(_))
        ));
    }

    #[test]
    fn taken_fields_read_as_lossy_text() {
        let mut map = HashMap::from([
            ("n".to_owned(), Value::Int(4)),
            ("b".to_owned(), Value::BulkString(vec![b'a', 0xff])),
        ]);
        assert_eq!(take_field(&mut map, "n").as_deref(), Some("4"));
        assert_eq!(take_field(&mut map, "b").as_deref(), Some("a\u{fffd}"));
        assert_eq!(take_field(&mut map, "b"), None);
    }

    #[test]
    fn fields_read_as_lossy_text() {
        let map = HashMap::from([
            ("n".to_owned(), Value::Int(4)),
            ("b".to_owned(), Value::BulkString(vec![b'a', 0xff])),
        ]);
        assert_eq!(field(&map, "n").as_deref(), Some("4"));
        assert_eq!(field(&map, "b").as_deref(), Some("a\u{fffd}"));
        assert_eq!(field(&map, "missing"), None);
    }
}
