"""Which layers are quantized: the ignore-pattern language (patterns.py) and the plan built from a
model's Linear layers, its family's defaults and the user's text (plan.py). The loader, the web
preview and the CLI all call `build_plan`."""
