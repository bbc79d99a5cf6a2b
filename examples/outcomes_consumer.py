#!/usr/bin/env python3
"""Read tarspay-worker's payout outcomes from another language (Python, redis-py >= 5).

The recipe, in any language with a Redis client:
  1. The outcome stream is `{<prefix>:payouts}:outcomes` (prefix: TARSPAY_QUEUE_PREFIX,
     default `tarspay`). Entries are flat field/value pairs, all strings (README, "Outcomes").
  2. Create a consumer group once: XGROUP CREATE <stream> <group> 0 MKSTREAM (BUSYGROUP = it
     exists). Each application gets its own group; its processes share it as consumers.
  3. Loop: XREADGROUP GROUP <group> <consumer> COUNT n BLOCK ms STREAMS <stream> >, apply each
     entry, then XACK it. After a crash, first re-read your own pending entries (id `0`
     instead of `>`): they were delivered but not acknowledged.
  4. Apply idempotently. An outcome can arrive twice (a crash between applying and XACK, or a
     Redis failover that lost the acknowledgement or the outcome itself): key your effect on
     (mchOrderNo, event, status). `event` is `final` once per payout, or `correction` when the
     gateway later contradicts it (act on it: the money moved differently).
  5. Acknowledge promptly: the workers trim outcomes older than TARSPAY_RETENTION only once
     every group has read and acknowledged them, so a stalled group holds memory.

This script prints one JSON line per new outcome and exits after --count outcomes (or runs
forever without it). Example:
  python3 examples/outcomes_consumer.py --redis-url redis://127.0.0.1:6379 --group payroll-app
"""

import argparse
import json
import socket
import sys

import redis


def ensure_group(client, stream, group):
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as err:
        if "BUSYGROUP" not in str(err):
            raise


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    parser.add_argument("--prefix", default="tarspay")
    parser.add_argument("--group", default="outcomes-example")
    parser.add_argument("--consumer", default=socket.gethostname())
    parser.add_argument("--count", type=int, default=0, help="stop after this many (0: never)")
    parser.add_argument("--block-ms", type=int, default=2000)
    args = parser.parse_args()

    client = redis.Redis.from_url(args.redis_url, decode_responses=True)
    stream = "{%s:payouts}:outcomes" % args.prefix
    ensure_group(client, stream, args.group)

    seen = set()  # (mchOrderNo, event, status): a real application keeps this in its database
    handled = 0
    # Our own pending entries first (delivered before a crash, never acknowledged), then new.
    cursor = "0"
    while args.count == 0 or handled < args.count:
        reply = client.xreadgroup(
            args.group, args.consumer, {stream: cursor}, count=100, block=args.block_ms
        )
        entries = reply[0][1] if reply else []
        if cursor == "0" and not entries:
            cursor = ">"
            continue
        for entry_id, fields in entries:
            key = (fields.get("mchOrderNo"), fields.get("event", "final"), fields.get("status"))
            if key not in seen:
                seen.add(key)
                print(json.dumps(fields, sort_keys=True), flush=True)
                handled += 1
            client.xack(stream, args.group, entry_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
