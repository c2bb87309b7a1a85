#!/usr/bin/env bash
# Install what the tests need on a Debian machine, as root; run again, it installs nothing new.
set -euo pipefail
cd "$(dirname "$0")"
pip install -r requirements.txt
# the browser test of app.py drives a real headless Chromium; the caption metrics run on Java
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v java >/dev/null || missing+=(default-jre-headless)
if ((${#missing[@]})); then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi
