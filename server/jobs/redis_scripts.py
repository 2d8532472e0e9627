"""The Lua scripts of the Redis job store: each change to a job runs atomically in Redis, so
replicas racing on one job (submit with one idempotency key, cancel against finish, a lease taken
over) always agree on its final state.

All keys share the prefix (PREFIX, passed in as ARGV[1]); see redis_store.py for the layout.
"""

from __future__ import annotations

PREFIX = "tg:"

# Shared by the scripts below: remove a job (expired, or evicted by the bound on kept results),
# tell a job's watchers of a change, and settle a job (record its final state). What settling
# does to keys shared by every job (the counts, the pending tallies, the finished set and its
# bound, the finished channel) is gathered and done once per script call, by settled(): a batch
# of N outcomes costs those keys one command each, not N.
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

-- ZADD of flat score, member pairs, 500 pairs a command at most (Lua's unpack has a stack limit).
local function zadd_all(key, flat)
  for i = 1, #flat, 1000 do
    redis.call('ZADD', key, unpack(flat, i, math.min(i + 999, #flat)))
  end
end

-- HINCRBY of each field of a hash by its tally, times sign.
local function hincrby_all(key, tallies, sign)
  for field, n in pairs(tallies) do
    redis.call('HINCRBY', key, field, sign * n)
  end
end

-- A change of the job's state, told to its watchers (whichever replica they are on): the job's
-- event number (the hash's `ev`, already advanced by the caller), then the event, on the channel
-- ev:<id> (nobody listening costs Redis nothing).
local function publish(id, seq, status, attempt, retry, now_ms, code, message)
  redis.call('PUBLISH', P .. 'ev:' .. id, seq .. '|' .. status .. '|' .. attempt .. '|' ..
             retry .. '|' .. now_ms .. '|' .. code .. '|' .. message)
end

local function event(id, status, attempt, retry, now_ms, code, message)
  local seq = redis.call('HINCRBY', P .. 'job:' .. id, 'ev', 1)
  publish(id, seq, status, attempt, retry, now_ms, code, message)
end

local told, finished, counts, pendings, bound = {}, {}, {}, {}, nil

-- held: the job's tenant, attempts, cb and ev fields, where the caller has read them already.
local function settle(id, status, now_ms, ttl_ms, max_finished, code, message, outputs, held)
  local job = P .. 'job:' .. id
  held = held or redis.call('HMGET', job, 'tenant', 'attempts', 'cb', 'ev')
  local tenant = held[1] or ''
  local seq = tonumber(held[4] or '0') + 1
  if outputs ~= '' then
    redis.call('HSET', job, 'status', status, 'finished', now_ms, 'code', code,
               'message', message, 'owner', '', 'ev', seq, 'outputs', outputs)
  else
    redis.call('HSET', job, 'status', status, 'finished', now_ms, 'code', code,
               'message', message, 'owner', '', 'ev', seq)
  end
  redis.call('HDEL', job, 'request')
  -- The sweep removes it once ttl_ms has passed; the key's own expiry is a safety net.
  redis.call('PEXPIRE', job, ttl_ms + 3600000)
  publish(id, seq, status, held[2] or '0', '0', now_ms, code, message)
  if held[3] and held[3] ~= '' then
    -- Its webhook is due now; the deliverers of every replica poll this set.
    redis.call('ZADD', P .. 'hooks', now_ms, id)
  end
  pendings[tenant] = (pendings[tenant] or 0) + 1
  counts[status] = (counts[status] or 0) + 1
  finished[#finished + 1] = now_ms
  finished[#finished + 1] = id
  told[#told + 1] = id .. ' ' .. status
  bound = max_finished
end

-- The shared keys' part of every settle() of this call; then one message tells every replica's
-- waiters of them all.
local function settled()
  if #told == 0 then
    return
  end
  hincrby_all(P .. 'pending', pendings, -1)
  hincrby_all(P .. 'count', counts, 1)
  zadd_all(P .. 'done', finished)
  local over = redis.call('ZCARD', P .. 'done') - bound
  if over > 0 then
    for _, old in ipairs(redis.call('ZRANGE', P .. 'done', 0, over - 1)) do
      remove(old)
    end
  end
  redis.call('PUBLISH', P .. 'finished', table.concat(told, '\\n'))
end

local function expired(job, now_ms, ttl_ms)
  local finished_ms = redis.call('HGET', job, 'finished')
  return finished_ms and finished_ms ~= '' and tonumber(finished_ms) + ttl_ms <= now_ms
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
  settled()
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
# count N, then per job: its id, idempotency key ('' = none), model, tenant, a count F, and F
# arguments: the job hash's fields and values (its request blob among them; the fields with
# nothing to say left out), set as they come.
# (The client packs every argument in one C call, and Lua takes them as they are: no JSON.)
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
local replies, queued, held, added, created = {}, {}, {}, {}, {}
for _ = 1, count do
  local id, key, model, tenant = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  local first = at + 5
  local last = at + 4 + tonumber(ARGV[at + 4])
  at = last + 1
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
    -- The tenant's unfinished jobs are read once per call (only when bounded) and counted here.
    if max_per_tenant > 0 and held[tenant] == nil then
      held[tenant] = tonumber(redis.call('HGET', P .. 'pending', tenant) or '0')
    end
    if pending >= max_pending then
      replies[#replies + 1] = -1
      replies[#replies + 1] = tostring(pending)
    elseif max_per_tenant > 0 and held[tenant] >= max_per_tenant then
      replies[#replies + 1] = -2
      replies[#replies + 1] = tostring(held[tenant])
    else
      local ahead = queued[stream] or redis.call('XLEN', stream)
      local entry = redis.call('XADD', stream, '*', 'id', id)
      queued[stream] = ahead + 1
      if key ~= '' then
        redis.call('SET', key, id)
        redis.call('HSET', job, 'entry', entry, 'idem', key, unpack(ARGV, first, last))
      else
        redis.call('HSET', job, 'entry', entry, unpack(ARGV, first, last))
      end
      added[tenant] = (added[tenant] or 0) + 1
      if held[tenant] ~= nil then
        held[tenant] = held[tenant] + 1
      end
      created[#created + 1] = now_ms
      created[#created + 1] = id
      pending = pending + 1
      replies[#replies + 1] = 1
      replies[#replies + 1] = ahead
    end
  end
end
hincrby_all(P .. 'pending', added, 1)
zadd_all(P .. 'jobs', created)
return replies
"""
)

# Stream entries of one model delivered to this replica, each claimed as CLAIM did. ARGV: prefix,
# group, consumer, max_attempts, now_ms, ttl_ms, max_finished, the model, a count C, a count E,
# then E entries read by the caller, each as two arguments: its entry id and job id. No entries
# (E = 0): the script reads up to C new ones itself (XREADGROUP without blocking), so under load
# one call both reads and claims. For each entry: start the job (its fields are returned), drop
# the entry of a job that finished (cancelled) or was handed back meanwhile, or dead-letter a job
# whose attempts ran out (false). Returns per entry three values: its entry id, its job id, and
# that answer; nothing when nothing was read.
CLAIM_MANY = (
    _COMMON
    + """
local group, consumer = ARGV[2], ARGV[3]
local max_attempts, now_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local ttl_ms, max_finished = tonumber(ARGV[6]), tonumber(ARGV[7])
local stream = P .. 'q:' .. ARGV[8]
local pairs_ = {}
local given = tonumber(ARGV[10])
if given > 0 then
  for i = 1, given do
    pairs_[i] = {ARGV[9 + i * 2], ARGV[10 + i * 2]}
  end
else
  local read = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', ARGV[9],
                          'STREAMS', stream, '>')
  for i, item in ipairs(read and read[1][2] or {}) do
    pairs_[i] = {item[1], item[2][2]}  -- an entry's fields are 'id' and the job's id
  end
end
local replies = {}
for i, pair in ipairs(pairs_) do
  local entry, id = pair[1], pair[2]
  local job = P .. 'job:' .. id
  -- Everything the claim reads, in one read: 1 status, 2 entry, 3 attempts, 4 code, 5 message,
  -- 6 started, 7 ev, 8 model, 9 tenant, 10 rid, 11 created, 12 request, 13 tp, 14 cb, 15 cbr.
  local f = redis.call('HMGET', job, 'status', 'entry', 'attempts', 'code', 'message',
                       'started', 'ev', 'model', 'tenant', 'rid', 'created', 'request', 'tp',
                       'cb', 'cbr')
  local status = f[1]
  local reply = false
  if not status or f[2] ~= entry or (status ~= 'PENDING' and status ~= 'RUNNING') then
    redis.call('XACK', stream, group, entry)
    redis.call('XDEL', stream, entry)
  else
    local attempts = tonumber(f[3])
    if attempts >= max_attempts then
      local last = f[5] or ''
      if last == '' then
        last = 'the replicas running it stopped before it finished'
      end
      local code = f[4] or ''
      if code == '' then
        code = 'UNAVAILABLE'
      end
      redis.call('XACK', stream, group, entry)
      redis.call('XDEL', stream, entry)
      settle(id, 'FAILED', now_ms, ttl_ms, max_finished, code,
             'gave up after ' .. attempts .. ' attempts: ' .. last, '', {f[9], f[3], f[14], f[7]})
      redis.call('XADD', P .. 'dead', 'MAXLEN', '~', '100000', '*', 'id', id,
                 'model', f[8], 'attempts', attempts, 'error', last)
    else
      local started = f[6]
      if not started or started == '' then
        started = tostring(now_ms)
      end
      local seq = tonumber(f[7] or '0') + 1
      redis.call('HSET', job, 'status', 'RUNNING', 'owner', consumer, 'attempts', attempts + 1,
                 'started', started, 'ev', seq)
      publish(id, seq, 'RUNNING', attempts + 1, '0', now_ms, '', '')
      reply = {f[8], f[9], f[10], tostring(attempts + 1), f[11], f[12], f[13], started, f[14],
               f[15]}
    end
  end
  replies[#replies + 1] = entry
  replies[#replies + 1] = id
  replies[#replies + 1] = reply
end
settled()
return replies
"""
)

# Many held jobs' outcomes, each as FINISH. ARGV: prefix, group, ttl_ms, max_finished, consumer,
# job count N, then per job eight arguments: entry, status, finished_ms, code, message, id,
# model, and its outputs blob.
# Returns per job the final status (a cancellation recorded first stays), 'GONE', or 'NOT_OURS':
# the job was handed back, or taken over by another replica after this one's lease lapsed, and
# the outcome is the new holder's to record. With RELEASE's own check, finishing and handing back
# are exclusive: whichever script runs first wins, so a job handed back is never also finished by
# the process that held it.
FINISH_MANY = (
    _COMMON
    + """
local group, ttl_ms, max_finished, consumer = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local replies, acked = {}, {}
for i = 0, tonumber(ARGV[6]) - 1 do
  local at = 7 + i * 8
  local entry, wanted, now_ms = ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2])
  local code, message, id, model = ARGV[at + 3], ARGV[at + 4], ARGV[at + 5], ARGV[at + 6]
  local outputs = ARGV[at + 7]
  local job, stream = P .. 'job:' .. id, P .. 'q:' .. model
  -- 1 status, 2 owner, 3 entry, then what settle() reads: 4 tenant, 5 attempts, 6 cb, 7 ev.
  local f = redis.call('HMGET', job, 'status', 'owner', 'entry', 'tenant', 'attempts', 'cb', 'ev')
  local status = f[1]
  local reply
  if status == 'PENDING' or (status == 'RUNNING' and (f[2] ~= consumer or f[3] ~= entry)) then
    redis.call('HINCRBY', P .. 'stats', 'dropped_results', 1)
    reply = 'NOT_OURS'
  else
    -- Acknowledged and deleted together below, a command per stream for the whole batch.
    local entries = acked[stream]
    if entries == nil then
      entries = {}
      acked[stream] = entries
    end
    entries[#entries + 1] = entry
    if not status then
      reply = 'GONE'
    elseif status ~= 'RUNNING' then
      if status ~= 'CANCELLED' then
        redis.call('HINCRBY', P .. 'stats', 'duplicate_runs', 1)
      end
      reply = status
    else
      settle(id, wanted, now_ms, ttl_ms, max_finished, code, message, outputs,
             {f[4], f[5], f[6], f[7]})
      if wanted == 'FAILED' then
        redis.call('XADD', P .. 'dead', 'MAXLEN', '~', '100000', '*', 'id', id,
                   'model', model, 'attempts', f[5], 'error', message)
      end
      reply = wanted
    end
  end
  replies[i + 1] = reply
end
for stream, entries in pairs(acked) do
  for i = 1, #entries, 1000 do
    local part = {unpack(entries, i, math.min(i + 999, #entries))}
    redis.call('XACK', stream, group, unpack(part))
    redis.call('XDEL', stream, unpack(part))
  end
end
settled()
return replies
"""
)
