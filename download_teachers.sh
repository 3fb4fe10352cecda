#!/usr/bin/env bash
# Fetch teachers into $GTE_HOME/teachers (SHA-256 verified, cached as safetensors): `gte fetch-teachers "$@"`.
# Without teacher names it fetches the paper's teachers; options pass through, e.g.
#   ./download_teachers.sh --mirror /shared/bcos-weights        # air-gapped: a directory with the release files
#   ./download_teachers.sh bcos_resnet50 --dest /data/teachers
# `gte fetch-teachers` with no names fetches the whole catalog; `gte fetch-teachers --list` shows it.
set -euo pipefail

has_name=0
skip=0
for arg in "$@"; do
    if [ "$skip" -eq 1 ]; then skip=0; continue; fi
    case "$arg" in
        --mirror|--dest) skip=1 ;;   # their value is not a teacher name
        -*) ;;
        *) has_name=1 ;;
    esac
done
if [ "$has_name" -eq 0 ]; then
    set -- "$@" bcos_densenet169 bcos_resnet34 resnet34
fi

if command -v gte >/dev/null 2>&1; then
    exec gte fetch-teachers "$@"
fi
exec python3 -m gte fetch-teachers "$@"
