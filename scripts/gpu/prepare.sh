#!/usr/bin/env bash
# Download HERE the Python 3.12 wheels the GPU machine lacks for scripts/gpu/check.sh: each name of
# scripts/gpu/wheels.txt at its pin in requirements/megatron-cpu312.txt, --no-deps (the image has
# torch 2.11 + CUDA 13 and the rest: scripts/gpu/image_packages.txt). Fails when the wheels plus
# the working tree that travels with them would pass the device tool's 64 MiB.
#   bash scripts/gpu/prepare.sh [DEST]        (default DEST: gpu-wheels/, ignored by git)
# Then, through the device tool: command "bash scripts/gpu/check.sh", carry ["gpu-wheels"].
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="${1:-$ROOT/gpu-wheels}"
LOCK="$ROOT/requirements/megatron-cpu312.txt"
LIST="$ROOT/scripts/gpu/wheels.txt"
LIMIT_MIB="${LIMIT_MIB:-64}"   # the device tool's limit on what travels (README: Limits)
PY="${PYTHON:-python3}"        # any Python with pip: --python-version picks the target
die() { echo "prepare.sh: $*" >&2; exit 2; }

[ -f "$LOCK" ] || die "no lock file $LOCK"
pins=()
while read -r name; do
  [ -z "$name" ] && continue
  pin="$(grep -i -m1 "^${name}==" "$LOCK" || true)"
  [ -n "$pin" ] || die "$name is not pinned in $LOCK"
  pins+=("$pin")
done < <(sed 's/#.*//; s/[[:space:]]//g' "$LIST")
[ ${#pins[@]} -gt 0 ] || die "no names in $LIST"

rm -rf "$DEST"
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
echo "prepare.sh: downloading ${pins[*]} (Python 3.12, x86_64) into $DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DEST" "${pins[@]}"

count=$(find "$DEST" -name '*.whl' | wc -l)
[ "$count" -eq ${#pins[@]} ] || die "expected ${#pins[@]} wheels in $DEST, found $count"
# Every unconditional requirement of a carried wheel must be in the image or carried as well.
"$PY" - "$DEST" "$ROOT/scripts/gpu/image_packages.txt" "$LIST" <<'PYEOF' || die "a carried wheel needs a distribution the GPU image lacks (add it to scripts/gpu/wheels.txt)"
import pathlib, re, sys, zipfile
dest, image, carried = sys.argv[1:]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
have = {norm(l.split("#")[0].strip()) for f in (image, carried) for l in open(f) if l.split("#")[0].strip()}
missing = []
for whl in sorted(pathlib.Path(dest).glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                name = norm(re.match(r"Requires-Dist:\s*([A-Za-z0-9_.\-]+)", line).group(1))
                if name not in have:
                    missing.append(f"{whl.name} requires {line.split(':', 1)[1].strip()}")
print("\n".join(f"prepare.sh: {m}" for m in missing) or "prepare.sh: every requirement is in the image or carried")
sys.exit(1 if missing else 0)
PYEOF
wheels=$(du -sb "$DEST" | cut -f1)
# What travels besides: tracked files and untracked files git does not ignore (README: Limits).
tree=$(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
       | awk '{s += $1} END {print s + 0}') || true  # stat skips deleted files
total=$((wheels + tree))
limit=$((LIMIT_MIB * 1024 * 1024))
awk -v w="$wheels" -v t="$tree" -v l="$LIMIT_MIB" 'BEGIN { m = 1048576;
  printf "prepare.sh: wheels %.1f MiB + working tree %.1f MiB = %.1f MiB (limit %d MiB)\n", w / m, t / m, (w + t) / m, l }'
if [ "$total" -gt "$limit" ]; then
  echo "prepare.sh: OVER THE LIMIT by $(( (total - limit) / 1048576 + 1 )) MiB: carry fewer wheels or shrink the tree" >&2
  exit 1
fi
ls -l "$DEST"
