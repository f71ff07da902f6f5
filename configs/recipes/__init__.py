"""Fine-tuning recipes, bundled so that `recipe=NAME` works from any folder (docs/recipes.md)."""
