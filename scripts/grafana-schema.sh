#!/usr/bin/env bash
# Grafana's own dashboard JSON Schema, generated from Grafana's TypeScript types (idempotent, cached).
#
#   scripts/grafana-schema.sh [VERSION...]      default: the pinned versions below
#
# For each @grafana/schema VERSION: `npm install` the package and ts-json-schema-generator into
# $NETWATCHD_GRAFANA_SCHEMA_DIR/VERSION (default .cache/grafana-schema/VERSION, .gitignore'd), then turn the
# `Dashboard` type of its raw dashboard types (dist/types/raw/dashboard/x/types.gen.d.ts; older releases
# name the file dashboard_types.gen.d.ts) into JSON Schema (draft-07). Prints one line per version on
# stdout: "VERSION PATH-TO-dashboard.schema.json". Progress and errors go to stderr; exit 1 when a schema
# cannot be had (no npm, no registry): tests/test_dashboards.py turns that into a skip with the reason.
#
# Pins: 11.6.0 is the Grafana release grafana-foundation-sdk==1769699379!11.6.0 generates for (what
# dashboards/build.py uses); 13.2.3 was the newest release when this was written, so the dashboards are
# also checked against what current Grafana accepts. --no-type-check: the generator's own type check of
# Grafana's .d.ts fails on unrelated lib settings (tsc itself accepts the file); the types are unchanged.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${NETWATCHD_GRAFANA_SCHEMA_DIR:-$REPO/.cache/grafana-schema}"
GENERATOR_VERSION="2.10.0"
DEFAULT_VERSIONS=(11.6.0 13.2.3)

log() { printf 'grafana-schema: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

one() {
  local version="$1" dir="$CACHE/$1"
  local out="$dir/dashboard.schema.json"
  if [[ ! -s "$out" ]]; then
    command -v npm >/dev/null || die "npm is not installed (apt-get install npm, or nodejs from NodeSource)"
    mkdir -p "$dir"
    log "fetching @grafana/schema@$version and ts-json-schema-generator@$GENERATOR_VERSION into $dir"
    [[ -f "$dir/package.json" ]] || printf '{"name":"netwatchd-grafana-schema","private":true}\n' >"$dir/package.json"
    npm install --prefix "$dir" --no-audit --no-fund --silent \
      "@grafana/schema@$version" "ts-json-schema-generator@$GENERATOR_VERSION" >&2 \
      || die "npm install @grafana/schema@$version failed"
    local types=""
    for cand in dist/types/raw/dashboard/x/types.gen.d.ts dist/types/raw/dashboard/x/dashboard_types.gen.d.ts \
                dist/esm/raw/dashboard/x/dashboard_types.gen.d.ts; do
      if [[ -f "$dir/node_modules/@grafana/schema/$cand" ]]; then types="$dir/node_modules/@grafana/schema/$cand"; break; fi
    done
    [[ -n "$types" ]] || die "@grafana/schema@$version: no raw dashboard types file found"
    log "generating $out from ${types#"$dir/"}"
    "$dir/node_modules/.bin/ts-json-schema-generator" --path "$types" --type Dashboard --no-type-check \
      -o "$out.tmp" >&2 || die "ts-json-schema-generator failed for @grafana/schema@$version"
    mv "$out.tmp" "$out"
  fi
  printf '%s %s\n' "$version" "$out"
}

versions=("$@")
(( ${#versions[@]} )) || versions=("${DEFAULT_VERSIONS[@]}")
for v in "${versions[@]}"; do
  one "$v"
done
