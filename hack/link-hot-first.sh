#!/usr/bin/env bash
# The linker for x86_64 Linux builds (.cargo/config.toml). Every link goes straight to `cc`,
# except the `tandem` binary of the `node` profile (what the image ships), which is linked
# with its hot functions first: those that start-up and a prepare/unprepare run, listed in
# hack/hot-functions.txt (hack/hot-functions.sh writes it).
#
# Why: a process's idle RSS counts every page of the binary it has mapped, and the kernel maps
# the 16 pages around each page a fault touches (fault-around). Start-up runs ~2 MB of code
# spread over the whole 8.7 MB of text, so ~80% of it ended up resident; packed together it is
# ~2.6 MB (BENCHMARKS.md).
#
# The list holds names without their hashes (the `17h…E` of legacy symbols, the crate
# disambiguators of v0 ones, LLVM's `.llvm.N` and `.N` suffixes), which change with the
# compiler and any dependency; this script maps them to the link's symbols. A name that is
# gone only stays where the linker puts it. Without lld (whose --symbol-ordering-file this
# needs) or nm, it links as `cc` would and says so. It leaves `<output>.hot-order` (the order
# given to lld, and a count on its first line) beside the output.
set -euo pipefail

# A symbol's name without what changes between builds (see above), one per line on stdin;
# hack/hot-functions.sh writes the list with it.
unhashed='
  function unhashed(name) {
    sub(/\.llvm\.[0-9]+$/, "", name)
    sub(/\.[0-9]+$/, "", name)
    if (name ~ /^_ZN/) sub(/17h[0-9a-f]+E$/, "E", name)
    else if (name ~ /^_R/) gsub(/Cs[0-9A-Za-z]*_/, "C", name)
    return name
  }'
if [[ "${1:-}" == --unhashed ]]; then
  exec awk "${unhashed}"' { print unhashed($0) }'
fi

# TANDEM_LINKER and TANDEM_HOT_FUNCTIONS replace `cc` and the list (tests/hot_link.rs).
linker="${TANDEM_LINKER:-cc}"
output=""
uses_lld=false
objects=()
previous=""
for arg in "$@"; do
  case "${previous}" in -o) output="${arg}" ;; esac
  case "${arg}" in
    -fuse-ld=lld) uses_lld=true ;;
    *.o | *.a) [[ -f "${arg}" ]] && objects+=("${arg}") ;;
  esac
  previous="${arg}"
done

case "${output}" in
  */node/deps/tandem-*) ;;
  *) exec "${linker}" "$@" ;;
esac

list="${TANDEM_HOT_FUNCTIONS:-$(dirname "${BASH_SOURCE[0]}")/hot-functions.txt}"
if [[ "${uses_lld}" != true ]] || ! command -v nm >/dev/null 2>&1 || [[ ! -f "${list}" ]]; then
  echo "link-hot-first: linking ${output##*/} without hot-function order (needs lld, nm and ${list})" >&2
  exec "${linker}" "$@"
fi

order="${output}.hot-order"
# nm prints "value type name" per defined symbol (archives add "file:" headers, skipped); the
# text symbols are matched by their hash-free names against the list, in the list's order.
nm --defined-only "${objects[@]}" 2>/dev/null | awk -v list="${list}" "${unhashed}"'
  BEGIN {
    while ((getline line < list) > 0) {
      if (line == "" || line ~ /^#/) continue
      wanted++
      rank[line] = wanted
      name[wanted] = line
    }
  }
  NF == 3 && $2 ~ /^[tTwW]$/ {
    key = unhashed($3)
    if (key in rank) {
      if (!(key in found)) { found[key] = 1; hits++ }
      symbols[rank[key]] = symbols[rank[key]] $3 "\n"
    }
  }
  END {
    printf "# %d of %d hot functions found in this link\n", hits, wanted
    # A plain C name (no Rust mangling, so nothing was stripped from it) not in the objects may
    # still come from a library given as -l (glibc, when linked statically): lld orders it
    # under that name if it is there and ignores it if not.
    for (i = 1; i <= wanted; i++) {
      if (i in symbols) printf "%s", symbols[i]
      else if (name[i] !~ /^_(ZN|R)/) print name[i]
    }
  }
' >"${order}" || {
  echo "link-hot-first: could not read the symbols of ${output##*/}; linking without order" >&2
  exec "${linker}" "$@"
}

exec "${linker}" "$@" "-Wl,--symbol-ordering-file=${order}" -Wl,--no-warn-symbol-ordering
