-- opsapi nginx-lua router: per-upstream weights in a lua_shared_dict, picked by a balancer,
-- set through an authenticated admin location, restored from opsapi's state file at start and
-- reload. Generated into the http {} snippet by `opsapi nginx-config`; see
-- opsapi/routers/nginx_lua.py for the protocol. No reload is ever needed to change a weight.
--
-- An entry (one line: the admin body, the shared dict value, a state file line):
--   upstream=checkout service=checkout generation=1732270000123456 canary=green stable=blue
--   slots=blue:75@10.0.0.1:8080,green:25@10.0.0.2:8080 valid_until=0 sticky=header:X-User

local ffi = require "ffi"
local balancer = require "ngx.balancer"
local bit = require "bit"

local M = {}

local config = nil -- {router, dict, state_file, verifier}, set by M.init
local parsed = {} -- per worker: upstream -> {raw = line, entry = table}

-- SHA-256 from the libcrypto nginx itself is linked with (each declaration alone: another module
-- may have declared some of them already).
pcall(ffi.cdef, "typedef struct evp_md_st EVP_MD;")
pcall(ffi.cdef, "const EVP_MD *EVP_sha256(void);")
pcall(ffi.cdef, "int EVP_Digest(const void *data, size_t count, unsigned char *md, "
    .. "unsigned int *size, const EVP_MD *type, void *impl);")
local digest = ffi.new("unsigned char[32]")
local digest_size = ffi.new("unsigned int[1]")

