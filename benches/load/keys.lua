-- wrk script: cycle over KEYS distinct URLs (?k=0 .. ?k=KEYS-1), each thread from its own offset.
local keys = tonumber(os.getenv("KEYS") or "100000")
local counter = 0
local offset = 0
local threads = 0

function setup(thread)
    thread:set("offset", threads * 7919)
    threads = threads + 1
end

function init(args)
    offset = tonumber(offset) or 0
end

function request()
    counter = counter + 1
    return wrk.format("GET", "/api/items/42?k=" .. ((offset + counter) % keys))
end
