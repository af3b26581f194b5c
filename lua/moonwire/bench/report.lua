--- The HTML report of `moonwire bench --html`: one self-contained page (inline CSS and inline
-- SVG charts; no scripts, fonts, images or fetches). Sections: the run's settings, a summary,
-- errors and statuses, latency percentiles on a log scale (as HdrHistogram plots them),
-- latency and throughput over time, threshold results, and a scenario's metrics.
local M = {}

local floor, log10 = math.floor, function(x) return math.log(x, 10) end

---------------------------------------------------------------------------------------------
-- text

local ESC = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;" }

local function esc(s)
  return (tostring(s):gsub("[&<>\"']", ESC))
end

local function finite(n)
  return type(n) == "number" and n == n and n ~= math.huge and n ~= -math.huge
end

local function num(n)
  if not finite(n) then return "–" end
  return tostring(math.tointeger(n) or n)
end

--- 1234567 -> "1,234,567"; fractions keep `digits` decimals
local function grouped(n, digits)
  if not finite(n) then return "–" end
  local s = digits and ("%." .. digits .. "f"):format(n) or ("%d"):format(floor(n + 0.5))
  local sign, int, frac = s:match("^(-?)(%d+)(.*)$")
  int = int:reverse():gsub("(%d%d%d)", "%1,"):reverse():gsub("^,", "")
  return sign .. int .. frac
end

--- microseconds -> "812 µs", "12.3 ms", "1.20 s"
local function time_us(us)
  if not finite(us) then return "–" end
  local a = math.abs(us)
  if a >= 1e6 then return ("%.2f s"):format(us / 1e6) end
  if a >= 1e4 then return ("%.1f ms"):format(us / 1e3) end
  if a >= 1e3 then return ("%.2f ms"):format(us / 1e3) end
  if a == floor(a) then return ("%d µs"):format(floor(us)) end
  return ("%.1f µs"):format(us)
end

local function bytes(n)
  if not finite(n) then return "–" end
  if n >= 1024 ^ 3 then return ("%.2f GiB"):format(n / 1024 ^ 3) end
  if n >= 1024 ^ 2 then return ("%.2f MiB"):format(n / 1024 ^ 2) end
  if n >= 1024 then return ("%.2f KiB"):format(n / 1024) end
  return ("%d B"):format(floor(n))
end

local function metric(n)
  if not finite(n) then return "–" end
  if n >= 1e6 then return ("%.2fM"):format(n / 1e6) end
  if n >= 1e4 then return ("%.1fk"):format(n / 1e3) end
  if n >= 1e3 then return ("%.2fk"):format(n / 1e3) end
  if n == floor(n) then return ("%d"):format(n) end
  return ("%.1f"):format(n)
end

