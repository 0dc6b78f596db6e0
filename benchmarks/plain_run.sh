# Sourced by the benchmarks/issue*_h200.sh scripts: `plain NAME ARGS...` runs benchmarks/plain_module.py with ARGS,
# writes $OUT/NAME.json and $OUT/NAME.stderr, prints the result line and, as they happen, the progress lines (build,
# setup, each step; grep flushes each line, so a run cut by a timeout still shows how far it got).
plain() {
  local name=$1
  shift
  python -u benchmarks/plain_module.py "$@" --out "$OUT/$name.json" \
    2> >(tee "$OUT/$name.stderr" | grep --line-buffered -E "^step|^model built|^plain:|Error" >&2) | tail -1 | cut -c1-700 \
    || { echo "$name: failed"; tail -5 "$OUT/$name.stderr"; }
}
