#!/usr/bin/env bash
# Headless Chromium and its WebDriver for the chat-page browser test (tests/test_chat_page.py).
# Idempotent: does nothing when both are already installed. Needs root or passwordless sudo.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
chromium --version
chromedriver --version
