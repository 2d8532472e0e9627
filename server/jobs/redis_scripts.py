"""The Lua scripts of the Redis job store: each change to a job runs atomically in Redis, so
replicas racing on one job (submit with one idempotency key, cancel against finish, a lease taken
over) always agree on its final state.

All keys share the prefix (PREFIX, passed in as ARGV[1]); see redis_store.py for the layout.
"""

from __future__ import annotations

PREFIX = "tg:"

# Shared by the scripts below: remove a job (expired, or evicted by the bound on kept results),
# and settle one (record its final state, count it, wake every replica's waiters).
_COMMON = """
local P = ARGV[1]

local function remove(id)
  local job = P .. 'job:' .. id
  local fields = redis.call('HMGET', job, 'status', 'idem')
  if fields[1] then
    redis.call('HINCRBY', P .. 'count', fields[1], -1)
  end
  if fields[2] and fields[2] ~= '' and redis.call('GET', fields[2]) == id then
    redis.call('DEL', fields[2])
  end
  redis.call('DEL', job)
  redis.call('ZREM', P .. 'jobs', id)
  redis.call('ZREM', P .. 'done', id)
  redis.call('ZREM', P .. 'hooks', id)
end

-- A change of the job's state, told to its watchers (whichever replica they are on): the job's
-- event number, then the event, on the channel ev:<id> (nobody listening costs Redis nothing).
local function event(id, status, attempt, retry, now_ms, code, message)
  local seq = redis.call('HINCRBY', P .. 'job:' .. id, 'ev', 1)
  redis.call('PUBLISH', P .. 'ev:' .. id, seq .. '|' .. status .. '|' .. attempt .. '|' ..
             retry .. '|' .. now_ms .. '|' .. code .. '|' .. message)
end

local function settle(id, status, now_ms, ttl_ms, max_finished, code, message, outputs)
  local job = P .. 'job:' .. id
  local held = redis.call('HMGET', job, 'tenant', 'attempts', 'cb')
  redis.call('HINCRBY', P .. 'pending', held[1] or '', -1)
  redis.call('HSET', job, 'status', status, 'finished', now_ms, 'code', code,
             'message', message, 'owner', '')
  if outputs ~= '' then
    redis.call('HSET', job, 'outputs', outputs)
  end
  redis.call('HDEL', job, 'request')
  -- The sweep removes it once ttl_ms has passed; the key's own expiry is a safety net.
  redis.call('PEXPIRE', job, ttl_ms + 3600000)
  redis.call('ZADD', P .. 'done', now_ms, id)
  redis.call('HINCRBY', P .. 'count', status, 1)
  event(id, status, held[2] or '0', '0', now_ms, code, message)
  if held[3] and held[3] ~= '' then
    -- Its webhook is due now; the deliverers of every replica poll this set.
    redis.call('ZADD', P .. 'hooks', now_ms, id)
  end
  local over = redis.call('ZCARD', P .. 'done') - max_finished
  if over > 0 then
    for _, old in ipairs(redis.call('ZRANGE', P .. 'done', 0, over - 1)) do
      remove(old)
    end
  end
  redis.call('PUBLISH', P .. 'finished', id .. ' ' .. status)
end

local function expired(job, now_ms, ttl_ms)
  local finished = redis.call('HGET', job, 'finished')
  return finished and finished ~= '' and tonumber(finished) + ttl_ms <= now_ms
end
"""

# Cancel an unfinished job. KEYS: the job. ARGV: prefix, tenant, now_ms, ttl_ms, max_finished, id.
# Returns 1, or 0 when unknown or another tenant's.
CANCEL = (
    _COMMON
    + """
local fields = redis.call('HMGET', KEYS[1], 'status', 'tenant', 'entry', 'model')
if not fields[1] or fields[2] ~= ARGV[2] then
  return 0
end
if fields[1] == 'PENDING' then
  -- Not delivered yet (or delivered and not started): it never runs.
  redis.call('XDEL', P .. 'q:' .. fields[4], fields[3])
end
if fields[1] == 'PENDING' or fields[1] == 'RUNNING' then
  settle(ARGV[6], 'CANCELLED', tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
         'CANCELLED', 'the job was cancelled', '')
end
return 1
"""
)

# Hand a held job back to its stream (shutdown). KEYS: the job, its stream. ARGV: prefix, entry,
# group, consumer, started ('1': its attempt stays counted), id, now_ms.
RELEASE = (
    _COMMON
    + """
redis.call('XACK', KEYS[2], ARGV[3], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
local fields = redis.call('HMGET', KEYS[1], 'status', 'entry', 'owner')
if fields[1] ~= 'RUNNING' or fields[2] ~= ARGV[2] or fields[3] ~= ARGV[4] then
  return 0
end
local entry = redis.call('XADD', KEYS[2], '*', 'id', ARGV[6])
redis.call('HSET', KEYS[1], 'status', 'PENDING', 'entry', entry, 'owner', '')
local attempts = redis.call('HGET', KEYS[1], 'attempts')
if ARGV[5] ~= '1' then
  attempts = redis.call('HINCRBY', KEYS[1], 'attempts', -1)
end
event(ARGV[6], 'PENDING', attempts, '0', ARGV[7], '', '')
return 1
"""
)

# A held job failed and runs again. KEYS: the job. ARGV: prefix, id, attempts, code, message,
# now_ms.
RETRY = (
    _COMMON
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'RUNNING' then
  return 0
end
redis.call('HSET', KEYS[1], 'attempts', ARGV[3], 'code', ARGV[4], 'message', ARGV[5])
event(ARGV[2], 'RUNNING', ARGV[3], '1', ARGV[6], ARGV[4], ARGV[5])
return 1
"""
)

# Forget a finished job now (DeleteOperation). KEYS: the job. ARGV: prefix, tenant, id. Returns
# 1 (forgotten), 2 (unfinished: kept) or 0 (unknown, or another tenant's).
DELETE = (
    _COMMON
    + """
local fields = redis.call('HMGET', KEYS[1], 'status', 'tenant')
if not fields[1] or fields[2] ~= ARGV[2] then
  return 0
end
if fields[1] == 'PENDING' or fields[1] == 'RUNNING' then
  return 2
end
remove(ARGV[3])
return 1
"""
)

# Webhooks due now, leased to this replica for lease_ms (past it, any replica takes them again).
# ARGV: prefix, now_ms, lease_ms, limit. Returns their job ids.
HOOKS_DUE = """
local P = ARGV[1]
local due = redis.call('ZRANGEBYSCORE', P .. 'hooks', '-inf', ARGV[2], 'LIMIT', 0, ARGV[4])
for _, id in ipairs(due) do
  redis.call('ZADD', P .. 'hooks', tonumber(ARGV[2]) + tonumber(ARGV[3]), id)
end
return due
"""

# The outcome of a webhook attempt. KEYS: the job. ARGV: prefix, id, state, attempts, last error,
# next_ms (when to try again; '' when settled), model.
HOOK_DONE = """
local P = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', P .. 'hooks', ARGV[2])
  return 0
end
redis.call('HSET', KEYS[1], 'hs', ARGV[3], 'hn', ARGV[4], 'he', ARGV[5])
if ARGV[6] ~= '' then
  redis.call('ZADD', P .. 'hooks', ARGV[6], ARGV[2])
else
  redis.call('ZREM', P .. 'hooks', ARGV[2])
end
if ARGV[3] == 'DELIVERY_FAILED' then
  redis.call('XADD', P .. 'hooks:dead', 'MAXLEN', '~', '100000', '*', 'id', ARGV[2],
             'model', ARGV[7], 'attempts', ARGV[4], 'error', ARGV[5])
end
return 1
"""

# Remove results older than the TTL. ARGV: prefix, cutoff_ms, limit. Returns how many.
SWEEP = (
    _COMMON
    + """
local old = redis.call('ZRANGEBYSCORE', P .. 'done', '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(old) do
  remove(id)
end
return #old
"""
)

# --- batches: one script call for the jobs of one loop iteration (a burst of Submits, the
# entries of one stream read, the outcomes of one batch) ----------------------------------------

# Many jobs submitted at once. ARGV: prefix, now_ms, ttl_ms, max_pending, max_per_tenant,
# model count M, the M model names (every served model: the pending bound counts them all), job
# count N, then per job two arguments: a JSON array [id, idempotency key ('' = none), fields]
# whose fields are an object of strings (model and tenant among them), and its request blob.
# (Every argument costs the client a Python call or several to pack: two per job, not forty.)
# Returns per job two values: {0, existing id} (deduplicated), {-1, pending} (over the bound),
# {-2, the tenant's unfinished jobs} (over its bound) or {1, unfinished jobs of the model before
# it}.
SUBMIT_MANY = (
    _COMMON
    + """
local now_ms, ttl_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
local max_pending, max_per_tenant = tonumber(ARGV[4]), tonumber(ARGV[5])
local models = tonumber(ARGV[6])
local pending = 0
for i = 1, models do
  pending = pending + redis.call('XLEN', P .. 'q:' .. ARGV[6 + i])
end
local at = 7 + models
local count = tonumber(ARGV[at])
at = at + 1
local replies = {}
for _ = 1, count do
  local meta, request = cjson.decode(ARGV[at]), ARGV[at + 1]
  at = at + 2
  local id, key, fields = meta[1], meta[2], meta[3]
  local model, tenant = fields['model'], fields['tenant']
  local job, stream = P .. 'job:' .. id, P .. 'q:' .. model
  local done = false
  if key ~= '' then
    local existing = redis.call('GET', key)
    if existing then
      local other = P .. 'job:' .. existing
      if redis.call('EXISTS', other) == 1 and not expired(other, now_ms, ttl_ms) then
        replies[#replies + 1] = 0
        replies[#replies + 1] = existing
        done = true
      end
    end
  end
  if not done then
    local held = tonumber(redis.call('HGET', P .. 'pending', tenant) or '0')
    if pending >= max_pending then
      replies[#replies + 1] = -1
      replies[#replies + 1] = tostring(pending)
    elseif max_per_tenant > 0 and held >= max_per_tenant then
      replies[#replies + 1] = -2
      replies[#replies + 1] = tostring(held)
    else
      local ahead = redis.call('XLEN', stream)
      redis.call('HINCRBY', P .. 'pending', tenant, 1)
      local flat = {'request', request}
      for name, value in pairs(fields) do
        flat[#flat + 1] = name
        flat[#flat + 1] = value
      end
      redis.call('HSET', job, unpack(flat))
      local entry = redis.call('XADD', stream, '*', 'id', id)
      redis.call('HSET', job, 'entry', entry)
      if key ~= '' then
        redis.call('SET', key, id)
        redis.call('HSET', job, 'idem', key)
      end
      redis.call('ZADD', P .. 'jobs', now_ms, id)
      pending = pending + 1
      replies[#replies + 1] = 1
      replies[#replies + 1] = ahead
    end
  end
end
return replies
"""
)

# Many stream entries of one model delivered to this replica, each as CLAIM. ARGV: prefix,
# group, consumer, max_attempts, now_ms, ttl_ms, max_finished, the model, then a JSON array of
# [entry id, job id] pairs. For each: start the job (its fields are returned), drop the entry of a
# job that finished (cancelled) or was handed back meanwhile, or dead-letter a job whose attempts
# ran out (false).
CLAIM_MANY = (
    _COMMON
    + """
local group, consumer = ARGV[2], ARGV[3]
local max_attempts, now_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local ttl_ms, max_finished = tonumber(ARGV[6]), tonumber(ARGV[7])
local stream = P .. 'q:' .. ARGV[8]
local replies = {}
for i, pair in ipairs(cjson.decode(ARGV[9])) do
  local entry, id = pair[1], pair[2]
  local job = P .. 'job:' .. id
  local fields = redis.call('HMGET', job, 'status', 'entry', 'attempts', 'code', 'message')
  local status = fields[1]
  local reply = false
  if not status or fields[2] ~= entry or (status ~= 'PENDING' and status ~= 'RUNNING') then
    redis.call('XACK', stream, group, entry)
    redis.call('XDEL', stream, entry)
  else
    local attempts = tonumber(fields[3])
    if attempts >= max_attempts then
      local last = fields[5] or ''
      if last == '' then
        last = 'the replicas running it stopped before it finished'
      end
      local code = fields[4] or ''
      if code == '' then
        code = 'UNAVAILABLE'
      end
      redis.call('XACK', stream, group, entry)
      redis.call('XDEL', stream, entry)
      settle(id, 'FAILED', now_ms, ttl_ms, max_finished, code,
             'gave up after ' .. attempts .. ' attempts: ' .. last, '')
      redis.call('XADD', P .. 'dead', 'MAXLEN', '~', '100000', '*', 'id', id,
                 'model', redis.call('HGET', job, 'model'), 'attempts', attempts, 'error', last)
    else
      redis.call('HSET', job, 'status', 'RUNNING', 'owner', consumer, 'attempts', attempts + 1)
      if redis.call('HGET', job, 'started') == '' then
        redis.call('HSET', job, 'started', now_ms)
      end
      event(id, 'RUNNING', attempts + 1, '0', now_ms, '', '')
      reply = redis.call('HMGET', job, 'model', 'tenant', 'rid', 'attempts', 'created',
                         'request', 'tp', 'started', 'cb', 'cbr')
    end
  end
  replies[i] = reply
end
return replies
"""
)

# Many held jobs' outcomes, each as FINISH. ARGV: prefix, group, ttl_ms, max_finished, consumer,
# job count N, then per job two arguments: a JSON array [entry, status, finished_ms, code,
# message, id, model] and its outputs blob.
# Returns per job the final status (a cancellation recorded first stays), 'GONE', or 'NOT_OURS':
# the job was handed back, or taken over by another replica after this one's lease lapsed, and
# the outcome is the new holder's to record. With RELEASE's own check, finishing and handing back
# are exclusive: whichever script runs first wins, so a job handed back is never also finished by
# the process that held it.
FINISH_MANY = (
    _COMMON
    + """
local group, ttl_ms, max_finished, consumer = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local replies = {}
for i = 0, tonumber(ARGV[6]) - 1 do
  local meta, outputs = cjson.decode(ARGV[7 + i * 2]), ARGV[8 + i * 2]
  local entry, wanted, now_ms = meta[1], meta[2], tonumber(meta[3])
  local code, message, id = meta[4], meta[5], meta[6]
  local job, stream = P .. 'job:' .. id, P .. 'q:' .. meta[7]
  local fields = redis.call('HMGET', job, 'status', 'owner', 'entry')
  local status = fields[1]
  local reply
  if status == 'PENDING' or (status == 'RUNNING' and (fields[2] ~= consumer
                                                      or fields[3] ~= entry)) then
    redis.call('HINCRBY', P .. 'stats', 'dropped_results', 1)
    reply = 'NOT_OURS'
  else
    redis.call('XACK', stream, group, entry)
    redis.call('XDEL', stream, entry)
    if not status then
      reply = 'GONE'
    elseif status ~= 'RUNNING' then
      if status ~= 'CANCELLED' then
        redis.call('HINCRBY', P .. 'stats', 'duplicate_runs', 1)
      end
      reply = status
    else
      settle(id, wanted, now_ms, ttl_ms, max_finished, code, message, outputs)
      if wanted == 'FAILED' then
        redis.call('XADD', P .. 'dead', 'MAXLEN', '~', '100000', '*', 'id', id,
                   'model', redis.call('HGET', job, 'model'),
                   'attempts', redis.call('HGET', job, 'attempts'), 'error', message)
      end
      reply = wanted
    end
  end
  replies[i + 1] = reply
end
return replies
"""
)
