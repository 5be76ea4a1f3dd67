#!/usr/bin/env bash
# Validate the alerting set-up with the real tools: promtool checks and unit-tests the rules,
# amtool checks the Alertmanager config and where each kind of alert is routed.
# Quiet on success except one summary line; on failure prints the failing tool's output, exits 1.
set -uo pipefail
cd "$(dirname "$0")/.."

PROMTOOL=${PROMTOOL:-promtool}
AMTOOL=${AMTOOL:-amtool}
OPSKIT=${OPSKIT:-.venv/bin/opskit}
[ -x "$OPSKIT" ] || OPSKIT=opskit
AM=alerts/alertmanager.yml
failed=0
checks=0

run() {  # run CMD...: quiet unless it fails
    local out
    checks=$((checks + 1))
    if ! out=$("$@" 2>&1); then
        echo "FAILED: $*" >&2
        echo "$out" >&2
        failed=$((failed + 1))
    fi
}

route() {  # route RECEIVER LABEL=VALUE...: the alert must reach exactly RECEIVER
    local want=$1
    shift
    run "$AMTOOL" config routes test --config.file="$AM" --verify.receivers="$want" "$@"
}

for tool in "$PROMTOOL" "$AMTOOL"; do
    command -v "$tool" >/dev/null || { echo "alerts/check.sh: $tool not found (run: make system-deps)" >&2; exit 1; }
done

# The committed Alertmanager config carries the placeholder receivers, whatever this shell exports.
run env -u OPSKIT_ALERT_RECEIVER_URL -u OPSKIT_ALERT_PAGER_URL -u OPSKIT_ALERT_CHAT_URL \
    -u OPSKIT_ALERT_TICKET_URL "$OPSKIT" generate alerts --check
# The same rules for the dcgm GPU source, which alerts/tests/gpu_dcgm.test.yml loads.
run env -u OPSKIT_ALERT_RECEIVER_URL -u OPSKIT_ALERT_PAGER_URL -u OPSKIT_ALERT_CHAT_URL \
    -u OPSKIT_ALERT_TICKET_URL "$OPSKIT" generate alerts --gpu-source dcgm --out-dir alerts/dcgm --check
run "$PROMTOOL" check rules alerts/*.rules.yml alerts/dcgm/*.rules.yml
run "$PROMTOOL" test rules alerts/tests/*.yml
run "$AMTOOL" check-config "$AM"

route pager alertname=LLMErrorRateCritical severity=critical target=api
route pager alertname=LLMErrorBudgetFastBurn severity=critical slo=availability target=api
route pager alertname=LLMProbeFailing severity=critical target=api instance=exporter:9464
route chat alertname=LLMHighTimeToFirstToken severity=warning target=api
route chat alertname=GPUHighUtilization severity=warning gpu=0 instance=node1:9464
route chat alertname=OpskitExporterDown severity=warning instance=exporter:9464 job=opskit
route pager alertname=GPUHardwareErrors severity=critical gpu=0 instance=node1:9464 error=xid_79
route ticket alertname=GPURowRemapPending severity=ticket gpu=0 instance=node1:9464
route ticket alertname=LLMErrorBudgetSlowBurn severity=ticket slo=availability target=api
# An alert without a known severity still reaches a human.
route chat alertname=SomethingElse
route chat alertname=SomethingElse severity=info

if [ "$failed" -ne 0 ]; then
    echo "alerts/check.sh: $failed of $checks checks failed" >&2
    exit 1
fi
echo "alerts/check.sh: $checks checks passed (rules generated and valid, promtool tests, alertmanager config and routes)"
