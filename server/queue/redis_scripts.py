"""Key names and the Lua scripts of the Redis Streams backend (each script is one atomic state change).

Keys, under a prefix ``P`` (``TOKSERVE_REDIS_PREFIX``, default ``tokserve``):

=========================  ===========================================================================
``P:q:{kind}:p{band}``     stream of jobs of one kind (``op:model``) and priority band (2 high, 1 normal,
                           0 low); consumer group ``workers``; entry fields ``job`` (wire bytes), ``id``,
                           ``tries`` (failed deliveries before this entry), ``error`` (the last one)
``P:job:{id}``             hash: status, times, deliveries, step / steps, error, meta (JSON), tracked
``P:res:{id}``             the result (wire bytes), expires after ``job_ttl_s``
``P:ev:{id}``              stream of the job's events; the waiting API blocks on it (XREAD), SSE replays it
``P:idem:{key}``           ``"{job id} {fingerprint}"``, SET NX: one Idempotency-Key, one run
``P:dead``                 dead-letter stream: jobs that failed ``redis_max_deliveries`` deliveries
``P:workers``              set of worker ids; ``P:worker:{id}`` what it serves, with a heartbeat TTL
=========================  ===========================================================================

A job hash leaves ``queued`` / ``running`` exactly once, for ``completed``, ``failed`` or ``cancelled``; the
scripts below check that, so a result is written once however many workers ran the job.
"""

from __future__ import annotations

GROUP = "workers"
BANDS = (2, 1, 0)  # read order: high, normal, low


def band_of(priority: int) -> int:
    """The stream band of a priority: > 0 high, 0 normal, < 0 low (exact order within a worker)."""
    return 2 if priority > 0 else 1 if priority == 0 else 0


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def stream(self, kind: str, band: int) -> str:
        return f"{self.prefix}:q:{kind}:p{band}"

    def streams(self, kind: str) -> list[str]:
        return [self.stream(kind, b) for b in BANDS]

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def result(self, job_id: str) -> str:
        return f"{self.prefix}:res:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:ev:{job_id}"

    def idem(self, key: str | None) -> str:
        return f"{self.prefix}:idem:{key or ''}"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"


_TERMINAL = "st == 'completed' or st == 'failed' or st == 'cancelled'"

# Accept a job, claiming its idempotency key in the same step (so a key always names a job that exists, or
# existed). KEYS: idempotency key, job hash, events stream, jobs stream. ARGV: [1] key value ('' = no key),
# [2] key ttl ms, [3] the value the key may hold to be taken over (its job is gone; '' = none), [4] job ttl
# ms, [5] tracked ('1' / '0'), [6] queued event JSON, [7] events maxlen, [8] job bytes, [9] job id,
# [10] stream maxlen, [11...] the job hash as field, value pairs. Returns 'ok', or the value of the key that
# names another job.
SUBMIT = """
if ARGV[1] ~= '' then
  local cur = redis.call('GET', KEYS[1])
  if cur and cur ~= ARGV[3] then return cur end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
redis.call('HSET', KEYS[2], unpack(ARGV, 11))
redis.call('PEXPIRE', KEYS[2], ARGV[4])
if ARGV[5] == '1' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'type', 'queued', 'data', ARGV[6])
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[10], '*', 'job', ARGV[8], 'id', ARGV[9], 'tries', 0, 'error', '')
return 'ok'
"""

# A worker took a delivery. KEYS: job, events. ARGV: now, worker, deliveries, events maxlen, event JSON.
# Returns the status it had ('missing' when the hash is gone); a terminal job is left alone.
CLAIM = f"""
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if {_TERMINAL} then return st end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[2], 'deliveries', ARGV[3])
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[1])
if redis.call('HGET', KEYS[1], 'tracked') == '1' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'type', 'started', 'data', ARGV[5])
end
return st
"""

# A job ends. KEYS: job, result, events, jobs stream, idempotency key, dead-letter stream.
# ARGV: [1] 'completed' | 'failed', [2] now, [3] ttl ms, [4] result bytes, [5] error JSON, [6] group,
# [7] entry id ('' = none), [8] events maxlen, [9] event JSON, [10] job id, [11] idempotency ttl ms,
# [12] dead-letter job bytes ('' = not dead-lettered), [13] dead-letter maxlen, [14] deliveries.
# Returns 1 when this call ended the job, 0 when it had already ended (a duplicate run) or is gone.
FINISH = f"""
if ARGV[7] ~= '' then redis.call('XACK', KEYS[4], ARGV[6], ARGV[7]) end
if ARGV[12] ~= '' then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[13], '*', 'id', ARGV[10], 'error', ARGV[5],
             'deliveries', ARGV[14], 'time', ARGV[2], 'stream', KEYS[4], 'job', ARGV[12])
end
local st = redis.call('HGET', KEYS[1], 'status')
if not st or {_TERMINAL} then return 0 end
if ARGV[1] == 'completed' then
  redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[3])
  redis.call('HSET', KEYS[1], 'status', 'completed', 'finished_at', ARGV[2])
else
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[2], 'error', ARGV[5])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[8], '*', 'type', ARGV[1], 'data', ARGV[9])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
local v = redis.call('GET', KEYS[5])
if v and string.sub(v, 1, string.len(ARGV[10]) + 1) == ARGV[10] .. ' ' then
  if ARGV[1] == 'completed' then redis.call('PEXPIRE', KEYS[5], ARGV[11]) else redis.call('DEL', KEYS[5]) end
end
return 1
"""

# Queue a taken job again (a retry after a model error, or handed back by a stopping worker), unless it
# ended meanwhile. KEYS: job, events, jobs stream. ARGV: group, old entry id, job bytes, job id, tries,
# error JSON ('' = none), stream maxlen, events maxlen, event JSON. Returns the new entry id, or false.
REQUEUE = f"""
redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
local st = redis.call('HGET', KEYS[1], 'status')
if not st or {_TERMINAL} then return false end
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'job', ARGV[3], 'id', ARGV[4],
                      'tries', ARGV[5], 'error', ARGV[6])
redis.call('HSET', KEYS[1], 'status', 'queued')
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'last_error', ARGV[6]) end
if redis.call('HGET', KEYS[1], 'tracked') == '1' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'type', 'queued', 'data', ARGV[9])
end
return id
"""

# A running job's progress (tracked jobs); nothing once it ended, so the terminal event stays the last one.
# KEYS: job, events. ARGV: step, steps, events maxlen, event JSON.
PROGRESS = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'step', ARGV[1], 'steps', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'type', 'step', 'data', ARGV[4])
return 1
"""

# Cancel (jobs API) or abandon (the caller gave up). KEYS: job, events, idempotency key.
# ARGV: now, ttl ms, events maxlen, event JSON, job id. Returns the status after, or false if unknown.
CANCEL = f"""
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return false end
if {_TERMINAL} then return st end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'type', 'cancelled', 'data', ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local v = redis.call('GET', KEYS[3])
if v and string.sub(v, 1, string.len(ARGV[5]) + 1) == ARGV[5] .. ' ' then redis.call('DEL', KEYS[3]) end
return 'cancelled'
"""

# Keep the deliveries a live worker holds from being reclaimed: reset their idle time, but only of those it
# still owns. KEYS: jobs stream. ARGV: group, consumer, entry ids... Returns the ids it no longer owns.
TOUCH = """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""
