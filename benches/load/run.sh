#!/usr/bin/env bash
# Palisade against nginx in one run, both in front of the same two origin replicas.
#
# The proxy under test is pinned to core 0 and capped by a cgroup v1 CPU quota (QUOTA_US of
# every PERIOD_US); wrk and the origins run on core 1. The bare origin is measured the same way
# (one origin process on core 0 under the same quota) as the reference. Targets alternate over
# ROUNDS rounds, in reverse order every other round, each run preceded by a short warm-up.
#
# Environment: DURATION (s, 10) WARMUP (s, 2) ROUNDS (2) CONNECTIONS (64) THREADS (2)
#              PERIOD_US (5000) QUOTA_US (2000) PORT_BASE (29100) SKIP_BUILD (0) KEEP (0)
#              NICE (-10: every benchmark process runs at this niceness, ahead of other work)
#              BASELINE (path to another palisade binary, measured as a fourth target "baseline"
#              in the same rounds, for before/after comparisons on a noisy machine)
#              CACHE (1: also measure cache hits: "ncache", nginx with proxy_cache
#              (proxy_cache_valid 200 60s), against "pcache", Palisade with a 60 s route cache, on
#              one URL; and "pkeys", a second Palisade instance (the same config with a one-hour
#              TTL, so that no URL it stores expires during the bench: rounds 1 and 2 run back
#              to back, and a fill's first URLs would expire 60 s later, in round 2), cycling
#              over KEYS (100000) distinct cached URLs, filled by a WARMUP_KEYS (20 s) warm-up,
#              whose threads each cycle over their own share of the keys so that all are
#              stored, against pcache's one-URL figure. Separate instances, as nginx's cache has none
#              of those URLs either: the 100,000 entries a pkeys warm-up stores expire 60 s
#              later, which in one shared instance fell in the next pcache round)
#              RATELIMIT (1: also measure "limited", Palisade with a rate limit on the route that
#              is never reached, against plain "palisade"; and "redis", the same limit kept in a
#              redis-server on core 1, reporting Redis round trips per request)
# Needs root (cgroups), nginx, wrk, taskset, curl (and redis-server, redis-cli for RATELIMIT).
# Traffic stays on 127.0.0.1.

set -euo pipefail

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-2}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
PERIOD_US=${PERIOD_US:-5000}
QUOTA_US=${QUOTA_US:-2000}
PORT_BASE=${PORT_BASE:-29100}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP=${KEEP:-0}
BASELINE=${BASELINE:-}
NICE=${NICE:--10}
RATELIMIT=${RATELIMIT:-1}
CACHE=${CACHE:-1}
export KEYS=${KEYS:-100000}
WARMUP_KEYS=${WARMUP_KEYS:-20}

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/benches/load"
CGROOT=/sys/fs/cgroup/cpu
ORIGIN1=$((PORT_BASE + 1))
ORIGIN2=$((PORT_BASE + 2))
REF_ORIGIN=$((PORT_BASE + 3))
NGINX_PORT=$((PORT_BASE + 10))
PALISADE_PORT=$((PORT_BASE + 20))
ADMIN_PORT=$((PORT_BASE + 21))
BASELINE_PORT=$((PORT_BASE + 30))
BASELINE_ADMIN_PORT=$((PORT_BASE + 31))
LIMITED_PORT=$((PORT_BASE + 40))
LIMITED_ADMIN_PORT=$((PORT_BASE + 41))
REDIS_LIMITED_PORT=$((PORT_BASE + 50))
REDIS_LIMITED_ADMIN_PORT=$((PORT_BASE + 51))
REDIS_PORT=$((PORT_BASE + 60))
NCACHE_PORT=$((PORT_BASE + 70))
PCACHE_PORT=$((PORT_BASE + 80))
PCACHE_ADMIN_PORT=$((PORT_BASE + 81))
PKEYS_PORT=$((PORT_BASE + 90))
PKEYS_ADMIN_PORT=$((PORT_BASE + 91))
URL_PATH=/api/items/42

