"""The D4RL dataset presets, importable without torch (the config validates against them)."""

RANDOM = "random"
# D4RL's five, and `final`: the behaviour policy at the end of its training, as the seed recorded it.
PRESETS = ("random", "medium", "expert", "medium-replay", "medium-expert", "final")
NUM_POLICIES = {"random": 1, "medium": 1, "expert": 1, "medium-expert": 2, "final": 1}
