#!/usr/bin/env bash
# The documentation checks: build the site with `mkdocs build --strict` (every page, every
# `:::` API block and every cross-reference must resolve), then execute every notebook in
# notebooks/ with nbmake, in fast mode (EQX_VISION_FAST=1: fewer epochs and steps).
# Needs the docs extra: pip install -e ".[docs]"
set -euo pipefail
cd "$(dirname "$0")/.."

site_dir="$(mktemp -d)"
trap 'rm -rf "$site_dir"' EXIT

start=$(date +%s)
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir "$site_dir"
echo "docs: mkdocs build --strict took $(( $(date +%s) - start )) s"

start=$(date +%s)
EQX_VISION_FAST=1 python -m pytest --nbmake notebooks/ -q -p no:cacheprovider
echo "docs: notebooks took $(( $(date +%s) - start )) s"
