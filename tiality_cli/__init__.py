"""tiality: live audio from a robot to its operator."""
