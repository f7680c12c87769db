#!/usr/bin/env bash
# Install tcexport with its test extras and run the test suite (GPU/TensorRT tests skip with a reason here).
#
# Tests run in parallel with pytest-xdist (TCEXPORT_TEST_WORKERS, default: one per CPU), a whole file per worker
# (--dist loadfile) so a file's module fixtures are built once; the tiny models the session fixtures export are
# made once per run and shared by the workers (tests/conftest.py: made_once). pytest's temporary files go to a
# directory of their own, removed at the end, so nothing large stays in /tmp. The elapsed time is printed last.
# The default run leaves out the slow end-to-end tests (marked `slow`, listed in tests/conftest.py); `--all`
# (what CI runs) includes them. Extra arguments go to pytest, e.g. `bash scripts/test.sh -k bench` or
# `TCEXPORT_TEST_WORKERS=0 bash scripts/test.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
temp=$(mktemp -d "${TMPDIR:-/tmp}/tcexport-tests.XXXXXX")
report() {
  local status=$? elapsed=$(( $(date +%s) - start ))
  rm -rf "$temp"
  printf 'test suite: %d min %02d s (install included), exit %d\n' $((elapsed / 60)) $((elapsed % 60)) "$status" >&2
}
trap report EXIT
select=(-m "not slow")
if [ "${1:-}" = "--all" ]; then
  select=()
  shift
fi
workers=${TCEXPORT_TEST_WORKERS:-auto}
parallel=()
if [ "$workers" != "0" ]; then
  parallel=(-n "$workers" --dist loadfile)
fi
python -m pytest -q -rs ${parallel[@]+"${parallel[@]}"} ${select[@]+"${select[@]}"} --basetemp "$temp/pytest" "$@"  # (empty array safe on bash 4.3)
