"""Which layers are quantized, and how. Imports go one way:
patterns.py (the pattern language; regexes through regex_engine.py, bounded in time) ->
actions.py (what a line asks for: keep / weights-only / quantize) -> layers.py (a model's Linear
layers) -> plan.py (`build_plan`: one decision per layer) -> user_text.py (the `# auto` text users
type) -> checkpoint_plan.py (`plan_checkpoint`: a file's plan with its notes and refusals, the one
entry the loader, the web preview and the CLI call)."""
