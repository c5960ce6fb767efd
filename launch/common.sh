# shellcheck shell=bash
# Shared functions of the launch scripts (sourced, not run): quoting, dry runs, errors.
#
# Every external command goes through `run` (or `show` for a command that is only described), so a
# dry run (DRY_RUN=1 or --dry_run) prints each command, quoted so that it can be pasted into a shell,
# and runs nothing.

# Prints "error: MESSAGE" on one line to stderr and exits with CODE (default 1; 2 = bad flag).
die() {
  local code=1
  if [[ $# -gt 1 ]]; then code=$1; shift; fi
  echo "error: $*" >&2
  exit "$code"
}

# Prints one argument quoted for a POSIX shell, as readably as possible:
#   plain words stay bare; --flag=VALUE keeps the flag bare and quotes only VALUE;
#   a value without ", $, `, \ or ! goes in double quotes (so --gin.MODEL_DIR="'gs://b/run'");
#   anything else goes in single quotes.
shq() {
  local s=$1 re_bare='^[A-Za-z0-9_./:=,+@%^-]+$' re_flag='^(--?[A-Za-z0-9_.-]+=)(.*)$'
  if [[ -n $s && $s =~ $re_bare ]]; then
    printf '%s' "$s"
  elif [[ $s =~ $re_flag ]] && [[ -n ${BASH_REMATCH[2]} ]]; then
    local flag=${BASH_REMATCH[1]} value=${BASH_REMATCH[2]}
    printf '%s' "$flag"
    shq "$value"
  elif [[ $s != *[\"\$\`\\\!]* ]]; then
    printf '"%s"' "$s"
  else
    local sq="'" esc="'\\''"
    printf "'%s'" "${s//$sq/$esc}"
  fi
}

# Prints a whole command line, each argument quoted by `shq`.
quote_command() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(shq "$arg")"
  done
  printf '%s\n' "$out"
}

# Runs a command, or prints it (prefixed with "+ ") when DRY_RUN=1.
run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '+ %s\n' "$(quote_command "$@")"
    return 0
  fi
  echo "+ $(quote_command "$@")" >&2
  "$@"
}

# Checks that a command exists unless this is a dry run.
need_command() {
  [[ ${DRY_RUN:-0} == 1 ]] && return 0
  command -v "$1" >/dev/null 2>&1 || die 1 "$1 not found on PATH ($2)"
}

# Reads "--name=value" into the variable VAR; prints nothing, fails if the flag lacks "=value".
# usage: flag_value --name=value
flag_value() {
  [[ $1 == *=* ]] || die 2 "$1: expected ${1}=VALUE"
  printf '%s' "${1#*=}"
}

# Accepts 1/0/true/false/yes/no; prints 1 or 0.
as_bool() {
  case "${1,,}" in
    1|true|yes|on) printf 1 ;;
    0|false|no|off|"") printf 0 ;;
    *) die 2 "$2: expected true or false, got '$1'" ;;
  esac
}