for tool in nginx wrk taskset curl; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done
[ -d "$CGROOT" ] || { echo "cgroup v1 cpu controller not mounted at $CGROOT" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || { echo "needs at least 2 cores" >&2; exit 1; }

WORK=$(mktemp -d /tmp/palisade-bench.XXXXXX)
PIDS=()
CGROUPS=()
WATCHDOG=

cleanup() {
    set +e
    trap - EXIT INT TERM
    if [ -n "$WATCHDOG" ]; then
        pkill -P "$WATCHDOG" 2>/dev/null
        kill "$WATCHDOG" 2>/dev/null
    fi
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for _ in $(seq 30); do
        alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    for cg in "${CGROUPS[@]}"; do
        [ -f "$cg/cgroup.procs" ] && while read -r p; do kill -KILL "$p" 2>/dev/null; done <"$cg/cgroup.procs"
        for _ in $(seq 20); do rmdir "$cg" 2>/dev/null && break; sleep 0.1; done
    done
    wait 2>/dev/null
    if [ "$KEEP" = 1 ]; then echo "logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fill() { # template output: substitutes the @NAME@ placeholders
    sed -e "s|@DIR@|$WORK|g" -e "s|@ORIGIN1@|$ORIGIN1|g" -e "s|@ORIGIN2@|$ORIGIN2|g" \
        -e "s|@PORT@|$2|g" -e "s|@ADMIN@|${4:-$ADMIN_PORT}|g" "$1" >"$3"
}

make_cgroup() { # name -> path of a fresh cgroup with the quota
    local cg="$CGROOT/palisade-bench-$1"
    [ -d "$cg" ] && rmdir "$cg"
    mkdir "$cg"
    CGROUPS+=("$cg")
    echo "$PERIOD_US" >"$cg/cpu.cfs_period_us"
    echo "$QUOTA_US" >"$cg/cpu.cfs_quota_us"
    echo "$cg"
}

start_capped() { # name log cmd...: on core 0, inside the cgroup from birth (children inherit it)
    local cg="$CGROOT/palisade-bench-$1" log=$2
    shift 2
    bash -c 'cg=$0 n=$1; shift; echo $$ >"$cg/cgroup.procs" && exec nice -n "$n" taskset -c 0 "$@"' "$cg" "$NICE" "$@" >"$log" 2>&1 &
    PIDS+=($!)
}

start_free() { # log cmd...: on core 1, no quota
    local log=$1
    shift
    nice -n "$NICE" taskset -c 1 "$@" >"$log" 2>&1 &
    PIDS+=($!)
}

wait_ready() { # port: until it answers 200, at most 10 s
    for _ in $(seq 100); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$1$URL_PATH")" = 200 ] && return 0
        sleep 0.1
    done
    echo "port $1 did not answer 200 within 10 s" >&2
    exit 1
}

cg_ticks() { # user+system clock ticks of every process in a cgroup
    local t=0 p
    while read -r p; do
        t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done <"$1/cgroup.procs"
    echo "$t"
}
cpu1_ticks() { awk '$1=="cpu1"{print $2+$3+$4+$6+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }
throttled() { awk '$1=="nr_periods"{p=$2} $1=="nr_throttled"{t=$2} END{print p, t}' "$1/cpu.stat"; }

to_ms() { # wrk latency such as 812.00us, 1.52ms, 1.01s
    awk -v v="$1" 'BEGIN{
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
        else print "nan" }'
}

cache_lookups() { # admin port: hits and all lookups that Palisade's cache has counted so far
    curl -s --max-time 2 "http://127.0.0.1:$1/metrics" |
        awk '/^palisade_cache_lookups_total/{n += $NF; if ($0 ~ /result="hit"/) h += $NF} END{print h + 0, n + 0}'
}

redis_scripts() { # script calls Redis has served so far (EVALSHA and EVAL)
    redis-cli -p "$REDIS_PORT" info commandstats | awk -F'[=,:]' '/^cmdstat_(evalsha|eval):/{n += $3} END{print n + 0}'
}

RESULTS="$WORK/results"
: >"$RESULTS"

