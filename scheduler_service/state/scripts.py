"""The Lua scripts of ``RedisStore``: each durable write is one script, run atomically in Redis.

Every write script starts with ``HOLDS``, the fencing check (see ``store``'s docstring): a scheduler
that lost its leader lease writes nothing. Kept apart from the store so that its Python reads as
what it does, and each script sits next to the comment saying which KEYS and ARGV it takes.
"""

from __future__ import annotations

# KEYS[1] = leader, KEYS[2] = fence; ARGV[1] = instance, ARGV[2] = ttl_ms. The fence is INCR'd only
# when the lease is taken, in the same atomic step, and never below Redis's clock in ms: a Redis
# that lost the counter (restarted without persistence, or AOF "everysec" losing its last second)
# still hands out fences above every earlier leader's, which workers have seen. A lease held under
# our own instance id is a previous incarnation of this process slot (kill -9, then restarted by
# its supervisor): taken over at once, with a new fence.
ACQUIRE = """
local h = redis.call('GET', KEYS[1])
if h and h ~= ARGV[1] and string.sub(h, 1, #ARGV[1] + 1) ~= ARGV[1] .. ':' then return false end
local f = redis.call('INCR', KEYS[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if f < now then
  f = now
  redis.call('SET', KEYS[2], string.format('%d', f))
end
local fence = string.format('%d', f)
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. fence, 'PX', ARGV[2])
return fence
"""

# The lease check every fenced script starts with. KEYS[1] = leader, KEYS[2] = fence; ARGV[1] =
# our lease value ('' = unfenced), ARGV[2] = our fence, ARGV[3] = the lease TTL in ms. A lease
# gone while the counter still says ours (or is gone too: Redis lost its data) was not taken by
# anyone since: it is taken back (and the counter restored).
HOLDS = """
local function holds()
  if ARGV[1] == '' then return true end
  local h = redis.call('GET', KEYS[1])
  if h == ARGV[1] then return true end
  if h then return false end
  local f = redis.call('GET', KEYS[2])
  if f and f ~= ARGV[2] then return false end
  if not f then redis.call('SET', KEYS[2], ARGV[2]) end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return true
end
"""

RENEW = HOLDS + """
if not holds() then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

# KEYS[3..7] = live, req, out, tim, lp; ARGV[4] = request id, ARGV[5] = arrival, ARGV[6..] = hash fields.
# An id whose record is still there (live, or finished and kept for finished_ttl_s) is refused
# (ID_TAKEN): a new Submit must never take over another request's record, tokens or expiry. The one
# exception is this very accept sent again (redis-py re-sends a script whose reply was lost): its
# record has the same arrival, and it is answered 1 without writing anything. A record without its
# prompt (only status fields, written by a commit or a cancel after Redis lost the record) is no
# request: it goes, with any outputs, and the new record takes its place.
ADD_REQUEST = HOLDS + """
if not holds() then return 0 end
local arrival = redis.call('HGET', KEYS[4], 'arrival')
if arrival == ARGV[5] then return 1 end
if redis.call('HEXISTS', KEYS[4], 'prompt') == 1 then return -1 end
redis.call('DEL', KEYS[4], KEYS[5], KEYS[6], KEYS[7])
redis.call('HSET', KEYS[4], unpack(ARGV, 6))
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
return 1
"""
ID_TAKEN = -1
"""What ``ADD_REQUEST`` answers for an id that another request's record holds."""

# A Submit whose record was not confirmed by enough replicas is not accepted: its record goes.
# KEYS[3..7] = live, req, out, tim, lp; ARGV[4] = request id.
WITHDRAW = HOLDS + """
if not holds() then return 0 end
redis.call('ZREM', KEYS[3], ARGV[4])
redis.call('DEL', KEYS[4], KEYS[5], KEYS[6], KEYS[7])
return 1
"""

# One iteration, one script (a pipeline of hundreds of APPENDs cost more in client-side command
# packing than the Redis work itself). KEYS[3] = live, then the keys of each section in order;
# ARGV[4] = finished TTL, ARGV[5..10] = the sections' sizes (appends, statuses, preemption counts,
# finished requests, logprob appends, truncations), then their values: appends, logprob appends,
# truncations, statuses, preemption counts, finished ids. Each append is (tokens, times, expected length of out in
# bytes; -1 = unchecked) so that the script is idempotent: redis-py re-sends a command whose reply
# was lost, and a second APPEND would repeat tokens. Tokens already there are skipped; an output
# shorter than expected (Redis lost acknowledged writes: a failover, AOF everysec on a crashed
# machine) writes nothing and returns the out keys with the gap, for the caller to restore. A
# logprob append (key lp; ARGV: the number of its append, 1-based, the records, and the expected
# length of lp in bytes, -1 = unchecked: then it lands exactly when its tokens do) is checked the
# same way, its gap reported as its out key (the caller restores out, tim and lp together), so lp
# stays aligned with out. A truncation (keys out, tim, lp; ARGV: the tokens kept and the bytes of
# their logprob records) cuts a request's output to its first tokens, for a request finished by a
# gateway's stop string (tokens written after the one that completed it go); cutting twice cuts
# nothing more, so it is idempotent too. Each finished request has 4 keys: req, out, tim, lp.
COMMIT = HOLDS + """
if not holds() then return 0 end
local k, a = 4, 11
local n, m = tonumber(ARGV[5]), tonumber(ARGV[9])
local gaps = {}
local function gap(key, off, len)
  if off < 0 then return false end
  local cur = redis.call('STRLEN', key)
  return cur < off or (cur > off and cur < off + len)
end
for i = 0, n - 1 do
  if gap(KEYS[k + 2 * i], tonumber(ARGV[a + 3 * i + 2]), #ARGV[a + 3 * i]) then gaps[#gaps + 1] = KEYS[k + 2 * i] end
end
for j = 0, m - 1 do
  local b = a + 3 * n + 3 * j
  if gap(KEYS[k + 2 * n + j], tonumber(ARGV[b + 2]), #ARGV[b + 1]) then
    gaps[#gaps + 1] = KEYS[k + 2 * (tonumber(ARGV[b]) - 1)]
  end
end
if #gaps > 0 then return gaps end
local wrote = {}
for i = 1, n do
  local off = tonumber(ARGV[a + 2])
  if off < 0 or redis.call('STRLEN', KEYS[k]) == off then
    redis.call('APPEND', KEYS[k], ARGV[a]); redis.call('APPEND', KEYS[k + 1], ARGV[a + 1])
    wrote[i] = true
  end
  k = k + 2; a = a + 3
end
for _ = 1, m do
  local off = tonumber(ARGV[a + 2])
  if (off < 0 and wrote[tonumber(ARGV[a])]) or (off >= 0 and redis.call('STRLEN', KEYS[k]) == off) then
    redis.call('APPEND', KEYS[k], ARGV[a + 1])
  end
  k = k + 1; a = a + 3
end
local function cut(key, len)
  if redis.call('STRLEN', key) > len then
    if len == 0 then redis.call('DEL', key) else redis.call('SET', key, redis.call('GETRANGE', key, 0, len - 1)) end
  end
end
for _ = 1, tonumber(ARGV[10]) do
  local kept = tonumber(ARGV[a])
  cut(KEYS[k], 4 * kept); cut(KEYS[k + 1], 8 * kept); cut(KEYS[k + 2], tonumber(ARGV[a + 1]))
  k = k + 3; a = a + 2
end
for _ = 1, tonumber(ARGV[6]) do
  redis.call('HSET', KEYS[k], 'status', ARGV[a], 'finish_reason', ARGV[a + 1]); k = k + 1; a = a + 2
end
for _ = 1, tonumber(ARGV[7]) do redis.call('HSET', KEYS[k], 'preemptions', ARGV[a]); k = k + 1; a = a + 1 end
for _ = 1, tonumber(ARGV[8]) do
  redis.call('ZREM', KEYS[3], ARGV[a]); a = a + 1
  for _ = 1, 4 do redis.call('EXPIRE', KEYS[k], ARGV[4]); k = k + 1 end
end
return 1
"""

# KEYS[3..5] = out, tim, lp; ARGV[4..6] = their whole contents: a request's output as delivered
# (no lp key when ARGV[6] is empty: the request did not ask for logprobs).
RESTORE_OUTPUT = HOLDS + """
if not holds() then return 0 end
redis.call('SET', KEYS[3], ARGV[4]); redis.call('SET', KEYS[4], ARGV[5])
if ARGV[6] == '' then redis.call('DEL', KEYS[5]) else redis.call('SET', KEYS[5], ARGV[6]) end
return 1
"""
