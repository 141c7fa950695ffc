-- wrk script: cycle over KEYS distinct URLs (?k=0 .. ?k=KEYS-1), each thread from its own offset.
-- With FILL=1 (the warm-up), thread i of THREADS cycles over its own share of the keys
-- (k = i, i+T, i+2T, ...) instead, so that the threads together store every key once in
-- KEYS requests, however the warm-up's requests split between them.
local keys = tonumber(os.getenv("KEYS") or "100000")
local fill = os.getenv("FILL") == "1"
local counter = 0
local threads = 0
-- offset and index are globals: setup() sets them in each thread's own Lua state (a local
-- here would hide them from init()).

function setup(thread)
    thread:set("offset", threads * 7919)
    thread:set("index", threads)
    threads = threads + 1
end

-- Every request is formatted once, here, before wrk starts its clock: formatting one per call
-- (wrk.format builds a table of headers each time) held wrk's threads to about 85% of what
-- the proxy under test could serve, so that the figure measured wrk.
local requests = {}

function init(args)
    offset = tonumber(offset) or 0
    index = tonumber(index) or 0
    threads = tonumber(os.getenv("THREADS") or "2")
    for k = 0, keys - 1 do
        requests[k + 1] = wrk.format("GET", "/api/items/42?k=" .. k)
    end
end

function request()
    local k
    if fill then
        local share = math.max(1, math.floor((keys - 1 - index) / threads) + 1)
        k = (index + threads * (counter % share)) % keys
    else
        k = (offset + counter) % keys
    end
    counter = counter + 1
    return requests[k + 1]
end