measure() { # target port round [wrk script]: the cgroup is the port's owner's
    local target=$1 port=$2 round=$3 cg="$CGROOT/palisade-bench-$1" out="$WORK/wrk-$1-$3.txt"
    local url="http://127.0.0.1:$port$URL_PATH" script=() warm=$WARMUP
    [ -n "${4:-}" ] && script=(-s "$4") && warm=$WARMUP_KEYS
    FILL=1 THREADS=$THREADS timeout $((warm + 10)) nice -n "$NICE" taskset -c 1 wrk -t"$THREADS" -c"$CONNECTIONS" -d"${warm}s" "${script[@]}" "$url" >/dev/null
    read -r p0 t0 < <(throttled "$cg")
    read -r b0 a0 < <(cpu1_ticks)
    local c0 c1
    c0=$(cg_ticks "$cg")
    local r0=0 h0=0 l0=0
    [ "$target" = redis ] && r0=$(redis_scripts)
    local admin=
    [ "$target" = pcache ] && admin=$PCACHE_ADMIN_PORT
    [ "$target" = pkeys ] && admin=$PKEYS_ADMIN_PORT
    [ -n "$admin" ] && read -r h0 l0 < <(cache_lookups "$admin")
    timeout $((DURATION + 15)) nice -n "$NICE" taskset -c 1 wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency "${script[@]}" "$url" >"$out"
    read -r b1 a1 < <(cpu1_ticks)
    read -r p1 t1 < <(throttled "$cg")
    c1=$(cg_ticks "$cg")
    local rps p99 bad errs
    rps=$(awk '/^Requests\/sec:/{print $2}' "$out")
    p99=$(to_ms "$(awk '$1=="99%"{print $2}' "$out")")
    bad=$(awk '/Non-2xx or 3xx/{print $NF}' "$out")
    errs=$(awk '/Socket errors/{gsub(",", ""); print $4+$6+$8+$10}' "$out")
    local thr core1 reqs us hits="" h1 l1
    if [ -n "$admin" ]; then
        read -r h1 l1 < <(cache_lookups "$admin")
        hits=$(awk -v h=$((h1 - h0)) -v l=$((l1 - l0)) 'BEGIN{printf "  cache hits %.2f%%", l ? 100 * h / l : 0}')
    fi
    reqs=$(awk '/requests in/{print $1}' "$out")
    if [ "$target" = redis ]; then
        echo "$reqs $r0 $(redis_scripts)" >>"$WORK/redis-round-trips"
    fi
    us=$(awk -v c=$((c1 - c0)) -v n="$reqs" -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.1f", n ? c * 1e6 / hz / n : 0}')
    thr=$(awk -v p=$((p1 - p0)) -v t=$((t1 - t0)) 'BEGIN{printf "%.0f%%", p ? 100 * t / p : 0}')
    core1=$(awk -v b=$((b1 - b0)) -v a=$((a1 - a0)) 'BEGIN{printf "%.0f%%", a ? 100 * b / a : 0}')
    echo "$target $round $rps $p99 ${bad:-0} ${errs:-0} $us" >>"$RESULTS"
    printf '  %-9s round %s: %8.0f req/s  p99 %7.3f ms  %6s CPU us/req  non-2xx %s  socket errors %s  throttled %s  core1 busy %s%s\n' \
        "$target" "$round" "$rps" "$p99" "$us" "${bad:-0}" "${errs:-0}" "$thr" "$core1" "$hits"
}

if [ "$SKIP_BUILD" != 1 ]; then
    echo "== building (release)"
    (cd "$ROOT" && cargo build --release --bin palisade --example origin)
fi
PALISADE="$ROOT/target/release/palisade"
ORIGIN="$ROOT/target/release/examples/origin"

TARGETS="origin nginx palisade"
[ -n "$BASELINE" ] && TARGETS="$TARGETS baseline"
[ "$RATELIMIT" = 1 ] && TARGETS="$TARGETS limited redis"
[ "$CACHE" = 1 ] && TARGETS="$TARGETS ncache pcache pkeys"
runs=$((ROUNDS * $(echo $TARGETS | wc -w)))
( sleep $((runs * (WARMUP + DURATION + 5) + 60)) && echo "watchdog: time is up" >&2 && kill -TERM $$ ) 2>/dev/null &
WATCHDOG=$!

echo "== starting origins, nginx and palisade"
mkdir -p "$WORK/tmp"
fill "$HERE/nginx.conf.in" "$NGINX_PORT" "$WORK/nginx.conf"
fill "$HERE/palisade.toml.in" "$PALISADE_PORT" "$WORK/palisade.toml"
"$PALISADE" check -c "$WORK/palisade.toml" >/dev/null
[ -n "$BASELINE" ] && fill "$HERE/palisade.toml.in" "$BASELINE_PORT" "$WORK/baseline.toml" "$BASELINE_ADMIN_PORT"
nginx -t -q -p "$WORK" -c "$WORK/nginx.conf"
if [ "$CACHE" = 1 ]; then
    # The worker runs as root so that it may write its cache under the private work directory.
    sed -e 's|nginx.pid|nginx-cache.pid|' -e 's|nginx-error.log|nginx-cache-error.log|' \
        -e 's|^worker_processes 1;|user root;\nworker_processes 1;|' \
        -e 's|^http {|http {\n    proxy_cache_path @DIR@/cache levels=1:2 keys_zone=bench:64m max_size=512m inactive=10m;|' \
        -e 's|proxy_pass http://origin;|proxy_pass http://origin;\n            proxy_cache bench;\n            proxy_cache_valid 200 60s;|' \
        "$HERE/nginx.conf.in" >"$WORK/nginx-cache.conf.in"
    fill "$WORK/nginx-cache.conf.in" "$NCACHE_PORT" "$WORK/nginx-cache.conf"
    nginx -t -q -p "$WORK" -c "$WORK/nginx-cache.conf"
    fill "$HERE/palisade.toml.in" "$PCACHE_PORT" "$WORK/pcache.toml" "$PCACHE_ADMIN_PORT"
    printf 'cache = { ttl = "60s" }\n\n[cache]\nmemory = "512MiB"\n' >>"$WORK/pcache.toml"
    "$PALISADE" check -c "$WORK/pcache.toml" >/dev/null
    fill "$HERE/palisade.toml.in" "$PKEYS_PORT" "$WORK/pkeys.toml" "$PKEYS_ADMIN_PORT"
    printf 'cache = { ttl = "3600s" }\n\n[cache]\nmemory = "512MiB"\n' >>"$WORK/pkeys.toml"
    "$PALISADE" check -c "$WORK/pkeys.toml" >/dev/null
fi
if [ "$RATELIMIT" = 1 ]; then
    # The route (the last table of the template) gets a limit far above what any run reaches.
    fill "$HERE/palisade.toml.in" "$LIMITED_PORT" "$WORK/limited.toml" "$LIMITED_ADMIN_PORT"
    echo 'rate_limit = { per = "client_ip", limit = "100000000/s" }' >>"$WORK/limited.toml"
    fill "$HERE/palisade.toml.in" "$REDIS_LIMITED_PORT" "$WORK/redis.toml" "$REDIS_LIMITED_ADMIN_PORT"
    printf 'rate_limit = { per = "client_ip", limit = "100000000/s" }\n\n[rate_limit]\nredis = { url = "redis://127.0.0.1:%s/0", timeout = "50ms", on_error = "allow" }\n' "$REDIS_PORT" >>"$WORK/redis.toml"
    "$PALISADE" check -c "$WORK/limited.toml" >/dev/null
    "$PALISADE" check -c "$WORK/redis.toml" >/dev/null
fi

start_free "$WORK/origin1.log" "$ORIGIN" "127.0.0.1:$ORIGIN1"
start_free "$WORK/origin2.log" "$ORIGIN" "127.0.0.1:$ORIGIN2"
make_cgroup origin >/dev/null
make_cgroup nginx >/dev/null
make_cgroup palisade >/dev/null
[ -n "$BASELINE" ] && make_cgroup baseline >/dev/null
start_capped origin "$WORK/ref-origin.log" "$ORIGIN" "127.0.0.1:$REF_ORIGIN"
start_capped nginx "$WORK/nginx.log" nginx -p "$WORK" -c "$WORK/nginx.conf"
start_capped palisade "$WORK/palisade.log" "$PALISADE" run -c "$WORK/palisade.toml"
ports="$ORIGIN1 $ORIGIN2 $REF_ORIGIN $NGINX_PORT $PALISADE_PORT"
if [ "$RATELIMIT" = 1 ]; then
    start_free "$WORK/redis-server.log" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no
    for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
    make_cgroup limited >/dev/null
    make_cgroup redis >/dev/null
    start_capped limited "$WORK/limited.log" "$PALISADE" run -c "$WORK/limited.toml"
    start_capped redis "$WORK/redis.log" "$PALISADE" run -c "$WORK/redis.toml"
    ports="$ports $LIMITED_PORT $REDIS_LIMITED_PORT"
fi
if [ "$CACHE" = 1 ]; then
    make_cgroup ncache >/dev/null
    make_cgroup pcache >/dev/null
    make_cgroup pkeys >/dev/null
    start_capped ncache "$WORK/nginx-cache.log" nginx -p "$WORK" -c "$WORK/nginx-cache.conf"
    start_capped pcache "$WORK/pcache.log" "$PALISADE" run -c "$WORK/pcache.toml"
    start_capped pkeys "$WORK/pkeys.log" "$PALISADE" run -c "$WORK/pkeys.toml"
    ports="$ports $NCACHE_PORT $PCACHE_PORT $PKEYS_PORT"
fi
if [ -n "$BASELINE" ]; then
    start_capped baseline "$WORK/baseline.log" "$BASELINE" run -c "$WORK/baseline.toml"
    ports="$ports $BASELINE_PORT"
fi
for port in $ports; do wait_ready "$port"; done
for t in $TARGETS; do
    echo "  $t: tasks in $CGROOT/palisade-bench-$t: $(wc -l <"$CGROOT/palisade-bench-$t/tasks")"
done

echo "== $ROUNDS rounds x $(echo $TARGETS | wc -w) targets, ${DURATION}s each (+${WARMUP}s warm-up), wrk -t$THREADS -c$CONNECTIONS, quota $QUOTA_US/$PERIOD_US us on core 0"
for round in $(seq "$ROUNDS"); do
    order=$TARGETS
    [ $((round % 2)) = 0 ] && order=$(echo $TARGETS | tr ' ' '\n' | tac | tr '\n' ' ')
    for t in $order; do
        case $t in
            origin) measure origin "$REF_ORIGIN" "$round" ;;
            nginx) measure nginx "$NGINX_PORT" "$round" ;;
            palisade) measure palisade "$PALISADE_PORT" "$round" ;;
            baseline) measure baseline "$BASELINE_PORT" "$round" ;;
            limited) measure limited "$LIMITED_PORT" "$round" ;;
            redis) measure redis "$REDIS_LIMITED_PORT" "$round" ;;
            ncache) measure ncache "$NCACHE_PORT" "$round" ;;
            pcache) measure pcache "$PCACHE_PORT" "$round" ;;
            pkeys) measure pkeys "$PKEYS_PORT" "$round" "$HERE/keys.lua" ;;
        esac
    done
