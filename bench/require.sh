# Sourced by the bench scripts: `require SCRIPT TOOL...` stops with an install hint when a
# tool is missing.
require() {
    local script="$1" tool
    shift
    for tool in "$@"; do
        command -v "$tool" >/dev/null || {
            echo "$script: $tool missing (it needs $*: Debian packages of those names, perf from linux-perf, callgrind_* from valgrind)" >&2
            exit 1
        }
    done
}
