#!/usr/bin/env bash
# Installs the Debian / Raspberry Pi OS packages tiality needs, or prints the command to do so.
# Usage: scripts/sysdeps.sh run|test      (test adds the virtual sound card, PulseAudio + ALSA pulse plugin, and
# a virtual X server with Tk for the GUI example: xvfb, xauth, python3-tk)
set -euo pipefail
run_pkgs=(python3 python3-venv python3-dev gcc libopus0 libportaudio2 libasound2-dev libsamplerate0)
test_pkgs=(pulseaudio pulseaudio-utils libasound2-plugins alsa-utils sox opus-tools ffmpeg openssl systemd xvfb xauth python3-tk)
want=("${run_pkgs[@]}")
[ "${1:-run}" = test ] && want+=("${test_pkgs[@]}")
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "tiality: missing system packages (${missing[*]}); install their equivalents with your package manager" >&2
  exit 1
fi
if [ "$(id -u)" -eq 0 ]; then sudo=(); elif sudo -n true 2>/dev/null; then sudo=(sudo -n); else
  echo "tiality: missing system packages; run this, then try again:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "tiality: installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