done

echo
echo "== summary (mean over $ROUNDS rounds; p99 is the mean of each run's p99)"
awk -v targets="$TARGETS" '
    { n[$1]++; rps[$1] += $3; p99[$1] += $4; bad[$1] += $5 + $6; cpu[$1] += $7 }
    END {
        for (t in n) { rps[t] /= n[t]; p99[t] /= n[t]; cpu[t] /= n[t] }
        printf "%-10s %12s %10s %14s %12s %10s\n", "target", "req/s", "p99 ms", "vs origin", "CPU us/req", "errors"
        k = split(targets, order, " ")
        for (i = 1; i <= k; i++) {
            t = order[i]
            printf "%-10s %12.0f %10.3f %13.2fx %12.1f %10d\n", t, rps[t], p99[t], rps[t] / rps["origin"], cpu[t], bad[t]
        }
        r = rps["palisade"] / rps["nginx"]; q = p99["palisade"] / p99["nginx"]
        printf "\nPalisade/nginx: req/s %.2fx, p99 %.2fx, CPU per request %.2fx\n", r, q, cpu["palisade"] / cpu["nginx"]
        if ("baseline" in n)
            printf "Palisade/baseline: req/s %.2fx, p99 %.2fx, CPU per request %.2fx\n", rps["palisade"] / rps["baseline"], p99["palisade"] / p99["baseline"], cpu["palisade"] / cpu["baseline"]
        ok = (r >= 1.2 && q <= 1.0 && bad["palisade"] == 0)
        printf "bar (req/s >= 1.2x nginx, p99 <= nginx, no errors): %s\n", ok ? "PASS" : "FAIL"
        if ("limited" in n) {
            l = rps["limited"] / rps["palisade"]
            lok = (l >= 0.95)
            printf "\nrate limit never reached / unlimited: req/s %.2fx, p99 %.2fx (bar >= 0.95x: %s)\n", l, p99["limited"] / p99["palisade"], lok ? "PASS" : "FAIL"
            printf "global limit in Redis: %.0f req/s (%.2fx unlimited), p99 %.3f ms\n", rps["redis"], rps["redis"] / rps["palisade"], p99["redis"]
        }
        if ("pcache" in n) {
            c = rps["pcache"] / rps["ncache"]; cq = p99["pcache"] / p99["ncache"]
            cok = (c >= 1.6 && cq <= 1.0)
            printf "\ncache hits, Palisade/nginx proxy_cache: req/s %.2fx, p99 %.2fx (bar >= 1.6x and p99 <= nginx: %s)\n", c, cq, cok ? "PASS" : "FAIL"
            k = rps["pkeys"] / rps["pcache"]
            kok = (k >= 0.9)
            printf "cache hits over %d keys / one key: req/s %.2fx (bar >= 0.9x: %s)\n", ENVIRON["KEYS"], k, kok ? "PASS" : "FAIL"
        }
    }' "$RESULTS"
if [ -f "$WORK/redis-round-trips" ]; then
    awk '{ reqs += $1; calls += $3 - $2 } END { printf "Redis round trips per request: %.3f (%d script calls for %d requests; warm-ups excluded)\n", reqs ? calls / reqs : 0, calls, reqs }' "$WORK/redis-round-trips"
fi
