"""Commands a person runs anywhere: `clawbot bench` (bench) and `clawbot make-model` (modelgen)."""
