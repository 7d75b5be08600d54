"""The queue's atomic steps as Lua scripts, with the KEYS / ARGV each expects.

Both sides use them (the API through redis.asyncio, workers through sync redis), so a job's
life — queued, taken, finished — is decided in one place and never half-written.
"""

from __future__ import annotations

__all__ = ["CANCEL", "ENQUEUE", "FINISH", "START"]

# KEYS: job, queued, stream, events, idempotency.
# ARGV: id, queue_max, ttl, now, use_idempotency ("1"/"0"), field, value, ...
# -> {"queued", position} | {"full", depth} | {"existing", job_id}
ENQUEUE = """
if ARGV[5] == '1' then
  local existing = redis.call('GET', KEYS[5])
  if existing then return {'existing', existing} end
end
local depth = redis.call('ZCARD', KEYS[2])
if depth >= tonumber(ARGV[2]) then return {'full', tostring(depth)} end
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], unpack(fields))
local sid = redis.call('XADD', KEYS[3], '*', 'job', ARGV[1])
redis.call('HSET', KEYS[1], 'stream_id', sid)
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('XADD', KEYS[4], '*', 'type', 'status', 'status', 'queued', 'progress', '0')
redis.call('EXPIRE', KEYS[4], ttl)
if ARGV[5] == '1' then redis.call('SET', KEYS[5], ARGV[1], 'EX', ttl) end
return {'queued', tostring(depth)}
"""

# KEYS: job, queued, events, stream, done.  ARGV: id, now, ttl.
# -> "cancelled" (it was queued) | "cancelling" (running: stops at its next step)
#    | "missing" | the terminal status it already had
CANCEL = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2],
             'error_code', 'cancelled', 'error', 'cancelled before it ran')
  redis.call('ZREM', KEYS[2], ARGV[1])
  local sid = redis.call('HGET', KEYS[1], 'stream_id')
  if sid then redis.call('XDEL', KEYS[4], sid) end
  redis.call('XADD', KEYS[3], '*', 'type', 'status', 'status', 'cancelled', 'progress', '0')
  redis.call('XADD', KEYS[5], '*', 'status', 'cancelled')
  redis.call('EXPIRE', KEYS[5], tonumber(ARGV[3]))
  return 'cancelled'
end
if st == 'in_progress' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'cancelling'
end
return st
"""

# KEYS: job, queued, events, done.  ARGV: id, now, worker, max_deliveries, ttl.
# -> "run" | "poison" (delivered max_deliveries times already) | "missing" | "cancelled"
#    | the terminal status it already had
START = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st == 'completed' or st == 'failed' or st == 'cancelled' then return st end
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2],
             'error_code', 'cancelled', 'error', 'cancelled')
  redis.call('XADD', KEYS[3], '*', 'type', 'status', 'status', 'cancelled', 'progress', '0')
  redis.call('XADD', KEYS[4], '*', 'status', 'cancelled')
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[5]))
  return 'cancelled'
end
local delivered = tonumber(redis.call('HGET', KEYS[1], 'deliveries') or '0')
if delivered >= tonumber(ARGV[4]) then return 'poison' end
redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'worker', ARGV[3], 'started_at', ARGV[2],
           'progress', '0', 'step', '0')
redis.call('XADD', KEYS[3], '*', 'type', 'status', 'status', 'in_progress', 'progress', '0')
return 'run'
"""

# KEYS: job, events, stream, durations, done.
# ARGV: group, stream_id, status, now, ttl, error_code, error, images, result_json, duration.
# Acks the stream entry in every case. -> "ok" | "duplicate" (already finished) | "missing"
FINISH = """
redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[3], ARGV[2])
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st == 'completed' or st == 'failed' or st == 'cancelled' then return 'duplicate' end
local progress = redis.call('HGET', KEYS[1], 'progress') or '0'
if ARGV[3] == 'completed' then progress = '100' end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'finished_at', ARGV[4], 'error_code', ARGV[6],
           'error', ARGV[7], 'images', ARGV[8], 'result', ARGV[9], 'progress', progress)
redis.call('XADD', KEYS[2], '*', 'type', 'status', 'status', ARGV[3], 'progress', progress,
           'message', ARGV[7])
local ttl = tonumber(ARGV[5])
redis.call('XADD', KEYS[5], '*', 'status', ARGV[3])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[5], ttl)
if ARGV[3] == 'completed' and ARGV[10] ~= '' then
  redis.call('LPUSH', KEYS[4], ARGV[10])
  redis.call('LTRIM', KEYS[4], 0, 49)
end
return 'ok'
"""
