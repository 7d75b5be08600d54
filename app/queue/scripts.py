"""The queue's atomic steps as Lua scripts, with the KEYS / ARGV each expects.

Both sides use them (the API through redis.asyncio, workers through sync redis), so a job's
life — queued, taken, finished — is decided in one place and never half-written.
"""

from __future__ import annotations

__all__ = ["CANCEL", "ENQUEUE", "FINISH", "RECONCILE", "START"]

# Removes from a queued set (KEYS[qi]) the jobs that can no longer run: those queued longer
# ago than the record's TTL (their record has expired), and, when ``full`` is set, every member
# whose record is gone (evicted, deleted) or no longer queued. ``prefix`` + id is a job's key.
_PRUNE = """
local function prune(queued, prefix, now, ttl, full)
  local removed = redis.call('ZREMRANGEBYSCORE', queued, '-inf', '(' .. (now - ttl))
  if full then
    for _, id in ipairs(redis.call('ZRANGE', queued, 0, -1)) do
      if redis.call('HGET', prefix .. id, 'status') ~= 'queued' then
        redis.call('ZREM', queued, id)
        removed = removed + 1
      end
    end
  end
  return removed
end
"""

# KEYS: queued.  ARGV: job key prefix, now, ttl.  -> members removed
RECONCILE = (
    _PRUNE
    + """
return prune(KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), true)
"""
)

# All or nothing: queues every job given, or none when one of their queues is full.
# KEYS: idempotency, then per job: job, queued, stream, events.
# ARGV: queue_max, ttl, now, use_idempotency ("1"/"0"), job key prefix,
#       then per job: id, field count, field, value, ...
# -> {"queued", position, ...} (one per job) | {"full", job index (1-based), depth}
#    | {"existing", job_id}
ENQUEUE = (
    _PRUNE
    + """
if ARGV[4] == '1' then
  local existing = redis.call('GET', KEYS[1])
  if existing then return {'existing', existing} end
end
local max, ttl, now, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[5]
local jobs, a = {}, 6
while a <= #ARGV do
  local count = tonumber(ARGV[a + 1])
  local fields = {}
  for i = a + 2, a + 1 + count do fields[#fields + 1] = ARGV[i] end
  local k = 1 + 4 * #jobs
  jobs[#jobs + 1] = {id = ARGV[a], fields = fields, job = KEYS[k + 1], queued = KEYS[k + 2],
                     stream = KEYS[k + 3], events = KEYS[k + 4]}
  a = a + 2 + count
end
local incoming = {}
for _, j in ipairs(jobs) do incoming[j.queued] = (incoming[j.queued] or 0) + 1 end
for i, j in ipairs(jobs) do
  prune(j.queued, prefix, now, ttl, false)
  local depth = redis.call('ZCARD', j.queued)
  if depth + incoming[j.queued] > max then
    prune(j.queued, prefix, now, ttl, true)  -- records gone early (evicted, deleted)?
    depth = redis.call('ZCARD', j.queued)
    if depth + incoming[j.queued] > max then return {'full', i, tostring(depth)} end
  end
end
local positions = {'queued'}
for _, j in ipairs(jobs) do
  positions[#positions + 1] = tostring(redis.call('ZCARD', j.queued))
  redis.call('HSET', j.job, unpack(j.fields))
  local sid = redis.call('XADD', j.stream, '*', 'job', j.id)
  redis.call('HSET', j.job, 'stream_id', sid)
  redis.call('EXPIRE', j.job, ttl)
  redis.call('ZADD', j.queued, now, j.id)
  redis.call('XADD', j.events, '*', 'type', 'status', 'status', 'queued', 'progress', '0')
  redis.call('EXPIRE', j.events, ttl)
end
if ARGV[4] == '1' then redis.call('SET', KEYS[1], jobs[1].id, 'EX', ttl) end
return positions
"""
)

# KEYS: job, queued, events, stream, done.  ARGV: id, now, ttl.
# -> "cancelled" (it was queued) | "cancelling" (running: stops at its next step)
#    | "missing" | "already_" .. the terminal status it already had (cancelling is idempotent)
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
return 'already_' .. st
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
