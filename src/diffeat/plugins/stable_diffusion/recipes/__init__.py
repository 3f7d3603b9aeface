"""The ``stable-diffusion`` extractor's modes, one recipe each (``mode`` picks one)."""

from __future__ import annotations

from diffeat.plugins.stable_diffusion.recipes.add_noise import AddNoise
from diffeat.plugins.stable_diffusion.recipes.base import DdimRecipe, Recipe
from diffeat.plugins.stable_diffusion.recipes.clean import Clean
from diffeat.plugins.stable_diffusion.recipes.generation import Generation
from diffeat.plugins.stable_diffusion.recipes.inversion import Inversion

#: the recipe class of each ``mode`` value
RECIPES: dict[str, type[Recipe]] = {r.mode: r for r in (AddNoise, Inversion, Generation, Clean)}


def recipe_for(mode: str) -> Recipe:
    """A recipe of ``mode`` (one of :data:`RECIPES`); each extractor holds its own."""
    try:
        return RECIPES[mode]()
    except KeyError:
        raise ValueError(f"mode must be one of {', '.join(RECIPES)}, got {mode!r}") from None


__all__ = [
    "RECIPES",
    "AddNoise",
    "Clean",
    "DdimRecipe",
    "Generation",
    "Inversion",
    "Recipe",
    "recipe_for",
]
