"""The recipes, installed as the package tinycnn.recipes (console scripts tinycnn-train, ...)."""
