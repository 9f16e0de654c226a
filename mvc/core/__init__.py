"""Infrastructure every stage stands on: user errors, atomic files and logging (`utils`), seeds, registries,
run paths, checkpoints, accelerate at the edge (`distributed`), speed levers (`perf`), LR schedules, the typed
config and `start_stage`. Nothing here imports anything above it."""
