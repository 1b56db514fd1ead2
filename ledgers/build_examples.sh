#!/usr/bin/env bash
# Rebuilds the example text ledgers in this folder with the kledger CLI, reproducibly (fixed dates,
# fixed author). Run from the repository root: bash ledgers/build_examples.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
data="$here/../../shared/data"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export KLEDGER_AUTHOR="kledger examples <examples@kledger.invalid>"
export KLEDGER_DATE="2026-01-01T00:00:00+00:00"

# eiffel: the quick-start ledger, one fact.
kledger init "$work/eiffel" >/dev/null
cd "$work/eiffel"
kledger add "The Eiffel Tower is located in the city of" Rome --subject "Eiffel Tower" --old Paris
kledger commit -m "Move the Eiffel Tower to Rome (the classic ROME demo)"
kledger export "$here/eiffel"

# counterfact-demo: 30 CounterFact records in batches, a branch, a merge and a revert.
kledger init "$work/cf" >/dev/null
cd "$work/cf"
python - "$data/counterfact-train.json" "$work" <<'PY'
import json, sys
recs = json.load(open(sys.argv[1]))[:40]
for i, chunk in enumerate((recs[0:10], recs[10:20], recs[20:30], recs[30:40])):
    json.dump(chunk, open(f"{sys.argv[2]}/batch{i}.json", "w"))
PY
kledger add --file "$work/batch0.json"; kledger commit -m "CounterFact records 0-9"
export KLEDGER_DATE="2026-01-02T00:00:00+00:00"
kledger add --file "$work/batch1.json"; kledger commit -m "CounterFact records 10-19"
kledger checkout -b experiment
export KLEDGER_DATE="2026-01-03T00:00:00+00:00"
kledger add --file "$work/batch2.json"; kledger commit -m "CounterFact records 20-29 (experiment)"
kledger checkout main
export KLEDGER_DATE="2026-01-04T00:00:00+00:00"
kledger add --file "$work/batch3.json"; kledger commit -m "CounterFact records 30-39"
export KLEDGER_DATE="2026-01-05T00:00:00+00:00"
kledger merge experiment -m "Merge the experiment"
export KLEDGER_DATE="2026-01-06T00:00:00+00:00"
kledger revert HEAD~2 -m "Revert records 10-19: to be re-checked"
kledger export "$here/counterfact-demo"
