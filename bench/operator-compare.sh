#!/usr/bin/env bash
# `make bench-operator-compare [OLD_REV=rev] [ROUNDS=n]`: the operator scale benchmark
# (`operator/examples/scale.rs`) at an older revision against the working tree.
#
#   bench/operator-compare.sh [OLD_REV] [ROUNDS]
#
# OLD_REV defaults to the merge-base with main; ROUNDS (default 5) is how many times each side
# runs. Both binaries are built in release first (the old one from a temporary `git worktree`
# with a target directory of its own, kept between runs so a rebuild is incremental), then
# run interleaved (old, new, old, new, ...) so that load from other work on the host falls on
# both alike. For each figure it prints the median of each side, the spread (min-max) and the
# ratio new/old (below 1 is better for times and memory). Nothing fails on a number: this
# reports, it does not judge.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OLD_REV="${1:-$(git merge-base HEAD main)}"
if [[ -z ${1:-} && $(git rev-parse "$OLD_REV") == $(git rev-parse HEAD) ]] && git diff --quiet HEAD -- operator; then
    echo "operator-compare: the default old revision (the merge-base with main) is HEAD itself" \
        "and the operator is unchanged: name the revision to compare with, e.g." \
        "bench/operator-compare.sh HEAD~5" >&2
    exit 2
fi
ROUNDS="${2:-${ROUNDS:-5}}"
OLD_SHA="$(git rev-parse --verify "$OLD_REV^{commit}")"
NEW_TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OLD_TARGET="${OPERATOR_COMPARE_OLD_TARGET:-${TMPDIR:-/tmp}/stratum-operator-compare-target}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/stratum-operator-compare.XXXXXX")"
OLD_TREE="$WORK/old"
NO_SYS_TIME=(setpriv --bounding-set=-sys_time --inh-caps=-sys_time)
cleanup() {
    git worktree remove --force "$OLD_TREE" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "old: ${OLD_SHA:0:12} ($(git log -1 --format=%s "$OLD_SHA"))" >&2
echo "new: working tree of $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . || echo ' + uncommitted changes')" >&2
git worktree add --detach "$OLD_TREE" "$OLD_SHA" >/dev/null 2>&1
(cd "$OLD_TREE" && CARGO_TARGET_DIR="$OLD_TARGET" nice -n 19 cargo build --quiet --release \
    -p stratum-operator --example scale)
CARGO_TARGET_DIR="$NEW_TARGET" nice -n 19 cargo build --quiet --release -p stratum-operator \
    --example scale
# Copied out: a build elsewhere in the same target directory cannot swap the binary mid-run.
cp "$OLD_TARGET/release/examples/scale" "$WORK/scale-old"
cp "$NEW_TARGET/release/examples/scale" "$WORK/scale-new"

# One run's figures as `name<TAB>value` lines, from the table scale.rs prints.
figures() {
    awk -F'|' '
        function num(s) { gsub(/[^0-9.]/, "", s); return s }
        /loaded event by event/ { match($0, /in [0-9.]+ ms/); print "index load, event by event (ms)\t" num(substr($0, RSTART, RLENGTH)) }
        /full resolution, 1000 allow lists/ { print "full resolution, 1000 allow lists (ms)\t" num($3) }
        /full agent config build/ { print "full agent config build + encode (ms)\t" num($3) }
        /every tenant.s plan/ { print "every tenant plan, as after a restart (ms)\t" num($3) }
        /affected allow lists, median/ { print "pod add: affected allow lists, median (ms)\t" num($3) }
        /new ConfigMap ready, CPU/ { split($3, v, "/"); print "pod add -> ConfigMap, CPU median (ms)\t" num(v[1]); print "pod add -> ConfigMap, CPU p99 (ms)\t" num(v[2]) }
        /new ConfigMap ready, wall/ { split($3, v, "/"); print "pod add -> ConfigMap, wall median (ms)\t" num(v[1]); print "pod add -> ConfigMap, wall p99 (ms)\t" num(v[2]) }
        /RSS now/ { split($3, v, "/"); print "RSS now (MiB)\t" num(v[1]); print "RSS peak (MiB)\t" num(v[2]) }
        /gzipped as written/ { split($3, v, "KiB"); print "agent config gzipped (KiB)\t" num(v[1]) }
    '
}

for round in $(seq 1 "$ROUNDS"); do
    for side in old new; do
        echo "round $round/$ROUNDS: $side" >&2
        out="$("${NO_SYS_TIME[@]}" "$WORK/scale-$side")"
        printf '%s\n' "$out" | figures | sed "s/^/$side\t/" >>"$WORK/figures.tsv"
    done
done

# Per figure, in first-seen order: median, min-max of each side, ratio of the medians.
awk -F'\t' '
    function median(list,    n, a, i, j, t) {
        n = split(list, a, " ")
        for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    function spread(list,    n, a, i, lo, hi) {
        n = split(list, a, " "); lo = hi = a[1]
        for (i = 2; i <= n; i++) { if (a[i] + 0 < lo + 0) lo = a[i]; if (a[i] + 0 > hi + 0) hi = a[i] }
        return lo "-" hi
    }
    !(($2) in seen) { seen[$2] = 1; order[++count] = $2 }
    { values[$1, $2] = values[$1, $2] " " $3 }
    END {
        printf "| %-44s | %10s | %-15s | %10s | %-15s | %7s |\n", "figure", "old median", "old min-max", "new median", "new min-max", "new/old"
        printf "|%s|%s|%s|%s|%s|%s|\n", "----------------------------------------------", "-----------:", "-----------------", "-----------:", "-----------------", "--------:"
        for (i = 1; i <= count; i++) {
            f = order[i]; o = median(values["old", f]); n = median(values["new", f])
            ratio = o + 0 > 0 ? sprintf("%.3f", n / o) : "-"
            printf "| %-44s | %10s | %-15s | %10s | %-15s | %7s |\n", f, o, spread(values["old", f]), n, spread(values["new", f]), ratio
        }
    }
' "$WORK/figures.tsv"
echo "($ROUNDS rounds each, interleaved; old ${OLD_SHA:0:12})"