local function seconds(s)
  if not finite(s) then return "–" end
  if s >= 60 and s % 60 == 0 then return ("%dm"):format(s // 60) end
  if s >= 1 then return (("%.3f"):format(s):gsub("%.?0+$", "")) .. "s" end
  return ("%dms"):format(floor(s * 1000 + 0.5))
end

local function pct_label(p)
  return (("%.3f"):format(p):gsub("%.?0+$", "")) .. "%"
end

M._fmt = { esc = esc, grouped = grouped, time_us = time_us, bytes = bytes, metric = metric, seconds = seconds }

---------------------------------------------------------------------------------------------
-- charts (inline SVG)

local CW, CH = 1000, 330                    -- the chart's coordinate system
local ML, MR, MT, MB = 78, 70, 18, 52       -- margins: axis labels and ticks live there
local PW, PH = CW - ML - MR, CH - MT - MB   -- the plot area

local COLORS = { p50 = "#2563eb", p99 = "#ea580c", max = "#6b7280", rps = "#0d9488", err = "#dc2626" }

--- Round ticks from 0 to at least `top`: list, the last tick
local function nice_ticks(top, count)
  if not finite(top) or top <= 0 then top = 1 end
  local raw = top / (count or 5)
  local mag = 10 ^ floor(log10(raw))
  local f = raw / mag
  local step = (f <= 1 and 1 or f <= 2 and 2 or f <= 2.5 and 2.5 or f <= 5 and 5 or 10) * mag
  local n = math.ceil(top / step - 1e-9)
  local ticks = {}
  for i = 0, n do ticks[#ticks + 1] = i * step end
  return ticks, n * step
end

--- A unit for latencies up to `top` µs: divisor, name
local function time_unit(top)
  if top >= 2e6 then return 1e6, "s" end
  if top >= 2e3 then return 1e3, "ms" end
  return 1, "µs"
end

local function tick_text(v)
  if v == floor(v) then return ("%d"):format(v) end
  return (("%.2f"):format(v):gsub("0+$", ""))
end

local function f1(v) return ("%.1f"):format(v) end

--- Opens a chart: frame, grid, y ticks (values in data units → label), x ticks, axis titles.
-- `x` and `y` map data to pixels. Returns the buffer (a list) to append marks to.
local function chart(spec)
  local out = {}
  out[#out + 1] = ('<svg class="chart" viewBox="0 0 %d %d" role="img" aria-label="%s" ' ..
    'xmlns="http://www.w3.org/2000/svg">'):format(CW, CH, esc(spec.title))
  out[#out + 1] = ('<rect x="%d" y="%d" width="%d" height="%d" class="plot"/>'):format(ML, MT, PW, PH)
  for _, t in ipairs(spec.yticks) do
    local y = f1(spec.y(t.v))
    out[#out + 1] = ('<line x1="%d" x2="%d" y1="%s" y2="%s" class="grid"/>'):format(ML, ML + PW, y, y)
    out[#out + 1] = ('<text x="%d" y="%s" class="tick" text-anchor="end" dy="0.32em">%s</text>')
      :format(ML - 8, y, esc(t.label))
  end
  for _, t in ipairs(spec.rticks or {}) do
    local y = f1(spec.ry(t.v))
    out[#out + 1] = ('<text x="%d" y="%s" class="tick err" dy="0.32em">%s</text>'):format(ML + PW + 8, y, esc(t.label))
  end
  for _, t in ipairs(spec.xticks) do
    local x = f1(spec.x(t.v))
    out[#out + 1] = ('<line x1="%s" x2="%s" y1="%d" y2="%d" class="grid%s"/>')
      :format(x, x, MT, MT + PH, t.major and " major" or "")
    out[#out + 1] = ('<text x="%s" y="%d" class="tick" text-anchor="middle">%s</text>')
      :format(x, MT + PH + 18, esc(t.label))
  end
  out[#out + 1] = ('<text x="%d" y="%d" class="axis" text-anchor="middle">%s</text>')
    :format(ML + PW // 2, CH - 10, esc(spec.xlabel))
  out[#out + 1] = ('<text class="axis" text-anchor="middle" transform="translate(18 %d) rotate(-90)">%s</text>')
    :format(MT + PH // 2, esc(spec.ylabel))
  if spec.rlabel then
    out[#out + 1] = ('<text class="axis err" text-anchor="middle" transform="translate(%d %d) rotate(90)">%s</text>')
      :format(CW - 14, MT + PH // 2, esc(spec.rlabel))
  end
  return out
end

local function close_chart(out)
  out[#out + 1] = "</svg>"
  return table.concat(out, "\n")
end

local function polyline(out, pts, color, cls)
  if #pts == 0 then return end
  local s = {}
  for i, p in ipairs(pts) do s[i] = f1(p[1]) .. "," .. f1(p[2]) end
  out[#out + 1] = ('<polyline points="%s" fill="none" stroke="%s" class="%s"/>')
    :format(table.concat(s, " "), color, cls or "line")
end

local function dots(out, pts, color, r)
  for _, p in ipairs(pts) do
    out[#out + 1] = ('<circle cx="%s" cy="%s" r="%s" fill="%s"/>'):format(f1(p[1]), f1(p[2]), r or 3, color)
  end
end

local function legend(items)
  local s = { '<div class="legend">' }
  for _, it in ipairs(items) do
    s[#s + 1] = ('<span><i style="background:%s"></i>%s</span>'):format(it[2], esc(it[1]))
  end
  s[#s + 1] = "</div>"
  return table.concat(s)
end

local function empty_chart(text)
  return ('<p class="empty">%s</p>'):format(esc(text))
end

-- x of a percentile on the log scale: the number of nines, -log10(1 - p/100)
local function nines(p) return -log10(1 - p / 100) end

local PCT_TICKS = { 50, 90, 99, 99.9, 99.99, 99.999 }
local PCT_TABLE = { 50, 75, 90, 95, 99, 99.9, 99.99, 99.999 }

local function latency_count(lat)
  if type(lat) ~= "table" and type(lat) ~= "userdata" then return 0 end
  if lat.count then return lat.count end
  return (lat.max or 0) > 0 and 1 or 0
end

local function percentile_chart(lat)
  if latency_count(lat) == 0 then return empty_chart("No latency samples were recorded.") end
  local x0, x1 = nines(50), nines(99.999)
  local pts, top = {}, 0
  local steps = 240
  for i = 0, steps do
    local x = x0 + (x1 - x0) * i / steps
    local p = 100 * (1 - 10 ^ -x)
    local v = lat:percentile(p)
    pts[#pts + 1] = { x, v }
    if v > top then top = v end
  end
  local max = lat.max or top
  if max > top then top = max end
  local div, unit = time_unit(top)
  local ticks, ytop = nice_ticks(top / div, 5)
  local function X(x) return ML + PW * (x - x0) / (x1 - x0) end
  local function Y(v) return MT + PH - PH * v / ytop end
  local yt = {}
  for _, t in ipairs(ticks) do yt[#yt + 1] = { v = t, label = tick_text(t) } end
  local xt = {}
  for _, p in ipairs(PCT_TICKS) do xt[#xt + 1] = { v = nines(p), label = pct_label(p), major = true } end
  local out = chart{
    title = "Latency by percentile", x = X, y = Y, xticks = xt, yticks = yt,
    xlabel = "percentile (log scale: each step adds a nine)", ylabel = "latency (" .. unit .. ")",
  }
  local line = {}
  for i, p in ipairs(pts) do line[i] = { X(p[1]), Y(p[2] / div) } end
  local area = { { X(x0), Y(0) } }
  for _, p in ipairs(line) do area[#area + 1] = p end
  area[#area + 1] = { X(x1), Y(0) }
  local s = {}
  for i, p in ipairs(area) do s[i] = f1(p[1]) .. "," .. f1(p[2]) end
  out[#out + 1] = ('<polygon points="%s" fill="%s" class="area"/>'):format(table.concat(s, " "), COLORS.p50)
  polyline(out, line, COLORS.p50)
  for _, p in ipairs(PCT_TICKS) do
    local v = lat:percentile(p)
    local cx, cy = X(nines(p)), Y(v / div)
    out[#out + 1] = ('<circle cx="%s" cy="%s" r="4" fill="#fff" stroke="%s" stroke-width="2"/>')
      :format(f1(cx), f1(cy), COLORS.p50)
    local anchor = p >= 99.999 and "end" or p <= 50 and "start" or "middle"
    local dx = anchor == "end" and -6 or anchor == "start" and 6 or 0
    out[#out + 1] = ('<text x="%s" y="%s" class="value" text-anchor="%s">%s</text>')
      :format(f1(cx + dx), f1(math.max(cy - 9, MT + 12)), anchor, esc(time_us(v)))
  end
  return close_chart(out)
end

-- x ticks for seconds 0..tmax
local function time_ticks(tmax)
  local ticks, top = nice_ticks(tmax, 8)
  local xt = {}
  for _, t in ipairs(ticks) do xt[#xt + 1] = { v = t, label = tick_text(t) } end
  return xt, top
end

local function timeline_of(r)
  local tl = {}
  if type(r.timeline) ~= "table" then return tl end
  for _, e in ipairs(r.timeline) do
    if type(e) == "table" and finite(e.t) then tl[#tl + 1] = e end
  end
  return tl
end

local function latency_time_chart(tl)
  if #tl == 0 then return empty_chart("The run was too short for a per-second timeline.") end
  local tmax, top = 0, 0
  for _, e in ipairs(tl) do
    if e.t > tmax then tmax = e.t end
    for _, k in ipairs{ "p50", "p99", "max" } do
      if finite(e[k]) and e[k] > top then top = e[k] end
    end
  end
  local div, unit = time_unit(top)
  local ticks, ytop = nice_ticks(top / div, 5)
  local xt, xtop = time_ticks(tmax)
  local function X(t) return ML + PW * t / xtop end
  local function Y(v) return MT + PH - PH * v / ytop end
  local yt = {}
  for _, t in ipairs(ticks) do yt[#yt + 1] = { v = t, label = tick_text(t) } end
  local out = chart{ title = "Latency over time", x = X, y = Y, xticks = xt, yticks = yt,
    xlabel = "time since start (s)", ylabel = "latency (" .. unit .. ")" }
  for _, k in ipairs{ "max", "p99", "p50" } do
    local pts = {}
    for _, e in ipairs(tl) do
      if finite(e[k]) then pts[#pts + 1] = { X(e.t), Y(e[k] / div) } end
    end
    polyline(out, pts, COLORS[k], k == "max" and "line dashed" or "line")
    if #pts <= 60 then dots(out, pts, COLORS[k], 3) end
  end
  return close_chart(out) .. legend{ { "p50", COLORS.p50 }, { "p99", COLORS.p99 }, { "max", COLORS.max } }
end

local function throughput_chart(tl)
  if #tl == 0 then return empty_chart("The run was too short for a per-second timeline.") end
  local tmax, top, etop = 0, 0, 0
  for _, e in ipairs(tl) do
    if e.t > tmax then tmax = e.t end
    if finite(e.rps) and e.rps > top then top = e.rps end
    if finite(e.errors) and e.errors > etop then etop = e.errors end
  end
  local ticks, ytop = nice_ticks(top, 5)
  local xt, xtop = time_ticks(tmax)
  local function X(t) return ML + PW * t / xtop end
  local function Y(v) return MT + PH - PH * v / ytop end
  local yt = {}
  for _, t in ipairs(ticks) do yt[#yt + 1] = { v = t, label = metric(t) } end
  local rt, etick_top
  if etop > 0 then
    local et
    et, etick_top = nice_ticks(etop, 5)
    rt = {}
    for _, t in ipairs(et) do rt[#rt + 1] = { v = t, label = metric(t) } end
  end
  local function RY(v) return MT + PH - PH * v / etick_top end
  local out = chart{ title = "Throughput over time", x = X, y = Y, xticks = xt, yticks = yt,
    rticks = rt, ry = RY, rlabel = etop > 0 and "errors per second" or nil,
    xlabel = "time since start (s)", ylabel = "requests per second" }
  -- errors: a red bar for every second that had some, on the right-hand axis
  local bw = math.max(3, math.min(24, PW / math.max(1, xtop) * 0.5))
  for _, e in ipairs(tl) do
    if finite(e.errors) and e.errors > 0 then
      local y = RY(e.errors)
      out[#out + 1] = ('<rect x="%s" y="%s" width="%s" height="%s" fill="%s" class="errbar"><title>%s errors at %ss' ..
        '</title></rect>'):format(f1(X(e.t) - bw / 2), f1(y), f1(bw), f1(MT + PH - y), COLORS.err,
        grouped(e.errors), ("%.1f"):format(e.t))
    end
  end
  local pts = {}
  for _, e in ipairs(tl) do
    if finite(e.rps) then pts[#pts + 1] = { X(e.t), Y(e.rps) } end
  end
  polyline(out, pts, COLORS.rps)
  if #pts <= 60 then dots(out, pts, COLORS.rps, 3) end
  local items = { { "requests/s", COLORS.rps } }
  items[2] = { etop > 0 and "errors/s" or "errors/s (none)", COLORS.err }
  return close_chart(out) .. legend(items)
end

---------------------------------------------------------------------------------------------
-- tables

local function grid_table(head, rows, numeric_from)
  local s = { "<table><thead><tr>" }
  for i, h in ipairs(head) do
    s[#s + 1] = ('<th%s>%s</th>'):format(i >= (numeric_from or 2) and ' class="num"' or "", esc(h))
  end
  s[#s + 1] = "</tr></thead><tbody>"
  for _, row in ipairs(rows) do
    s[#s + 1] = "<tr>"
    for i, c in ipairs(row) do
      s[#s + 1] = ('<td%s>%s</td>'):format(i >= (numeric_from or 2) and ' class="num"' or "", c)
    end
    s[#s + 1] = "</tr>"
  end
  s[#s + 1] = "</tbody></table>"
  return table.concat(s)
end

local ERROR_KINDS = {
  { "connect", "could not connect" }, { "read", "read failed or the connection broke" },
  { "write", "write failed" }, { "timeout", "no complete response within the timeout" },
  { "status", "HTTP status 400 and above" },
}

local function errors_section(r)
  local e = type(r.errors) == "table" and r.errors or {}
  local total = 0
  local rows = {}
  for _, k in ipairs(ERROR_KINDS) do
    local n = tonumber(e[k[1]]) or 0
    total = total + n
    rows[#rows + 1] = { esc(k[1]), esc(k[2]), ('<span class="%s">%s</span>'):format(n > 0 and "bad" or "", grouped(n)) }
  end
  return grid_table({ "kind", "meaning", "count" }, rows, 3), total
end

local function statuses_section(r)
  local st = type(r.statuses) == "table" and r.statuses or {}
  local codes, total = {}, 0
  for code, n in pairs(st) do
    codes[#codes + 1] = code
    total = total + (tonumber(n) or 0)
  end
  if #codes == 0 then return '<p class="empty">No responses.</p>' end
  table.sort(codes, function(a, b) return tostring(a) < tostring(b) end)
  local rows = {}
  for _, code in ipairs(codes) do
    local n = tonumber(st[code]) or 0
    local c = tonumber(code) or 0
    local cls = c >= 500 and "bad" or c >= 400 and "warn" or "good"
    rows[#rows + 1] = { ('<span class="code %s">%s</span>'):format(cls, esc(code)), grouped(n),
      total > 0 and ("%.2f%%"):format(100 * n / total) or "–" }
  end
  return grid_table({ "status", "responses", "share" }, rows)
end

local function latency_table(lat)
  if latency_count(lat) == 0 then return '<p class="empty">No latency samples.</p>' end
  local head, row = { "min" }, { time_us(lat.min) }
  for _, p in ipairs(PCT_TABLE) do
    head[#head + 1] = "p" .. pct_label(p):sub(1, -2)
    row[#row + 1] = esc(time_us(lat:percentile(p)))
  end
  for _, k in ipairs{ "max", "mean", "stdev" } do
    head[#head + 1] = k
    row[#row + 1] = esc(time_us(lat[k]))
  end
  return grid_table(head, { row }, 1)
end

local function thresholds_section(r)
  local list = type(r.threshold_results) == "table" and r.threshold_results or {}
  if #list == 0 then return nil end
  local rows, failed = {}, 0
  for _, t in ipairs(list) do
    if not t.pass then failed = failed + 1 end
    rows[#rows + 1] = { t.pass and '<span class="badge pass">PASS</span>' or '<span class="badge fail">FAIL</span>',
      "<code>" .. esc(t.expr or "") .. "</code>", esc(t.message or "") }
  end
  local head = failed == 0 and ('<p class="verdict pass">All %d thresholds passed.</p>'):format(#list)
    or ('<p class="verdict fail">%d of %d thresholds failed.</p>'):format(failed, #list)
  return head .. grid_table({ "result", "threshold", "detail" }, rows, 99)
end

-- a distributed run: one row per agent beside the merged figures above
local function agents_section(r)
  local list = type(r.agents) == "table" and r.agents or nil
  if not list or #list == 0 then return nil end
  local rows = {}
  for _, a in ipairs(list) do
    local state = tostring(a.state or "")
    rows[#rows + 1] = { esc(a.name or ""), num(a.threads), a.connections and num(a.connections) or "-",
      grouped(tonumber(a.requests) or 0), grouped(tonumber(a.rps) or 0, 2), time_us(tonumber(a.p50) or 0),
      time_us(tonumber(a.p99) or 0), grouped(tonumber(a.errors) or 0),
      state == "ok" and '<span class="badge pass">ok</span>'
        or ('<span class="badge fail">%s</span>'):format(esc(state)) }
  end
  return grid_table({ "agent", "threads", "connections", "requests", "req/s", "p50", "p99", "errors", "state" },
    rows, 2)
end

local function is_time_metric(name)
  return name:match("duration") or name:match("_ms$") or name:match("time") or name:match("rtt")
end

local function metrics_section(r)
  if type(r.metrics) ~= "table" then return nil end
  -- a scenario's checks (bench.check) come apart from its metrics; http_req_failed, a rate
  -- whose "passes" are failures, is the summary's failed requests instead
  local all = {}
  for name, m in pairs(r.metrics) do all[name] = m end
  for name, c in pairs(type(r.checks) == "table" and r.checks or {}) do
    if name ~= "http_req_failed" and all[name] == nil and type(c) == "table" then
      all[name] = { kind = "check", pass = c.pass, fail = c.fail }
    end
  end
  local names = {}
  for name in pairs(all) do names[#names + 1] = tostring(name) end
  if #names == 0 then return nil end
  table.sort(names)
  local trends, counters, checks, others = {}, {}, {}, {}
  local function v(x) return finite(x) and grouped(x, (x == floor(x)) and 0 or 2) or "–" end
  for _, name in ipairs(names) do
    local m = all[name]
    if type(m) ~= "table" then m = { value = m } end
    local kind = m.kind
    if kind == "trend" then
      local unit = is_time_metric(name) and " ms" or ""
      trends[#trends + 1] = { "<code>" .. esc(name) .. "</code>", v(m.count) }
      for _, k in ipairs{ "avg", "min", "p50", "p90", "p95", "p99", "max" } do
        local x = m[k]
        if x == nil and k == "p50" then x = m.med end
        trends[#trends][#trends[#trends] + 1] = finite(x) and (grouped(x, 2) .. unit) or "–"
      end
    elseif kind == "counter" then
      counters[#counters + 1] = { "<code>" .. esc(name) .. "</code>", v(m.value or m.count),
        finite(m.rate) and grouped(m.rate, 2) .. "/s" or "–" }
    elseif kind == "check" or kind == "checks" or kind == "rate" or m.passes or m.fails then
      local pass = tonumber(m.passes or m.pass or m.ok) or 0
      local fail = tonumber(m.fails or m.fail or m.failed) or 0
      local share = pass + fail > 0 and 100 * pass / (pass + fail) or tonumber(m.rate or m.value)
      if share and share <= 1 and pass + fail == 0 and kind == "rate" then share = share * 100 end
      checks[#checks + 1] = { "<code>" .. esc(name) .. "</code>", v(pass), ('<span class="%s">%s</span>')
        :format(fail > 0 and "bad" or "", v(fail)), share and ("%.2f%%"):format(share) or "–" }
    else
      local parts = {}
      local keys = {}
      for k in pairs(m) do keys[#keys + 1] = tostring(k) end
      table.sort(keys)
      for _, k in ipairs(keys) do
        local x = m[k]
        if type(x) == "number" then parts[#parts + 1] = esc(k) .. " = " .. esc(num(x))
        elseif type(x) ~= "table" then parts[#parts + 1] = esc(k) .. " = " .. esc(x) end
      end
      others[#others + 1] = { "<code>" .. esc(name) .. "</code>", table.concat(parts, ", ") }
    end
  end
  local s = {}
  if #trends > 0 then
    s[#s + 1] = "<h3>Trends</h3>" .. grid_table({ "metric", "count", "avg", "min", "med", "p90", "p95", "p99", "max" },
      trends)
  end
  if #counters > 0 then s[#s + 1] = "<h3>Counters</h3>" .. grid_table({ "metric", "value", "rate" }, counters) end
  if #checks > 0 then
    s[#s + 1] = "<h3>Checks</h3>" .. grid_table({ "check", "passed", "failed", "pass rate" }, checks)
  end
  if #others > 0 then s[#s + 1] = "<h3>Other</h3>" .. grid_table({ "metric", "values" }, others, 99) end
  return table.concat(s, "\n")
end

---------------------------------------------------------------------------------------------
-- the page

local CSS = [[
:root{--fg:#111827;--muted:#6b7280;--line:#e5e7eb;--bg:#f8fafc;--card:#fff;--accent:#2563eb;--bad:#dc2626;
--good:#15803d;--warn:#b45309}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,"Noto Sans","Liberation Sans",sans-serif;-webkit-font-smoothing:antialiased}
main{max-width:1080px;margin:0 auto;padding:28px 24px 40px}
header{margin-bottom:20px}
header .tool{font-size:13px;font-weight:600;letter-spacing:.08em;text-transform:uppercase;color:var(--accent)}
h1{font-size:24px;margin:4px 0 10px;font-weight:650;word-break:break-all}
h2{font-size:17px;margin:0 0 12px;font-weight:650}
h3{font-size:14px;margin:16px 0 8px;color:var(--muted);font-weight:600;text-transform:uppercase;letter-spacing:.05em}
.settings{display:flex;flex-wrap:wrap;gap:8px;margin:0;padding:0;list-style:none}
.settings li{background:var(--card);border:1px solid var(--line);border-radius:999px;padding:2px 12px;font-size:13px}
.settings b{font-weight:600}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:18px 20px;margin:0 0 18px;
box-shadow:0 1px 2px rgba(0,0,0,.04)}
.cards{display:grid;grid-template-columns:repeat(4,1fr);gap:12px}
.card{border:1px solid var(--line);border-radius:8px;padding:10px 14px}
.card .label{font-size:12px;color:var(--muted);text-transform:uppercase;letter-spacing:.05em}
.card .value{font-size:22px;font-weight:650;font-variant-numeric:tabular-nums}
.card .sub{font-size:12px;color:var(--muted)}
.card.bad .value{color:var(--bad)}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:24px}
.pct{margin-top:10px;overflow-x:auto}.pct th,.pct td{padding:5px 6px}
table{border-collapse:collapse;width:100%;font-size:14px;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:5px 10px;border-bottom:1px solid var(--line)}
thead th{font-size:12px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em;font-weight:600}
.num{text-align:right}
table.kv th{font-weight:500;color:var(--muted);width:45%}
table.kv td{text-align:right}
code{font:13px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace}
.bad{color:var(--bad);font-weight:600}
.code{font-weight:600}.code.good{color:var(--good)}.code.warn{color:var(--warn)}.code.bad{color:var(--bad)}
.badge{display:inline-block;border-radius:4px;padding:0 8px;font-size:12px;font-weight:700;color:#fff}
.badge.pass{background:var(--good)}.badge.fail{background:var(--bad)}
.verdict{margin:0 0 10px;font-weight:600}.verdict.pass{color:var(--good)}.verdict.fail{color:var(--bad)}
.chart{width:100%;height:auto;display:block}
.chart .plot{fill:#fff;stroke:#d1d5db}
.chart .grid{stroke:#eef0f3;stroke-width:1}
.chart .grid.major{stroke:#e2e5ea}
.chart .tick{font-size:12px;fill:#4b5563}
.chart .axis{font-size:13px;fill:#374151;font-weight:600}
.chart .err{fill:var(--bad)}
.chart .value{font-size:11.5px;fill:#1f2937;font-weight:600;paint-order:stroke;stroke:#fff;stroke-width:3px}
.chart .line{stroke-width:2;stroke-linejoin:round;stroke-linecap:round}
.chart .dashed{stroke-dasharray:5 4;stroke-width:1.5}
.chart .area{opacity:.08}
.chart .errbar{opacity:.75}
.legend{display:flex;gap:18px;justify-content:center;font-size:13px;color:#374151;margin-top:4px}
.legend i{display:inline-block;width:14px;height:3px;border-radius:2px;vertical-align:middle;margin-right:6px}
.note{font-size:13px;color:var(--muted);margin:8px 0 0}
.empty{color:var(--muted);font-style:italic;margin:6px 0}
footer{font-size:12px;color:var(--muted);text-align:center}
@media (max-width:760px){.cards{grid-template-columns:repeat(2,1fr)}.cols{grid-template-columns:1fr}}
]]

local function card(label, value, sub, bad)
  return ('<div class="card%s"><div class="label">%s</div><div class="value">%s</div>%s</div>')
    :format(bad and " bad" or "", esc(label), esc(value), sub and ('<div class="sub">%s</div>'):format(esc(sub)) or "")
end

--- The report page for options `o` and merged results `r` (see cli.lua); returns the HTML.
function M.html(o, r)
  o, r = o or {}, r or {}
  local target = o.url or (o.scenario and ("scenario " .. tostring(o.scenario))) or "(no target)"
  local dur_s = finite(r.duration_us) and r.duration_us / 1e6 or o.duration
  local lat = r.latency
  local has_lat = lat ~= nil and latency_count(lat) > 0
  local tl = timeline_of(r)
  local requests = tonumber(r.requests_total) or 0

  local settings = {}
  local function setting(k, v) settings[#settings + 1] = ("<li>%s <b>%s</b></li>"):format(esc(k), esc(v)) end
  if o.threads then setting("threads", num(o.threads)) end
  if r.scenario then
    -- (a scenario's own duration and users, not -d and the URL options it does not use)
    local planned = tonumber(r.planned_duration) or dur_s
    if planned then setting("duration", seconds(planned)) end
    if r.max_users then setting("max users", num(r.max_users)) end
  else
    if o.connections then setting("connections", num(o.connections)) end
    if o.duration then setting("duration", seconds(o.duration)) end
    setting("rate", o.rate and (grouped(o.rate) .. " req/s (constant, open model)") or "max (closed model)")
    if o.pipeline and o.pipeline > 1 then setting("pipeline", num(o.pipeline)) end
    if o.timeout then setting("timeout", seconds(o.timeout)) end
    if o.method and o.method ~= "GET" then setting("method", o.method) end
    if o.script then setting("script", o.script) end
  end

  local h = {}
  h[#h + 1] = "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">"
  h[#h + 1] = '<meta name="viewport" content="width=device-width, initial-scale=1">'
  h[#h + 1] = ("<title>moonwire bench: %s</title>"):format(esc(target))
  h[#h + 1] = "<style>" .. CSS .. "</style>\n</head>\n<body>\n<main>"
  h[#h + 1] = ('<header><div class="tool">moonwire bench report</div><h1>%s</h1><ul class="settings">%s</ul></header>')
    :format(esc(target), table.concat(settings))

  -- summary
  local errors_html, errors_total = errors_section(r)
  local rps = tonumber(r.rps) or 0
  h[#h + 1] = "<section><h2>Summary</h2><div class=\"cards\">"
  if r.scenario then
    -- bench.http's requests (http_reqs), its failures (http_req_failed) and the users' errors
    local failed = tonumber(r.failed_requests) or 0
    local uerr = tonumber(r.user_errors) or 0
    h[#h + 1] = card("requests", grouped(requests), dur_s and ("in " .. seconds(dur_s)) or nil)
    h[#h + 1] = card("throughput", grouped(rps, rps < 100 and 2 or 0) .. " req/s")
    h[#h + 1] = card("failed requests", grouped(failed),
      requests > 0 and ("%.3f%% of requests"):format(100 * failed / requests) or nil, failed > 0)
    h[#h + 1] = card("user errors", grouped(uerr), r.first_error and ("first: " .. tostring(r.first_error)) or nil,
      uerr > 0)
    h[#h + 1] = "</div></section>"
  else
    h[#h + 1] = card("requests", grouped(requests), dur_s and ("in " .. seconds(dur_s)) or nil)
    h[#h + 1] = card("throughput", grouped(rps, rps < 100 and 2 or 0) .. " req/s",
      o.rate and ("requested " .. grouped(o.rate) .. " req/s") or nil)
    h[#h + 1] = card("transferred", bytes(tonumber(r.bytes) or 0),
      dur_s and dur_s > 0 and (bytes((tonumber(r.bytes) or 0) / dur_s) .. "/s") or nil)
    -- (a share of the attempts: responses and the requests that got none, as errors<X% is)
    local attempts = tonumber(r.attempts) or requests
    h[#h + 1] = card("errors", grouped(errors_total),
      attempts > 0 and ("%.3f%% of attempts"):format(100 * errors_total / attempts) or nil, errors_total > 0)
    if has_lat then
      h[#h + 1] = card("latency p50", time_us(lat:percentile(50)), "mean " .. time_us(lat.mean))
      h[#h + 1] = card("latency p99", time_us(lat:percentile(99)), "p99.9 " .. time_us(lat:percentile(99.9)))
      h[#h + 1] = card("latency max", time_us(lat.max), "min " .. time_us(lat.min))
    end
    local hung = tonumber(r.hung) or 0
    h[#h + 1] = card("unanswered at end", grouped(hung), "requests still in flight", hung > 0 and errors_total > 0)
    h[#h + 1] = "</div></section>"
  end

  local ag = agents_section(r)
  if ag then h[#h + 1] = "<section><h2>Agents</h2>" .. ag .. "</section>" end
  local th = thresholds_section(r)
  if th then h[#h + 1] = "<section><h2>Thresholds</h2>" .. th .. "</section>" end
  local ms = metrics_section(r)
  if ms then h[#h + 1] = "<section><h2>Metrics</h2>" .. ms .. "</section>" end

  if lat ~= nil then
    h[#h + 1] = ('<section><h2>Latency distribution</h2>%s<div class="pct">%s</div><p class="note">%s</p></section>')
      :format(percentile_chart(lat), latency_table(lat),
      o.rate and "Constant-rate run: latency counts from each request's scheduled send time, so server stalls " ..
        "are not hidden by coordinated omission." or
      "Closed-model run: each connection waits for its response before sending again, so latency excludes " ..
        "time a request would have queued during a stall (use -R for a constant rate).")
  end
  if #tl > 0 or not r.metrics then
    h[#h + 1] = "<section><h2>Latency over time</h2>" .. latency_time_chart(tl) .. "</section>"
    h[#h + 1] = "<section><h2>Throughput over time</h2>" .. throughput_chart(tl) .. "</section>"
  end

  if not r.scenario then
    h[#h + 1] = ('<section><div class="cols"><div><h2>Errors</h2>%s</div><div><h2>Status codes</h2>%s</div></div>' ..
      '</section>'):format(errors_html, statuses_section(r))
  end

  h[#h + 1] = ("<footer>Generated by moonwire bench on %s.</footer>"):format(esc(os.date("!%Y-%m-%d %H:%M:%S UTC")))
  h[#h + 1] = "</main>\n</body>\n</html>\n"
  return table.concat(h, "\n")
end

return M
