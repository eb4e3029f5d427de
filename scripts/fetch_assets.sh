#!/usr/bin/env bash
# Fetch the official copies of the model and the test footage into a shared dir (default
# ../shared beside the repo, or $EDGE_SHARED_DIR), checking each file's sha256.
# For users with internet; tests never run this (they read ../shared as it is).
#
#   scripts/fetch_assets.sh            # model + PETS09-S2L1 + TUD clips
#   scripts/fetch_assets.sh model      # just the model
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
dest="${EDGE_SHARED_DIR:-$here/../shared}"
python="${PYTHON:-$here/.venv/bin/python}"
[ -x "$python" ] || python=python3
what="${1:-all}"

MODEL_URL="https://github.com/Kazuhito00/YOLOX-ONNX-TFLite-Sample/raw/main/model/yolox_nano.onnx"
MODEL_SHA=695e750a5d5754bb5a8d5325643b59282191a7e7a564e435a415fd3c578eab14
PETS_URL="https://raw.githubusercontent.com/opencv/opencv/4.x/samples/data/vtest.avi"
PETS_SHA=45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf
MOT15_URL="https://motchallenge.net/data/MOT15.zip"  # ground truth (and TUD frames), ~1.3 GB
declare -A GT_SHA=(
  [PETS09-S2L1]=9759f51a2429b17e1f4dfdd76cf9731ca02097069298914b51d35bb9045baf1d
  [TUD-Campus]=6ea5c56dffa72db2d286bf3c4593465583bfe43e9ecaa110001ccce2c4d10e39
  [TUD-Stadtmitte]=009b3ef8df68c963fd8104350083fd6bc9798b6b435858b99dbd1385cfbde873
)

die() { echo "fetch_assets: $*" >&2; exit 1; }

verify() {  # verify FILE SHA256: a mismatch removes nothing, it only refuses
  local got
  got="$(sha256sum "$1" | cut -d' ' -f1)"
  [ "$got" = "$2" ] || die "$1: sha256 $got, expected $2 (download corrupted or upstream changed)"
  echo "ok  $1"
}

fetch() {  # fetch URL FILE SHA256: skip when already there and verified
  local url="$1" file="$2" sha="$3"
  if [ -f "$file" ] && [ "$(sha256sum "$file" | cut -d' ' -f1)" = "$sha" ]; then
    echo "ok  $file (already there)"; return
  fi
  mkdir -p "$(dirname "$file")"
  curl -fL --retry 3 -o "$file.part" "$url" || die "cannot download $url"
  verify "$file.part" "$sha"
  mv "$file.part" "$file"
}

fetch_model() {
  fetch "$MODEL_URL" "$dest/models/yolox_nano.onnx" "$MODEL_SHA"
}

frames_to_video() {  # frames_to_video IMG_DIR OUT FPS: the TUD clips ship as JPEG frames
  "$python" - "$1" "$2" "$3" <<'EOF'
import sys, glob, cv2
frames = sorted(glob.glob(sys.argv[1] + "/*.jpg"))
first = cv2.imread(frames[0])
out = cv2.VideoWriter(sys.argv[2], cv2.VideoWriter_fourcc(*"mp4v"), float(sys.argv[3]), first.shape[1::-1])
for f in frames:
    out.write(cv2.imread(f))
out.release()
EOF
}

fetch_footage() {
  fetch "$PETS_URL" "$dest/footage/PETS09-S2L1/PETS09-S2L1.avi" "$PETS_SHA"
  local tmp; tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  curl -fL --retry 3 -o "$tmp/MOT15.zip" "$MOT15_URL" || die "cannot download $MOT15_URL"
  for seq in PETS09-S2L1 TUD-Campus TUD-Stadtmitte; do
    local d="$dest/footage/$seq"
    mkdir -p "$d"
    unzip -q -o "$tmp/MOT15.zip" "MOT15/train/$seq/*" -d "$tmp"
    cp "$tmp/MOT15/train/$seq/gt/gt.txt" "$d/gt.txt"
    cp "$tmp/MOT15/train/$seq/seqinfo.ini" "$d/seqinfo.ini" 2>/dev/null || true
    verify "$d/gt.txt" "${GT_SHA[$seq]}"
    if [ "$seq" != PETS09-S2L1 ]; then  # re-encoded here, so no fixed hash for the video
      frames_to_video "$tmp/MOT15/train/$seq/img1" "$d/$seq.mp4" 25
      echo "ok  $d/$seq.mp4 (encoded from MOT15 frames)"
    fi
  done
}

case "$what" in
  model) fetch_model ;;
  footage) fetch_footage ;;
  all) fetch_model; fetch_footage ;;
  *) die "usage: $0 [all|model|footage]" ;;
esac
