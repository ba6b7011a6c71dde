#!/usr/bin/env bash
# Joins the model's parts as they arrive (transfers to a GPU machine are limited in size, so the
# parts may come in several batches): appends every part in PARTS_DIR that DEST lacks, in order,
# and checks the SHA-256 once all have arrived. Exit 0 when complete, 3 while parts are missing.
#   ./stage-model.sh PARTS_DIR DEST
set -euo pipefail
parts_dir=$1 dest=$2
progress="$dest.parts-done"
done_count=$(cat "$progress" 2>/dev/null || echo 0)
[ "$done_count" = 0 ] && : > "$dest"
total=$(cat "$parts_dir/parts" 2>/dev/null || cat "$dest.parts-total" 2>/dev/null || echo "?")
[ "$total" != "?" ] && echo "$total" > "$dest.parts-total"
[ -f "$parts_dir/model.sha256" ] && cp "$parts_dir/model.sha256" "$dest.sha256"
while part=$(printf '%s/part%02d' "$parts_dir" "$done_count") && [ -f "$part" ]; do
    cat "$part" >> "$dest"
    done_count=$((done_count + 1))
    echo "$done_count" > "$progress"
done
if [ "$total" != "?" ] && [ "$done_count" -ge "$total" ]; then
    want=$(cut -d' ' -f1 "$dest.sha256")
    got=$(sha256sum "$dest" | cut -d' ' -f1)
    [ "$want" = "$got" ] || { echo "stage-model: $dest does not match its SHA-256 ($got != $want)" >&2; exit 1; }
    echo "stage-model: $dest complete ($done_count parts, sha256 ok)"
    exit 0
fi
echo "stage-model: $done_count of $total parts in $dest; send the next"
exit 3
