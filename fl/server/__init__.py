"""The coordinator's side of a run: the ServerApp, the round loop, the simulation launcher, the
run folder and progress display."""