local function sha256_hex(text)
    if ffi.C.EVP_Digest(text, #text, digest, digest_size, ffi.C.EVP_sha256(), nil) ~= 1 then
        return nil
    end
    local out = {}
    for i = 0, 31 do
        out[i + 1] = string.format("%02x", digest[i])
    end
    return table.concat(out)
end

-- Constant time for equal lengths (both sides are 64-character digests).
local function same(a, b)
    if #a ~= #b then
        return false
    end
    local diff = 0
    for i = 1, #a do
        diff = bit.bor(diff, bit.bxor(a:byte(i), b:byte(i)))
    end
    return diff == 0
end

local function valid_name(value, pattern, longest)
    return value ~= nil and #value >= 1 and #value <= longest and value:match(pattern) ~= nil
end

local function parse_address(text)
    local host, port = text:match("^(%d+%.%d+%.%d+%.%d+):(%d%d?%d?%d?%d?)$")
    if host == nil then
        host, port = text:match("^(%[[%x:%.]+%]):(%d%d?%d?%d?%d?)$")
    end
    port = host and tonumber(port)
    if host == nil or port < 1 or port > 65535 then
        return nil
    end
    return host, port
end

local KEYS = {
    upstream = true, service = true, generation = true, canary = true, stable = true,
    slots = true, valid_until = true, sticky = true,
}

-- The entry of a line, or nil and why. Checked as strictly as opsapi checks it: these values
-- choose where traffic goes.
local function parse(line)
    if type(line) ~= "string" or #line > 2048 then
        return nil, "not an entry"
    end
    local fields = {}
    for token in line:gmatch("%S+") do
        local key, value = token:match("^([a-z_]+)=(%S+)$")
        if key == nil or not KEYS[key] or fields[key] ~= nil then
            return nil, "unknown or repeated field"
        end
        fields[key] = value
    end
    for key in pairs(KEYS) do
        if fields[key] == nil then
            return nil, "missing field " .. key
        end
    end
    local e = {
        upstream = fields.upstream, service = fields.service, canary = fields.canary,
        stable = fields.stable,
    }
    if not valid_name(e.upstream, "^[%w_-]+$", 64) then
        return nil, "bad upstream"
    end
    if not valid_name(e.service, "^[a-z0-9][a-z0-9-]*$", 63) then
        return nil, "bad service"
    end
    if not valid_name(fields.generation, "^%d+$", 16) then
        return nil, "bad generation"
    end
    e.generation = tonumber(fields.generation)
    if not valid_name(fields.valid_until, "^%d+%.?%d*$", 20) then
        return nil, "bad valid_until"
    end
    e.valid_until = tonumber(fields.valid_until)
    e.slots = {}
    local total = 0
    for part in (fields.slots .. ","):gmatch("([^,]*),") do
        local name, weight, address = part:match("^([a-z0-9][a-z0-9_-]*):(%d%d?%d?)@(.+)$")
        local host, port
        if name ~= nil then
            host, port = parse_address(address)
            weight = tonumber(weight)
        end
        if host == nil or #name > 32 or weight > 100 or e.slots[name] then
            return nil, "bad slots"
        end
        e.slots[name] = {name = name, weight = weight, host = host, port = port}
        e.slots[#e.slots + 1] = e.slots[name]
        total = total + weight
    end
    if #e.slots ~= 2 or total ~= 100 or not e.slots[e.canary] or not e.slots[e.stable] then
        return nil, "bad slots"
    end
    e.other = e.slots[1].name == e.canary and e.slots[2] or e.slots[1]
    if fields.sticky ~= "-" then
        local kind, name = fields.sticky:match("^(%a+):(.+)$")
        if kind == "header" and valid_name(name, "^[%w-]+$", 64) then
            e.sticky = "http_" .. name:lower():gsub("-", "_")
        elseif kind == "cookie" and valid_name(name, "^[%w_-]+$", 64) then
            e.sticky = "cookie_" .. name
        else
            return nil, "bad sticky"
        end
    end
    return e
end

local function entry_for(dict, upstream)
    local raw = dict:get(upstream)
    if raw == nil then
        return nil
    end
    local cached = parsed[upstream]
    if cached == nil or cached.raw ~= raw then
        cached = {raw = raw, entry = parse(raw)}
        parsed[upstream] = cached
    end
    return cached.entry
end

-- In init_by_lua (the master, at start and at every reload): the state file's entries replace
-- the shared dict's when newer. The dict outlives a reload, not a stop: after a restart the
-- state file is all there is. Bad lines are logged and skipped, never guessed at.
function M.init(options)
    config = options
    local dict = ngx.shared[options.dict]
    if dict == nil then
        error("opsapi: lua_shared_dict " .. options.dict .. " is not declared")
    end
    if sha256_hex("") == nil then
        error("opsapi: SHA-256 is not available from nginx's libcrypto")
    end
    local file = io.open(options.state_file, "r")
    if file == nil then
        ngx.log(ngx.WARN, "opsapi: no state file ", options.state_file, " yet: upstreams without "
            .. "weights answer 500 until opsapi applies")
        return
    end
    local number = 0
    for line in file:lines() do
        number = number + 1
        if line ~= "" and line:sub(1, 1) ~= "#" then
            local e, why = parse(line)
            if e == nil then
                ngx.log(ngx.ERR, "opsapi: state file line ", number, " skipped: ", why)
            else
                local live = dict:get(e.upstream)
                local current = live and parse(live)
                if current == nil or current.generation < e.generation then
                    local ok, err = dict:set(e.upstream, line)
                    if not ok then
                        ngx.log(ngx.ERR, "opsapi: cannot store upstream ", e.upstream, ": ", err)
                    end
                end
            end
        end
    end
    file:close()
end

function M.init_worker()
    -- Each worker its own random sequence.
    math.randomseed(ngx.now() * 1000 + ngx.worker.pid())
end

-- balancer_by_lua of an upstream: the canary slot by its weight (by a stable hash of the sticky
-- header or cookie when the caller sends one, else at random), the stable slot once a lease has
-- expired; no weights at all fail the request rather than guess a slot.
function M.balance(upstream)
    local e = entry_for(ngx.shared[config.dict], upstream)
    if e == nil then
        ngx.log(ngx.ERR, "opsapi: no weights for upstream ", upstream, ": refusing to guess a slot")
        return ngx.exit(ngx.ERROR)
    end
    local slot
    if e.valid_until > 0 and ngx.now() >= e.valid_until then
        slot = e.slots[e.stable]
    else
        local weight = e.slots[e.canary].weight
        if weight >= 100 then
            slot = e.slots[e.canary]
        elseif weight <= 0 then
            slot = e.other
        else
            local point
            if e.sticky ~= nil then
                local value = ngx.var[e.sticky]
                if value ~= nil and value ~= "" then
                    -- Callers below the weight get the canary: raising it only adds callers.
                    point = ngx.crc32_long(value) % 100
                end
            end
            point = point or math.random(0, 99)
            slot = point < weight and e.slots[e.canary] or e.other
        end
    end
    local ok, err = balancer.set_current_peer(slot.host, slot.port)
    if not ok then
        ngx.log(ngx.ERR, "opsapi: upstream ", upstream, " slot ", slot.name, ": ", err)
        return ngx.exit(ngx.ERROR)
    end
end

local function answer(status, body)
    ngx.status = status
    ngx.header["Content-Type"] = "text/plain"
    ngx.header["Content-Length"] = #body + 1
    ngx.header["Cache-Control"] = "no-store"
    ngx.print(body, "\n")
end

local function authorized()
    local header = ngx.var.http_authorization
    local token = header and header:match("^Bearer ([\33-\126]+)$")
    if token == nil then
        return false
    end
    local seen = sha256_hex("opsapi nginx-lua admin " .. config.router .. "\n" .. token)
    return seen ~= nil and same(seen, config.verifier)
end

-- content_by_lua of the admin server's /opsapi/ location.
function M.admin()
    if not authorized() then
        -- Nothing about the credentials is logged or answered.
        ngx.header["WWW-Authenticate"] = 'Bearer realm="opsapi"'
        return answer(401, "unauthorized")
    end
    local dict = ngx.shared[config.dict]
    local uri, method = ngx.var.uri, ngx.req.get_method()
    if uri == "/opsapi/health" and method == "GET" then
        local keys = dict:get_keys(1024)
        return answer(200, "opsapi nginx-lua router=" .. config.router .. " upstreams=" .. #keys)
    end
    if uri ~= "/opsapi/weights" then
        return answer(404, "not found")
    end
    if method == "GET" then
        local upstream = ngx.var.arg_upstream
        if not valid_name(upstream, "^[%w_-]+$", 64) then
            return answer(400, "bad upstream")
        end
        local live = dict:get(upstream)
        if live == nil then
            return answer(404, "no weights for upstream " .. upstream)
        end
        return answer(200, live)
    end
    if method ~= "POST" then
        return answer(405, "method not allowed")
    end
    ngx.req.read_body()
    local line = (ngx.req.get_body_data() or ""):gsub("\n$", "")
    local e, why = parse(line)
    if e == nil then
        return answer(400, "bad entry: " .. why)
    end
    local live = dict:get(e.upstream)
    local current = live and parse(live)
    if current ~= nil then
        -- Only a newer generation replaces an entry (a replayed or late older call never does);
        -- the same generation again is a retry of the same call.
        if current.generation > e.generation
            or (current.generation == e.generation and live ~= line) then
            return answer(409, live)
        end
    end
    local ok, err = dict:set(e.upstream, line)
    if not ok then
        ngx.log(ngx.ERR, "opsapi: cannot store upstream ", e.upstream, ": ", err)
        return answer(507, "cannot store: " .. tostring(err) .. " (raise lua_shared_dict size)")
    end
    -- Read back from the shared memory every worker's balancer reads.
    return answer(200, dict:get(e.upstream) or "")
end

M.parse = parse
return M
