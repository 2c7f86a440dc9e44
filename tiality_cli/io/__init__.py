"""Sources, sinks and sound-device backends (ALSA, PortAudio, files)."""
