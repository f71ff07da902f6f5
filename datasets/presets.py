"""The D4RL dataset presets, importable without torch (the config validates against them)."""

RANDOM = "random"
PRESETS = ("random", "medium", "expert", "medium-replay", "medium-expert")
NUM_POLICIES = {"random": 1, "medium": 1, "expert": 1, "medium-expert": 2}
