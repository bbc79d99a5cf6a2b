#!/usr/bin/env python3
"""Read tarspay-worker's payout outcomes from another language (Python, redis-py >= 5).

The recipe, in any language with a Redis client:
  1. Outcomes live in one stream per partition. Their names are the members of the sorted set
     `{<prefix>:payouts}:outcome-streams` (prefix: TARSPAY_QUEUE_PREFIX, default `tarspay`;
     ZRANGE key 0 -1), written by every tarspay-worker process at start; with one partition
     it holds `{<prefix>:payouts}:outcomes`. Entries are flat field/value pairs, all strings
     (README, "Outcomes"). A payout's outcomes are all in one stream, in order.
  2. Create a consumer group once per stream: XGROUP CREATE <stream> <group> 0 MKSTREAM
     (BUSYGROUP = it exists). Each application gets its own group; its processes share it as
     consumers.
  3. Loop over the streams: XREADGROUP GROUP <group> <consumer> COUNT n STREAMS <stream> >,
     apply each entry, then XACK it. Read each stream in its own call (on Redis Cluster the
     streams live on different nodes, and one call over several is refused as CROSSSLOT).
     After a crash, first re-read your own pending entries (id `0` instead of `>`): they
     were delivered but not acknowledged.
  4. Apply idempotently. An outcome can arrive twice (a crash between applying and XACK, or a
     Redis failover that lost the acknowledgement or the outcome itself): key your effect on
     (mchOrderNo, event, status). `event` is `final` once per payout, or `correction` when the
     gateway later contradicts it (act on it: the money moved differently).
  5. Acknowledge promptly: the workers trim outcomes older than TARSPAY_RETENTION only once
     every group has read and acknowledged them, so a stalled group holds memory.

This script prints one JSON line per new outcome and exits after --count outcomes (or runs
forever without it). Examples:
  python3 examples/outcomes_consumer.py --redis-url redis://127.0.0.1:6379 --group payroll-app
  python3 examples/outcomes_consumer.py --cluster --redis-url redis://10.0.0.5:7000 ...
"""

import argparse
import json
import socket
import sys
import time

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
    parser.add_argument("--cluster", action="store_true", help="the URL is a Redis Cluster node")
    parser.add_argument("--prefix", default="tarspay")
    parser.add_argument("--group", default="outcomes-example")
    parser.add_argument("--consumer", default=socket.gethostname())
    parser.add_argument("--count", type=int, default=0, help="stop after this many (0: never)")
    parser.add_argument("--idle-ms", type=int, default=200, help="pause when nothing is new")
    args = parser.parse_args()

    if args.cluster:
        client = redis.RedisCluster.from_url(args.redis_url, decode_responses=True)
    else:
        client = redis.Redis.from_url(args.redis_url, decode_responses=True)
    streams = client.zrange("{%s:payouts}:outcome-streams" % args.prefix, 0, -1)
    if not streams:
        print("no outcome streams yet: start a tarspay-worker process first", file=sys.stderr)
        return 1
    for stream in streams:
        ensure_group(client, stream, args.group)

    seen = set()  # (mchOrderNo, event, status): a real application keeps this in its database
    handled = 0
    # Per stream: our own pending entries first (delivered before a crash, never
    # acknowledged), then new ones.
    cursors = {stream: "0" for stream in streams}
    while args.count == 0 or handled < args.count:
        read = 0
        for stream in streams:
            if args.count and handled >= args.count:
                break
            reply = client.xreadgroup(args.group, args.consumer, {stream: cursors[stream]}, count=100)
            entries = reply[0][1] if reply else []
            if cursors[stream] == "0" and not entries:
                cursors[stream] = ">"
            for entry_id, fields in entries:
                if args.count and handled >= args.count:
                    # Read but not handled: left pending, re-read first by the next run.
                    break
                read += 1
                key = (fields.get("mchOrderNo"), fields.get("event", "final"), fields.get("status"))
                if key not in seen:
                    seen.add(key)
                    print(json.dumps(fields, sort_keys=True), flush=True)
                    handled += 1
                client.xack(stream, args.group, entry_id)
        if read == 0:
            time.sleep(args.idle_ms / 1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
